"""The RTSP path against a real RTSP server (GStreamer's, standing in for an IP camera): stream copy, and the
camera vanishing mid-recording and coming back."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.recorder import BACKOFF_CAP
from edge_agent.spool import Journal, probe_segment
from exam_contract.manifest import Manifest
from exam_contract.signing import load_private_key
from tests.conftest import _unavailable
from tests.edge.conftest import Cam, write_config
from tests.support.pipeline import wait_until
from tests.support.rtsp import RtspCamera, rtsp_server_problem

pytestmark = [pytest.mark.ffmpeg, pytest.mark.mosquitto]
CAM = "t101-ipc"


@pytest.fixture
def camera(ffmpeg_available: None):
    problem = rtsp_server_problem()
    if problem:
        _unavailable(problem)
    cam = RtspCamera(gop=25)
    cam.start()
    try:
        yield cam
    finally:
        cam.stop()


def ffmpeg_cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_rtsp_camera_recorded_by_stream_copy_survives_the_camera_vanishing(tmp_path: Path, mosquitto,
                                                                           camera: RtspCamera) -> None:
    path = write_config(tmp_path, broker_url=mosquitto.url, cameras=(Cam(id=CAM, source=camera.url),))
    path.write_text(path.read_text() + "\n[health]\nenabled = false\n")
    config = load_config(path)
    key = load_private_key(config.agent.key_file)
    agent = Agent(config, key, drain_seconds=0)
    agent.connect()
    agent.start()
    recorder = agent.recorders.by_camera[CAM]
    try:
        wait_until(lambda: recorder.state == "recording", 30, what="recording")
        cmd = ffmpeg_cmdline(recorder.pid())
        assert cmd[cmd.index("-i") + 1] == camera.url and cmd[cmd.index("-c") + 1] == "copy"
        assert "-rtsp_transport" in cmd and cmd[cmd.index("-rtsp_transport") + 1] == "tcp"
        wait_until(lambda: len(agent.journal.records(CAM)) >= 1, 40, what="first segment")
        camera.stop()  # a power cut a few seconds into the second segment
        # ffmpeg notices, exits, and restarts fail while the camera is away: long enough for the backoff to
        # reach its cap (1 + 2 + 4 + 5 + 5 s)
        wait_until(lambda: recorder.restarts >= 6, 90, what="restart attempts while the camera is away")
        camera.start()
        back = datetime.now(timezone.utc)
        wait_until(lambda: any(r.kind == "gap" for r in agent.journal.records(CAM)), 60, what="the gap record")
        gap_seq = next(r.seq for r in agent.journal.records(CAM) if r.kind == "gap")
        wait_until(lambda: sum(r.kind == "segment" and r.seq > gap_seq for r in agent.journal.records(CAM)) >= 1,
                   60, what="a segment after the camera came back")
        resumed = Manifest.from_dict(agent.journal.records(CAM)[gap_seq].manifest_raw).start
        # Retried at least every BACKOFF_CAP: recording resumes within that of the camera's return, plus the
        # time an RTSP session and ffmpeg take to start (a 30 s cap left a 22 s wait here).
        assert resumed - back < timedelta(seconds=BACKOFF_CAP + 5), (back, resumed)
    finally:
        agent.stop()

    journal = Journal(config.agent.journal_path)
    try:
        records = journal.records(CAM)
        ms = [Manifest.from_dict(r.manifest_raw) for r in records]
        assert [m.seq for m in ms] == list(range(1, len(ms) + 1))
        gaps = [m for m in ms if m.kind == "gap"]
        assert len(gaps) == 1 and gaps[0].cause == "camera_unreachable", [(m.kind, m.cause, m.detail) for m in ms]
        gap = gaps[0]
        before, after = ms[gap.seq - 2], ms[gap.seq]
        assert before.kind == "segment" and after.kind == "segment"
        assert gap.start == before.end and gap.end == after.start and gap.end > gap.start
        for m, r in zip(ms, records):
            if m.kind == "segment":
                probe = probe_segment(r.path)
                assert probe.video.codec == "h264" and (probe.video.width, probe.video.height) == (640, 360)
                assert m.video == probe.video
                assert abs(m.duration - probe.duration) <= 1 / probe.video.fps + 0.001, (m.duration, probe.duration)
        for a, b in zip(ms, ms[1:]):
            assert b.prev == a.record_hash()
    finally:
        journal.close()

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
from tests.support.services import free_port

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
        # the outage is stated while it lasts, not only once the camera is back
        wait_until(lambda: any(r.kind == "gap" for r in agent.journal.records(CAM)), 30,
                   what="a gap record while the camera is still away")
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
        # one outage, stated as consecutive gap records that tile it exactly
        assert len(gaps) >= 2 and {g.cause for g in gaps} == {"camera_unreachable"}, \
            [(m.kind, m.cause, m.detail) for m in ms]
        assert [g.seq for g in gaps] == list(range(gaps[0].seq, gaps[-1].seq + 1))
        before, after = ms[gaps[0].seq - 2], ms[gaps[-1].seq]
        assert before.kind == "segment" and after.kind == "segment"
        assert gaps[0].start == before.end and gaps[-1].end == after.start
        assert all(a.end == b.start for a, b in zip(gaps, gaps[1:])) and all(g.end > g.start for g in gaps)
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


def test_a_camera_dark_from_the_agents_start_is_stated_as_gaps_while_it_stays_dark(tmp_path: Path, mosquitto,
                                                                                  ffmpeg_available: None) -> None:
    """A camera whose RTSP port refuses from the start (an unplugged camera at install time): the agent seals
    camera_unreachable gap records from its start on, at least every segment length, continuing the chain,
    while the camera is still down; no footage, nothing else."""
    dead = f"rtsp://127.0.0.1:{free_port()}/stream"
    path = write_config(tmp_path, broker_url=mosquitto.url, cameras=(Cam(id=CAM, source=dead),))
    config = load_config(path)
    agent = Agent(config, load_private_key(config.agent.key_file), drain_seconds=0)
    started = datetime.now(timezone.utc)
    agent.connect()
    agent.start()
    try:
        wait_until(lambda: len(agent.journal.records(CAM)) >= 2, 60, what="two gap records while the camera is dark")
        ms = [Manifest.from_dict(r.manifest_raw) for r in agent.journal.records(CAM)]
    finally:
        agent.stop()
    assert {m.kind for m in ms} == {"gap"} and {m.cause for m in ms} == {"camera_unreachable"}
    assert [m.seq for m in ms] == list(range(1, len(ms) + 1))
    assert all(b.prev == a.record_hash() and a.end == b.start for a, b in zip(ms, ms[1:]))
    assert abs((ms[0].start - started).total_seconds()) < 5     # from the agent's start, not from nowhere
    assert all((m.end - m.start).total_seconds() >= 10 for m in ms)   # each at least a segment long

"""Camera passwords stay out of gap records, agent logs, status.json and `exam-edge probe`, with real ffmpeg
(which names its input URL, password included, in its messages) and a real RTSP camera stand-in."""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.config import EdgeConfig, load_config
from edge_agent.spool import Journal
from exam_contract.signing import load_private_key
from tests.conftest import _unavailable
from tests.edge.conftest import Cam, write_config
from tests.support.pipeline import run_cli, wait_until
from tests.support.rtsp import RtspCamera, rtsp_server_problem
from tests.support.services import free_port

pytestmark = pytest.mark.ffmpeg
CAM = "t101-ipc"
PASSWORD = "S3cretPw!"


def edge_config(tmp_path: Path, *cameras: Cam) -> EdgeConfig:
    path = write_config(tmp_path, cameras=cameras)
    path.write_text(path.read_text() + "\n[health]\nenabled = false\n")
    return load_config(path)


def manifests(config: EdgeConfig) -> list[str]:
    journal = Journal(config.agent.journal_path)
    try:
        return [record.manifest_json for record in journal.records()]
    finally:
        journal.close()


def status_json(config: EdgeConfig) -> str:
    return (config.agent.data_dir / "status.json").read_text(encoding="utf-8")


@pytest.fixture
def locked_camera(ffmpeg_available: None) -> Iterator[RtspCamera]:
    """A GStreamer RTSP camera that wants admin:S3cretPw!."""
    problem = rtsp_server_problem()
    if problem:
        _unavailable(problem)
    camera = RtspCamera(path="/stream", user=f"admin:{PASSWORD}")
    camera.start()
    try:
        yield camera
    finally:
        camera.stop()


def test_an_unreachable_camera_leaves_no_password_in_logs_or_status(tmp_path: Path, ffmpeg_available: None,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()
    config = edge_config(tmp_path, Cam(id=CAM, source=f"rtsp://admin:{PASSWORD}@127.0.0.1:{port}/stream"))
    agent = Agent(config, load_private_key(config.agent.key_file), drain_seconds=0)
    agent.start()
    recorder = agent.recorders.by_camera[CAM]
    try:
        wait_until(lambda: recorder.restarts >= 2, 20, what="two failed ffmpeg runs")
    finally:
        agent.stop()

    assert not any(PASSWORD in manifest for manifest in manifests(config))
    assert PASSWORD not in caplog.text
    # ffmpeg's own error line, kept with the host
    assert f"rtsp://***@127.0.0.1:{port}/stream: Connection refused" in caplog.text
    assert PASSWORD not in status_json(config)


def test_a_camera_that_hangs_while_recording_leaves_no_password_in_its_gap_record(
        tmp_path: Path, locked_camera: RtspCamera, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    config = edge_config(tmp_path, Cam(id=CAM, source=locked_camera.url_with(f"admin:{PASSWORD}")))
    agent = Agent(config, load_private_key(config.agent.key_file), drain_seconds=0)
    agent.start()
    recorder = agent.recorders.by_camera[CAM]
    try:
        wait_until(lambda: recorder.state == "recording", 20, what="recording")
        # A hung camera: ffmpeg gives up after its I/O timeout with `URL: Connection timed out`, which
        # becomes the outage's detail; the camera then vanishes, so the restarts are refused.
        assert locked_camera.process is not None
        locked_camera.process.send_signal(signal.SIGSTOP)
        wait_until(lambda: agent.sealer.pending_outage(CAM) == "camera_unreachable", 40, what="the outage")
        locked_camera.stop()
        restarts = recorder.restarts
        wait_until(lambda: recorder.restarts > restarts, 20, what="a refused restart")
    finally:
        agent.stop()  # states the open outage as a gap record

    journaled = manifests(config)
    gaps = [manifest for manifest in journaled if '"kind":"gap"' in manifest]
    assert len(gaps) == 1
    assert f"rtsp://***@127.0.0.1:{locked_camera.port}/stream: Connection timed out" in gaps[0]
    assert not any(PASSWORD in manifest for manifest in journaled)
    assert PASSWORD not in caplog.text
    assert f"from 'rtsp://***@127.0.0.1:{locked_camera.port}/stream'" in caplog.text  # ffmpeg's input line
    assert PASSWORD not in status_json(config)


def test_probe_output_has_no_password(tmp_path: Path, ffmpeg_available: None) -> None:
    refused = free_port()
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        listening = silent.getsockname()[1]
        config_path = write_config(tmp_path, cameras=(
            Cam(id="t101-off", source=f"rtsp://admin:{PASSWORD}@127.0.0.1:{refused}/stream"),
            # an unencoded `#` ends the URL's authority: ffmpeg cannot parse it and quotes it whole
            Cam(id="t101-hash", source=f"rtsp://admin:{PASSWORD}#1@127.0.0.1:{listening}/stream"),
        ))
        result = run_cli("exam-edge", "--config", str(config_path), "probe", "--timeout", "3", check=False)

    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert PASSWORD not in output
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line}
    assert f"FAIL unreachable: 127.0.0.1:{refused} refused the connection" in rows["t101-off"]
    assert f"FAIL cannot open source: rtsp://***@127.0.0.1:{listening}/stream" in rows["t101-hash"]

"""`exam-edge probe` against real sources: lavfi, files, GStreamer RTSP stand-ins (open and with a password),
a closed port and a server that accepts connections but never answers."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest

from edge_agent.config import load_config
from edge_agent.health import reference_path
from edge_agent.probe import classify_failure
from tests.conftest import _unavailable
from tests.edge.conftest import Cam, write_config
from tests.support.pipeline import run_cli
from tests.support.rtsp import RtspCamera, rtsp_server_problem
from tests.support.services import free_port, lavfi_source

pytestmark = pytest.mark.ffmpeg
URL = "rtsp://192.168.1.64:554/Streaming/Channels/101"


@pytest.mark.parametrize("stderr, reason", [
    ("[rtsp @ 0x1] method DESCRIBE failed: 401 Unauthorized\nrtsp://x: Server returned 401 Unauthorized",
     "auth failure (401)"),
    ("method DESCRIBE failed: 404 Not Found", "stream path not found (404)"),
    ("Connection to tcp://192.168.1.64:554?timeout=0 failed: Connection refused",
     "unreachable: 192.168.1.64:554 refused the connection"),
    ("Connection to tcp://192.168.1.64:554 failed: No route to host", "unreachable: no route to 192.168.1.64:554"),
    ("rtsp://x: Invalid data found when processing input", "not a video stream"),
    ("something new and strange", "cannot open source: something new and strange"),
])
def test_ffmpeg_messages_become_technician_reasons(stderr: str, reason: str) -> None:
    assert classify_failure(stderr, URL).startswith(reason)


def test_a_server_that_never_answers_is_a_timeout() -> None:
    reason = classify_failure("rtsp://x: Invalid data found when processing input", URL, waited_out=True)
    assert reason.startswith("timeout: 192.168.1.64:554 accepted the connection but sent no answer")


@pytest.fixture(scope="module")
def rtsp_ready() -> None:
    problem = rtsp_server_problem()
    if problem:
        _unavailable(problem)


@pytest.fixture
def cameras(rtsp_ready) -> Iterator[tuple[RtspCamera, RtspCamera]]:
    open_cam, locked_cam = RtspCamera(), RtspCamera(user="tech:s3cret")
    open_cam.start()
    try:
        locked_cam.start()
        yield open_cam, locked_cam
    finally:
        open_cam.stop()
        locked_cam.stop()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts TCP connections and never says a word (a hung camera)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@pytest.fixture
def audio_only(tmp_path: Path, ffmpeg_available: None) -> Path:
    path = tmp_path / "audio-only.ts"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=440",
                    "-t", "2", "-c:a", "mp2", "-f", "mpegts", str(path)], check=True)
    return path


def table_rows(stdout: str) -> dict[str, str]:
    rows = {}
    for line in stdout.splitlines()[1:]:
        if line and not line.startswith(("snapshot ", "reference view ")):
            rows[line.split()[0]] = line
    return rows


def test_probe_reports_each_camera_and_fails_with_clear_reasons(tmp_path: Path, cameras, silent_server: int,
                                                                audio_only: Path) -> None:
    open_cam, locked_cam = cameras
    config_path = write_config(tmp_path, cameras=(
        Cam(id="t101-front", source=lavfi_source(size="640x360")),
        Cam(id="t101-rtsp", source=open_cam.url),
        Cam(id="t101-locked", source=locked_cam.url_with("tech:wrong")),
        Cam(id="t102-off", room="T102", source=f"rtsp://127.0.0.1:{free_port()}/cam"),
        Cam(id="t102-hung", room="T102", source=f"rtsp://127.0.0.1:{silent_server}/cam"),
        Cam(id="t102-audio", room="T102", source=str(audio_only)),
    ))
    result = run_cli("exam-edge", "--config", str(config_path), "probe", "--timeout", "3", check=False)
    assert result.returncode == 1, result.stderr
    rows = table_rows(result.stdout)
    assert rows["t101-front"].split() == ["t101-front", "T101", "rawvideo", "640x360", "25", "69.12", "Mbit/s", "OK"]
    assert "h264" in rows["t101-rtsp"] and "640x360" in rows["t101-rtsp"] and rows["t101-rtsp"].endswith("OK")
    assert "kbit/s" in rows["t101-rtsp"] or "Mbit/s" in rows["t101-rtsp"]
    assert "FAIL auth failure (401)" in rows["t101-locked"]
    assert "FAIL unreachable: 127.0.0.1:" in rows["t102-off"] and "refused the connection" in rows["t102-off"]
    assert f"FAIL timeout: 127.0.0.1:{silent_server} accepted the connection" in rows["t102-hung"]
    assert "FAIL no video stream" in rows["t102-audio"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("exam-edge: error:")]
    assert errors == ["exam-edge: error: 4 of 6 camera(s) failed (t101-locked, t102-off, t102-hung, t102-audio): "
                      "fix what the table says and run `exam-edge probe` again"]
    config = load_config(config_path)
    for cam in ("t101-front", "t101-rtsp"):
        snapshot = cv2.imread(str(config.agent.snapshot_dir / f"{cam}.jpg"))
        assert snapshot is not None and snapshot.shape == (360, 640, 3)
    assert not (config.agent.snapshot_dir / "t101-locked.jpg").exists()


def test_probe_all_ok_sets_reference_views(tmp_path: Path, cameras) -> None:
    open_cam, locked_cam = cameras
    config_path = write_config(tmp_path, cameras=(
        Cam(id="t101-rtsp", source=open_cam.url),
        Cam(id="t101-locked", source=locked_cam.url_with("tech:s3cret")),
    ))
    result = run_cli("exam-edge", "--config", str(config_path), "probe", "--set-reference")
    assert all(row.endswith("OK") for row in table_rows(result.stdout).values())
    config = load_config(config_path)
    for cam in ("t101-rtsp", "t101-locked"):
        reference = cv2.imread(str(reference_path(config, cam)), cv2.IMREAD_GRAYSCALE)
        assert reference is not None and reference.shape == (180, 320)


def test_probe_of_an_unknown_camera_is_bad_input(tmp_path: Path, ffmpeg_available: None) -> None:
    config_path = write_config(tmp_path)
    result = run_cli("exam-edge", "--config", str(config_path), "probe", "--camera", "nope", check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "exam-edge: error: --camera nope is not configured: use one of t101-front"

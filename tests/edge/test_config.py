"""Config validation and the CLI's one-line errors and exit codes."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.config import ConfigError, load_config
from tests.edge.conftest import Cam, write_config
from tests.support.services import free_port

EXE = str(Path(sys.executable).parent / "exam-edge")


def edge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("exam-edge: error: ")
    for needle in needles:
        assert needle in lines[0]


def assert_error_line(result: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    """stderr is exactly `exam-edge: error: MESSAGE` and nothing else."""
    assert result.returncode == code, result.stderr
    assert result.stderr == f"exam-edge: error: {message}\n"


def test_valid_config_loads(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, cameras=(Cam(), Cam(id="t101-back"))))
    assert config.agent.id == "jl2201001-01-a"
    assert config.mqtt.host == "127.0.0.1" and config.mqtt.port == 1 and not config.mqtt.tls
    assert config.mqtt.password_file is None
    assert config.recording.segment_seconds == 10
    assert [c.id for c in config.cameras] == ["t101-front", "t101-back"]
    assert config.cameras[0].source_kind == "lavfi"


def test_defaults_and_mqtts_port(tmp_path: Path) -> None:
    path = write_config(tmp_path, broker_url="mqtts://collector.example.cn")
    path.write_text(path.read_text().replace("segment_seconds = 10\n", ""))
    config = load_config(path)
    assert config.recording.segment_seconds == 60
    assert config.mqtt.port == 8883 and config.mqtt.tls


@pytest.mark.parametrize("old,new,needle", [
    ("segment_seconds = 10", "segment_seconds = 5", "[recording] segment_seconds"),
    ("segment_seconds = 10", "segment_seconds = 301", "[recording] segment_seconds"),
    ("segment_seconds = 10", 'segment_seconds = "ten"', "[recording] segment_seconds"),
    ('room_kind = "theory"', 'room_kind = "lab"', "room_kind"),
    ('url = "mqtt://127.0.0.1:1"', 'url = "http://127.0.0.1:1"', "[mqtt] url"),
    ('id = "jl2201001-01-a"', 'id = "a/b"', "[agent] id"),
    ('institution = "JL2201001"\n', "", "[agent] institution"),
    ('username = "jl2201001-01-a"', 'password_file = "/nonexistent/mqtt.pass"', "[mqtt] password_file"),
    ("[recording]", "[recordings]", "[recordings]"),
])
def test_bad_key_is_named(tmp_path: Path, old: str, new: str, needle: str) -> None:
    path = write_config(tmp_path)
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in str(info.value)
    assert ":" in str(info.value) or "; did you mean " in str(info.value)  # what is wrong: how to fix


def test_duplicate_camera_ids(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="used twice"):
        load_config(write_config(tmp_path, cameras=(Cam(), Cam())))


@pytest.mark.parametrize("source", ["http://cam/stream", "/no/such/file.mp4", "/dev/sda", "lavfi:"])
def test_unknown_camera_source(tmp_path: Path, source: str) -> None:
    with pytest.raises(ConfigError, match=r"\[camera t101-front\] source"):
        load_config(write_config(tmp_path, cameras=(Cam(source=source),)))


def test_existing_file_source_is_accepted(tmp_path: Path) -> None:
    video = tmp_path / "clip.ts"
    video.write_bytes(b"\0")
    config = load_config(write_config(tmp_path, cameras=(Cam(source=str(video)),)))
    assert config.cameras[0].source_kind == "file"


def test_cli_bad_config_one_line_exit_1(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("segment_seconds = 10", "segment_seconds = 5"))
    assert_error_line(edge("--config", str(path), "run"), 1,
                      "[recording] segment_seconds = 5 is out of range 10..300: set a value between 10 and 300")
    missing = tmp_path / "missing.toml"
    assert_error_line(edge("--config", str(missing), "pubkey"), 1,
                      f"config file {missing} does not exist: create it with `exam-edge --config {missing} init ...` "
                      "or pass --config / EXAM_EDGE_CONFIG")
    (tmp_path / "broken.toml").write_text("[agent\n")
    assert_one_line_error(edge("--config", str(tmp_path / "broken.toml"), "run"), 1, "not valid TOML")


def test_cli_unknown_source_exit_1(tmp_path: Path) -> None:
    path = write_config(tmp_path, cameras=(Cam(source="ftp://camera/1"),))
    assert_one_line_error(edge("--config", str(path), "run"), 1, "[camera t101-front] source")


def test_cli_unreadable_key_exit_1(tmp_path: Path) -> None:
    path = write_config(tmp_path, make_key=False)
    assert_one_line_error(edge("--config", str(path), "run"), 1, "[agent] key_file")
    (tmp_path / "agent.key").write_text("not a key\n")
    assert_one_line_error(edge("--config", str(path), "pubkey"), 1, "[agent] key_file", "PEM")


def test_cli_unreachable_broker_exit_2(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(tmp_path, broker_url=f"mqtt://127.0.0.1:{port}")
    result = edge("run", "--duration", "5", env={"EXAM_EDGE_CONFIG": str(path)})
    assert_error_line(result, 2, f"MQTT broker 127.0.0.1:{port} is unreachable (Connection refused): start it or "
                                 "fix [mqtt] url")
    assert not any((tmp_path / "data" / "recording").glob("*/*.ts"))  # no camera was started


def test_cli_unreadable_mqtt_password_file_exit_1(tmp_path: Path) -> None:
    """A password_file that exists (checked at load) but cannot be read as text: one line, no traceback, no
    camera started."""
    path = write_config(tmp_path)
    secret = tmp_path / "mqtt.pass"
    secret.write_bytes(b"\xff\xfesecret\n")
    path.write_text(path.read_text().replace("[mqtt]\n", f'[mqtt]\npassword_file = "{secret}"\n', 1))
    assert_error_line(edge("--config", str(path), "run", "--duration", "5"), 1,
                      f"[mqtt] password_file = '{secret.resolve()}' cannot be read (not UTF-8 text): save the "
                      "password in it as UTF-8 text")
    assert not any((tmp_path / "data" / "recording").glob("*/*.ts"))


def test_cli_usage_error_is_exit_1(tmp_path: Path) -> None:
    assert_one_line_error(edge("--config", str(tmp_path / "x.toml"), "nosuchcommand"), 1)


def test_init_pubkey_and_refusal_to_overwrite(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "edge.toml"
    args = ["--config", str(config), "init", "--agent", "jl2201001-01-a", "--institution", "JL2201001",
            "--venue", "JL2201001-01", "--broker", "mqtt://127.0.0.1:1883", "--data-dir", str(tmp_path / "data"),
            "--key-file", str(tmp_path / "keys" / "agent.key")]
    result = edge(*args)
    assert result.returncode == 0, result.stderr
    key = tmp_path / "keys" / "agent.key"
    assert key.stat().st_mode & 0o777 == 0o600
    loaded = load_config(config)
    assert loaded.cameras == () and loaded.recording.segment_seconds == 60
    assert "# [[camera]]" in config.read_text()
    pub = edge("--config", str(config), "pubkey")
    assert pub.returncode == 0 and len(base64.b64decode(pub.stdout.strip())) == 32
    assert_one_line_error(edge(*args), 1, "already exists")
    no_camera = edge("--config", str(config), "run")
    assert_one_line_error(no_camera, 1, "[[camera]]")


UPLOAD = """
[upload]
max_kbps = 8000
[[upload.schedule]]
from = "22:00"   # Asia/Shanghai wall clock
to = "06:00"
max_kbps = 0
[[upload.schedule]]
from = "12:00"
to = "13:00"
max_kbps = 2000
"""


def test_upload_cap_and_schedule(tmp_path: Path) -> None:
    from datetime import time

    from edge_agent.ratecap import CapWindow

    plain = load_config(write_config(tmp_path / "a"))
    assert plain.upload.max_kbps == 0 and plain.upload.schedule == ()   # unlimited unless configured
    path = write_config(tmp_path / "b")
    path.write_text(path.read_text() + UPLOAD)
    config = load_config(path)
    assert config.upload.max_kbps == 8000
    assert config.upload.schedule == (CapWindow(time(22, 0), time(6, 0), 0), CapWindow(time(12, 0), time(13, 0), 2000))


@pytest.mark.parametrize("old,new,needles", [
    ("max_kbps = 8000", "max_kbps = -1", ("[upload] max_kbps = -1", "between 0 and")),
    ("max_kbps = 8000", 'max_kbps = "8M"', ("[upload] max_kbps = '8M'", "whole number of kbit/s")),
    ('from = "22:00"', 'from = "22h"', ("[upload.schedule #1] from = '22h'", '"HH:MM"')),
    ('to = "13:00"', 'to = "24:00"', ("[upload.schedule #2] to = '24:00'", '"HH:MM"')),
    ("max_kbps = 2000", "max_kbps = -5", ("[upload.schedule #2] max_kbps = -5",)),
    ("max_kbps = 2000", "", ("[upload.schedule #2] max_kbps is missing",)),
    ('from = "12:00"', 'from = "05:00"', ("#1] (22:00-06:00) and [upload.schedule #2] (05:00-13:00) overlap",
                                          "no minute is in two windows")),
    ('to = "13:00"', 'to = "12:00"', ("from and to are both '12:00'",)),
    ('to = "06:00"', 'to = "06:00"\nuntil = "07:00"', ("[upload.schedule #1] until is not a known key",)),
])
def test_bad_upload_config_names_the_key_and_the_fix(tmp_path: Path, old: str, new: str,
                                                      needles: tuple[str, ...]) -> None:
    path = write_config(tmp_path)
    path.write_text(path.read_text() + UPLOAD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    for needle in needles:
        assert needle in str(info.value)

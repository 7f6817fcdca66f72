"""The edge config (TOML; every key in docs/config.md) as frozen dataclasses."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exam_contract import tomlconfig as toml
from exam_contract.manifest import ROOM_KINDS
from exam_contract.mqtt import MqttSettings, parse_mqtt_table
from exam_contract.redact import redact_source
from exam_contract.tomlconfig import ConfigError

from .ratecap import CapWindow, overlapping, parse_hhmm

SEGMENT_SECONDS_DEFAULT = 60
SEGMENT_SECONDS_RANGE = (10, 300)
LOCAL_KEEP_DAYS_DEFAULT = 7
MIN_FREE_MB_DEFAULT = 1024
MAX_BATCH_FIRST_MINUTES_DEFAULT = 30
MAX_BATCH_FIRST_MINUTES_RANGE = (1, 24 * 60)
MAX_KBPS_LIMIT = 100_000_000   # 100 Gbit/s: anything above is a typo

# Camera and agent ids end up in file names and MQTT topics: no '/', '+', '#', '@' or spaces.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class AgentConfig:
    id: str
    institution: str
    venue: str
    data_dir: Path
    key_file: Path
    local_keep_days: int = LOCAL_KEEP_DAYS_DEFAULT
    # Disk budget (issue 3): below this much free space on data_dir's filesystem acknowledged footage is
    # deleted oldest first, even within local_keep_days; below half of it the cameras stop (disk_full).
    min_free_mb: int = MIN_FREE_MB_DEFAULT

    @property
    def recording_dir(self) -> Path:
        return self.data_dir / "recording"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def corrupt_dir(self) -> Path:
        return self.data_dir / "corrupt"

    @property
    def journal_path(self) -> Path:
        return self.data_dir / "journal.sqlite"

    @property
    def thumbnail_dir(self) -> Path:
        return self.data_dir / "thumbnails"

    @property
    def reference_dir(self) -> Path:
        return self.data_dir / "reference"

    @property
    def snapshot_dir(self) -> Path:
        return self.data_dir / "snapshots"


@dataclass(frozen=True)
class HealthConfig:
    """[health]: keyframe analysis of each finished segment (flags in the manifest's `health`)."""

    enabled: bool = True


@dataclass(frozen=True)
class RecordingConfig:
    segment_seconds: int = SEGMENT_SECONDS_DEFAULT


@dataclass(frozen=True)
class UploadConfig:
    """[upload]: the cap on the bytes the uploader publishes, in kbit/s (0 = unlimited), and the daily windows
    ([[upload.schedule]], Asia/Shanghai wall clock) with another cap."""

    max_kbps: int = 0
    schedule: tuple[CapWindow, ...] = ()
    # Batch-first order (edge_agent/upload_order.py): footage of the collector's batch windows goes first, but
    # the oldest other record gets the next free slot once it has been passed over this long.
    max_batch_first_minutes: int = MAX_BATCH_FIRST_MINUTES_DEFAULT


@dataclass(frozen=True)
class CameraConfig:
    id: str
    room: str
    room_kind: str
    source: str

    @property
    def source_kind(self) -> str:
        return source_kind(self.source)


@dataclass(frozen=True)
class EdgeConfig:
    path: Path
    agent: AgentConfig
    mqtt: MqttSettings
    recording: RecordingConfig
    cameras: tuple[CameraConfig, ...]
    health: HealthConfig = HealthConfig()
    upload: UploadConfig = UploadConfig()

    def camera(self, camera_id: str) -> CameraConfig:
        for cam in self.cameras:
            if cam.id == camera_id:
                return cam
        raise KeyError(camera_id)


def source_kind(source: str) -> str:
    """`rtsp`, `v4l2`, `lavfi` or `file`; raises ConfigError for anything else."""
    if source.startswith(("rtsp://", "rtsps://")):
        return "rtsp"
    if source.startswith("lavfi:") and len(source) > len("lavfi:"):
        return "lavfi"
    if re.fullmatch(r"/dev/video\d+", source):
        return "v4l2"
    if source and Path(source).is_file():
        return "file"
    raise ValueError(source)


def load_config(path: Path | str) -> EdgeConfig:
    path = Path(path)
    raw = toml.load_file(path, f"create it with `exam-edge --config {path} init ...` or pass --config / "
                               "EXAM_EDGE_CONFIG")
    return parse_config(raw, base_dir=path.resolve().parent, path=path)


def parse_config(raw: dict[str, Any], base_dir: Path, path: Path) -> EdgeConfig:
    toml.unknown_sections(raw, {"agent", "mqtt", "recording", "camera", "health", "upload"})
    agent = _agent(_table(raw, "agent"), base_dir)
    mqtt = parse_mqtt_table(_table(raw, "mqtt"), base_dir, files_must_exist=True)
    recording = _recording(_table(raw, "recording", required=False))
    cams_raw = raw.get("camera", [])
    if not isinstance(cams_raw, list):
        raise ConfigError("[[camera]] must be an array of tables: write each camera as a [[camera]] table")
    cameras: list[CameraConfig] = []
    seen: set[str] = set()
    for index, table in enumerate(cams_raw):
        cam = _camera(table, index, base_dir)
        if cam.id in seen:
            raise ConfigError(f"[[camera]] id = {cam.id!r} is used twice: give every camera a unique id")
        seen.add(cam.id)
        cameras.append(cam)
    return EdgeConfig(path=path, agent=agent, mqtt=mqtt, recording=recording, cameras=tuple(cameras),
                      health=_health(_table(raw, "health", required=False)),
                      upload=_upload(_table(raw, "upload", required=False)))


def _table(raw: dict[str, Any], name: str, required: bool = True) -> dict[str, Any]:
    return toml.table(raw, name, required=required, init_command="exam-edge init")


def _str(table: dict[str, Any], section: str, key: str, required: bool = True) -> str | None:
    return toml.string(table, section, key, required=required)


def _ident(table: dict[str, Any], section: str, key: str) -> str:
    value = _str(table, section, key)
    assert value is not None
    if not _ID_RE.match(value):
        raise ConfigError(f"[{section}] {key} = {value!r} has characters other than letters, digits, "
                          "'.', '_' and '-': use only those")
    return value


def _path(table: dict[str, Any], section: str, key: str, base_dir: Path, required: bool = True) -> Path | None:
    return toml.path(table, section, key, base_dir, required=required)


_unknown_keys = toml.unknown_keys


def _agent(table: dict[str, Any], base_dir: Path) -> AgentConfig:
    _unknown_keys(table, "agent", {"id", "institution", "venue", "data_dir", "key_file", "local_keep_days",
                                   "min_free_mb"})
    min_free = table.get("min_free_mb", MIN_FREE_MB_DEFAULT)
    if not isinstance(min_free, int) or isinstance(min_free, bool) or min_free < 1:
        raise ConfigError(f"[agent] min_free_mb = {min_free!r} must be a whole number of MB >= 1: fix it "
                          f"(default {MIN_FREE_MB_DEFAULT})")
    keep = table.get("local_keep_days", LOCAL_KEEP_DAYS_DEFAULT)
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
        raise ConfigError(f"[agent] local_keep_days = {keep!r} must be a whole number of days >= 0: fix it")
    data_dir = _path(table, "agent", "data_dir", base_dir)
    key_file = _path(table, "agent", "key_file", base_dir)
    assert data_dir is not None and key_file is not None
    return AgentConfig(id=_ident(table, "agent", "id"), institution=_ident(table, "agent", "institution"),
                       venue=_ident(table, "agent", "venue"), data_dir=data_dir, key_file=key_file,
                       local_keep_days=keep, min_free_mb=min_free)


def _recording(table: dict[str, Any]) -> RecordingConfig:
    _unknown_keys(table, "recording", {"segment_seconds"})
    low, high = SEGMENT_SECONDS_RANGE
    seconds = toml.integer(table, "recording", "segment_seconds", SEGMENT_SECONDS_DEFAULT, low, high)
    return RecordingConfig(segment_seconds=seconds)


def _health(table: dict[str, Any]) -> HealthConfig:
    _unknown_keys(table, "health", {"enabled"})
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"[health] enabled = {enabled!r} is not a boolean: write enabled = true or enabled = false")
    return HealthConfig(enabled=enabled)


def _kbps(table: dict[str, Any], section: str, default: int | None) -> int:
    if "max_kbps" not in table and default is None:
        raise ConfigError(f"[{section}] max_kbps is missing: set max_kbps = N (kbit/s; 0 = unlimited) in the window")
    value = table.get("max_kbps", default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_KBPS_LIMIT:
        raise ConfigError(f"[{section}] max_kbps = {value!r} must be a whole number of kbit/s between 0 and "
                          f"{MAX_KBPS_LIMIT} (0 = unlimited): fix it, e.g. max_kbps = 8000 for 8 Mbit/s")
    return value


def _upload(table: dict[str, Any]) -> UploadConfig:
    _unknown_keys(table, "upload", {"max_kbps", "schedule", "max_batch_first_minutes"})
    batch_first = toml.integer(table, "upload", "max_batch_first_minutes", MAX_BATCH_FIRST_MINUTES_DEFAULT,
                               *MAX_BATCH_FIRST_MINUTES_RANGE)
    max_kbps = _kbps(table, "upload", 0)
    raw = table.get("schedule", [])
    if not isinstance(raw, list):
        raise ConfigError("[upload] schedule must be an array of tables: write each window as an "
                          "[[upload.schedule]] table with from, to and max_kbps")
    windows: list[CapWindow] = []
    for index, entry in enumerate(raw):
        section = f"upload.schedule #{index + 1}"
        if not isinstance(entry, dict):
            raise ConfigError(f"[{section}] must be a table: write it as [[upload.schedule]] with from, to and "
                              "max_kbps below it")
        _unknown_keys(entry, section, {"from", "to", "max_kbps"})
        bounds = []
        for key in ("from", "to"):
            text = entry.get(key)
            parsed = parse_hhmm(text) if isinstance(text, str) else None
            if parsed is None:
                raise ConfigError(f"[{section}] {key} = {text!r} is not a time of day: write it as \"HH:MM\" "
                                  "(00:00 to 23:59, Asia/Shanghai wall clock), e.g. from = \"22:00\"")
            bounds.append(parsed)
        if bounds[0] == bounds[1]:
            raise ConfigError(f"[{section}] from and to are both {entry['from']!r}: a window needs two different "
                              "times (to before from wraps past midnight); for the whole day set [upload] max_kbps")
        windows.append(CapWindow(bounds[0], bounds[1], _kbps(entry, section, None)))
    clash = overlapping(windows)
    if clash is not None:
        first, second = (windows[i] for i in clash)
        raise ConfigError(f"[upload.schedule #{clash[0] + 1}] ({first.start:%H:%M}-{first.end:%H:%M}) and "
                          f"[upload.schedule #{clash[1] + 1}] ({second.start:%H:%M}-{second.end:%H:%M}) overlap: "
                          "change from/to so that no minute is in two windows")
    return UploadConfig(max_kbps=max_kbps, schedule=tuple(windows), max_batch_first_minutes=batch_first)


def _camera(table: Any, index: int, base_dir: Path) -> CameraConfig:
    section = f"camera #{index + 1}"
    if not isinstance(table, dict):
        raise ConfigError(f"[[camera]] #{index + 1} must be a table: write it as [[camera]] with keys below it")
    _unknown_keys(table, section, {"id", "room", "room_kind", "source"})
    cam_id = _ident(table, section, "id")
    section = f"camera {cam_id}"
    room = _ident(table, section, "room")
    room_kind = _str(table, section, "room_kind")
    if room_kind not in ROOM_KINDS:
        raise ConfigError(f"[camera {cam_id}] room_kind = {room_kind!r} is unknown: use \"theory\" or \"practical\"")
    source = _str(table, section, "source")
    assert source is not None
    if not source.startswith(("rtsp://", "rtsps://", "lavfi:", "/dev/")):
        candidate = Path(source).expanduser()
        if not candidate.is_absolute():
            candidate = base_dir / candidate
        if candidate.is_file():
            source = str(candidate)
    try:
        source_kind(source)
    except ValueError:
        raise ConfigError(f"[camera {cam_id}] source = {redact_source(source)!r} is not a camera source: use "
                          "rtsp://..., rtsps://..., /dev/videoN, lavfi:FILTER or the path of an existing video file"
                          ) from None
    return CameraConfig(id=cam_id, room=room, room_kind=room_kind, source=source)

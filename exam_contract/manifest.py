"""The signed record of one finished segment or one stated gap (docs/protocol.md, Records)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from .canonical import canonical_bytes, format_time, parse_time, sha256_hex
from .identifiers import IDENTIFIER_RULE, is_identifier

MANIFEST_VERSION = 1
RoomKind = Literal["theory", "practical"]
RecordKind = Literal["segment", "gap"]
ROOM_KINDS: tuple[str, ...] = ("theory", "practical")


class GapCause(StrEnum):
    """Why a camera did not record, as a gap record states it (`cause`)."""

    CAMERA_UNREACHABLE = "camera_unreachable"  # the camera never delivered, or stopped delivering
    RECORDER_CRASHED = "recorder_crashed"      # ffmpeg ended for another reason
    CORRUPT_SEGMENT = "corrupt_segment"        # a finished segment could not be read; set aside, not uploaded
    DISK_FULL = "disk_full"                    # the agent held its cameras (or ffmpeg could not write)
    AGENT_STOPPED = "agent_stopped"            # the edge agent was not running (or its journal started anew)


GAP_CAUSES: tuple[str, ...] = tuple(cause.value for cause in GapCause)


# Bounds on what a signed manifest may carry: a signature proves who sent a field, not that it is sane.
MAX_SEQ = 10**15
MAX_SIZE = 2**50            # the contract's own ceiling; a collector sets a far lower one ([ingest] max_segment_mb)
MAX_DETAIL_CHARS = 2000
MAX_HEALTH_FLAGS = 16
MAX_HEALTH_FLAG_CHARS = 32
MAX_VIDEO_TEXT = 32
MAX_VIDEO_PIXELS = 16384
MAX_FPS = 1000.0
IDENTIFIER_FIELDS: tuple[str, ...] = ("agent", "institution", "venue", "room", "camera")


class ManifestError(ValueError):
    """A manifest is malformed; the message names the field."""


@dataclass(frozen=True)
class VideoInfo:
    codec: str
    width: int
    height: int
    fps: float
    container: str = "mpegts"

    def to_dict(self) -> dict[str, Any]:
        return {"codec": self.codec, "width": self.width, "height": self.height,
                "fps": self.fps, "container": self.container}


@dataclass(frozen=True)
class ClockInfo:
    """Measured offset of the agent clock to the collector (collector minus agent)."""

    offset_ms: float | None = None
    synced: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"offset_ms": self.offset_ms, "synced": self.synced}


@dataclass(frozen=True)
class Manifest:
    kind: RecordKind
    agent: str
    institution: str
    venue: str
    room: str
    room_kind: RoomKind
    camera: str
    seq: int
    start: datetime
    end: datetime
    duration: float
    size: int
    sha256: str | None
    prev: str | None
    video: VideoInfo | None = None
    clock: ClockInfo = field(default_factory=ClockInfo)
    health: tuple[str, ...] = ()
    cause: str | None = None  # gap records only: a GapCause
    detail: str | None = None  # free text for a gap (e.g. ffmpeg's last error line)
    v: int = MANIFEST_VERSION

    @property
    def file_id(self) -> str:
        return file_id_for(self.camera, self.seq)

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": self.v,
            "kind": self.kind,
            "agent": self.agent,
            "institution": self.institution,
            "venue": self.venue,
            "room": self.room,
            "room_kind": self.room_kind,
            "camera": self.camera,
            "seq": self.seq,
            "start": format_time(self.start),
            "end": format_time(self.end),
            "duration": self.duration,
            "size": self.size,
            "sha256": self.sha256,
            "prev": self.prev,
            "video": self.video.to_dict() if self.video else None,
            "clock": self.clock.to_dict(),
            "health": list(self.health),
            "cause": self.cause,
            "detail": self.detail,
        }

    def canonical(self) -> bytes:
        return canonical_bytes(self.to_dict())

    def record_hash(self) -> str:
        """What the next record of this camera carries as `prev`."""
        return sha256_hex(self.canonical())

    @classmethod
    def from_dict(cls, raw: Any) -> "Manifest":
        """Validate a received manifest. Verify signatures over `canonical_bytes(raw)`, not over
        a re-serialisation, so unknown extra fields from a newer agent still verify."""
        if not isinstance(raw, dict):
            raise ManifestError("manifest: expected a JSON object")
        kind = _req(raw, "kind", str)
        if kind not in ("segment", "gap"):
            raise ManifestError(f"manifest.kind: {kind!r} is not 'segment' or 'gap'")
        room_kind = _req(raw, "room_kind", str)
        if room_kind not in ROOM_KINDS:
            raise ManifestError(f"manifest.room_kind: {room_kind!r} is not 'theory' or 'practical'")
        for name in IDENTIFIER_FIELDS:
            if not is_identifier(_req(raw, name, str)):
                raise ManifestError(f"manifest.{name}: {raw[name][:80]!r} is not a valid id ({IDENTIFIER_RULE})")
        seq = _req(raw, "seq", int)
        if isinstance(seq, bool) or not 1 <= seq <= MAX_SEQ:
            raise ManifestError(f"manifest.seq: must be an integer from 1 to {MAX_SEQ}")
        start = _time(raw, "start")
        end = _time(raw, "end")
        if end < start:
            raise ManifestError("manifest.end: earlier than start")
        duration = _req(raw, "duration", (int, float))
        if isinstance(duration, bool) or not math.isfinite(duration) or duration < 0:
            raise ManifestError("manifest.duration: must be a finite number of seconds >= 0")
        size = _req(raw, "size", int)
        if not 0 <= size <= MAX_SIZE:
            raise ManifestError(f"manifest.size: must be from 0 to {MAX_SIZE} bytes")
        sha = raw.get("sha256")
        prev = raw.get("prev")
        for name, value in (("sha256", sha), ("prev", prev)):
            if value is not None and not is_hex64(value):
                raise ManifestError(f"manifest.{name}: not 64 lowercase hex characters")
        if kind == "segment" and sha is None:
            raise ManifestError("manifest.sha256: required for a segment")
        if seq == 1 and prev is not None:
            raise ManifestError("manifest.prev: must be null for seq 1")
        if seq > 1 and prev is None:
            raise ManifestError("manifest.prev: null but seq > 1")
        cause = raw.get("cause")
        if kind == "gap":
            if cause not in GAP_CAUSES:
                raise ManifestError(f"manifest.cause: {cause!r} is not one of {', '.join(GAP_CAUSES)}")
            cause = GapCause(cause)
        detail = raw.get("detail")
        if detail is not None and (not isinstance(detail, str) or len(detail) > MAX_DETAIL_CHARS):
            raise ManifestError(f"manifest.detail: must be null or text of at most {MAX_DETAIL_CHARS} characters")
        video = _video(raw.get("video"))
        clock_raw = raw.get("clock") or {}
        if not isinstance(clock_raw, dict):
            raise ManifestError("manifest.clock: expected an object")
        offset_ms = clock_raw.get("offset_ms")
        if offset_ms is not None and (isinstance(offset_ms, bool) or not isinstance(offset_ms, (int, float))
                                      or not math.isfinite(offset_ms)):
            raise ManifestError("manifest.clock.offset_ms: must be null or a finite number")
        synced = clock_raw.get("synced", False)
        if not isinstance(synced, bool):
            raise ManifestError("manifest.clock.synced: must be true or false")
        clock = ClockInfo(offset_ms=offset_ms, synced=synced)
        health = raw.get("health") or []
        if (not isinstance(health, list) or len(health) > MAX_HEALTH_FLAGS
                or not all(isinstance(h, str) and 0 < len(h) <= MAX_HEALTH_FLAG_CHARS for h in health)):
            raise ManifestError(f"manifest.health: expected at most {MAX_HEALTH_FLAGS} flags of at most "
                                f"{MAX_HEALTH_FLAG_CHARS} characters")
        version = raw.get("v", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ManifestError("manifest.v: must be a positive integer")
        return cls(
            kind=kind, agent=_req(raw, "agent", str), institution=_req(raw, "institution", str),
            venue=_req(raw, "venue", str), room=_req(raw, "room", str), room_kind=room_kind,
            camera=_req(raw, "camera", str), seq=seq, start=start, end=end,
            duration=duration, size=size, sha256=sha, prev=prev, video=video, clock=clock,
            health=tuple(health), cause=cause, detail=detail, v=version,
        )


def file_id_for(camera: str, seq: int) -> str:
    return f"{camera}-{seq}"


def segment_file_name(camera: str, start: datetime, extension: str = "ts") -> str:
    """`<camera>@<UTC start>`, e.g. `t101-front@20261126T172206.120Z.ts`."""
    stamp = format_time(start).replace("-", "").replace(":", "")
    return f"{camera}@{stamp}.{extension}"


def _req(raw: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in raw:
        raise ManifestError(f"manifest.{key}: missing")
    value = raw[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"manifest.{key}: wrong type {type(value).__name__}")
    if isinstance(value, str) and not value:
        raise ManifestError(f"manifest.{key}: empty")
    return value


def _time(raw: dict[str, Any], key: str) -> datetime:
    try:
        return parse_time(_req(raw, key, str))
    except ValueError as exc:
        raise ManifestError(f"manifest.{key}: {exc}") from exc


def is_hex64(value: Any) -> bool:
    """A SHA-256 in the contract's spelling: 64 lowercase hex characters."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _video(raw: Any) -> VideoInfo | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ManifestError("manifest.video: expected an object")
    try:
        video = VideoInfo(codec=str(raw["codec"]), width=int(raw["width"]), height=int(raw["height"]),
                          fps=float(raw["fps"]), container=str(raw.get("container", "mpegts")))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ManifestError(f"manifest.video: {exc}") from exc
    if (len(video.codec) > MAX_VIDEO_TEXT or len(video.container) > MAX_VIDEO_TEXT
            or not 0 <= video.width <= MAX_VIDEO_PIXELS or not 0 <= video.height <= MAX_VIDEO_PIXELS
            or not (math.isfinite(video.fps) and 0 <= video.fps <= MAX_FPS)):
        raise ManifestError("manifest.video: codec, size or fps out of range")
    return video

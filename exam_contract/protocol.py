"""Protocol v1 payloads: the agent's `init` and `fin`, the collector's `reply`, and the chain-head exchange."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from .canonical import format_time, parse_time
from .chunks import chunk_count
from .identifiers import is_file_id, is_identifier
from .manifest import Manifest, ManifestError, is_hex64


class ReplyState(StrEnum):
    """What the collector says about one record (`reply.state`)."""

    STORED = "stored"        # the record is stored: the agent's acknowledgement
    MISSING = "missing"      # chunks (or the init) are missing: the agent sends them again
    REJECTED = "rejected"    # refused; `reason` starts with a RejectionCode


REPLY_STATES: tuple[str, ...] = tuple(state.value for state in ReplyState)

# The reason of a `missing` reply (before ": detail") when the collector holds no init for the record: the
# agent sends the init and every chunk again.
REASON_INIT_MISSING = "init_missing"


class ProtocolError(ValueError):
    """A payload does not follow protocol v1; the message says what is wrong."""


def _json_object(payload: bytes, what: str) -> dict[str, Any]:
    """A payload that must be one JSON object; ProtocolError naming `what` otherwise."""
    try:
        raw = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what}: malformed JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ProtocolError(f"{what}: expected a JSON object")
    return raw


@dataclass(frozen=True)
class InitMessage:
    manifest_raw: dict[str, Any]   # exactly as received: the signature covers canonical_bytes(manifest_raw)
    signature: str
    chunk_size: int
    chunks: int

    @classmethod
    def build(cls, manifest: Manifest, signature: str, chunk_size: int) -> "InitMessage":
        chunks = chunk_count(manifest.size, chunk_size) if manifest.kind == "segment" else 0
        return cls(manifest.to_dict(), signature, chunk_size, chunks)

    def encode(self) -> bytes:
        return json.dumps({"manifest": self.manifest_raw, "signature": self.signature,
                           "chunk_size": self.chunk_size, "chunks": self.chunks},
                          ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def decode(cls, payload: bytes) -> "InitMessage":
        raw = _json_object(payload, "init")
        manifest = raw.get("manifest")
        signature = raw.get("signature")
        chunk_size = raw.get("chunk_size")
        chunks = raw.get("chunks")
        if not isinstance(manifest, dict):
            raise ProtocolError("init.manifest: missing or not an object")
        if not isinstance(signature, str):
            raise ProtocolError("init.signature: missing or not a string")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
            raise ProtocolError("init.chunk_size: must be a positive integer")
        if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 0:
            raise ProtocolError("init.chunks: must be a non-negative integer")
        return cls(manifest, signature, chunk_size, chunks)

    def manifest(self) -> Manifest:
        """Parsed manifest; raises ManifestError naming the bad field."""
        return Manifest.from_dict(self.manifest_raw)

    def check_chunk_count(self, manifest: Manifest) -> None:
        expected = chunk_count(manifest.size, self.chunk_size) if manifest.kind == "segment" else 0
        if self.chunks != expected:
            raise ProtocolError(
                f"init.chunks: {self.chunks} does not match size {manifest.size} / chunk_size "
                f"{self.chunk_size} (expected {expected})")


MAX_MISSING_RANGES = 256   # a `missing` reply names at most this many ranges; the rest are asked for next time


@dataclass(frozen=True)
class Reply:
    """The collector's answer about one record. `record` is the SHA-256 (hex) of the canonical manifest the
    answer is about (None only where the collector knows none, e.g. an init it could not parse): an agent
    takes `stored` only when it equals its own record's hash, so an answer about other bytes is never
    mistaken for an acknowledgement of its own."""

    file_id: str
    state: ReplyState
    collector_time: datetime
    missing: list[list[int]] = field(default_factory=list)
    reason: str | None = None
    record: str | None = None

    def encode(self) -> bytes:
        return json.dumps({"file_id": self.file_id, "state": self.state, "missing": self.missing,
                           "reason": self.reason, "record": self.record,
                           "collector_time": format_time(self.collector_time)},
                          ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @property
    def reason_code(self) -> str | None:
        """The rejection code before `: detail` (e.g. `bad_signature`)."""
        return self.reason.split(":", 1)[0].strip() if self.reason else None

    @classmethod
    def decode(cls, payload: bytes) -> "Reply":
        try:
            raw = json.loads(payload.decode("utf-8"))
            state = raw["state"]
            if state not in REPLY_STATES:
                raise ProtocolError(f"reply.state: {state!r} unknown")
            state = ReplyState(state)
            record = raw.get("record")
            if record is not None and not is_hex64(record):
                raise ProtocolError("reply.record: not 64 lowercase hex characters")
            missing = raw.get("missing") or []
            if not isinstance(missing, list) or len(missing) > MAX_MISSING_RANGES:
                raise ProtocolError(f"reply.missing: not a list of at most {MAX_MISSING_RANGES} ranges")
            reason = raw.get("reason")
            if reason is not None and not isinstance(reason, str):
                raise ProtocolError("reply.reason: not a string")
            return cls(file_id=str(raw["file_id"]), state=state,
                       collector_time=parse_time(raw["collector_time"]),
                       missing=[[int(a), int(b)] for a, b in missing], reason=reason, record=record)
        except ProtocolError:
            raise
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"reply: malformed ({exc})") from exc


def encode_fin(record_hash: str | None) -> bytes:
    """A `fin` names the record it finishes by its hash, so the collector answers about those bytes only."""
    return record_hash.encode("ascii") if record_hash else b""


def decode_fin(payload: bytes) -> str | None:
    """The record hash a `fin` names; None for an empty `fin` (an agent that names none)."""
    if not payload:
        return None
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ProtocolError("fin: payload is not a record hash") from exc
    if not is_hex64(text):
        raise ProtocolError("fin: payload is not 64 lowercase hex characters")
    return text


# ---------------------------------------------------------------------------- chain heads
# An agent that starts with no journal (a new or re-imaged venue machine, a lost disk) asks where each of its
# cameras' chains ends at the collector, and continues them from there instead of restarting at seq 1.

MAX_CHAIN_CAMERAS = 256


@dataclass(frozen=True)
class ChainHead:
    seq: int
    record: str          # record hash of the newest stored record of the camera
    end: datetime        # its end, as the agent signed it

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "record": self.record, "end": format_time(self.end)}


@dataclass(frozen=True)
class ChainRequest:
    nonce: str
    cameras: tuple[str, ...]

    def encode(self) -> bytes:
        return json.dumps({"nonce": self.nonce, "cameras": list(self.cameras)},
                          separators=(",", ":")).encode("utf-8")

    @classmethod
    def decode(cls, payload: bytes) -> "ChainRequest":
        raw = _json_object(payload, "chain request")
        nonce, cameras = raw.get("nonce"), raw.get("cameras")
        if not is_identifier(nonce):
            raise ProtocolError("chain request.nonce: not an id")
        if (not isinstance(cameras, list) or len(cameras) > MAX_CHAIN_CAMERAS
                or not all(is_identifier(c) for c in cameras)):
            raise ProtocolError(f"chain request.cameras: expected at most {MAX_CHAIN_CAMERAS} camera ids")
        return cls(nonce, tuple(dict.fromkeys(cameras)))


@dataclass(frozen=True)
class ChainHeads:
    nonce: str
    heads: dict[str, ChainHead | None]   # camera -> head, None when the collector has no record of it
    collector_time: datetime

    def encode(self) -> bytes:
        return json.dumps({"nonce": self.nonce, "collector_time": format_time(self.collector_time),
                           "heads": {c: (h.to_dict() if h else None) for c, h in sorted(self.heads.items())}},
                          separators=(",", ":")).encode("utf-8")

    @classmethod
    def decode(cls, payload: bytes) -> "ChainHeads":
        try:
            raw = json.loads(payload.decode("utf-8"))
            heads: dict[str, ChainHead | None] = {}
            for camera, head in raw["heads"].items():
                if not is_identifier(camera):
                    raise ProtocolError(f"chain heads: {camera!r} is not a camera id")
                if head is None:
                    heads[camera] = None
                    continue
                seq, record = head["seq"], head["record"]
                if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1 or not is_hex64(record):
                    raise ProtocolError(f"chain heads: bad head for camera {camera}")
                heads[camera] = ChainHead(seq, record, parse_time(head["end"]))
            return cls(str(raw["nonce"]), heads, parse_time(raw["collector_time"]))
        except ProtocolError:
            raise
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"chain heads: malformed ({exc})") from exc


__all__ = ["InitMessage", "Reply", "ReplyState", "RejectionCode", "ProtocolError", "ManifestError", "REPLY_STATES",
           "REASON_INIT_MISSING", "encode_fin", "decode_fin", "ChainRequest", "ChainHeads", "ChainHead", "is_file_id"]


class RejectionCode(StrEnum):
    """Why the collector rejected a record: the prefix of `reply.reason` before ": detail"."""

    MALFORMED = "malformed"
    UNKNOWN_AGENT = "unknown_agent"
    VENUE_MISMATCH = "venue_mismatch"
    AGENT_MISMATCH = "agent_mismatch"
    BAD_SIGNATURE = "bad_signature"
    WRONG_CHUNK_COUNT = "wrong_chunk_count"
    HASH_MISMATCH = "hash_mismatch"
    SIZE_MISMATCH = "size_mismatch"
    SEQ_REPLAYED = "seq_replayed"
    CHAIN_BROKEN = "chain_broken"
    INSTITUTION_MISMATCH = "institution_mismatch"
    TOO_LARGE = "too_large"                    # size above the collector's [ingest] max_segment_mb
    BAD_CHUNK_SIZE = "bad_chunk_size"          # chunk_size outside the collector's allowed range
    EMPTY_SEGMENT = "empty_segment"            # a segment of 0 bytes covers nothing
    IMPLAUSIBLE = "implausible_record"         # times, duration or size that cannot describe real footage
    TOO_MANY_TRANSFERS = "too_many_transfers"  # the agent has too many unfinished uploads open
    STAGING_FULL = "staging_full"              # the agent's unfinished uploads would exceed its staging quota
    UNSAFE_PATH = "unsafe_path"                # the storage path would leave storage_dir
    AGENT_REVOKED = "agent_revoked"            # the operator revoked the agent (`exam-collector enroll --revoke`)


# The names the code used before RejectionCode.
REJECT_MALFORMED = RejectionCode.MALFORMED
REJECT_UNKNOWN_AGENT = RejectionCode.UNKNOWN_AGENT
REJECT_VENUE_MISMATCH = RejectionCode.VENUE_MISMATCH
REJECT_AGENT_MISMATCH = RejectionCode.AGENT_MISMATCH
REJECT_BAD_SIGNATURE = RejectionCode.BAD_SIGNATURE
REJECT_WRONG_CHUNK_COUNT = RejectionCode.WRONG_CHUNK_COUNT
REJECT_HASH_MISMATCH = RejectionCode.HASH_MISMATCH
REJECT_SIZE_MISMATCH = RejectionCode.SIZE_MISMATCH
REJECT_SEQ_REPLAYED = RejectionCode.SEQ_REPLAYED
REJECT_CHAIN_BROKEN = RejectionCode.CHAIN_BROKEN
REJECT_INSTITUTION_MISMATCH = RejectionCode.INSTITUTION_MISMATCH
REJECT_TOO_LARGE = RejectionCode.TOO_LARGE
REJECT_BAD_CHUNK_SIZE = RejectionCode.BAD_CHUNK_SIZE
REJECT_EMPTY_SEGMENT = RejectionCode.EMPTY_SEGMENT
REJECT_IMPLAUSIBLE = RejectionCode.IMPLAUSIBLE
REJECT_TOO_MANY_TRANSFERS = RejectionCode.TOO_MANY_TRANSFERS
REJECT_STAGING_FULL = RejectionCode.STAGING_FULL
REJECT_UNSAFE_PATH = RejectionCode.UNSAFE_PATH
REJECT_AGENT_REVOKED = RejectionCode.AGENT_REVOKED

REJECTION_CODES: tuple[RejectionCode, ...] = tuple(RejectionCode)
# Rejections an operator or time can cure (an enrolment to fix, a quota that frees up): the agent keeps the
# record and retries it with backoff, raising an alarm meanwhile. The others need `exam-edge retry`.
RETRYABLE_REJECTIONS: frozenset[RejectionCode] = frozenset({
    RejectionCode.UNKNOWN_AGENT, RejectionCode.BAD_SIGNATURE, RejectionCode.VENUE_MISMATCH,
    RejectionCode.INSTITUTION_MISMATCH, RejectionCode.TOO_MANY_TRANSFERS, RejectionCode.STAGING_FULL,
    RejectionCode.AGENT_REVOKED})

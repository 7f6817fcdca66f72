"""Protocol v1 payloads: the agent's `init` and the collector's `reply`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from .canonical import format_time, parse_time
from .chunks import chunk_count
from .manifest import Manifest, ManifestError

ReplyState = Literal["stored", "missing", "rejected"]
REPLY_STATES: tuple[str, ...] = ("stored", "missing", "rejected")


class ProtocolError(ValueError):
    """A payload does not follow protocol v1; the message says what is wrong."""


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
        try:
            raw = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"init: malformed JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise ProtocolError("init: expected a JSON object")
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


@dataclass(frozen=True)
class Reply:
    file_id: str
    state: ReplyState
    collector_time: datetime
    missing: list[list[int]] = field(default_factory=list)
    reason: str | None = None

    def encode(self) -> bytes:
        return json.dumps({"file_id": self.file_id, "state": self.state, "missing": self.missing,
                           "reason": self.reason, "collector_time": format_time(self.collector_time)},
                          ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def decode(cls, payload: bytes) -> "Reply":
        try:
            raw = json.loads(payload.decode("utf-8"))
            state = raw["state"]
            if state not in REPLY_STATES:
                raise ProtocolError(f"reply.state: {state!r} unknown")
            return cls(file_id=str(raw["file_id"]), state=state,
                       collector_time=parse_time(raw["collector_time"]),
                       missing=[[int(a), int(b)] for a, b in (raw.get("missing") or [])],
                       reason=raw.get("reason"))
        except ProtocolError:
            raise
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"reply: malformed ({exc})") from exc


__all__ = ["InitMessage", "Reply", "ProtocolError", "ManifestError", "REPLY_STATES"]

# Rejection reasons the collector puts in `reply.reason` (prefix before ": detail").
REJECT_MALFORMED = "malformed"
REJECT_UNKNOWN_AGENT = "unknown_agent"
REJECT_VENUE_MISMATCH = "venue_mismatch"
REJECT_AGENT_MISMATCH = "agent_mismatch"
REJECT_BAD_SIGNATURE = "bad_signature"
REJECT_WRONG_CHUNK_COUNT = "wrong_chunk_count"
REJECT_HASH_MISMATCH = "hash_mismatch"
REJECT_SIZE_MISMATCH = "size_mismatch"
REJECT_SEQ_REPLAYED = "seq_replayed"
REJECT_CHAIN_BROKEN = "chain_broken"

"""What an agent may ask of the collector: pure checks of an init against the configured limits, of a record's
plausibility, and of its times against the collector's receipt time. No I/O: `collector.ingest` feeds facts.

Every check answers from the init's few numbers, never by allocating anything proportional to what an init
claims (its `size` and `chunks` are untrusted, even under a valid signature).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from exam_contract import protocol as P
from exam_contract.manifest import Manifest
from exam_contract.protocol import InitMessage, RejectionCode

KIB = 1024
MIB = 1024 * 1024


class Refusal(Exception):
    """An init the collector will not take; `code` is the rejection code sent to the agent."""

    def __init__(self, code: RejectionCode, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class IngestLimits:
    """`[ingest]` in the collector config. Defaults fit a venue agent (256 KiB chunks, 4 uploads at once,
    segments of at most a few hundred MB) with a wide margin."""

    max_segment_bytes: int = 4096 * MIB
    min_chunk_bytes: int = 64 * KIB
    max_chunk_bytes: int = 1024 * KIB
    max_open_transfers: int = 32          # unfinished uploads per agent
    max_staging_bytes: int = 8192 * MIB   # bytes those uploads announce, per agent
    max_early_chunks: int = 256           # chunks held per agent before their init arrives
    max_segment_seconds: float = 3600.0   # a segment longer than this is not what an agent records
    max_gap_days: int = 400               # a stated gap longer than this cannot be true
    clock_future_minutes: int = 10        # a record ending this far after its receipt has a wrong clock
    clock_backlog_days: int = 30          # a record ending this long before its receipt is suspect
    clock_offset_seconds: float = 60.0    # an agent that measured its own clock this far off is suspect


# Slack between `duration` (measured from the stream) and `end - start` (from the wall clock anchor).
DURATION_SLACK_SECONDS = 5.0


def check_init_shape(message: InitMessage, manifest: Manifest, limits: IngestLimits) -> None:
    """Size and chunking, before anything is staged."""
    if manifest.size > limits.max_segment_bytes:
        raise Refusal(P.REJECT_TOO_LARGE, f"size {manifest.size} bytes is above the collector's limit of "
                                          f"{limits.max_segment_bytes} bytes ([ingest] max_segment_mb)")
    if manifest.kind == "segment" and not limits.min_chunk_bytes <= message.chunk_size <= limits.max_chunk_bytes:
        raise Refusal(P.REJECT_BAD_CHUNK_SIZE, f"chunk_size {message.chunk_size} is outside "
                                               f"{limits.min_chunk_bytes}..{limits.max_chunk_bytes} bytes")


def check_plausible(manifest: Manifest, limits: IngestLimits) -> None:
    """A record that cannot describe real footage or a real outage is refused with a reason, not stored as
    coverage (an empty segment would make its part `complete`)."""
    span = (manifest.end - manifest.start).total_seconds()
    if manifest.kind == "segment":
        if manifest.size == 0:
            raise Refusal(P.REJECT_EMPTY_SEGMENT, "a segment of 0 bytes holds no footage")
        if not 0 < manifest.duration <= limits.max_segment_seconds:
            raise Refusal(P.REJECT_IMPLAUSIBLE, f"segment duration {manifest.duration} s is outside "
                                                f"(0, {limits.max_segment_seconds:g}] s")
        if span <= 0 or span > limits.max_segment_seconds:
            raise Refusal(P.REJECT_IMPLAUSIBLE, f"segment spans {span:g} s from start to end, outside "
                                                f"(0, {limits.max_segment_seconds:g}] s")
        if abs(span - manifest.duration) > max(DURATION_SLACK_SECONDS, 0.1 * manifest.duration):
            raise Refusal(P.REJECT_IMPLAUSIBLE, f"segment duration {manifest.duration} s does not match its "
                                                f"start-to-end span of {span:g} s")
    else:
        if manifest.size != 0 or manifest.sha256 is not None:
            raise Refusal(P.REJECT_IMPLAUSIBLE, "a gap record carries no bytes: size must be 0 and sha256 null")
        if span > limits.max_gap_days * 86400:
            raise Refusal(P.REJECT_IMPLAUSIBLE, f"gap of {span / 86400:.0f} days is longer than "
                                                f"{limits.max_gap_days} days")


@dataclass(frozen=True)
class AgentLoad:
    """The agent's other unfinished uploads, as the database has them."""

    open_transfers: int
    staged_bytes: int


def check_agent_load(message: InitMessage, load: AgentLoad, limits: IngestLimits) -> None:
    """Quotas per agent (retryable: the agent keeps the record and tries again later)."""
    if load.open_transfers >= limits.max_open_transfers:
        raise Refusal(P.REJECT_TOO_MANY_TRANSFERS, f"{load.open_transfers} unfinished uploads are open, the "
                                                   f"limit is {limits.max_open_transfers}; finish those first")
    announced = message.chunks * message.chunk_size
    if load.staged_bytes + announced > limits.max_staging_bytes:
        raise Refusal(P.REJECT_STAGING_FULL, f"{load.staged_bytes} bytes already staged and {announced} announced "
                                             f"exceed the agent's {limits.max_staging_bytes}-byte staging quota")


def clock_suspicion(manifest: Manifest, received: datetime, limits: IngestLimits) -> str | None:
    """Why the record's own times are not to be believed, or None. Such a record is still stored (it is
    evidence), but its keep counts from its arrival and coverage names it."""
    if manifest.end > received + timedelta(minutes=limits.clock_future_minutes):
        return (f"ends {manifest.end.isoformat()}, {(manifest.end - received).total_seconds():.0f} s after the "
                f"collector received it: the agent's clock is ahead")
    if manifest.end < received - timedelta(days=limits.clock_backlog_days):
        return (f"ends {manifest.end.isoformat()}, {(received - manifest.end).days} days before the collector "
                f"received it: the agent's clock may be behind (or the upload waited that long)")
    offset = manifest.clock.offset_ms
    if offset is not None and abs(offset) > limits.clock_offset_seconds * 1000:
        return f"the agent measured its own clock {offset / 1000:+.0f} s off the collector's when it sealed the record"
    return None


class NoteThrottle:
    """At most `per_minute` notes per key and minute; what is held back is counted and reported with the next
    note, so a flood from one agent neither fills the database nor disappears. `clock` is injectable."""

    MAX_KEYS = 10_000

    def __init__(self, per_minute: int, clock=time.monotonic) -> None:  # noqa: ANN001
        self.per_minute = per_minute
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int, int]] = {}   # key -> (window start, notes, held back)

    def admit(self, key: str) -> tuple[bool, int]:
        """(note it now?, how many were held back before it)."""
        now = self._clock()
        with self._lock:
            start, notes, held = self._windows.get(key, (now, 0, 0))
            if now - start >= 60:
                start, notes = now, 0
            if notes < self.per_minute:
                self._windows[key] = (start, notes + 1, 0)
                return True, held
            self._windows[key] = (start, notes, held + 1)
            if len(self._windows) > self.MAX_KEYS:  # keys are checked ids, but the table never grows without end
                self._windows.pop(next(iter(self._windows)))
            return False, 0

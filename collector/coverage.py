"""Coverage arithmetic for one batch part: pure, no I/O, no database; intervals are half-open `[start, end)` in UTC.
See docs/design/states.md (part statuses and gap causes, `clock_unsynced` and `clock_suspect` included)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, NamedTuple

Status = Literal["complete", "gaps", "no_footage", "pending"]

STATUS_COMPLETE: Status = "complete"
STATUS_GAPS: Status = "gaps"
STATUS_NO_FOOTAGE: Status = "no_footage"
STATUS_PENDING: Status = "pending"

CAUSE_MISSING_SEQ = "missing_seq"
CAUSE_REJECTED = "rejected_upload"
CAUSE_CLOCK_UNSYNCED = "clock_unsynced"
CAUSE_CLOCK_SUSPECT = "clock_suspect"
CAUSE_UNKNOWN = "unknown"
CAUSE_DELETED = "deleted_by_retention"
HEALTH_PREFIX = "health_"
DISQUALIFYING_HEALTH: frozenset[str] = frozenset({"black", "frozen", "obstructed"})


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise ValueError(f"window end {self.end} is not after its start {self.start}")

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()


class SegmentSpan(NamedTuple):
    """A stored, verified segment (a NamedTuple: a year of one camera is half a million of them)."""

    start: datetime
    end: datetime
    health: tuple[str, ...] = ()
    clock_synced: bool = True
    clock_suspect: bool = False      # the collector does not believe the agent's times (SegmentRecord)


@dataclass(frozen=True)
class GapRecord:
    """An interval the agent stated it could not record, and why (gap causes: docs/design/states.md)."""

    start: datetime
    end: datetime
    cause: str


@dataclass(frozen=True)
class SeqHole:
    """Seq numbers that never arrived: they lie after `after` (end of the record before the hole, None if
    unknown) and before `before` (start of the record after it, None if unknown)."""

    first_seq: int
    last_seq: int
    after: datetime | None
    before: datetime | None
    causes: tuple[str, ...] = (CAUSE_MISSING_SEQ,)


@dataclass(frozen=True)
class CameraInput:
    venue: str
    camera: str
    segments: tuple[SegmentSpan, ...] = ()
    gap_records: tuple[GapRecord, ...] = ()
    holes: tuple[SeqHole, ...] = ()
    in_flight: bool = False          # an upload of this camera is being received right now
    last_record_end: datetime | None = None  # newest record of any kind, for the "still arriving" rule


@dataclass(frozen=True)
class Gap:
    start: datetime
    end: datetime
    causes: tuple[str, ...]

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()


@dataclass(frozen=True)
class CameraCoverage:
    venue: str
    camera: str
    covered_seconds: float
    window_seconds: float
    gaps: tuple[Gap, ...]
    status: Status
    unsynced_segments: int = 0
    suspect_segments: int = 0

    @property
    def percent(self) -> float:
        return 100.0 * self.covered_seconds / self.window_seconds if self.window_seconds else 0.0


@dataclass(frozen=True)
class PartCoverage:
    window: Window
    status: Status
    cameras: tuple[CameraCoverage, ...] = field(default_factory=tuple)


def covered_intervals(window: Window, segments: Iterable[SegmentSpan],
                      disqualifying: frozenset[str] = DISQUALIFYING_HEALTH) -> list[tuple[datetime, datetime]]:
    """The union of the usable segments, clipped to the window, sorted and disjoint."""
    clipped = sorted((max(s.start, window.start), min(s.end, window.end)) for s in segments
                     if not disqualifying.intersection(s.health))
    merged: list[tuple[datetime, datetime]] = []
    for start, end in clipped:
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _uncovered(window: Window, covered: Sequence[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    out: list[tuple[datetime, datetime]] = []
    cursor = window.start
    for start, end in covered:
        if start > cursor:
            out.append((cursor, start))
        cursor = max(cursor, end)
    if cursor < window.end:
        out.append((cursor, window.end))
    return out


def _overlaps(a_start: datetime | None, a_end: datetime | None, b_start: datetime, b_end: datetime) -> bool:
    """Positive-length overlap of [a_start, a_end) and [b_start, b_end); None is unbounded."""
    if a_start is not None and a_end is not None and a_end <= a_start:
        return False
    return (a_start is None or a_start < b_end) and (a_end is None or a_end > b_start)


def gap_causes(start: datetime, end: datetime, camera: CameraInput, tolerance: timedelta,
               disqualifying: frozenset[str] = DISQUALIFYING_HEALTH,
               special: Sequence[SegmentSpan] | None = None) -> tuple[str, ...]:
    """Causes of the gap [start, end). `special` may pre-select the segments that can name a cause (flagged,
    unsynced or clock-suspect); by default all segments are looked at."""
    causes: set[str] = set()
    for record in camera.gap_records:
        if _overlaps(record.start, record.end, start, end):
            causes.add(record.cause)
    for hole in camera.holes:
        if _overlaps(hole.after, hole.before, start, end):
            causes.update(hole.causes)
    for seg in camera.segments if special is None else special:
        flags = disqualifying.intersection(seg.health)
        if flags and _overlaps(seg.start, seg.end, start, end):
            causes.update(HEALTH_PREFIX + flag for flag in flags)
        if not seg.clock_synced and _overlaps(seg.start - tolerance, seg.end + tolerance, start, end):
            causes.add(CAUSE_CLOCK_UNSYNCED)
        if seg.clock_suspect and _overlaps(seg.start - tolerance, seg.end + tolerance, start, end):
            causes.add(CAUSE_CLOCK_SUSPECT)
    return tuple(sorted(causes)) or (CAUSE_UNKNOWN,)


def camera_coverage(window: Window, camera: CameraInput, tolerance: timedelta, now: datetime,
                    settle: timedelta = timedelta(minutes=2),
                    disqualifying: frozenset[str] = DISQUALIFYING_HEALTH) -> CameraCoverage:
    covered = covered_intervals(window, camera.segments, disqualifying)
    covered_seconds = sum((end - start).total_seconds() for start, end in covered)
    special = [s for s in camera.segments
               if not s.clock_synced or s.clock_suspect or disqualifying.intersection(s.health)]
    gaps = tuple(Gap(start, end, gap_causes(start, end, camera, tolerance, disqualifying, special))
                 for start, end in _uncovered(window, covered) if end - start >= tolerance)
    arriving = (now < window.end + settle and
                (camera.last_record_end is None or camera.last_record_end < window.end - tolerance))
    if now < window.end or camera.in_flight or arriving:
        status = STATUS_PENDING
    elif covered_seconds == 0:
        status = STATUS_NO_FOOTAGE
    elif gaps:
        status = STATUS_GAPS
    else:
        status = STATUS_COMPLETE
    unsynced = sum(1 for s in camera.segments
                   if not s.clock_synced and _overlaps(s.start, s.end, window.start, window.end))
    suspect = sum(1 for s in camera.segments if s.clock_suspect and _overlaps(s.start, s.end, window.start, window.end))
    return CameraCoverage(camera.venue, camera.camera, covered_seconds, window.seconds, gaps, status, unsynced,
                          suspect)


def part_coverage(window: Window, cameras: Sequence[CameraInput], tolerance: timedelta, now: datetime,
                  settle: timedelta = timedelta(minutes=2),
                  disqualifying: frozenset[str] = DISQUALIFYING_HEALTH) -> PartCoverage:
    """Status of a part: `pending` while any camera is; `no_footage` when no camera is known or none has
    covered a single moment; `gaps` when any camera has a gap; else `complete`."""
    results = tuple(camera_coverage(window, c, tolerance, now, settle, disqualifying)
                    for c in sorted(cameras, key=lambda c: (c.venue, c.camera)))
    if any(r.status == STATUS_PENDING for r in results):
        status = STATUS_PENDING
    elif not results or all(r.covered_seconds == 0 for r in results):
        status = STATUS_NO_FOOTAGE
    elif any(r.gaps for r in results):
        status = STATUS_GAPS
    else:
        status = STATUS_COMPLETE
    return PartCoverage(window, status, results)

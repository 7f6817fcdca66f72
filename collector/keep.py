"""The pure rules of keeping footage that the collector shares with `exam-retention`: calendar years on the
Shanghai wall clock, the keep floor, and which footage a hold covers. No I/O, no clock, no database.

`retention.policy` (the keep rule, docs/design/retention.md) builds on these and re-exports them; the collector
uses them for the storage's own locks and legal holds (docs/design/storage.md), and it may not import
`retention`, which imports the collector.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

SHANGHAI = ZoneInfo("Asia/Shanghai")


def add_calendar_years(moment: datetime, years: int = 1) -> datetime:
    """Same Shanghai wall-clock time `years` later; 29 Feb becomes 1 Mar in a non-leap year."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: attach a timezone (UTC inside)")
    local = moment.astimezone(SHANGHAI)
    year = local.year + years
    try:
        day = date(year, local.month, local.day)
    except ValueError:  # 29 February in a year without one
        day = date(year, 3, 1)
    moved = datetime(day.year, day.month, day.day, local.hour, local.minute, local.second, local.microsecond,
                     tzinfo=SHANGHAI)
    return moved.astimezone(timezone.utc)


def keep_floor(moment: datetime, margin_days: int) -> datetime:
    """One calendar year plus `margin_days` after `moment`: the keep of footage counted from that moment (its
    end or arrival for the base floor, a linked batch part's end for linked footage)."""
    return add_calendar_years(moment) + timedelta(days=margin_days)


# ---------------------------------------------------------------------------- what a hold covers

@dataclass(frozen=True)
class HoldWindow:
    """Where and when a batch hold protects footage: a batch part's room and window (with margins)."""

    venue: str
    room: str | None
    start: datetime
    end: datetime


@dataclass(frozen=True)
class HoldFacts:
    id: int
    case_ref: str = ""
    batch_id: str | None = None
    venue: str | None = None
    camera: str | None = None
    start: datetime | None = None        # camera holds: open-ended when None
    end: datetime | None = None
    windows: tuple[HoldWindow, ...] = ()  # batch holds: the batch's windows, when known
    resolved: bool = True                 # False: a batch hold whose batch is unknown here


def overlaps(start: datetime, end: datetime, lo: datetime | None, hi: datetime | None) -> bool:
    # Closed on both sides: a segment that only touches a held range is held too.
    return (lo is None or end >= lo) and (hi is None or start <= hi)


def hold_covers(hold: HoldFacts, *, venue: str, room: str, camera: str, start: datetime, end: datetime,
                batches: Collection[str] = ()) -> bool:
    """Whether `hold` covers footage of `camera` in `venue`/`room` over [start, end] linked to `batches`."""
    if hold.batch_id is not None:
        return (not hold.resolved or hold.batch_id in batches
                or any(w.venue == venue and (w.room is None or w.room == room)
                       and overlaps(start, end, w.start, w.end) for w in hold.windows))
    if hold.camera is not None:
        return (hold.camera == camera and (hold.venue is None or hold.venue == venue)
                and overlaps(start, end, hold.start, hold.end))
    return True  # a hold naming neither batch nor camera cannot be narrowed: it holds all

"""Legal holds (docs/retention.md): by batch, or by camera and time range; each logged in the audit log.
What a hold covers is `collector.keep.hold_covers`; the facts it is judged on (batch windows, active holds) are
read here, for `exam-retention enforce` and for the storage's legal holds (collector/object_locks.py)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, sessionmaker

from exam_contract.canonical import format_time

from . import audit
from .keep import HoldFacts, HoldWindow, hold_covers
from .models import ExamBatchPart, LegalHold

SHANGHAI = ZoneInfo("Asia/Shanghai")


class HoldError(ValueError):
    """A hold cannot be added or released; the message says why and what to do."""


@dataclass(frozen=True)
class HoldView:
    id: int
    batch_id: str | None
    venue: str | None
    camera: str | None
    from_at: datetime | None
    to_at: datetime | None
    reason: str
    case_ref: str
    created_at: datetime
    created_by: str
    released_at: datetime | None
    released_by: str | None
    release_reason: str | None

    @property
    def active(self) -> bool:
        return self.released_at is None

    def scope(self) -> str:
        if self.batch_id is not None:
            return f"batch {self.batch_id}"
        where = f"{self.venue}/{self.camera}" if self.venue else f"camera {self.camera} (every venue)"
        lo = format_time(self.from_at) if self.from_at else "…"
        hi = format_time(self.to_at) if self.to_at else "…"
        return f"{where} {lo} .. {hi}"


def parse_moment(text: str, option: str) -> datetime:
    """ISO 8601; a time without offset is Asia/Shanghai (as in batch imports)."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise HoldError(f"{option} {text!r} is not an ISO 8601 time: write e.g. 2026-11-20T09:00 "
                        "(Asia/Shanghai) or 2026-11-20T01:00:00Z") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=SHANGHAI)
    return moment.astimezone(timezone.utc)


def _view(row: LegalHold) -> HoldView:
    return HoldView(row.id, row.batch_id, row.venue, row.camera, row.from_at, row.to_at, row.reason, row.case_ref,
                    row.created_at, row.created_by, row.released_at, row.released_by, row.release_reason)


def add_hold(sessions: sessionmaker[Session], *, reason: str, case_ref: str, actor: str,
             batch_id: str | None = None, venue: str | None = None, camera: str | None = None,
             from_at: datetime | None = None, to_at: datetime | None = None) -> HoldView:
    if not reason or not reason.strip():
        raise HoldError("--reason is empty: say why the footage must be kept (e.g. the complaint)")
    if not case_ref or not case_ref.strip():
        raise HoldError("--case is empty: give the case reference the hold belongs to")
    if (batch_id is None) == (camera is None):
        raise HoldError("a hold is either by batch (--batch B) or by camera (--camera C --from T --to T): give one")
    if batch_id is not None and (venue or from_at or to_at):
        raise HoldError("--batch holds the whole batch: drop --venue/--from/--to, or hold by --camera instead")
    if camera is not None:
        if from_at is None or to_at is None:
            raise HoldError("a camera hold needs --from and --to: give the time range to keep")
        if to_at < from_at:
            raise HoldError(f"--to {format_time(to_at)} is before --from {format_time(from_at)}: swap them")
    now = datetime.now(timezone.utc)
    with sessions.begin() as session:
        row = LegalHold(batch_id=batch_id, venue=venue, camera=camera, from_at=from_at, to_at=to_at,
                        reason=reason.strip(), case_ref=case_ref.strip(), created_at=now, created_by=actor)
        session.add(row)
        session.flush()
        audit.record(session, audit.ACTION_HOLD_ADD, actor=actor, target=f"hold:{row.id}", reason=row.reason,
                     detail={"case": row.case_ref, "batch": batch_id, "venue": venue, "camera": camera,
                             "from": from_at, "to": to_at})
        return _view(row)


def release_hold(sessions: sessionmaker[Session], hold_id: int, *, reason: str, actor: str) -> HoldView:
    if not reason or not reason.strip():
        raise HoldError("--reason is empty: releasing a hold needs a reason (e.g. the case is closed)")
    with sessions.begin() as session:
        row = session.get(LegalHold, hold_id)
        if row is None:
            raise HoldError(f"hold {hold_id} does not exist: see `exam-collector hold list`")
        if row.released_at is not None:
            raise HoldError(f"hold {hold_id} was already released at {format_time(row.released_at)} "
                            f"by {row.released_by}")
        row.released_at, row.released_by, row.release_reason = datetime.now(timezone.utc), actor, reason.strip()
        audit.record(session, audit.ACTION_HOLD_RELEASE, actor=actor, target=f"hold:{row.id}",
                     reason=row.release_reason, detail={"case": row.case_ref})
        return _view(row)


def batch_known(session: Session, batch_id: str) -> bool:
    from .models import ExamBatch

    return session.get(ExamBatch, batch_id) is not None


def list_holds(session: Session, include_released: bool = False) -> list[HoldView]:
    query = select(LegalHold).order_by(LegalHold.id)
    if not include_released:
        query = query.where(LegalHold.released_at.is_(None))
    return [_view(row) for row in session.scalars(query)]


# ---------------------------------------------------------------------------- the facts a hold is judged on

@dataclass(frozen=True)
class BatchWindow:
    batch_id: str
    venue: str
    room: str
    start: datetime        # part window widened by the coverage margins (for linking)
    end: datetime
    part_end: datetime     # the part's own end (for the retention floor)


def batch_windows(session: Session, pre: timedelta, post: timedelta, *where) -> list[BatchWindow]:
    return [BatchWindow(p.batch_id, p.venue, p.room, p.start_at - pre, p.end_at + post, p.end_at)
            for p in session.scalars(select(ExamBatchPart).where(*where))]


def active_holds(session: Session, windows: Sequence[BatchWindow]) -> tuple[list[HoldFacts], list[str]]:
    """The active holds as facts (a batch hold with its batch's windows among `windows`), and an alarm for each
    batch hold whose batch is not imported (it holds all footage)."""
    return hold_facts(session, windows, select(LegalHold).where(LegalHold.released_at.is_(None)))


def hold_facts(session: Session, windows: Sequence[BatchWindow],
               query: Select[Any] | None = None) -> tuple[list[HoldFacts], list[str]]:
    """Holds (all, or those `query` selects) as facts, batch holds with their windows among `windows`."""
    by_batch: dict[str, list[BatchWindow]] = defaultdict(list)
    for w in windows:
        by_batch[w.batch_id].append(w)
    holds: list[HoldFacts] = []
    alarms: list[str] = []
    for row in session.scalars((query if query is not None else select(LegalHold)).order_by(LegalHold.id)):
        if row.batch_id is not None:
            found = by_batch.get(row.batch_id, [])
            if not found and row.released_at is None:
                alarms.append(f"hold {row.id} (case {row.case_ref}) names batch {row.batch_id}, which is not "
                              "imported: it holds ALL footage until the batch is imported or the hold released")
            holds.append(HoldFacts(row.id, row.case_ref, batch_id=row.batch_id, resolved=bool(found),
                                   windows=tuple(HoldWindow(w.venue, w.room, w.start, w.end) for w in found)))
        else:
            holds.append(HoldFacts(row.id, row.case_ref, venue=row.venue, camera=row.camera, start=row.from_at,
                                   end=row.to_at))
    return holds, alarms


def held_batch_windows(session: Session, pre: timedelta, post: timedelta) -> list[BatchWindow]:
    """The windows of the batches active holds name (only those: a hold judges footage by its own batch)."""
    held = list(session.scalars(select(LegalHold.batch_id).where(LegalHold.released_at.is_(None),
                                                                 LegalHold.batch_id.is_not(None))))
    return batch_windows(session, pre, post, ExamBatchPart.batch_id.in_(held)) if held else []


def holds_covering(session: Session, *, venue: str, room: str, camera: str, start: datetime, end: datetime,
                   pre: timedelta, post: timedelta) -> list[int]:
    """The ids of the active holds that cover this footage (a record being stored, say)."""
    holds, _ = active_holds(session, held_batch_windows(session, pre, post))
    return [hold.id for hold in holds
            if hold_covers(hold, venue=venue, room=room, camera=camera, start=start, end=end)]

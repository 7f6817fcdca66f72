"""Legal holds (PRODUCT.md, Retention): by batch, or by camera and time range; each logged in the audit log."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from exam_contract.canonical import format_time

from . import audit
from .models import LegalHold

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

"""The storage's own protection kept in step with the database (docs/design/storage.md, Object Lock): retention
locks at least as long as the keep rule's floor, and legal holds on every object an active hold covers.

Only a versioned store (S3 with Object Lock) has either; on the filesystem every function here does nothing.
Ingest locks each object when it uploads it (`LockSettings.upload_lock`), long enough for any batch part that
ends within `[storage] longest_exam_day_hours` of the footage; a longer part makes `extend_linked_locks` (at
batch import and in `exam-retention enforce`) lengthen the locks of its linked objects. Holds: `sync_hold` turns
the storage's legal hold on for every object an active hold covers, and off, once it is released, for those no
other active hold covers. A storage that fails to lock or hold an object is never silent: the failures are an
`object_lock_failed` alarm and an audit entry, and the command exits non-zero.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from exam_contract.alarms import AlarmCode

from . import audit
from .batch_coverage import RECORD_SLACK, room_cameras
from .footage_store import FootageStore, StoredFileMissing, UnsafePath
from .holds import active_holds, batch_windows, held_batch_windows, hold_facts
from .keep import HoldFacts, hold_covers, keep_floor
from .models import ExamBatchPart, LegalHold, SegmentRecord

if TYPE_CHECKING:
    from .config import CollectorConfig

log = logging.getLogger(__name__)

MAX_FAILURES_IN_LOG = 500
PAGE = 2000
PROGRESS_EVERY = 100


@dataclass(frozen=True)
class LockSettings:
    """What the storage locks are computed from: the keep rule's margin and the longest exam day; the coverage
    margins say which footage a batch part links to."""

    margin_days: int = 7
    longest_exam_day: timedelta = timedelta(hours=24)
    pre_margin: timedelta = timedelta(minutes=15)
    post_margin: timedelta = timedelta(minutes=15)

    @classmethod
    def from_config(cls, config: CollectorConfig) -> LockSettings:
        return cls(config.retention.margin_days, timedelta(hours=config.storage.longest_exam_day_hours),
                   timedelta(minutes=config.coverage.pre_margin_minutes),
                   timedelta(minutes=config.coverage.post_margin_minutes))

    def upload_lock(self, end: datetime, stored_at: datetime) -> datetime:
        """The lock an object gets at upload: the keep floor counted from the later of its end and arrival plus
        the longest exam day, so it covers the floor itself and the linked keep of any batch part ending within
        that day (one calendar year is counted from the later moment, which is never shorter)."""
        return keep_floor(max(end, stored_at) + self.longest_exam_day, self.margin_days)

    def linked_lock(self, part_end: datetime) -> datetime:
        """What footage linked to a part ending at `part_end` must stay locked until (the linked keep)."""
        return keep_floor(part_end, self.margin_days)


@dataclass(frozen=True)
class StoredRef:
    """A live segment row that names an object version."""

    segment_id: int
    venue: str
    room: str
    camera: str
    seq: int
    start: datetime
    end: datetime
    relpath: str
    version: str
    lock_until: datetime | None

    @property
    def target(self) -> str:
        return f"{self.venue}/{self.camera}/{self.seq}"


@dataclass
class LockReport:
    """What a pass over objects did: `done` changed, `unchanged` already as asked (or kept by another hold)."""

    what: str
    done: int = 0
    unchanged: int = 0
    failed: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.done + self.unchanged + len(self.failed)

    def line(self) -> str:
        failed = f", {len(self.failed)} FAILED" if self.failed else ""
        return f"{self.what}: {self.done} object(s) changed, {self.unchanged} already so{failed}"


Progress = Callable[[LockReport], None]

_COLUMNS = (SegmentRecord.id, SegmentRecord.venue, SegmentRecord.room, SegmentRecord.camera, SegmentRecord.seq,
            SegmentRecord.start_at, SegmentRecord.end_at, SegmentRecord.storage_path, SegmentRecord.storage_version,
            SegmentRecord.lock_until)
_LIVE_OBJECT = (SegmentRecord.kind == "segment", SegmentRecord.storage_path.is_not(None),
                SegmentRecord.storage_version.is_not(None), SegmentRecord.deleted_at.is_(None))


def _refs(session: Session, *where: Any) -> Iterator[StoredRef]:
    """Live rows naming an object version, by id pages (flat memory over millions)."""
    after = 0
    while True:
        rows = session.execute(select(*_COLUMNS).where(SegmentRecord.id > after, *_LIVE_OBJECT, *where)
                               .order_by(SegmentRecord.id).limit(PAGE)).all()
        if not rows:
            return
        for r in rows:
            yield StoredRef(r.id, r.venue, r.room, r.camera, r.seq, r.start_at, r.end_at, r.storage_path,
                            r.storage_version, r.lock_until)
        after = rows[-1].id


def objects_in_window(session: Session, venue: str, room: str | None, lo: datetime, hi: datetime,
                      *where: Any) -> Iterator[StoredRef]:
    """Objects of a room's footage touching [lo, hi] (a batch part's widened window: the link rule), one index
    range per camera."""
    if room is None:
        yield from _refs(session, SegmentRecord.venue == venue, SegmentRecord.start_at <= hi,
                         SegmentRecord.end_at >= lo, *where)
        return
    for camera in room_cameras(session, venue, room):
        yield from _refs(session, SegmentRecord.venue == venue, SegmentRecord.camera == camera,
                         SegmentRecord.room == room, SegmentRecord.start_at >= lo - RECORD_SLACK,
                         SegmentRecord.start_at <= hi, SegmentRecord.end_at >= lo, *where)


def objects_of_hold(session: Session, hold: HoldFacts) -> Iterator[StoredRef]:
    """Every live object the hold covers (`collector.keep.hold_covers`), each once."""
    seen: set[int] = set()
    if hold.batch_id is not None and hold.resolved:
        found: Iterator[StoredRef] = (ref for w in hold.windows
                                      for ref in objects_in_window(session, w.venue, w.room, w.start, w.end))
    elif hold.batch_id is None and hold.camera is not None:
        where = [SegmentRecord.camera == hold.camera]
        if hold.venue is not None:
            where.append(SegmentRecord.venue == hold.venue)
        if hold.start is not None:
            where.append(SegmentRecord.end_at >= hold.start)
        if hold.end is not None:
            where.append(SegmentRecord.start_at <= hold.end)
        found = _refs(session, *where)
    else:   # a batch hold whose batch is not imported, or one naming neither batch nor camera: all footage
        found = _refs(session)
    for ref in found:
        if ref.segment_id not in seen:
            seen.add(ref.segment_id)
            yield ref


# ---------------------------------------------------------------------------- retention locks

def extend_linked_locks(sessions: sessionmaker[Session], store: FootageStore, settings: LockSettings,
                        now: datetime, *, batch_ids: list[str] | None = None, dry_run: bool = False,
                        progress: Progress | None = None) -> LockReport:
    """Lengthen the storage lock of every live object linked to a batch part whose linked keep outlasts it (a
    part longer than the longest exam day); the rows record the new dates. Parts of `batch_ids`, or every part
    whose linked keep is still ahead of `now` (`exam-retention enforce`). `dry_run`: count, change nothing."""
    report = LockReport("storage locks extended for batch links" if not dry_run else "storage locks to extend")
    if not store.versioned:
        return report
    with sessions() as session:
        query = select(ExamBatchPart)
        if batch_ids is not None:
            query = query.where(ExamBatchPart.batch_id.in_(batch_ids))
        else:  # a part that ended over a year (and the margin) ago links footage whose linked keep has passed
            query = query.where(ExamBatchPart.end_at >= now - timedelta(days=366 + settings.margin_days))
        parts = [(p.venue, p.room, p.start_at, p.end_at) for p in session.scalars(query.order_by(ExamBatchPart.id))]
        for venue, room, start, end in parts:
            needed = settings.linked_lock(end)
            short = or_(SegmentRecord.lock_until.is_(None), SegmentRecord.lock_until < needed)
            for ref in objects_in_window(session, venue, room, start - settings.pre_margin,
                                         end + settings.post_margin, short):
                if dry_run:
                    report.done += 1
                    continue
                try:
                    held = store.extend_lock(ref.relpath, ref.version, needed)
                except (OSError, UnsafePath) as exc:
                    report.failed.append(f"{ref.target} {ref.relpath} version {ref.version}: {exc}")
                else:
                    _record_lock(sessions, ref.segment_id, held or needed)
                    report.done += 1
                if progress is not None and report.total % PROGRESS_EVERY == 0:
                    progress(report)
    if progress is not None:
        progress(report)
    return report


def _record_lock(sessions: sessionmaker[Session], segment_id: int, until: datetime) -> None:
    with sessions.begin() as session:
        row = session.get(SegmentRecord, segment_id)
        if row is not None and (row.lock_until is None or row.lock_until < until):
            row.lock_until = until


# ---------------------------------------------------------------------------- legal holds

def sync_hold(sessions: sessionmaker[Session], store: FootageStore, hold_id: int, settings: LockSettings,
              progress: Progress | None = None) -> LockReport:
    """Make the storage's legal holds follow hold `hold_id`: ON for every object it covers while it is active;
    once it is released, OFF for those objects no other active hold covers. Safe to run again (`exam-collector
    hold sync`)."""
    with sessions() as session:
        row = session.get(LegalHold, hold_id)
        if row is None:
            raise LookupError(f"hold {hold_id} does not exist: see `exam-collector hold list`")
        active = row.released_at is None
        report = LockReport(f"legal hold {'ON' if active else 'OFF'} for hold {hold_id}")
        if not store.versioned:
            return report
        windows = (batch_windows(session, settings.pre_margin, settings.post_margin,
                                 ExamBatchPart.batch_id == row.batch_id) if row.batch_id is not None else [])
        [hold], _ = hold_facts(session, windows, select(LegalHold).where(LegalHold.id == hold_id))
        others: list[HoldFacts] = []
        if not active:
            others, _ = active_holds(session, held_batch_windows(session, settings.pre_margin,
                                                                  settings.post_margin))
        for ref in objects_of_hold(session, hold):
            if not active and any(hold_covers(other, venue=ref.venue, room=ref.room, camera=ref.camera,
                                              start=ref.start, end=ref.end) for other in others):
                report.unchanged += 1     # still held by another active hold
            else:
                try:
                    store.set_legal_hold(ref.relpath, ref.version, active)
                except (OSError, UnsafePath) as exc:
                    if not active and isinstance(exc, StoredFileMissing):
                        report.unchanged += 1    # gone already (deleted after its keep): nothing to release
                    else:
                        report.failed.append(f"{ref.target} {ref.relpath} version {ref.version}: {exc}")
                else:
                    report.done += 1
            if progress is not None and report.total % PROGRESS_EVERY == 0:
                progress(report)
    if progress is not None:
        progress(report)
    return report


def record_report(sessions: sessionmaker[Session], report: LockReport, *, action: str, actor: str,
                  target: str) -> str | None:
    """An audit entry for a pass that changed or failed something; the `object_lock_failed` alarm line when any
    object failed (also logged), else None."""
    if not report.done and not report.failed:
        return None
    alarm = None
    if report.failed:
        alarm = (f"{report.what}: the storage did not take {len(report.failed)} of {report.total} object(s), "
                 f"e.g. {report.failed[0]}; the database still protects them, the storage does not yet")
        log.error("ALARM %s: %s", AlarmCode.OBJECT_LOCK_FAILED, alarm)
    with sessions.begin() as session:
        audit.record(session, action, actor=actor, target=target,
                     reason=f"{len(report.failed)} object(s) failed" if report.failed else None,
                     detail={"what": report.what, "changed": report.done, "unchanged": report.unchanged,
                             "failed": report.failed[:MAX_FAILURES_IN_LOG]})
    return alarm

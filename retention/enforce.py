"""`exam-retention enforce`: gather facts from the database, ask the pure policy, delete what it allows, each
deletion tombstone first. See docs/design/retention.md (the procedure and its failure cases). On object storage
the storage has the last word: a version whose lock or legal hold is still on is not deleted (`ObjectLocked`),
never forced, and stays live; see docs/design/storage.md."""

from __future__ import annotations

import logging
import socket
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from collector import audit
from collector.footage_store import FootageStore, ObjectLocked, UnsafePath
from collector.holds import BatchWindow, active_holds, batch_windows, held_batch_windows
from collector.models import AuditCheckpoint, AuditEntry, ExamBatchPart, SegmentRecord
from exam_contract.canonical import format_time

from .policy import (BatchLink, Decision, HoldFacts, RetentionPolicy, SegmentFacts, decide, earliest_possible_floor,
                     shanghai_text)

__all__ = ["BatchWindow", "ClockError", "EnforcePlan", "EnforceResult", "PlannedDeletion", "active_holds",
           "batch_windows", "build_plan", "check_clock", "current_facts", "execute", "plan_lines"]

log = logging.getLogger(__name__)

CLOCK_TOLERANCE = timedelta(minutes=10)       # against times a collector wrote itself (never agents' times)
FUTURE_FOOTAGE_ALARM = timedelta(days=1)      # footage ending this far after `now`: an agent's clock is ahead
DISK_ALARM_FREE_FRACTION = 0.10
READ_CHUNK = 2000


class ClockError(Exception):
    """The clock is earlier than what a collector already wrote: enforce refuses to decide anything."""


@dataclass(frozen=True)
class PlannedDeletion:
    segment_id: int
    venue: str
    camera: str
    seq: int
    storage_path: str
    size: int
    sha256: str | None
    record_hash: str
    start: datetime
    end: datetime
    keep_until: datetime
    rule: str
    reason: str
    storage_version: str | None = None   # the object version (object storage); None for a file

    @property
    def target(self) -> str:
        return f"{self.venue}/{self.camera}/{self.seq}"

    def as_json(self) -> dict:
        return {"segment_id": self.segment_id, "venue": self.venue, "camera": self.camera, "seq": self.seq,
                "storage_path": self.storage_path, "storage_version": self.storage_version, "size": self.size,
                "sha256": self.sha256, "record_hash": self.record_hash, "start": format_time(self.start),
                "end": format_time(self.end), "keep_until": format_time(self.keep_until), "rule": self.rule,
                "reason": self.reason}


@dataclass(frozen=True)
class VenueTotal:
    venue: str
    files: int
    bytes: int


@dataclass(frozen=True)
class EnforcePlan:
    now: datetime
    deletions: tuple[PlannedDeletion, ...]
    stored_segments: int          # live segment files in the database
    candidates: int               # those old enough to be looked at (ended and stored >= 365 days ago)
    held: int                     # candidates kept only because of a hold
    alarms: tuple[str, ...]
    locked: int = 0               # due, but the storage's own lock (the row's lock_until) has not ended yet

    @property
    def files(self) -> int:
        return len(self.deletions)

    @property
    def bytes(self) -> int:
        return sum(d.size for d in self.deletions)

    def per_venue(self) -> list[VenueTotal]:
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for d in self.deletions:
            totals[d.venue][0] += 1
            totals[d.venue][1] += d.size
        return [VenueTotal(v, f, b) for v, (f, b) in sorted(totals.items())]

    def as_json(self) -> dict:
        return {"now": format_time(self.now), "files": self.files, "bytes": self.bytes,
                "stored_segments": self.stored_segments, "candidates": self.candidates, "held": self.held,
                "locked": self.locked,
                "per_venue": [{"venue": t.venue, "files": t.files, "bytes": t.bytes} for t in self.per_venue()],
                "deletions": [d.as_json() for d in self.deletions], "alarms": list(self.alarms)}


@dataclass
class EnforceResult:
    deleted: list[PlannedDeletion] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)   # the storage refused (a lock or legal hold still on)
    checkpoint_entries: int | None = None


# ---------------------------------------------------------------------------- facts

def current_facts(session: Session, row: SegmentRecord, pre: timedelta,
                  post: timedelta) -> tuple[SegmentFacts, list[HoldFacts]]:
    """The segment's links and the active holds as they are now, read with indexed queries (per deletion)."""
    room = batch_windows(session, pre, post, ExamBatchPart.venue == row.venue, ExamBatchPart.room == row.room,
                         ExamBatchPart.start_at <= row.end_at + pre, ExamBatchPart.end_at >= row.start_at - post)
    holds, _ = active_holds(session, held_batch_windows(session, pre, post))
    return facts_of(row, {(row.venue, row.room): room}), holds


def check_clock(session: Session, now: datetime, host: str | None = None) -> None:
    """Refuse when `now` is earlier than a time some collector wrote with its own clock: the newest segment
    arrival (`stored_at`), the newest audit-log entry, the newest signed audit checkpoint. Times the agents
    wrote (a segment's start and end) are never compared: one agent with a wrong clock must not stop
    retention for everyone (its footage is simply kept; see `future_footage_alarm`)."""
    host = host or socket.gethostname()
    said = f"the clock of this machine ({host}) says {format_time(now)}"
    fix = "one of these two clocks is wrong; fix it (NTP) before enforcing retention"
    stored = session.execute(select(SegmentRecord.stored_at, SegmentRecord.stored_by, SegmentRecord.venue,
                                    SegmentRecord.camera, SegmentRecord.seq)
                             .order_by(SegmentRecord.stored_at.desc()).limit(1)).first()
    if stored is not None and now < stored.stored_at - CLOCK_TOLERANCE:
        instance = stored.stored_by or "(not recorded: stored before migration 0007)"
        raise ClockError(f"{said} but collector instance {instance} stored a segment at "
                         f"{format_time(stored.stored_at)} ({stored.venue}/{stored.camera}/{stored.seq}): {fix}")
    entry = session.scalars(select(AuditEntry).order_by(AuditEntry.at.desc()).limit(1)).first()
    if entry is not None and now < entry.at - CLOCK_TOLERANCE:
        raise ClockError(f"{said} but audit-log entry {entry.seq} ({entry.action} by {entry.actor}) was written "
                         f"at {format_time(entry.at)}: {fix}")
    checkpoint = session.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.at.desc()).limit(1)).first()
    if checkpoint is not None and now < checkpoint.at - CLOCK_TOLERANCE:
        signer = getattr(checkpoint, "host", None)
        by = f"signed on {signer}" if signer else "signed by a collector (host not recorded)"
        raise ClockError(f"{said} but audit checkpoint {checkpoint.id} ({checkpoint.occasion}) was {by} at "
                         f"{format_time(checkpoint.at)}: {fix}")


def future_footage_alarm(session: Session, now: datetime) -> str | None:
    """Footage whose agent-written end lies well after `now`: its agent's clock is ahead. It is kept (its
    floor counts from that end) and enforce goes on for everything else; the alarm names it."""
    limit = now + FUTURE_FOOTAGE_ALARM
    live = (SegmentRecord.kind == "segment", SegmentRecord.deleted_at.is_(None), SegmentRecord.end_at > limit)
    count = session.scalar(select(func.count()).select_from(SegmentRecord).where(*live)) or 0
    if not count:
        return None
    newest = session.execute(select(SegmentRecord.venue, SegmentRecord.camera, SegmentRecord.seq,
                                    SegmentRecord.end_at, SegmentRecord.stored_at).where(*live)
                             .order_by(SegmentRecord.end_at.desc()).limit(1)).one()
    return (f"{count} stored segment(s) end more than {FUTURE_FOOTAGE_ALARM.days} day after this clock "
            f"({format_time(now)}), e.g. {newest.venue}/{newest.camera}/{newest.seq} ends "
            f"{format_time(newest.end_at)} but arrived {format_time(newest.stored_at)}: that agent's clock is "
            "ahead; the footage is kept; fix the agent's time (NTP)")


def _candidates(session: Session, cutoff: datetime) -> Iterator[SegmentRecord]:
    after = 0
    while True:
        rows = list(session.scalars(select(SegmentRecord).where(
            SegmentRecord.id > after, SegmentRecord.kind == "segment", SegmentRecord.storage_path.is_not(None),
            SegmentRecord.deleted_at.is_(None), SegmentRecord.end_at <= cutoff, SegmentRecord.stored_at <= cutoff)
            .order_by(SegmentRecord.id).limit(READ_CHUNK)))
        if not rows:
            return
        yield from rows
        after = rows[-1].id
        session.expunge_all()  # keep memory flat over millions of candidates


def facts_of(row: SegmentRecord, windows_by_room: dict[tuple[str, str], list[BatchWindow]]) -> SegmentFacts:
    links = tuple(BatchLink(w.batch_id, w.part_end) for w in windows_by_room.get((row.venue, row.room), ())
                  if w.start <= row.end_at and w.end >= row.start_at)
    return SegmentFacts(row.id, row.venue, row.room, row.camera, row.start_at, row.end_at, row.size, links,
                        stored_at=row.stored_at)


def disk_alarm(store: FootageStore) -> str | None:
    try:
        usage = store.usage()
    except OSError as exc:
        return f"{store} cannot be checked ({exc.strerror}): check the volume"
    if usage is not None and usage.total and usage.free / usage.total < DISK_ALARM_FREE_FRACTION:
        return (f"{store} is {100 * (1 - usage.free / usage.total):.1f}% full "
                f"({usage.free / 1e9:.1f} GB free): add storage; retention never deletes footage early to make room")
    return None


def build_plan(session: Session, policy: RetentionPolicy, now: datetime, store: FootageStore,
               pre: timedelta, post: timedelta) -> EnforcePlan:
    """The same inputs give the same plan: `--dry-run` prints exactly what a real run would delete."""
    policy.check()
    check_clock(session, now)
    windows = batch_windows(session, pre, post)
    # Linking uses the part's window widened by the coverage margins ([coverage] in docs/config.md; docs/retention.md).
    by_room: dict[tuple[str, str], list[BatchWindow]] = defaultdict(list)
    for w in windows:
        by_room[(w.venue, w.room)].append(w)
    holds, alarms = active_holds(session, windows)
    stored = session.scalar(select(func.count()).select_from(SegmentRecord).where(
        SegmentRecord.kind == "segment", SegmentRecord.storage_path.is_not(None),
        SegmentRecord.deleted_at.is_(None))) or 0
    deletions: list[PlannedDeletion] = []
    candidates = held = locked = 0
    for row in _candidates(session, earliest_possible_floor(now)):
        candidates += 1
        decision: Decision = decide(facts_of(row, by_room), holds, now, policy)
        if decision.holds and now >= decision.keep_until:
            held += 1
        if decision.delete and row.lock_until is not None and now < row.lock_until:
            # Due by the policy, but the storage locked it a little longer (the lock covers the longest exam
            # day after the floor): not an error, the run after the lock's end deletes it.
            locked += 1
        elif decision.delete:
            assert row.storage_path is not None
            deletions.append(PlannedDeletion(row.id, row.venue, row.camera, row.seq, row.storage_path, row.size,
                                             row.sha256, row.record_hash, row.start_at, row.end_at,
                                             decision.keep_until, decision.rule, decision.reason,
                                             row.storage_version))
    for alarm in (future_footage_alarm(session, now), disk_alarm(store)):
        if alarm:
            alarms.append(alarm)
    return EnforcePlan(now, tuple(deletions), stored, candidates, held, tuple(alarms), locked)


# ---------------------------------------------------------------------------- execution

def execute(sessions: sessionmaker[Session], plan: EnforcePlan, store: FootageStore, policy: RetentionPolicy,
            actor: str, pre: timedelta, post: timedelta) -> EnforceResult:
    """Carry out the plan, each deletion in the order the module docstring gives. A store that fails to delete
    raises (OSError) after that deletion's tombstone and before its row is marked: the next run finishes it
    under the same tombstone. A storage that refuses because the object is locked or held (`ObjectLocked`) is
    not a failure of the run: that deletion is reported in `refused`, its row stays live, and a later run
    deletes it under the same tombstone once the storage allows it (never by force)."""
    result = EnforceResult()
    for item in plan.deletions:
        try:
            # the path is checked before anything is written
            present = store.exists(item.storage_path, item.storage_version)
        except UnsafePath as exc:  # a row written before paths were checked: never unlink outside storage
            log.error("%s not deleted: %s", item.target, exc)
            result.skipped.append(f"{item.target}: {exc}; not deleted")
            continue
        with sessions.begin() as session:
            row = session.get(SegmentRecord, item.segment_id, with_for_update=True)
            if row is None or row.deleted_at is not None:
                result.skipped.append(f"{item.target}: already deleted or gone")
                continue
            if (row.record_hash, row.storage_path, row.storage_version) != (item.record_hash, item.storage_path,
                                                                             item.storage_version):
                result.skipped.append(f"{item.target}: row changed since planning; left for the next run")
                continue
            # A hold placed or a batch imported while this run was going still wins.
            facts, holds = current_facts(session, row, pre, post)
            if not decide(facts, holds, plan.now, policy).delete:
                result.skipped.append(f"{item.target}: no longer due (hold or new batch link); kept")
                continue
            earlier = [e for e in audit.entries_for(session, audit.ACTION_SEGMENT_DELETE, item.target)
                       if audit.parse_detail(e).get("record_hash") == item.record_hash]
            if earlier:
                tombstone_seq = earlier[-1].seq  # an interrupted earlier run wrote it; finish that deletion
            else:
                tombstone_seq = audit.record(
                    session, audit.ACTION_SEGMENT_DELETE, actor=actor, target=item.target, reason=item.reason,
                    detail={"segment_id": item.segment_id, "storage_path": item.storage_path,
                            "storage_version": item.storage_version, "size": item.size, "sha256": item.sha256,
                            "record_hash": item.record_hash, "start": item.start, "end": item.end,
                            "keep_until": item.keep_until, "rule": item.rule}).seq
        if not present:
            log.info("%s: file %s is already missing; finishing its deletion", item.target, item.storage_path)
        try:
            store.unlink(item.storage_path, item.storage_version)
        except ObjectLocked as exc:
            log.error("%s not deleted: %s", item.target, exc)
            result.refused.append(f"{item.target}: {exc}; the row stays live (tombstone entry {tombstone_seq} is "
                                  "reused once the storage allows the deletion)")
            continue
        with sessions.begin() as session:
            row = session.get(SegmentRecord, item.segment_id)
            if row is not None:
                row.deleted_at = datetime.now(timezone.utc)
                row.deleted_entry = tombstone_seq
        log.info("deleted %s (%s, %s bytes), tombstone entry %s", item.target, item.storage_path, item.size,
                 tombstone_seq)
        result.deleted.append(item)
    return result


def plan_lines(plan: EnforcePlan) -> list[str]:
    lines = [f"delete {d.target} {d.storage_path} {d.size} B: {d.reason}" for d in plan.deletions]
    locked = f", {plan.locked} due but locked by the storage a little longer" if plan.locked else ""
    lines.append(f"plan at {shanghai_text(plan.now)}: delete {plan.files} files, {plan.bytes} bytes "
                 f"(of {plan.stored_segments} stored segments; {plan.candidates} old enough to check, "
                 f"{plan.held} kept by holds{locked})")
    for t in plan.per_venue():
        lines.append(f"  venue {t.venue}: {t.files} files, {t.bytes} bytes")
    return lines

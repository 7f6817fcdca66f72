"""Importing exam batches: the one transaction that creates or updates batches and their parts from a validated
file, the change log it keeps (`batch_import` table, audit entries) and what it reports back."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from exam_contract.canonical import format_time

from .batch_parse import PARTS, BatchImportError, PartRow, RowError, parse_rows, validate_rows
from .models import Agent, BatchImport, ExamBatch, ExamBatchPart

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FieldChange:
    field: str
    old: str | None
    new: str | None


@dataclass(frozen=True)
class BatchChange:
    batch_id: str
    action: str       # created | updated | unchanged
    changes: tuple[FieldChange, ...] = ()


@dataclass(frozen=True)
class ImportResult:
    source: str
    encoding: str
    rows: int
    batches: tuple[BatchChange, ...]
    warnings: tuple[str, ...] = ()

    def count(self, action: str) -> int:
        return sum(1 for b in self.batches if b.action == action)


# ---------------------------------------------------------------------------- the import transaction

def import_batches(session: Session, data: bytes, *, source: str, actor: str, fmt: str | None = None,
                   allow_room_change: bool = False) -> ImportResult:
    """Validate the whole file, then create or update its batches within `session`'s transaction (the
    caller commits). Raises BatchImportError, before writing anything, on any problem."""
    raw_rows, encoding = parse_rows(data, fmt)
    try:
        rows = validate_rows(raw_rows)
    except BatchImportError as exc:
        raise BatchImportError(exc.errors, source) from None
    by_batch: dict[str, list[PartRow]] = defaultdict(list)
    for row in rows:
        by_batch[row.batch_id].append(row)

    stored_batches = {b.id: b for b in session.scalars(select(ExamBatch).where(ExamBatch.id.in_(list(by_batch))))}
    stored_parts: dict[str, list[ExamBatchPart]] = defaultdict(list)
    for p in session.scalars(select(ExamBatchPart).where(ExamBatchPart.batch_id.in_(list(by_batch)))):
        stored_parts[p.batch_id].append(p)

    errors: list[RowError] = []
    if not allow_room_change:
        for batch_id, batch_rows in by_batch.items():
            for part in PARTS:
                new_rooms = {(r.venue, r.room): r for r in batch_rows if r.part == part}
                old_rooms = {(p.venue, p.room) for p in stored_parts[batch_id] if p.part == part}
                if new_rooms and old_rooms and set(new_rooms) != old_rooms:
                    row = min(new_rooms.values(), key=lambda r: r.row)
                    errors.append(RowError(row.row, "room", (
                        f"batch {batch_id} {part} is already imported in {_rooms_text(old_rooms)}, this file "
                        f"puts it in {_rooms_text(set(new_rooms))}: fix the file, or if the room really "
                        "changed import it again with --allow-room-change")))
    if errors:
        raise BatchImportError(errors, source)

    now = datetime.now(timezone.utc)
    venues = {r.venue for r in rows}
    known = set(session.scalars(select(Agent.venue).where(Agent.venue.in_(venues)).distinct()))
    warnings = tuple(f"venue {v} has no enrolled agent yet (footage will link once it arrives)"
                     for v in sorted(venues - known))
    results: list[BatchChange] = []
    for batch_id, batch_rows in by_batch.items():
        first = batch_rows[0]
        changes: list[FieldChange] = []
        batch = stored_batches.get(batch_id)
        if batch is None:
            session.add(ExamBatch(id=batch_id, institution=first.institution, occupation=first.occupation,
                                  level=first.level, created_at=now, updated_at=now))
            action = "created"
        else:
            for column in ("institution", "occupation", "level"):
                if getattr(batch, column) != getattr(first, column):
                    changes.append(FieldChange(column, getattr(batch, column), getattr(first, column)))
                    setattr(batch, column, getattr(first, column))
            action = "updated"
        existing = {(p.part, p.venue, p.room): p for p in stored_parts[batch_id]}
        for row in batch_rows:
            label = f"{row.part}/{row.venue}/{row.room}"
            stored = existing.pop((row.part, row.venue, row.room), None)
            if stored is None:
                session.add(ExamBatchPart(batch_id=batch_id, part=row.part, venue=row.venue, room=row.room,
                                          start_at=row.start, end_at=row.end))
                if batch is not None:
                    changes.append(FieldChange(f"{label}", None, f"{format_time(row.start)}..{format_time(row.end)}"))
                continue
            for column, value in (("start_at", row.start), ("end_at", row.end)):
                if getattr(stored, column) != value:
                    changes.append(FieldChange(f"{label}.{column.removesuffix('_at')}",
                                               format_time(getattr(stored, column)), format_time(value)))
                    setattr(stored, column, value)
        if allow_room_change:
            # Parts re-imported in other rooms drop the rooms this file no longer names.
            for (part, venue, room), stored in existing.items():
                if any(r.part == part for r in batch_rows):
                    changes.append(FieldChange(f"{part}/{venue}/{room}",
                                               f"{format_time(stored.start_at)}..{format_time(stored.end_at)}", None))
                    session.delete(stored)
        if batch is not None:
            if changes:
                batch.updated_at = now
            else:
                action = "unchanged"
        results.append(BatchChange(batch_id, action, tuple(changes)))

    digest = hashlib.sha256(data).hexdigest()
    session.add(BatchImport(at=now, actor=actor, source=source, sha256=digest, rows=len(rows),
                            changes=json.dumps([asdict(r) for r in results], ensure_ascii=False, sort_keys=True)))
    for result in results:
        if result.action != "unchanged":
            _audit(session, actor, result, source, digest)
        log.info("batch %s %s from %s by %s (%s changes)", result.batch_id, result.action, source, actor,
                 len(result.changes))
    session.flush()
    return ImportResult(source, encoding, len(rows), tuple(results), warnings)


def _audit(session: Session, actor: str, result: BatchChange, source: str, digest: str) -> None:
    """The one call site into the audit log (collector/audit.py, issue 5)."""
    from . import audit

    audit.record(session, audit.ACTION_BATCH_IMPORT, actor=actor, target=result.batch_id,
                 detail={"action": result.action, "source": source, "sha256": digest,
                         "changes": [asdict(c) for c in result.changes]})


def _rooms_text(rooms: set[tuple[str, str]]) -> str:
    return ", ".join(f"room {room} of {venue}" for venue, room in sorted(rooms))


def import_file(sessions: sessionmaker[Session], path: Path, *, actor: str,
                allow_room_change: bool = False) -> ImportResult:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BatchImportError([RowError(0, "file", f"cannot read {path}: {exc.strerror or exc}")], str(path)) from exc
    fmt = "json" if Path(path).suffix.lower() == ".json" else None
    with sessions.begin() as session:
        return import_batches(session, data, source=str(path), actor=actor, fmt=fmt,
                              allow_room_change=allow_room_change)

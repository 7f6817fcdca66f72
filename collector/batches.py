"""Exam batches (批次): import from the exam-affairs system, link footage, report coverage.

Import (`import_batches`) is all-or-nothing: every row is checked first and all problems are raised together
as one `BatchImportError`; only a clean file touches the database, in one transaction.

Linking is a query, not a table: a part's footage is every record of a camera seen in the part's venue and
room that overlaps `[start - pre_margin, end + post_margin]`. Whichever arrives first, batch or footage, the
answer is the same at the time it is asked, and there is no link table to go stale.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import DateTime, select, tuple_, type_coerce
from sqlalchemy.orm import Session, sessionmaker

from exam_contract.canonical import format_time

from .coverage import (CAUSE_MISSING_SEQ, CAUSE_REJECTED, STATUS_COMPLETE, STATUS_GAPS, STATUS_NO_FOOTAGE,
                       STATUS_PENDING, CameraCoverage, CameraInput, GapRecord, PartCoverage, SegmentSpan, SeqHole,
                       Window, camera_coverage, part_coverage)
from .models import EVENT_REJECTED, Agent, BatchImport, ExamBatch, ExamBatchPart, IngestEvent, SegmentRecord

log = logging.getLogger(__name__)

SHANGHAI = ZoneInfo("Asia/Shanghai")
COLUMNS: tuple[str, ...] = ("batch_id", "institution", "venue", "occupation", "level", "part", "room", "start", "end")
PARTS: tuple[str, ...] = ("theory", "practical")
MAX_PART_HOURS = 24
# A segment is at most a few minutes long; records starting earlier than this before a window cannot overlap
# it, except a long stated gap, which is found as the record just before.
RECORD_SLACK = timedelta(hours=1)
STAGING_FRESH_SECONDS = 600
RESAVE_ADVICE = ("re-save it as UTF-8: in Excel choose 文件 → 另存为 → \"CSV UTF-8 (逗号分隔)(*.csv)\"; "
                 "in WPS choose 另存为 → CSV and encoding UTF-8")


# ---------------------------------------------------------------------------- errors and results

@dataclass(frozen=True)
class RowError:
    row: int          # CSV: line number as a spreadsheet shows it (header = 1); JSON: 1-based item index
    field: str
    problem: str

    def __str__(self) -> str:
        return f"row {self.row}, {self.field}: {self.problem}"


class BatchImportError(ValueError):
    """The file was not imported (nothing was); `errors` lists each problem with its row and field."""

    def __init__(self, errors: Sequence[RowError], source: str = "") -> None:
        self.errors = list(errors)
        self.source = source
        shown = "; ".join(str(e) for e in self.errors[:5])
        more = f" (and {len(self.errors) - 5} more)" if len(self.errors) > 5 else ""
        super().__init__(f"{source + ': ' if source else ''}{len(self.errors)} problem(s), nothing imported: "
                         f"{shown}{more}")


class BatchNotFound(LookupError):
    """No batch with that id."""


@dataclass(frozen=True)
class PartRow:
    row: int
    batch_id: str
    institution: str
    venue: str
    occupation: str
    level: str
    part: str
    room: str
    start: datetime   # UTC
    end: datetime     # UTC


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


# ---------------------------------------------------------------------------- reading files

def decode_text(data: bytes) -> tuple[str, str]:
    """(text, encoding name). UTF-8 with or without BOM, UTF-16 with BOM (Excel "Unicode text"), else
    GB18030 (which includes GBK), the default of Excel and WPS on Chinese Windows."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="strict"), "utf-8-sig"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16"), "utf-16"
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("gb18030"), "gb18030"
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise BatchImportError([RowError(line, "file", f"is neither UTF-8 nor GB18030/GBK text (bad byte at "
                                                       f"offset {exc.start}): {RESAVE_ADVICE}")]) from exc


def _csv_rows(text: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    lines = text.splitlines()
    header_line = next((line for line in lines if line.strip()), "")
    delimiter = max((",", "\t", ";"), key=header_line.count)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    for values in reader:
        if not any(v.strip() for v in values):
            continue
        if header is None:
            header = [v.strip().lower() for v in values]
            continue
        rows.append((reader.line_num, values))
    return header or [], rows


def parse_rows(data: bytes, fmt: str | None = None) -> tuple[list[tuple[int, dict[str, str]]], str]:
    """([(row number, {column: value})], encoding). Raises BatchImportError for structural problems."""
    text, encoding = decode_text(data)
    body = text.lstrip("\ufeff").lstrip()
    if fmt is None:
        fmt = "json" if body[:1] in ("[", "{") else "csv"
    errors: list[RowError] = []
    out: list[tuple[int, dict[str, str]]] = []
    if fmt == "json":
        try:
            raw = json.loads(body)
        except ValueError as exc:
            raise BatchImportError([RowError(1, "file", f"is not valid JSON ({exc}): give a list of objects "
                                                        f"with keys {', '.join(COLUMNS)}")]) from exc
        if isinstance(raw, dict):
            raw = raw.get("rows", raw.get("parts"))
        if not isinstance(raw, list):
            raise BatchImportError([RowError(1, "file", "JSON must be a list of objects (or {\"rows\": [...]}), "
                                                        f"each with keys {', '.join(COLUMNS)}")])
        for index, item in enumerate(raw, start=1):
            if not isinstance(item, dict):
                errors.append(RowError(index, "row", "is not a JSON object"))
                continue
            missing = [c for c in COLUMNS if c not in item]
            for column in missing:
                errors.append(RowError(index, column, "missing key"))
            values = {}
            for k, v in item.items():
                if v is not None and not isinstance(v, (str, int, float)):
                    errors.append(RowError(index, str(k), f"must be a string, not {type(v).__name__}"))
                values[str(k).strip().lower()] = "" if v is None else str(v)
            out.append((index, values))
    else:
        header, rows = _csv_rows(body)
        missing = [c for c in COLUMNS if c not in header]
        if not header:
            raise BatchImportError([RowError(1, "file", f"is empty: give a header row {','.join(COLUMNS)} "
                                                        "and one row per batch part")])
        if missing:
            raise BatchImportError([RowError(1, c, f"missing column (the header must name {','.join(COLUMNS)})")
                                    for c in missing])
        for line, values in rows:
            if len(values) != len(header):
                errors.append(RowError(line, "row", f"has {len(values)} fields, the header has {len(header)}"))
                continue
            out.append((line, dict(zip(header, values))))
    if errors:
        raise BatchImportError(errors)
    if not out:
        raise BatchImportError([RowError(1, "file", "has no data rows: add one row per batch part")])
    return out, encoding


_SLASH_TIME = re.compile(r"^(\d{4})/(\d{1,2})/(\d{1,2})[ T](\d{1,2}):(\d{2})(?::(\d{2}))?$")
_HAS_CLOCK = re.compile(r"\d[T ]\d{1,2}:\d{2}")


def parse_exam_time(value: str) -> datetime:
    """ISO 8601 with a time of day, to UTC; a naive time is Asia/Shanghai (PRODUCT.md). Also the
    `2026/11/26 9:00` form Excel writes when a CSV of ISO times is opened and saved again."""
    text = value.strip()
    slash = _SLASH_TIME.match(text)
    if slash:
        y, mo, d, h, mi, s = slash.groups()
        text = f"{int(y):04d}-{int(mo):02d}-{int(d):02d}T{int(h):02d}:{mi}:{s or '00'}"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 time: write e.g. 2026-11-26T09:00:00+08:00 "
                         "(without an offset it is taken as Asia/Shanghai)") from None
    if not _HAS_CLOCK.search(text):
        raise ValueError(f"{value!r} has no time of day: write e.g. 2026-11-26T09:00:00+08:00")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=SHANGHAI)
    return moment.astimezone(timezone.utc)


def validate_rows(rows: Sequence[tuple[int, dict[str, str]]]) -> list[PartRow]:
    errors: list[RowError] = []
    parts: list[PartRow] = []
    first_of_batch: dict[str, PartRow] = {}
    seen: dict[tuple[str, str, str], int] = {}
    for line, values in rows:
        row_errors: list[RowError] = []
        clean = {c: (values.get(c) or "").strip() for c in COLUMNS}
        for column in ("batch_id", "institution", "venue", "occupation", "level", "room"):
            if not clean[column]:
                row_errors.append(RowError(line, column, "is empty"))
        part = clean["part"].lower()
        if part not in PARTS:
            row_errors.append(RowError(line, "part", f"{clean['part']!r} is not theory (理论知识) or "
                                                     "practical (操作技能)"))
        times: dict[str, datetime] = {}
        for column in ("start", "end"):
            try:
                times[column] = parse_exam_time(clean[column])
            except ValueError as exc:
                row_errors.append(RowError(line, column, str(exc)))
        if len(times) == 2:
            if times["end"] <= times["start"]:
                row_errors.append(RowError(line, "end", f"{clean['end']} is not after start {clean['start']}"))
            elif times["end"] - times["start"] > timedelta(hours=MAX_PART_HOURS):
                row_errors.append(RowError(line, "end", f"the part lasts more than {MAX_PART_HOURS} h: check "
                                                        "the date of start and end"))
        if row_errors:
            errors.extend(row_errors)
            continue
        row = PartRow(line, clean["batch_id"], clean["institution"], clean["venue"], clean["occupation"],
                      clean["level"], part, clean["room"], times["start"], times["end"])
        key = (row.batch_id, row.part, row.room)
        if key in seen:
            errors.append(RowError(line, "room", f"batch {row.batch_id} {row.part} in room {row.room} is "
                                                 f"already given in row {seen[key]}"))
            continue
        seen[key] = line
        first = first_of_batch.setdefault(row.batch_id, row)
        for column in ("institution", "occupation", "level"):
            if getattr(row, column) != getattr(first, column):
                errors.append(RowError(line, column, f"{getattr(row, column)!r} differs from "
                                                     f"{getattr(first, column)!r} in row {first.row} of the "
                                                     f"same batch {row.batch_id}"))
        parts.append(row)
    if errors:
        raise BatchImportError(errors)
    return parts


# ---------------------------------------------------------------------------- import

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


def import_file(sessions: sessionmaker[Session], path: Path, *, actor: str, allow_room_change: bool = False) -> ImportResult:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BatchImportError([RowError(0, "file", f"cannot read {path}: {exc.strerror or exc}")], str(path)) from exc
    fmt = "json" if Path(path).suffix.lower() == ".json" else None
    with sessions.begin() as session:
        return import_batches(session, data, source=str(path), actor=actor, fmt=fmt,
                              allow_room_change=allow_room_change)


# ---------------------------------------------------------------------------- linking and coverage

@dataclass(frozen=True)
class PartReport:
    part: str
    venue: str
    room: str
    start: datetime
    end: datetime
    coverage: PartCoverage

    @property
    def status(self) -> str:
        return self.coverage.status


@dataclass(frozen=True)
class BatchReport:
    batch_id: str
    institution: str
    occupation: str
    level: str
    parts: tuple[PartReport, ...]
    generated_at: datetime
    tolerance_seconds: float
    pre_margin_minutes: int
    post_margin_minutes: int

    @property
    def status(self) -> str:
        statuses = {p.status for p in self.parts}
        for status in (STATUS_PENDING, STATUS_NO_FOOTAGE, STATUS_GAPS):
            if status in statuses:
                return status
        return STATUS_COMPLETE if statuses else STATUS_NO_FOOTAGE


def room_cameras(session: Session, venue: str, room: str) -> list[str]:
    """Every camera that ever recorded in the room: one index seek per camera (a loose index scan)."""
    cameras: list[str] = []
    while True:
        query = select(SegmentRecord.camera).where(SegmentRecord.venue == venue, SegmentRecord.room == room)
        if cameras:
            query = query.where(SegmentRecord.camera > cameras[-1])
        camera = session.scalar(query.order_by(SegmentRecord.camera).limit(1))
        if camera is None:
            return cameras
        cameras.append(camera)


def linked_records(session: Session, venue: str, room: str, lo: datetime, hi: datetime) -> list[SegmentRecord]:
    """Records (segments and gaps) of the room's cameras overlapping [lo, hi): the part's linked footage."""
    out: list[SegmentRecord] = []
    for camera in room_cameras(session, venue, room):
        out.extend(session.scalars(select(SegmentRecord).where(
            SegmentRecord.venue == venue, SegmentRecord.camera == camera, SegmentRecord.room == room,
            SegmentRecord.start_at >= lo - RECORD_SLACK, SegmentRecord.start_at < hi, SegmentRecord.end_at > lo)
            .order_by(SegmentRecord.start_at)))
    return out


def parts_linked_to(session: Session, venue: str, room: str, start: datetime, end: datetime,
                    pre_margin: timedelta, post_margin: timedelta) -> list[ExamBatchPart]:
    """The batch parts a record of this venue/room/time links to (the other direction of `linked_records`)."""
    return list(session.scalars(select(ExamBatchPart).where(
        ExamBatchPart.venue == venue, ExamBatchPart.room == room,
        ExamBatchPart.start_at < end + pre_margin, ExamBatchPart.end_at > start - post_margin)))


def _fast_flags(manifest: str) -> tuple[tuple[str, ...], bool, str | None]:
    """(health, clock synced, gap cause) from the canonical manifest text; the common clean case is found
    without parsing, since canonical JSON has exactly one spelling of these tokens."""
    if '"health":[]' in manifest and '"synced":true' in manifest and '"cause":null' in manifest:
        return (), True, None
    raw = json.loads(manifest)
    clock = raw.get("clock") or {}
    return tuple(raw.get("health") or ()), bool(clock.get("synced", False)), raw.get("cause")


# Times are read with the plain DateTime type: naive UTC on SQLite, aware on PostgreSQL, converted by the driver
# in C. Only the few values that leave `camera_input` are made UTC-aware, which matters for a period audit
# that reads half a million rows per camera.
_DRIVER_TIME = DateTime(timezone=True)
_RECORD_COLUMNS = (SegmentRecord.seq, SegmentRecord.kind, SegmentRecord.room,
                   type_coerce(SegmentRecord.start_at, _DRIVER_TIME).label("start_at"),
                   type_coerce(SegmentRecord.end_at, _DRIVER_TIME).label("end_at"), SegmentRecord.manifest,
                   SegmentRecord.clock_suspect)


def camera_input(session: Session, venue: str, room: str | None, camera: str, window: Window,
                 staging_dir: Path | None = None, agents: Sequence[str] = (),
                 rows: Iterable[Any] | None = None) -> CameraInput:
    """What the database knows about one camera around the window, for the coverage engine. Footage counts
    only while the camera was in `room` (None: in any room). Consecutive clean segments (no health flag,
    clock synced, not clock-suspect) are handed over merged into one span: the union, and so the coverage,
    is the same.
    `rows` may bring the camera's records starting in [window.start - RECORD_SLACK, window.end), in start
    order, as `_RECORD_COLUMNS` (a period audit streams them for all cameras in one query)."""
    conn = session.connection()
    naive = conn.dialect.name == "sqlite"
    # psycopg returns times in the session's zone; bounds in that same tzinfo object compare ten times faster.
    info = getattr(conn.connection.dbapi_connection, "info", None)
    row_zone = getattr(info, "timezone", None) or timezone.utc

    def driver(t: datetime) -> datetime:
        return t.astimezone(timezone.utc).replace(tzinfo=None) if naive else t.astimezone(row_zone)

    def utc(t: datetime) -> datetime:
        return t.replace(tzinfo=timezone.utc) if naive else t.astimezone(timezone.utc)

    w_start, w_end = driver(window.start), driver(window.end)
    base = select(*_RECORD_COLUMNS).where(SegmentRecord.venue == venue, SegmentRecord.camera == camera)
    before = conn.execute(base.where(SegmentRecord.start_at < window.start - RECORD_SLACK)
                          .order_by(SegmentRecord.start_at.desc()).limit(1)).first()
    after = conn.execute(base.where(SegmentRecord.start_at >= window.end)
                         .order_by(SegmentRecord.start_at).limit(1)).first()
    if rows is None:
        result = conn.execute(base.where(SegmentRecord.start_at >= window.start - RECORD_SLACK,
                                         SegmentRecord.start_at < window.end).order_by(SegmentRecord.start_at))
        # Row by row is fastest from sqlite3 but slow from psycopg, which is read in blocks.
        rows = result if naive else itertools.chain.from_iterable(result.partitions(20_000))
    segments: list[SegmentSpan] = []
    gaps: list[GapRecord] = []
    chain: list[tuple[int, datetime, datetime]] = []   # (seq, start, end) of every record, for the seq holes
    run_start = run_end = None
    for records in (((before,) if before is not None else ()), rows, ((after,) if after is not None else ())):
        for seq, kind, r_room, start, end, manifest, suspect in records:
            chain.append((seq, start, end))
            if (room is not None and r_room != room) or end <= w_start or start >= w_end:
                continue
            health, synced, cause = _fast_flags(manifest)
            if kind == "gap":
                gaps.append(GapRecord(utc(start), utc(end), cause or "unknown"))
            elif health or not synced or suspect:
                segments.append(SegmentSpan(utc(start), utc(end), health, synced, bool(suspect)))
            elif run_end is not None and start <= run_end:
                if end > run_end:
                    run_end = end
            else:
                if run_end is not None:
                    segments.append(SegmentSpan(utc(run_start), utc(run_end)))
                run_start, run_end = start, end
    if run_end is not None:
        segments.append(SegmentSpan(utc(run_start), utc(run_end)))
    if any(a[0] >= b[0] for a, b in zip(chain, chain[1:])):
        chain.sort(key=lambda c: c[0])
    holes: list[SeqHole] = []
    for (seq_a, _, end_a), (seq_b, start_b, _) in zip(chain, chain[1:]):
        if seq_b > seq_a + 1:
            holes.append(SeqHole(seq_a + 1, seq_b - 1, utc(end_a), utc(start_b)))
    if chain and chain[0][0] > 1 and before is None:
        holes.append(SeqHole(1, chain[0][0] - 1, None, utc(chain[0][1])))
    if holes:
        low, high = min(h.first_seq for h in holes), max(h.last_seq for h in holes)
        rejected = set(session.scalars(select(IngestEvent.seq).where(
            IngestEvent.venue == venue, IngestEvent.camera == camera, IngestEvent.event == EVENT_REJECTED,
            IngestEvent.seq >= low, IngestEvent.seq <= high)))
        if rejected:
            holes = [SeqHole(h.first_seq, h.last_seq, h.after, h.before,
                             (CAUSE_MISSING_SEQ, CAUSE_REJECTED) if any(h.first_seq <= s <= h.last_seq for s in rejected)
                             else (CAUSE_MISSING_SEQ,)) for h in holes]
    last_end = utc(max(c[2] for c in chain)) if chain else None
    return CameraInput(venue, camera, tuple(segments), tuple(gaps), tuple(holes),
                       _in_flight(staging_dir, agents, camera), last_end)


def _in_flight(staging_dir: Path | None, agents: Sequence[str], camera: str) -> bool:
    """A file of this camera is being reassembled in staging right now (touched in the last minutes)."""
    if staging_dir is None:
        return False
    cutoff = time.time() - STAGING_FRESH_SECONDS
    for agent in agents:
        for path in (staging_dir / agent).glob(f"{camera}-*"):
            try:
                if path.stat().st_mtime >= cutoff and not (path / "rejected.json").exists():
                    return True
            except FileNotFoundError:
                continue
    return False


def batch_report(session: Session, batch_id: str, *, tolerance_seconds: float = 2, pre_margin_minutes: int = 15,
                 post_margin_minutes: int = 15, now: datetime | None = None,
                 staging_dir: Path | None = None) -> BatchReport:
    """Coverage of every part × camera of a batch. The coverage window is the exam time itself; the margins
    only decide which footage is linked (and kept) with the batch."""
    batch = session.get(ExamBatch, batch_id)
    if batch is None:
        raise BatchNotFound(f"batch {batch_id!r} is not imported: check the id with `exam-collector batches list` "
                            "or import it with `exam-collector batches import FILE`")
    now = now or datetime.now(timezone.utc)
    tolerance = timedelta(seconds=tolerance_seconds)
    parts = session.scalars(select(ExamBatchPart).where(ExamBatchPart.batch_id == batch_id)
                            .order_by(ExamBatchPart.start_at, ExamBatchPart.part, ExamBatchPart.room)).all()
    reports: list[PartReport] = []
    agents_of: dict[str, list[str]] = {}
    for part in parts:
        if part.venue not in agents_of:
            agents_of[part.venue] = list(session.scalars(select(Agent.id).where(Agent.venue == part.venue)))
        window = Window(part.start_at, part.end_at)
        inputs = [camera_input(session, part.venue, part.room, camera, window, staging_dir, agents_of[part.venue])
                  for camera in room_cameras(session, part.venue, part.room)]
        reports.append(PartReport(part.part, part.venue, part.room, part.start_at, part.end_at,
                                  part_coverage(window, inputs, tolerance, now)))
    return BatchReport(batch.id, batch.institution, batch.occupation, batch.level, tuple(reports), now,
                       tolerance_seconds, pre_margin_minutes, post_margin_minutes)


def all_cameras(session: Session) -> list[tuple[str, str]]:
    """Every (venue, camera) with a record, one index seek each."""
    out: list[tuple[str, str]] = []
    while True:
        query = select(SegmentRecord.venue, SegmentRecord.camera)
        if out:
            query = query.where(tuple_(SegmentRecord.venue, SegmentRecord.camera) > tuple_(*out[-1]))
        row = session.execute(query.order_by(SegmentRecord.venue, SegmentRecord.camera).limit(1)).first()
        if row is None:
            return out
        out.append((row.venue, row.camera))


def audit_period(session: Session, start: datetime, end: datetime, *, tolerance_seconds: float = 2,
                 now: datetime | None = None) -> list[CameraCoverage]:
    """Coverage of every camera over a whole period (whatever room it was in), from one ordered pass over
    the segment table.

    On PostgreSQL the pass is one query streamed through a server-side cursor (the planner may scan in
    parallel and sort). SQLite has no server-side cursor and walks the (venue, camera, start_at) index either
    way, so there one range query per camera is the same pass without grouping every row in Python."""
    window = Window(start, end)
    now = now or datetime.now(timezone.utc)
    tolerance = timedelta(seconds=tolerance_seconds)
    conn = session.connection()
    if conn.dialect.name == "sqlite":
        return [camera_coverage(window, camera_input(session, venue, None, camera, window), tolerance, now)
                for venue, camera in all_cameras(session)]
    query = (select(SegmentRecord.venue, SegmentRecord.camera, *_RECORD_COLUMNS)
             .where(SegmentRecord.start_at >= start - RECORD_SLACK, SegmentRecord.start_at < end)
             .order_by(SegmentRecord.venue, SegmentRecord.camera, SegmentRecord.start_at))
    stream = itertools.chain.from_iterable(
        conn.execution_options(stream_results=True, yield_per=20_000).execute(query).partitions())
    found: dict[tuple[str, str], CameraCoverage] = {}
    for (venue, camera), group in itertools.groupby(stream, key=lambda r: (r[0], r[1])):
        records = (r[2:] for r in group)
        found[(venue, camera)] = camera_coverage(
            window, camera_input(session, venue, None, camera, window, rows=records), tolerance, now)
    return [found.get((venue, camera)) or camera_coverage(window, camera_input(session, venue, None, camera, window),
                                                          tolerance, now)
            for venue, camera in all_cameras(session)]


@dataclass(frozen=True)
class BatchSummary:
    batch_id: str
    institution: str
    occupation: str
    level: str
    parts: int
    first_start: datetime | None
    last_end: datetime | None
    updated_at: datetime


def list_batches(session: Session) -> list[BatchSummary]:
    parts: dict[str, list[ExamBatchPart]] = defaultdict(list)
    for p in session.scalars(select(ExamBatchPart)):
        parts[p.batch_id].append(p)
    out = []
    for b in session.scalars(select(ExamBatch).order_by(ExamBatch.id)):
        ps = parts.get(b.id, [])
        out.append(BatchSummary(b.id, b.institution, b.occupation, b.level, len(ps),
                                min((p.start_at for p in ps), default=None), max((p.end_at for p in ps), default=None),
                                b.updated_at))
    return sorted(out, key=lambda s: (s.first_start or s.updated_at, s.batch_id))


# ---------------------------------------------------------------------------- JSON form (CLI --json, HTTP API)

def _local(t: datetime) -> str:
    return t.astimezone(SHANGHAI).isoformat(timespec="seconds")


def report_json(report: BatchReport) -> dict[str, Any]:
    """Times in UTC (`…Z`) plus Asia/Shanghai local (`*_local`)."""
    return {
        "batch_id": report.batch_id, "institution": report.institution, "occupation": report.occupation,
        "level": report.level, "status": report.status, "generated_at": format_time(report.generated_at),
        "gap_tolerance_seconds": report.tolerance_seconds,
        "parts": [{
            "part": p.part, "venue": p.venue, "room": p.room, "status": p.status,
            "start": format_time(p.start), "end": format_time(p.end),
            "start_local": _local(p.start), "end_local": _local(p.end),
            "cameras": [{
                "camera": c.camera, "status": c.status, "covered_percent": round(c.percent, 3),
                "covered_seconds": round(c.covered_seconds, 3), "window_seconds": c.window_seconds,
                "unsynced_segments": c.unsynced_segments, "clock_suspect_segments": c.suspect_segments,
                "gaps": [{"start": format_time(g.start), "end": format_time(g.end), "start_local": _local(g.start),
                          "end_local": _local(g.end), "seconds": round(g.seconds, 3), "causes": list(g.causes)}
                         for g in c.gaps],
            } for c in p.coverage.cameras],
        } for p in report.parts],
    }

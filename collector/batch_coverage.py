"""Linking footage to batch parts (a query, not a table) and the coverage of batches and periods as the database
gives it (`camera_input` for the arithmetic in collector/coverage.py), the batch list and the JSON form."""

from __future__ import annotations

import itertools
import json
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, select, tuple_, type_coerce
from sqlalchemy.orm import Session

from exam_contract.canonical import format_time

from .batch_parse import SHANGHAI
from .coverage import (CAUSE_DELETED, CAUSE_MISSING_SEQ, CAUSE_REJECTED, STATUS_COMPLETE, STATUS_GAPS,
                       STATUS_NO_FOOTAGE, STATUS_PENDING, CameraCoverage, CameraInput, GapRecord, PartCoverage,
                       SegmentSpan, SeqHole, Window, camera_coverage, part_coverage)
from .models import EVENT_REJECTED, Agent, ExamBatch, ExamBatchPart, IngestEvent, SegmentRecord

# A segment is at most a few minutes long; records starting earlier than this before a window cannot overlap
# it, except a long stated gap, which is found as the record just before.
RECORD_SLACK = timedelta(hours=1)
STAGING_FRESH_SECONDS = 600


class BatchNotFound(LookupError):
    """No batch with that id."""


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


# ---------------------------------------------------------------------------- linking footage to parts

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


# ---------------------------------------------------------------------------- coverage from the database

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
                   SegmentRecord.clock_suspect, SegmentRecord.deleted_at)


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
    run_start: datetime | None = None
    run_end: datetime | None = None
    for records in (((before,) if before is not None else ()), rows, ((after,) if after is not None else ())):
        for seq, kind, r_room, start, end, manifest, suspect, deleted_at in records:
            chain.append((seq, start, end))
            if (room is not None and r_room != room) or end <= w_start or start >= w_end:
                continue
            health, synced, cause = _fast_flags(manifest)
            if kind == "segment" and deleted_at is not None:
                # removed by retention (its floor had passed and no hold applied): no longer footage
                gaps.append(GapRecord(utc(start), utc(end), CAUSE_DELETED))
            elif kind == "gap":
                gaps.append(GapRecord(utc(start), utc(end), cause or "unknown"))
            elif health or not synced or suspect:
                segments.append(SegmentSpan(utc(start), utc(end), health, synced, bool(suspect)))
            elif run_end is not None and start <= run_end:
                if end > run_end:
                    run_end = end
            else:
                if run_start is not None and run_end is not None:
                    segments.append(SegmentSpan(utc(run_start), utc(run_end)))
                run_start, run_end = start, end
    if run_start is not None and run_end is not None:
        segments.append(SegmentSpan(utc(run_start), utc(run_end)))
    if any(a[0] >= b[0] for a, b in zip(chain, chain[1:], strict=False)):
        chain.sort(key=lambda c: c[0])
    holes: list[SeqHole] = []
    for (seq_a, _, end_a), (seq_b, start_b, _) in zip(chain, chain[1:], strict=False):
        if seq_b > seq_a + 1:
            holes.append(SeqHole(seq_a + 1, seq_b - 1, utc(end_a), utc(start_b)))
    if chain and chain[0][0] > 1 and before is None:
        holes.append(SeqHole(1, chain[0][0] - 1, None, utc(chain[0][1])))
    if holes:
        low, high = min(h.first_seq for h in holes), max(h.last_seq for h in holes)
        rejected = {s for s in session.scalars(select(IngestEvent.seq).where(
            IngestEvent.venue == venue, IngestEvent.camera == camera, IngestEvent.event == EVENT_REJECTED,
            IngestEvent.seq >= low, IngestEvent.seq <= high)) if s is not None}   # (the bounds exclude null)
        if rejected:
            holes = [SeqHole(h.first_seq, h.last_seq, h.after, h.before,
                             (CAUSE_MISSING_SEQ, CAUSE_REJECTED)
                             if any(h.first_seq <= s <= h.last_seq for s in rejected)
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


# ---------------------------------------------------------------------------- the batch list

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

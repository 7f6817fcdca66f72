"""`exam-retention audit`: coverage gaps over a period, across institutions, venues and batches.

Two views of the period (days in Asia/Shanghai, `--to` inclusive):
- batch parts whose exam window overlaps the period, through the coverage engine (collector.batches /
  collector.coverage): per part and camera, status and every gap with its causes;
- camera continuity: every camera with records in the period, its missing sequence numbers (records that
  never arrived: lost footage whenever it happened) and its stated outages (gap records).
A gap inside a batch window, a part without footage, or a missing sequence number counts as a gap (exit 3).
A stated outage outside every exam window is listed but not counted: the product only promises coverage of
exam windows ([coverage] in docs/config.md).
Records the collector flagged `clock_suspect` (their own times far from their arrival: the agent's clock is
not to be believed) are listed per camera when their claimed times overlap the period or they arrived in it:
count, first and last arrival (`stored_at`), claimed times and seqs. They are kept and still cover; a gap
next to one names `clock_suspect`. They are not counted as gaps.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from collector import audit
from collector.batches import batch_report
from collector.config import CollectorConfig
from collector.coverage import STATUS_GAPS, STATUS_NO_FOOTAGE, STATUS_PENDING
from collector.models import ExamBatchPart, SegmentRecord

from .policy import SHANGHAI
from .report_render import (CAUSES_ZH, CSV_COLUMNS, PART_ZH, STATUS_ZH, local, report_csv, report_html, report_json,
                            write_report)

MAX_SEQ_LIST = 50


@dataclass(frozen=True)
class ReportGap:
    source: str                   # "batch" (a gap in an exam window) or "sequence" (records never received)
    institution: str
    venue: str
    camera: str
    room: str
    start: datetime | None
    end: datetime | None
    causes: tuple[str, ...]
    batch_id: str | None = None
    part: str | None = None
    seqs: str | None = None       # for "sequence": the missing seq range

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds() if self.start and self.end else 0.0


@dataclass(frozen=True)
class PartRow:
    batch_id: str
    institution: str
    occupation: str
    level: str
    part: str
    venue: str
    room: str
    start: datetime
    end: datetime
    status: str
    cameras: int
    covered_percent: float
    gaps: int


@dataclass(frozen=True)
class Outage:
    start: datetime
    end: datetime
    cause: str


@dataclass(frozen=True)
class CameraRow:
    institution: str
    venue: str
    camera: str
    rooms: tuple[str, ...]
    segments: int
    gap_records: int
    seconds_recorded: float
    missing_seqs: tuple[int, ...]
    outages: tuple[Outage, ...]


@dataclass(frozen=True)
class SuspectRow:
    """A camera's records flagged `clock_suspect` that concern the period (claimed times or arrival in it)."""

    institution: str
    venue: str
    camera: str
    records: int
    first_stored: datetime        # arrival at the collector (its clock), the earliest of these records
    last_stored: datetime
    claimed_start: datetime       # the earliest start / latest end the agent's clock claimed
    claimed_end: datetime
    seqs: tuple[int, ...]         # the first MAX_SEQ_LIST of them


@dataclass(frozen=True)
class Totals:
    institutions: int
    venues: int
    batches: int
    parts: int
    parts_with_gaps: int
    cameras: int
    gaps: int
    gap_seconds: float
    part_status: dict[str, int] = field(default_factory=dict)
    clock_suspect_records: int = 0


@dataclass(frozen=True)
class AuditReport:
    first_day: date
    last_day: date
    start: datetime
    end: datetime
    generated_at: datetime
    parts: tuple[PartRow, ...]
    cameras: tuple[CameraRow, ...]
    gaps: tuple[ReportGap, ...]
    totals: Totals
    clock_suspect: tuple[SuspectRow, ...] = ()


def period_bounds(first: date, last: date) -> tuple[datetime, datetime]:
    lo = datetime.combine(first, time(0), tzinfo=SHANGHAI).astimezone(timezone.utc)
    hi = datetime.combine(last + timedelta(days=1), time(0), tzinfo=SHANGHAI).astimezone(timezone.utc)
    return lo, hi


def _seq_ranges(seqs: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def _continuity(session: Session, lo: datetime, hi: datetime) -> tuple[list[CameraRow], list[ReportGap]]:
    rows = session.execute(select(
        SegmentRecord.institution, SegmentRecord.venue, SegmentRecord.camera, SegmentRecord.room, SegmentRecord.seq,
        SegmentRecord.kind, SegmentRecord.start_at, SegmentRecord.end_at, SegmentRecord.duration,
        SegmentRecord.manifest).where(SegmentRecord.start_at < hi, SegmentRecord.end_at > lo)
        .order_by(SegmentRecord.venue, SegmentRecord.camera, SegmentRecord.seq)).all()
    by_camera: dict[tuple[str, str], list] = defaultdict(list)
    for r in rows:
        by_camera[(r.venue, r.camera)].append(r)
    cameras: list[CameraRow] = []
    gaps: list[ReportGap] = []
    for (venue, camera), recs in by_camera.items():
        institution = recs[0].institution
        seqs = [r.seq for r in recs]
        missing = [s for a, b in zip(seqs, seqs[1:], strict=False) for s in range(a + 1, b)]
        # Records just before the period close holes at its start: look one record back.
        first = session.scalar(select(SegmentRecord.seq).where(
            SegmentRecord.venue == venue, SegmentRecord.camera == camera, SegmentRecord.seq < seqs[0])
            .order_by(SegmentRecord.seq.desc()).limit(1))
        lead = list(range((first or 0) + 1, seqs[0]))
        missing = lead + missing
        outages = []
        for r in recs:
            if r.kind == "gap":
                cause = json.loads(r.manifest).get("cause") or "unknown"
                outages.append(Outage(r.start_at, r.end_at, cause))
        ends = {r.seq: r for r in recs}
        for a, b in _seq_ranges(missing):
            before, after = ends.get(a - 1), ends.get(b + 1)
            gaps.append(ReportGap("sequence", institution, venue, camera, (after or before or recs[0]).room,
                                  before.end_at if before else None, after.start_at if after else None,
                                  ("missing_seq",), seqs=f"{a}" if a == b else f"{a}-{b}"))
        cameras.append(CameraRow(institution, venue, camera, tuple(sorted({r.room for r in recs})),
                                 sum(1 for r in recs if r.kind != "gap"), len(outages),
                                 round(sum(r.duration for r in recs if r.kind != "gap"), 3),
                                 tuple(missing[:MAX_SEQ_LIST]), tuple(outages)))
    return cameras, gaps


def _clock_suspect(session: Session, lo: datetime, hi: datetime) -> list[SuspectRow]:
    rows = session.execute(select(
        SegmentRecord.institution, SegmentRecord.venue, SegmentRecord.camera, SegmentRecord.seq,
        SegmentRecord.start_at, SegmentRecord.end_at, SegmentRecord.stored_at).where(
        SegmentRecord.clock_suspect.is_(True),
        or_(and_(SegmentRecord.start_at < hi, SegmentRecord.end_at > lo),
            and_(SegmentRecord.stored_at >= lo, SegmentRecord.stored_at < hi)))
        .order_by(SegmentRecord.venue, SegmentRecord.camera, SegmentRecord.seq)).all()
    by_camera: dict[tuple[str, str], list] = defaultdict(list)
    for r in rows:
        by_camera[(r.venue, r.camera)].append(r)
    return [SuspectRow(recs[0].institution, venue, camera, len(recs), min(r.stored_at for r in recs),
                       max(r.stored_at for r in recs), min(r.start_at for r in recs), max(r.end_at for r in recs),
                       tuple(r.seq for r in recs[:MAX_SEQ_LIST]))
            for (venue, camera), recs in by_camera.items()]


def build_report(sessions: sessionmaker[Session], cfg: CollectorConfig, first: date, last: date,
                 now: datetime, actor: str) -> AuditReport:
    lo, hi = period_bounds(first, last)
    parts: list[PartRow] = []
    gaps: list[ReportGap] = []
    with sessions() as session:
        batch_ids = sorted(set(session.scalars(select(ExamBatchPart.batch_id).where(
            ExamBatchPart.start_at < hi, ExamBatchPart.end_at > lo))))
        for batch_id in batch_ids:
            rep = batch_report(session, batch_id, tolerance_seconds=cfg.coverage.gap_tolerance_seconds,
                               pre_margin_minutes=cfg.coverage.pre_margin_minutes,
                               post_margin_minutes=cfg.coverage.post_margin_minutes, now=now,
                               staging_dir=cfg.staging_dir)
            for p in rep.parts:
                if not (p.start < hi and p.end > lo):
                    continue
                cams = p.coverage.cameras
                window = (p.end - p.start).total_seconds()
                covered = sum(c.covered_seconds for c in cams)
                count = 0
                for c in cams if p.status != STATUS_PENDING else ():  # a pending part's gaps may still fill
                    for g in c.gaps:
                        gaps.append(ReportGap("batch", rep.institution, p.venue, c.camera, p.room, g.start, g.end,
                                              g.causes, batch_id, p.part))
                        count += 1
                if not cams and p.status == STATUS_NO_FOOTAGE:
                    gaps.append(ReportGap("batch", rep.institution, p.venue, "-", p.room, p.start, p.end,
                                          ("unknown",), batch_id, p.part))
                    count += 1
                parts.append(PartRow(batch_id, rep.institution, rep.occupation, rep.level, p.part, p.venue, p.room,
                                     p.start, p.end, p.status, len(cams),
                                     round(100 * covered / (window * len(cams)), 2) if cams and window else 0.0, count))
        cameras, seq_gaps = _continuity(session, lo, hi)
        suspects = _clock_suspect(session, lo, hi)
    gaps.extend(seq_gaps)
    statuses: dict[str, int] = defaultdict(int)
    for row in parts:
        statuses[row.status] += 1
    totals = Totals(
        institutions=len({p.institution for p in parts} | {c.institution for c in cameras}),
        venues=len({p.venue for p in parts} | {c.venue for c in cameras}),
        batches=len({p.batch_id for p in parts}), parts=len(parts),
        parts_with_gaps=sum(1 for p in parts if p.status in (STATUS_GAPS, STATUS_NO_FOOTAGE)),
        cameras=len(cameras), gaps=len(gaps), gap_seconds=round(sum(g.seconds for g in gaps), 3),
        part_status=dict(sorted(statuses.items())), clock_suspect_records=sum(c.records for c in suspects))
    report = AuditReport(first, last, lo, hi, now, tuple(parts), tuple(cameras), tuple(gaps), totals,
                         tuple(suspects))
    with sessions.begin() as session:
        audit.record(session, audit.ACTION_AUDIT_REPORT, actor=actor, target=f"period:{first}..{last}",
                     detail={"parts": totals.parts, "parts_with_gaps": totals.parts_with_gaps, "gaps": totals.gaps,
                             "gap_seconds": totals.gap_seconds, "cameras": totals.cameras,
                             "clock_suspect_records": totals.clock_suspect_records})
    return report


__all__ = ["MAX_SEQ_LIST", "ReportGap", "PartRow", "Outage", "CameraRow", "SuspectRow", "Totals", "AuditReport",
           "period_bounds", "build_report",
           # rendered by retention/report_render.py, re-exported for the callers of this module
           "CAUSES_ZH", "CSV_COLUMNS", "PART_ZH", "STATUS_ZH", "local", "report_csv", "report_html", "report_json",
           "write_report"]

"""Batch import (all-or-nothing, encodings, re-import), linking in either order, and the coverage report,
on real SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from collector.audit import ACTION_BATCH_IMPORT
from collector.batches import (BatchImportError, BatchNotFound, audit_period, batch_report, import_batches, import_file,
                               linked_records, list_batches, parse_exam_time, parts_linked_to, report_json)
from collector.batch_view import render_report
from collector.db import make_engine, session_factory, upgrade
from collector.models import AuditEntry, BatchImport, ExamBatch, ExamBatchPart, SegmentRecord
from exam_contract.manifest import ClockInfo

from .conftest import BASE, INSTITUTION, VENUE, Harness, payload_bytes

HEADER = "batch_id,institution,venue,occupation,level,part,room,start,end\n"
ROWS = (f"B2026-001,{INSTITUTION},{VENUE},电工,四级,theory,T101,2026-11-26T09:00:00,2026-11-26T09:01:00\n"
        f"B2026-001,{INSTITUTION},{VENUE},电工,四级,practical,P201,2026-11-26T10:00:00+08:00,2026-11-26T11:30:00+08:00\n")
UTC = timezone.utc


@pytest.fixture
def sessions(database_url: str):
    engine = make_engine(database_url)
    upgrade(engine)
    yield session_factory(engine)
    engine.dispose()


def do_import(sessions, data: bytes | str, **kw):
    if isinstance(data, str):
        data = data.encode("utf-8")
    with sessions.begin() as session:
        return import_batches(session, data, source=kw.pop("source", "test.csv"), actor="tester", **kw)


def counts(sessions) -> tuple[int, int, int]:
    with sessions() as s:
        return (s.scalar(select(func.count()).select_from(ExamBatch)),
                s.scalar(select(func.count()).select_from(ExamBatchPart)),
                s.scalar(select(func.count()).select_from(BatchImport)))


def test_import_csv_naive_times_are_shanghai_and_stored_utc(sessions) -> None:
    result = do_import(sessions, HEADER + ROWS)
    assert result.rows == 2 and result.encoding == "utf-8" and result.count("created") == 1
    with sessions() as s:
        parts = {p.part: p for p in s.scalars(select(ExamBatchPart))}
        batch = s.get(ExamBatch, "B2026-001")
        audit = s.scalars(select(AuditEntry).where(AuditEntry.action == ACTION_BATCH_IMPORT)).all()
    assert batch.occupation == "电工" and batch.level == "四级"
    assert parts["theory"].start_at == datetime(2026, 11, 26, 1, 0, tzinfo=UTC)
    assert parts["practical"].end_at == datetime(2026, 11, 26, 3, 30, tzinfo=UTC)
    assert [(a.target, a.actor) for a in audit] == [("B2026-001", "tester")]


def test_bom_gb18030_tabs_and_json(sessions) -> None:
    assert do_import(sessions, b"\xef\xbb\xbf" + (HEADER + ROWS).encode()).encoding == "utf-8-sig"
    gb = (HEADER + ROWS.replace("B2026-001", "B2026-002")).encode("gb18030")
    result = do_import(sessions, gb)
    assert result.encoding == "gb18030"
    with sessions() as s:
        assert s.get(ExamBatch, "B2026-002").occupation == "电工"
    tabs = (HEADER + ROWS.replace("B2026-001", "B2026-003")).replace(",", "\t").encode("utf-16")
    assert do_import(sessions, tabs).encoding == "utf-16"
    items = [dict(zip(HEADER.strip().split(","), line.split(","))) for line in ROWS.replace("B2026-001", "B2026-004").splitlines()]
    assert do_import(sessions, json.dumps(items, ensure_ascii=False), source="x.json").count("created") == 1
    assert counts(sessions) == (4, 8, 4)


def test_undecodable_file_is_rejected_with_resave_advice(sessions) -> None:
    with pytest.raises(BatchImportError) as info:
        do_import(sessions, HEADER.encode() + b"\x81\x20\xff\xfe,broken\n")
    assert "CSV UTF-8" in str(info.value)
    assert counts(sessions) == (0, 0, 0)


@pytest.mark.parametrize("text, expected", [
    (HEADER.replace(",occupation", "") + "B1,I,V,四级,theory,T1,2026-11-26T09:00,2026-11-26T10:00\n",
     [(1, "occupation", "missing column")]),
    (HEADER + "B1,I,V,电工,四级,theory,T1,2026-11-26T10:00,2026-11-26T09:00\n", [(2, "end", "is not after start")]),
    (HEADER + "B1,I,V,电工,四级,written,T1,2026-11-26T09:00,2026-11-26T10:00\n", [(2, "part", "is not theory")]),
    (HEADER + "B1,I,V,电工,四级,theory,T1,2026-11-26,2026-11-26T10:00\n", [(2, "start", "no time of day")]),
    (HEADER + "B1,I,V,电工,四级,theory,T1,26.11.2026 09:00,next day\n",
     [(2, "start", "not an ISO 8601 time"), (2, "end", "not an ISO 8601 time")]),
    (HEADER + "B1,I,V,电工,四级,theory,,2026-11-26T09:00,2026-11-26T10:00\n", [(2, "room", "is empty")]),
    (HEADER + "B1,I,V,电工,四级,theory,T1,2026-11-26T09:00,2026-11-26T10:00\n"
              "B1,I,V,电工,五级,practical,P1,2026-11-26T11:00,2026-11-26T12:00\n", [(3, "level", "differs from")]),
    (HEADER + "B1,I,V,电工,四级,theory,T1,2026-11-26T09:00,2026-11-26T10:00\n"
              "B1,I,V,电工,四级,theory,T1,2026-11-26T09:00,2026-11-26T10:00\n", [(3, "room", "already given in row")]),
])
def test_bad_rows_are_listed_and_nothing_is_imported(sessions, text: str, expected) -> None:
    good = "B0,I,V,电工,四级,theory,T9,2026-11-26T09:00,2026-11-26T10:00\n"
    if text.startswith(HEADER):
        text = HEADER + good + text[len(HEADER):]
        expected = [(row + 1, f, p) for row, f, p in expected]
    with pytest.raises(BatchImportError) as info:
        do_import(sessions, text)
    got = [(e.row, e.field, e.problem) for e in info.value.errors]
    assert len(got) == len(expected)
    for (row, fld, problem), (erow, efield, eproblem) in zip(got, expected):
        assert (row, fld) == (erow, efield) and eproblem in problem
    assert counts(sessions) == (0, 0, 0)  # the good row was not imported either


def test_reimport_updates_and_logs_conflicting_room_is_rejected(sessions) -> None:
    do_import(sessions, HEADER + ROWS)
    same = do_import(sessions, HEADER + ROWS)
    assert [b.action for b in same.batches] == ["unchanged"]
    moved = ROWS.replace("2026-11-26T09:01:00", "2026-11-26T09:30:00").replace("电工", "电工(中级)")
    result = do_import(sessions, HEADER + moved, source="second.csv")
    assert result.batches[0].action == "updated"
    assert {c.field for c in result.batches[0].changes} == {"occupation", "theory/JL2201001-01/T101.end"}
    with sessions() as s:
        theory = s.scalars(select(ExamBatchPart).where(ExamBatchPart.part == "theory")).one()
        audit = s.scalars(select(AuditEntry).where(AuditEntry.action == ACTION_BATCH_IMPORT)
                          .order_by(AuditEntry.seq)).all()
    assert theory.end_at == datetime(2026, 11, 26, 1, 30, tzinfo=UTC)
    assert len(audit) == 2 and "second.csv" in audit[1].detail

    conflicting = moved.replace(",T101,", ",T102,")
    with pytest.raises(BatchImportError) as info:
        do_import(sessions, HEADER + conflicting, source="third.csv")
    message = str(info.value)
    assert "third.csv" in message and "room T101" in message and "room T102" in message
    assert "--allow-room-change" in message
    assert counts(sessions) == (1, 2, 3)
    changed = do_import(sessions, HEADER + conflicting, allow_room_change=True)
    assert changed.batches[0].action == "updated"
    with sessions() as s:
        assert sorted(p.room for p in s.scalars(select(ExamBatchPart))) == ["P201", "T102"]


def test_import_file_reads_json_by_extension(sessions, tmp_path: Path) -> None:
    path = tmp_path / "batches.json"
    path.write_text(json.dumps({"rows": [{"batch_id": "J1", "institution": "I", "venue": "V", "occupation": "o",
                                          "level": 3, "part": "theory", "room": "T1",
                                          "start": "2026-11-26T09:00:00Z", "end": "2026-11-26T10:00:00Z"}]}))
    assert import_file(sessions, path, actor="t").count("created") == 1
    with sessions() as s:
        assert s.get(ExamBatch, "J1").level == "3"
        assert [b.batch_id for b in list_batches(s)] == ["J1"]


def test_parse_exam_time_forms() -> None:
    shanghai_nine = datetime(2026, 11, 26, 1, 0, tzinfo=UTC)
    assert parse_exam_time("2026-11-26T09:00:00") == shanghai_nine
    assert parse_exam_time("2026-11-26 09:00") == shanghai_nine
    assert parse_exam_time("2026/11/26 9:00") == shanghai_nine
    assert parse_exam_time("2026-11-26T01:00:00Z") == shanghai_nine
    assert parse_exam_time("2026-11-26T10:00:00+09:00") == shanghai_nine


# ---------------------------------------------------------------------------- linking and coverage

def store_run(harness: Harness, seqs: range, *, kind_of=lambda seq: "segment", camera: str | None = None,
              prev: str | None = None) -> str | None:
    """Store consecutive 10 s records starting at BASE + 10 s × (seq - 1); returns the last record hash."""
    agent = harness.agent
    for seq in seqs:
        kind = kind_of(seq)
        data = payload_bytes(seq) if kind == "segment" else None
        m = agent.manifest(seq, data, prev, kind=kind, camera=camera, clock=ClockInfo(offset_ms=0.0, synced=True))
        reply = harness.send(m, data)
        assert reply is not None and reply.state == "stored", reply
        prev = m.record_hash()
    return prev


def batch_csv(start: datetime, end: datetime, room: str = "T101", batch: str = "B1") -> str:
    return HEADER + f"{batch},{INSTITUTION},{VENUE},电工,四级,theory,{room},{start.isoformat()},{end.isoformat()}\n"


def test_linking_holds_in_either_order_and_report_names_causes(harness: Harness) -> None:
    sessions = session_factory(harness.engine)
    # Batch B1 is imported before its footage, B2 (same window, margins widen nothing here) after it.
    window_start, window_end = BASE + timedelta(seconds=5), BASE + timedelta(seconds=115)
    do_import(sessions, batch_csv(window_start, window_end, batch="B1"))
    # seq 1-4 segments, 5-6 a stated gap (recorder_crashed), 7-8 segments, 9 never arrives, 10-12 segments.
    prev = store_run(harness, range(1, 5))
    prev = store_run(harness, range(5, 6), kind_of=lambda s: "gap", prev=prev)
    agent = harness.agent
    prev = store_run(harness, range(7, 9), prev=_skip_hash(harness, prev, 6))
    prev = store_run(harness, range(10, 13), prev=_skip_hash(harness, prev, 9))
    do_import(sessions, batch_csv(window_start, window_end, batch="B2"))
    later = BASE + timedelta(days=1)
    with sessions() as s:
        for batch in ("B1", "B2"):
            report = batch_report(s, batch, now=later)
            assert report.status == "gaps"
            (part,) = report.parts
            (cam,) = part.coverage.cameras
            assert cam.camera == agent.camera
            got = [(g.start - BASE, g.end - BASE, g.causes) for g in cam.gaps]
            assert got == [
                (timedelta(seconds=40), timedelta(seconds=60), ("camera_unreachable", "missing_seq")),
                (timedelta(seconds=80), timedelta(seconds=90), ("missing_seq",)),
            ]
            assert cam.covered_seconds == pytest.approx(110 - 30)
        linked = linked_records(s, VENUE, "T101", window_start, window_end)
        assert sorted(r.seq for r in linked) == [1, 2, 3, 4, 5, 7, 8, 10, 11, 12]
        assert {p.batch_id for p in parts_linked_to(s, VENUE, "T101", BASE + timedelta(seconds=200),
                                                    BASE + timedelta(seconds=210), timedelta(minutes=15),
                                                    timedelta(minutes=15))} == {"B1", "B2"}
        out = report_json(batch_report(s, "B1", now=later))
        assert out["parts"][0]["cameras"][0]["gaps"][0]["start_local"] == "2026-11-26T09:00:40+08:00"
        (period,) = audit_period(s, BASE, BASE + timedelta(seconds=120), now=later)
        assert [(g.start - BASE, g.end - BASE) for g in period.gaps] == [
            (timedelta(seconds=40), timedelta(seconds=60)), (timedelta(seconds=80), timedelta(seconds=90))]


def test_footage_removed_by_retention_is_a_gap_not_coverage(harness: Harness) -> None:
    """A stored segment whose bytes retention removed (its row kept with deleted_at) covers nothing any more:
    the batch report, its JSON and the period audit show a gap named deleted_by_retention."""
    sessions = session_factory(harness.engine)
    store_run(harness, range(1, 4))
    do_import(sessions, batch_csv(BASE, BASE + timedelta(seconds=30), batch="B1"))
    later = BASE + timedelta(days=400)
    with sessions() as s:
        assert batch_report(s, "B1", now=later).status == "complete"
    with sessions.begin() as s:
        s.execute(update(SegmentRecord).where(SegmentRecord.seq == 2).values(deleted_at=later))
    with sessions() as s:
        report = batch_report(s, "B1", now=later)
        assert report.status == "gaps"
        (cam,) = report.parts[0].coverage.cameras
        assert [(g.start - BASE, g.end - BASE, g.causes) for g in cam.gaps] == [
            (timedelta(seconds=10), timedelta(seconds=20), ("deleted_by_retention",))]
        assert cam.covered_seconds == pytest.approx(20)
        assert report_json(report)["parts"][0]["cameras"][0]["gaps"][0]["causes"] == ["deleted_by_retention"]
        assert "保存期满已删除" in render_report(report, "zh")
        (period,) = audit_period(s, BASE, BASE + timedelta(seconds=30), now=later)
        assert [(g.start - BASE, g.causes) for g in period.gaps] == [(timedelta(seconds=10), ("deleted_by_retention",))]


def _skip_hash(harness: Harness, prev: str, missing_seq: int) -> str:
    """The hash a never-arriving record `missing_seq` would have had, so the next one chains after it."""
    m = harness.agent.manifest(missing_seq, payload_bytes(missing_seq), prev)
    return m.record_hash()


def test_room_without_camera_is_no_footage_and_running_window_is_pending(harness: Harness) -> None:
    sessions = session_factory(harness.engine)
    store_run(harness, range(1, 4))
    do_import(sessions, batch_csv(BASE, BASE + timedelta(seconds=30), room="T999", batch="EMPTY"))
    do_import(sessions, batch_csv(BASE, BASE + timedelta(seconds=30), batch="FULL"))
    do_import(sessions, batch_csv(BASE, BASE + timedelta(hours=1), batch="RUNNING"))
    with sessions() as s:
        empty = batch_report(s, "EMPTY", now=BASE + timedelta(days=1))
        assert empty.status == "no_footage" and empty.parts[0].coverage.cameras == ()
        full = batch_report(s, "FULL", now=BASE + timedelta(days=1))
        assert full.status == "complete" and full.parts[0].coverage.cameras[0].percent == pytest.approx(100)
        assert batch_report(s, "RUNNING", now=BASE + timedelta(minutes=5)).status == "pending"
        with pytest.raises(BatchNotFound):
            batch_report(s, "NOPE")


def test_flagged_and_unsynced_segments_through_the_database(harness: Harness) -> None:
    """A black segment is a gap named by its flag; an unsynced one covers but names the gap it touches."""
    sessions = session_factory(harness.engine)
    agent, prev = harness.agent, None
    synced = ClockInfo(offset_ms=0.0, synced=True)
    for seq, changes in [(1, {}), (2, {"health": ("black",)}), (3, {}), (4, {}),
                         (5, {"clock": ClockInfo(None, False)}), (7, {})]:
        data = payload_bytes(seq)
        if seq == 7:
            prev = _skip_hash(harness, prev, 6)
        m = agent.manifest(seq, data, prev, **({"clock": synced} | changes))
        assert harness.send(m, data).state == "stored"
        prev = m.record_hash()
    do_import(sessions, batch_csv(BASE, BASE + timedelta(seconds=70), batch="F"))
    with sessions() as s:
        (cam,) = batch_report(s, "F", now=BASE + timedelta(days=1)).parts[0].coverage.cameras
    assert [(g.start - BASE, g.end - BASE, g.causes) for g in cam.gaps] == [
        (timedelta(seconds=10), timedelta(seconds=20), ("health_black",)),
        (timedelta(seconds=50), timedelta(seconds=60), ("clock_unsynced", "missing_seq")),
    ]
    assert cam.unsynced_segments == 1 and cam.covered_seconds == pytest.approx(50)


def test_clock_suspect_segment_named_in_gap_report_json_and_text(harness: Harness) -> None:
    """A segment the collector flagged `clock_suspect` covers what it claims, but the gap next to it names
    `clock_suspect`, and the report counts such segments per camera (JSON and zh/en text)."""
    sessions = session_factory(harness.engine)
    prev = store_run(harness, range(1, 4))
    store_run(harness, range(5, 7), prev=_skip_hash(harness, prev, 4))   # seq 4 (30-40 s) never arrives
    with harness.engine.begin() as conn:
        conn.execute(update(SegmentRecord).where(SegmentRecord.seq == 5).values(clock_suspect=True))
    do_import(sessions, batch_csv(BASE, BASE + timedelta(seconds=60), batch="S"))
    later = BASE + timedelta(days=1)
    with sessions() as s:
        report = batch_report(s, "S", now=later)
        (period,) = audit_period(s, BASE, BASE + timedelta(seconds=60), now=later)
    (cam,) = report.parts[0].coverage.cameras
    assert [(g.start - BASE, g.end - BASE, g.causes) for g in cam.gaps] == [
        (timedelta(seconds=30), timedelta(seconds=40), ("clock_suspect", "missing_seq"))]
    assert cam.covered_seconds == pytest.approx(50) and cam.suspect_segments == 1
    assert [g.causes for g in period.gaps] == [("clock_suspect", "missing_seq")] and period.suspect_segments == 1
    (cam_json,) = report_json(report)["parts"][0]["cameras"]
    assert cam_json["clock_suspect_segments"] == 1
    assert cam_json["gaps"][0]["causes"] == ["clock_suspect", "missing_seq"]
    zh, en = render_report(report, "zh"), render_report(report, "en")
    assert "时钟可疑片段 1" in zh and "原因: 时钟可疑、序号缺失" in zh
    assert "segments with suspect clock 1" in en and "agent clock suspect" in en

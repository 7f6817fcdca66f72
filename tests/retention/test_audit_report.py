"""`exam-retention audit`: coverage gaps across batches and cameras, in json, csv and zh-CN html."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timedelta, timezone

from sqlalchemy import update

from collector.models import ExamBatch, ExamBatchPart, SegmentRecord
from exam_contract.canonical import format_time

from .conftest import EXAM_RETENTION, Env

# 2026-11-20 09:00-09:00:10 Shanghai: a 10 s exam part, covered by 2 s segments
PART_START = datetime(2026, 11, 20, 1, 0, tzinfo=timezone.utc)


def batch(env: Env, seconds: int = 10) -> None:
    with env.sessions.begin() as s:
        s.add(ExamBatch(id="JL-B-2026-11-20", institution="JL2201001", occupation="电工", level="四级",
                        created_at=PART_START, updated_at=PART_START))
        s.flush()
        s.add(ExamBatchPart(batch_id="JL-B-2026-11-20", part="theory", venue="JL2201001-01", room="T101",
                            start_at=PART_START, end_at=PART_START + timedelta(seconds=seconds)))


def test_complete_batch_has_no_gaps(env: Env, capsys, tmp_path) -> None:
    batch(env)
    for i in range(5):
        env.store("t101-front", PART_START + timedelta(seconds=2 * i), clip=i)
    out = tmp_path / "report.json"
    code, text, err = env.run(capsys, "audit", "--from", "2026-11-20", "--to", "2026-11-20", "--format", "json",
                              "--out", str(out))
    assert code == 0, text + err
    report = json.loads(out.read_text())
    assert report["totals"]["gaps"] == 0 and report["parts"][0]["status"] == "complete"
    assert report["parts"][0]["start_local"] == "2026-11-20 09:00:00"
    assert report["cameras"][0]["segments"] == 5


def test_gaps_named_with_causes_exit_3(env: Env, capsys, tmp_path) -> None:
    batch(env)
    env.store("t101-front", PART_START, clip=0)
    env.store("t101-front", PART_START + timedelta(seconds=6), clip=1, seq=3)  # seq 2 (2..4 s) never arrives
    env.store("t101-front", PART_START + timedelta(seconds=8), clip=2, seq=4)
    for fmt in ("json", "csv", "html"):
        out = tmp_path / f"report.{fmt}"
        code, text, _ = env.run(capsys, "audit", "--from", "2026-11-20", "--to", "2026-11-20", "--format", fmt,
                                "--out", str(out))
        assert code == 3 and "with gaps" in text
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["parts"][0]["status"] == "gaps"
    batch_gaps = [g for g in report["gaps"] if g["source"] == "batch"]
    # the test agent's manifests say its clock is not synced, so that cause is named too
    assert [(g["start_local"], g["end_local"], g["causes"]) for g in batch_gaps] == \
        [("2026-11-20 09:00:02", "2026-11-20 09:00:06", ["clock_unsynced", "missing_seq"])]
    assert [g["missing_seqs"] for g in report["gaps"] if g["source"] == "sequence"] == ["2"]
    rows = list(csv.DictReader((tmp_path / "report.csv").open(encoding="utf-8")))
    assert [r["row"] for r in rows] == ["part", "gap", "gap", "total"]
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert '<html lang="zh-CN">' in page and "考试录像覆盖审计报告" in page and "有缺口" in page
    assert "片段序号缺失" in page and "JL-B-2026-11-20" in page and "2026-11-20 09:00:02" in page


def test_bad_dates_exit_1_and_real_command(env: Env, capsys, tmp_path) -> None:
    code, _, err = env.run(capsys, "audit", "--from", "2026-13-01", "--to", "2026-11-20", "--format", "json",
                           "--out", str(tmp_path / "x.json"))
    assert code == 1 and "--from '2026-13-01' is not a date" in err
    proc = env.run_process(EXAM_RETENTION, "audit", "--from", "2026-11-19", "--to", "2026-11-19", "--format", "html",
                           "--out", str(tmp_path / "empty.html"))
    assert proc.returncode == 0, proc.stderr
    assert "未发现覆盖缺口" in (tmp_path / "empty.html").read_text(encoding="utf-8")


def test_clock_suspect_records_listed_per_camera(env: Env, capsys, tmp_path) -> None:
    """Records the collector flagged clock_suspect are listed per camera (count, first/last arrival), whether
    their claimed times or their arrival fall in the period; a gap next to one names the cause."""
    batch(env)
    front = [env.store("t101-front", PART_START + timedelta(seconds=2 * i), clip=i, seq=i + 1) for i in (0, 1, 3, 4)]
    ahead = env.store("t102-back", datetime(2099, 1, 1, 1, 0, tzinfo=timezone.utc), room="T102")  # clock in 2099
    arrival_front = PART_START + timedelta(minutes=5)
    arrival_ahead = PART_START + timedelta(hours=2)
    with env.engine.begin() as conn:
        conn.execute(update(SegmentRecord).where(SegmentRecord.id == front[2].id)
                     .values(clock_suspect=True, stored_at=arrival_front))
        conn.execute(update(SegmentRecord).where(SegmentRecord.id == ahead.id)
                     .values(clock_suspect=True, stored_at=arrival_ahead))
    for fmt in ("json", "csv", "html"):
        code, text, err = env.run(capsys, "audit", "--from", "2026-11-20", "--to", "2026-11-20", "--format", fmt,
                                  "--out", str(tmp_path / f"report.{fmt}"))
        assert code == 3, text + err   # the missing seq 3 is a gap; suspect records alone are not
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["totals"]["clock_suspect_records"] == 2
    assert [(c["camera"], c["records"], c["first_stored_at"], c["last_stored_at"], c["seqs"])
            for c in report["clock_suspect"]] == [
        ("t101-front", 1, format_time(arrival_front), format_time(arrival_front), [4]),
        ("t102-back", 1, format_time(arrival_ahead), format_time(arrival_ahead), [1])]
    assert report["clock_suspect"][1]["claimed_start"] == "2099-01-01T01:00:00.000Z"
    assert report["clock_suspect"][0]["first_stored_local"] == "2026-11-20 09:05:00"
    (gap,) = [g for g in report["gaps"] if g["source"] == "batch"]
    assert gap["causes"] == ["clock_suspect", "clock_unsynced", "missing_seq"]
    rows = list(csv.DictReader((tmp_path / "report.csv").open(encoding="utf-8")))
    suspect_rows = [r for r in rows if r["row"] == "clock_suspect"]
    assert [(r["camera"], r["status"], r["start_local"]) for r in suspect_rows] == [
        ("t101-front", "1 records", "2026-11-20 09:05:00"), ("t102-back", "1 records", "2026-11-20 11:00:00")]
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<h2>时钟可疑</h2>" in page and "时钟可疑片段数" in page
    assert "<td>t102-back</td><td>1</td><td>2026-11-20 11:00:00</td>" in page
    assert "时钟可疑、时钟未同步、片段序号缺失" in page

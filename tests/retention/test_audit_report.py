"""`exam-retention audit`: coverage gaps across batches and cameras, in json, csv and zh-CN html."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timedelta, timezone

from collector.models import ExamBatch, ExamBatchPart

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

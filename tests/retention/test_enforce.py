"""`exam-retention enforce` on stored ffmpeg footage: plan, dry run, tombstones, holds, batch links, refusals."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from collector.models import AuditEntry, ExamBatch, ExamBatchPart, SegmentRecord

from .conftest import EXAM_COLLECTOR, EXAM_RETENTION, Env

OLD = datetime(2024, 6, 1, 1, 0, tzinfo=timezone.utc)       # long expired by now (Nov 2026)
RECENT = datetime.now(timezone.utc) - timedelta(days=30)   # within the year


def add_batch(env: Env, batch_id: str, start: datetime, end: datetime, room: str = "T101") -> None:
    with env.sessions.begin() as s:
        s.add(ExamBatch(id=batch_id, institution="JL2201001", occupation="电工", level="四级",
                        created_at=start, updated_at=start))
        s.flush()
        s.add(ExamBatchPart(batch_id=batch_id, part="theory", venue="JL2201001-01", room=room,
                            start_at=start, end_at=end))


def test_dry_run_and_real_run_same_plan_tombstones_then_verify(env: Env, capsys) -> None:
    old = [env.store("t101-front", OLD + timedelta(seconds=2 * i), clip=i) for i in range(3)]
    recent = env.store("t101-back", RECENT)
    code, dry, err = env.run(capsys, "enforce", "--dry-run", "--json")
    assert code == 0, err
    code, real, err = env.run(capsys, "enforce", "--json")
    assert code == 0, err
    dry_plan, real_plan = json.loads(dry), json.loads(real)
    for plan in (dry_plan, real_plan):
        plan.pop("now")
        for d in plan["deletions"]:
            assert d["reason"].startswith("expired ")
    assert dry_plan == real_plan
    assert [d["segment_id"] for d in real_plan["deletions"]] == [r.id for r in old]
    assert real_plan["files"] == 3 and real_plan["bytes"] == sum(r.size for r in old)
    assert real_plan["per_venue"] == [{"venue": "JL2201001-01", "files": 3, "bytes": real_plan["bytes"]}]

    with env.sessions() as s:
        rows = {r.id: r for r in s.scalars(select(SegmentRecord))}
        tombstones = list(s.scalars(select(AuditEntry).where(AuditEntry.action == "segment.delete")
                                    .order_by(AuditEntry.seq)))
    assert len(rows) == 4  # never erased
    assert [t.target for t in tombstones] == [f"JL2201001-01/t101-front/{r.seq}" for r in old]
    for r, t in zip(old, tombstones):
        row = rows[r.id]
        assert row.deleted_at is not None and row.deleted_entry == t.seq
        assert json.loads(t.detail)["sha256"] == r.sha256 and json.loads(t.detail)["record_hash"] == r.record_hash
        assert not (env.storage / r.storage_path).exists()
    assert rows[recent.id].deleted_at is None and (env.storage / recent.storage_path).exists()

    assert env.run(capsys, "verify-log")[0] == 0
    code, out, _ = env.run(capsys, "scrub")
    assert code == 0 and "re-hashed 1 files" in out  # chains of deleted rows still prove; no orphans
    code, again, _ = env.run(capsys, "enforce", "--dry-run", "--json")
    assert code == 0 and json.loads(again)["files"] == 0


def test_batch_link_and_hold_keep_expired_footage(env: Env, capsys) -> None:
    linked = env.store("t101-front", OLD)
    held = env.store("t102-front", OLD, room="T102")
    free = env.store("t103-front", OLD, room="T103")
    # The batch part ended a year and a day ago: with margin_days 7 it is not yet due.
    now = datetime.now(timezone.utc)
    add_batch(env, "B-2025-1", now - timedelta(days=400), now - timedelta(days=366))
    with env.engine.begin() as conn:  # the footage overlaps that part's window
        conn.execute(ExamBatchPart.__table__.update().values(start_at=OLD - timedelta(minutes=5),
                                                             end_at=now - timedelta(days=366)))
    code, out, err = env.run(capsys, "enforce", "--dry-run")
    assert code == 0, err
    hold = env.run_process(EXAM_COLLECTOR, "hold", "add", "--camera", "t102-front", "--venue", "JL2201001-01",
                           "--from", "2024-06-01T08:00", "--to", "2024-06-01T10:00", "--reason", "投诉调查",
                           "--case", "JL-2026-017")
    assert hold.returncode == 0, hold.stderr
    assert "hold 1 placed on JL2201001-01/t102-front" in hold.stdout
    listed = env.run_process(EXAM_COLLECTOR, "hold", "list", "--json")
    assert json.loads(listed.stdout)[0]["case"] == "JL-2026-017"

    code, out, err = env.run(capsys, "enforce", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert [d["segment_id"] for d in plan["deletions"]] == [free.id] and plan["held"] == 1
    with env.sessions() as s:
        state = {r.id: r.deleted_at for r in s.scalars(select(SegmentRecord))}
    assert state[linked.id] is None and state[held.id] is None and state[free.id] is not None

    release = env.run_process(EXAM_COLLECTOR, "hold", "release", "1", "--reason", "案件已结")
    assert release.returncode == 0, release.stderr
    code, out, _ = env.run(capsys, "enforce", "--json")
    assert [d["segment_id"] for d in json.loads(out)["deletions"]] == [held.id]
    with env.sessions() as s:
        actions = [e.action for e in s.scalars(select(AuditEntry).order_by(AuditEntry.seq))]
    assert actions.count("hold.add") == 1 and actions.count("hold.release") == 1
    assert env.run(capsys, "verify-log")[0] == 0


def test_unknown_batch_hold_holds_everything(env: Env, capsys) -> None:
    env.store("t101-front", OLD)
    hold = env.run_process(EXAM_COLLECTOR, "hold", "add", "--batch", "B-NOT-IMPORTED", "--reason", "复核",
                           "--case", "C-1")
    assert hold.returncode == 0, hold.stderr
    assert "batch B-NOT-IMPORTED is not imported" in hold.stderr
    code, out, err = env.run(capsys, "enforce", "--json")
    assert code == 0 and json.loads(out)["files"] == 0
    assert "ALARM: hold 1 (case C-1) names batch B-NOT-IMPORTED" in err


def test_clock_behind_stored_footage_refuses(env: Env, capsys) -> None:
    env.store("t101-front", OLD)
    env.store("t101-back", datetime.now(timezone.utc) + timedelta(days=3))  # footage "from the future"
    code, out, err = env.run(capsys, "enforce")
    assert code == 1 and out == ""
    assert "exam-retention: error: the clock says" in err and "fix the time (NTP)" in err
    with env.sessions() as s:
        assert all(r.deleted_at is None for r in s.scalars(select(SegmentRecord)))


def test_config_minimum_below_one_year_refuses(env: Env, capsys) -> None:
    env.store("t101-front", OLD)
    env.config.write_text(env.config.read_text().replace("margin_days = 7",
                                                         "margin_days = 7\nunlinked_retention_days = 90"))
    code, _, err = env.run(capsys, "enforce", "--dry-run")
    assert code == 1 and "unlinked_retention_days = 90 is below one year" in err


def test_real_commands_dry_run_then_run(env: Env) -> None:
    """Through the installed console scripts, as the systemd unit runs them."""
    row = env.store("t101-front", OLD)
    dry = env.run_process(EXAM_RETENTION, "enforce", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"delete JL2201001-01/t101-front/1 {row.storage_path} {row.size} B: expired" in dry.stdout
    assert "delete 1 files" in dry.stdout and "venue JL2201001-01: 1 files" in dry.stdout
    assert (env.storage / row.storage_path).exists()
    real = env.run_process(EXAM_RETENTION, "enforce")
    assert real.returncode == 0, real.stderr
    assert dry.stdout.splitlines()[0] == real.stdout.splitlines()[0]
    assert not (env.storage / row.storage_path).exists()
    log = env.run_process(EXAM_RETENTION, "verify-log")
    assert log.returncode == 0 and "checkpoints match" in log.stdout


def test_hold_input_errors_exit_1(env: Env) -> None:
    both = env.run_process(EXAM_COLLECTOR, "hold", "add", "--batch", "B", "--camera", "c", "--reason", "r", "--case", "k")
    assert both.returncode == 1 and "either by batch" in both.stderr
    no_range = env.run_process(EXAM_COLLECTOR, "hold", "add", "--camera", "c", "--reason", "r", "--case", "k")
    assert no_range.returncode == 1 and "needs --from and --to" in no_range.stderr
    bad_time = env.run_process(EXAM_COLLECTOR, "hold", "add", "--camera", "c", "--from", "yesterday", "--to",
                               "2026-01-01", "--reason", "r", "--case", "k")
    assert bad_time.returncode == 1 and "--from 'yesterday' is not an ISO 8601 time" in bad_time.stderr
    missing = env.run_process(EXAM_COLLECTOR, "hold", "release", "42", "--reason", "done")
    assert missing.returncode == 1 and "hold 42 does not exist" in missing.stderr


def test_hold_placed_after_planning_still_wins(env: Env) -> None:
    from collector.holds import add_hold
    from retention.enforce import build_plan, execute
    from retention.policy import RetentionPolicy

    row = env.store("t101-front", OLD)
    policy, pre, post = RetentionPolicy(), timedelta(minutes=15), timedelta(minutes=15)
    now = datetime.now(timezone.utc)
    with env.sessions() as s:
        plan = build_plan(s, policy, now, env.storage, pre, post)
    assert [d.segment_id for d in plan.deletions] == [row.id]
    add_hold(env.sessions, camera="t101-front", venue="JL2201001-01", from_at=OLD, to_at=OLD + timedelta(hours=1),
             reason="late complaint", case_ref="C-9", actor="test")
    result = execute(env.sessions, plan, env.storage, policy, "test", pre, post)
    assert result.deleted == [] and "no longer due" in result.skipped[0]
    assert (env.storage / row.storage_path).exists()
    with env.sessions() as s:
        assert s.scalars(select(AuditEntry).where(AuditEntry.action == "segment.delete")).first() is None

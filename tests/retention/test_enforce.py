"""`exam-retention enforce` on stored ffmpeg footage: plan, dry run, tombstones, holds, batch links, refusals."""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, update

from collector.footage_store import FilesystemStore, StoreUsage
from collector.models import AuditCheckpoint, AuditEntry, ExamBatch, ExamBatchPart, SegmentRecord
from retention.enforce import CLOCK_TOLERANCE, ClockError, build_plan, check_clock, execute
from retention.policy import RetentionPolicy, add_calendar_years
from retention.scrub import run_scrub
from tests.support.faulty_store import FaultyStore

from .conftest import EXAM_COLLECTOR, EXAM_RETENTION, Env

OLD = datetime(2024, 6, 1, 1, 0, tzinfo=timezone.utc)       # long expired by now (Nov 2026)
RECENT = datetime.now(timezone.utc) - timedelta(days=30)   # within the year
MARGINS = timedelta(minutes=15)


def arrived(env: Env, rows: Iterable[SegmentRecord], at: datetime | None = None, by: str | None = None) -> None:
    """Set when (and by which collector instance) stored rows arrived: footage uploaded long ago is stored
    here today, and the retention floor counts from the later of its end and its arrival. Default: a minute
    after the footage's own end, as a prompt upload would have been."""
    with env.engine.begin() as conn:
        for row in rows:
            values: dict = {"stored_at": at or row.end_at + timedelta(minutes=1)}
            if by is not None:
                values["stored_by"] = by
            conn.execute(update(SegmentRecord).where(SegmentRecord.id == row.id).values(**values))


def add_batch(env: Env, batch_id: str, start: datetime, end: datetime, room: str = "T101") -> None:
    with env.sessions.begin() as s:
        s.add(ExamBatch(id=batch_id, institution="JL2201001", occupation="电工", level="四级",
                        created_at=start, updated_at=start))
        s.flush()
        s.add(ExamBatchPart(batch_id=batch_id, part="theory", venue="JL2201001-01", room=room,
                            start_at=start, end_at=end))


def test_dry_run_and_real_run_same_plan_tombstones_then_verify(env: Env, capsys) -> None:
    old = [env.store("t101-front", OLD + timedelta(seconds=2 * i), clip=i) for i in range(3)]
    arrived(env, old)
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
    arrived(env, [linked, held, free])
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
    arrived(env, [env.store("t101-front", OLD)])
    hold = env.run_process(EXAM_COLLECTOR, "hold", "add", "--batch", "B-NOT-IMPORTED", "--reason", "复核",
                           "--case", "C-1")
    assert hold.returncode == 0, hold.stderr
    assert "batch B-NOT-IMPORTED is not imported" in hold.stderr
    code, out, err = env.run(capsys, "enforce", "--json")
    assert code == 0 and json.loads(out)["files"] == 0
    assert "ALARM: hold 1 (case C-1) names batch B-NOT-IMPORTED" in err


def test_footage_from_a_reset_agent_clock_is_kept_a_year_from_its_arrival(env: Env, capsys) -> None:
    """An agent with a reset clock uploads footage dated two years ago: stored now, it is not due one second
    later, nor on the next real `enforce`; its floor counts from its arrival."""
    row = env.store("t101-front", datetime.now(timezone.utc) - timedelta(days=2 * 366))
    assert row.end_at < add_calendar_years(row.stored_at, -1)
    with env.sessions() as s:
        plan = build_plan(s, RetentionPolicy(), row.stored_at + timedelta(seconds=1), env.footage_store, MARGINS,
                          MARGINS)
        assert plan.deletions == () and plan.candidates == 0
        # Even a year after its end *and* past the first pass's cutoff for it, the arrival decides:
        later = build_plan(s, RetentionPolicy(), add_calendar_years(row.stored_at) + timedelta(days=6),
                           env.footage_store, MARGINS, MARGINS)
        assert later.deletions == () and later.candidates == 1
        due = build_plan(s, RetentionPolicy(), add_calendar_years(row.stored_at) + timedelta(days=7),
                         env.footage_store, MARGINS, MARGINS)
    assert [d.segment_id for d in due.deletions] == [row.id]
    assert "kept from its arrival at the collector" in due.deletions[0].reason
    code, out, err = env.run(capsys, "enforce", "--json")
    assert code == 0, err
    assert json.loads(out)["files"] == 0
    with env.sessions() as s:
        assert s.get(SegmentRecord, row.id).deleted_at is None
    assert (env.storage / row.storage_path).exists()


def test_footage_dated_in_the_future_is_kept_and_does_not_stop_enforce(env: Env, capsys) -> None:
    """One agent with a clock in 2099 must not stop retention for everyone: its footage is kept (and named
    in an alarm), and the expired footage of other cameras is deleted in the same run."""
    expired = env.store("t101-front", OLD)
    arrived(env, [expired])
    future = env.store("t101-back", datetime(2099, 1, 1, 1, 0, tzinfo=timezone.utc))
    code, out, err = env.run(capsys, "enforce", "--json")
    assert code == 0, err
    assert [d["segment_id"] for d in json.loads(out)["deletions"]] == [expired.id]
    assert "ALARM: 1 stored segment(s) end more than 1 day after this clock" in err
    assert "JL2201001-01/t101-back/1 ends 2099-01-01T01:00:02" in err and "footage is kept" in err
    with env.sessions() as s:
        assert s.get(SegmentRecord, expired.id).deleted_at is not None
        assert s.get(SegmentRecord, future.id).deleted_at is None
    assert not (env.storage / expired.storage_path).exists() and (env.storage / future.storage_path).exists()


def test_clock_behind_what_a_collector_stored_refuses_and_names_both_machines(env: Env, capsys) -> None:
    """The clock check compares only times collectors wrote (arrival, audit entry, checkpoint); the refusal
    names this machine and the collector instance whose clock disagrees."""
    row = env.store("t101-front", OLD)
    stored_at = datetime.now(timezone.utc) + timedelta(hours=2)   # another collector's clock is ahead
    arrived(env, [row], at=stored_at, by="collector-b.4242.a1b2c3")
    with env.sessions() as s:
        check_clock(s, stored_at - CLOCK_TOLERANCE, host="exam-a")   # within the tolerance: fine
        with pytest.raises(ClockError) as info:
            check_clock(s, stored_at - CLOCK_TOLERANCE - timedelta(seconds=1), host="exam-a")
    message = str(info.value)
    assert message.startswith("the clock of this machine (exam-a) says ")
    assert "but collector instance collector-b.4242.a1b2c3 stored a segment at " in message
    assert "one of these two clocks is wrong; fix it (NTP) before enforcing retention" in message
    code, out, err = env.run(capsys, "enforce")
    assert code == 1 and out == ""
    assert f"exam-retention: error: the clock of this machine ({socket.gethostname()}) says" in err
    assert "collector instance collector-b.4242.a1b2c3" in err
    with env.sessions() as s:
        assert all(r.deleted_at is None for r in s.scalars(select(SegmentRecord)))


def test_checkpoint_signed_later_than_this_clock_refuses(env: Env) -> None:
    arrived(env, [env.store("t101-front", OLD)])
    at = datetime.now(timezone.utc) + timedelta(hours=1)
    with env.sessions.begin() as s:
        s.add(AuditCheckpoint(at=at, entry_count=1, head_hash=None, occasion="schedule", public_key="k",
                              signature="s"))
    with env.sessions() as s, pytest.raises(ClockError) as info:
        check_clock(s, datetime.now(timezone.utc), host="exam-a")
    assert "(exam-a)" in str(info.value) and "audit checkpoint" in str(info.value)
    assert "one of these two clocks is wrong" in str(info.value)


def test_config_minimum_below_one_year_refuses(env: Env, capsys) -> None:
    arrived(env, [env.store("t101-front", OLD)])
    env.config.write_text(env.config.read_text().replace("margin_days = 7",
                                                         "margin_days = 7\nunlinked_retention_days = 90"))
    code, _, err = env.run(capsys, "enforce", "--dry-run")
    assert code == 1 and "unlinked_retention_days = 90 is below one year" in err


def test_real_commands_dry_run_then_run(env: Env) -> None:
    """Through the installed console scripts, as the systemd unit runs them."""
    row = env.store("t101-front", OLD)
    arrived(env, [row])
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

    row = env.store("t101-front", OLD)
    arrived(env, [row])
    policy, pre, post = RetentionPolicy(), timedelta(minutes=15), timedelta(minutes=15)
    now = datetime.now(timezone.utc)
    with env.sessions() as s:
        plan = build_plan(s, policy, now, env.footage_store, pre, post)
    assert [d.segment_id for d in plan.deletions] == [row.id]
    add_hold(env.sessions, camera="t101-front", venue="JL2201001-01", from_at=OLD, to_at=OLD + timedelta(hours=1),
             reason="late complaint", case_ref="C-9", actor="test")
    result = execute(env.sessions, plan, env.footage_store, policy, "test", pre, post)
    assert result.deleted == [] and "no longer due" in result.skipped[0]
    assert (env.storage / row.storage_path).exists()
    with env.sessions() as s:
        assert s.scalars(select(AuditEntry).where(AuditEntry.action == "segment.delete")).first() is None


def _tombstones(env: Env) -> list[AuditEntry]:
    with env.sessions() as s:
        return list(s.scalars(select(AuditEntry).where(AuditEntry.action == "segment.delete").order_by(AuditEntry.seq)))


def test_a_failing_delete_leaves_the_row_live_under_its_tombstone_and_the_next_run_finishes_it(env: Env) -> None:
    """Step 2 of a deletion (the store unlinks) fails with EIO after step 1 (the tombstone) committed: enforce
    stops there, the row is not marked deleted and its file is still stored. The next run finishes the deletion
    under that same tombstone (no second one), and scrub then finds every deleted row with its tombstone."""
    row = env.store("t101-front", OLD)
    kept = env.store("t101-back", OLD)
    arrived(env, [row, kept])
    store = FaultyStore(FilesystemStore(env.storage))
    policy = RetentionPolicy()
    with env.sessions() as s:
        plan = build_plan(s, policy, datetime.now(timezone.utc), store, MARGINS, MARGINS)
    assert [d.segment_id for d in plan.deletions] == [row.id, kept.id]
    store.fail("unlink", errno.EIO, relpath=row.storage_path)
    with pytest.raises(OSError) as failed:
        execute(env.sessions, plan, store, policy, "test", MARGINS, MARGINS)
    assert failed.value.errno == errno.EIO
    [tombstone] = _tombstones(env)
    assert tombstone.target == f"JL2201001-01/t101-front/{row.seq}"
    assert json.loads(tombstone.detail)["record_hash"] == row.record_hash
    with env.sessions() as s:
        assert s.get(SegmentRecord, row.id).deleted_at is None and s.get(SegmentRecord, kept.id).deleted_at is None
    assert store.exists(row.storage_path) and store.exists(kept.storage_path)

    store.heal()
    with env.sessions() as s:
        again = build_plan(s, policy, datetime.now(timezone.utc), store, MARGINS, MARGINS)
    result = execute(env.sessions, again, store, policy, "test", MARGINS, MARGINS)
    assert [d.segment_id for d in result.deleted] == [row.id, kept.id]
    first, second = _tombstones(env)
    assert first.seq == tombstone.seq and second.target == f"JL2201001-01/t101-back/{kept.seq}"
    with env.sessions() as s:
        assert s.get(SegmentRecord, row.id).deleted_entry == tombstone.seq
        assert s.get(SegmentRecord, kept.id).deleted_entry == second.seq
    assert not store.exists(row.storage_path) and not store.exists(kept.storage_path)
    assert run_scrub(env.sessions, store, actor="test").problems == []


def test_a_nearly_full_store_raises_the_disk_alarm_and_deletes_nothing_extra(env: Env) -> None:
    """The store-based twin of tests/retention/test_cli.py's tmpfs test: the store reports 3 % free. And a store
    whose usage cannot be read (EIO) is an alarm too, never a reason to delete."""
    recent = env.store("t101-front", datetime.now(timezone.utc) - timedelta(days=2))
    store = FaultyStore(FilesystemStore(env.storage))
    store.usage_reported = StoreUsage(total=100 * 10**9, free=3 * 10**9)
    policy, now = RetentionPolicy(), datetime.now(timezone.utc)
    with env.sessions() as s:
        plan = build_plan(s, policy, now, store, MARGINS, MARGINS)
    assert plan.alarms == (f"storage {env.storage} is 97.0% full (3.0 GB free): add storage; retention never "
                           "deletes footage early to make room",)
    assert plan.deletions == () and execute(env.sessions, plan, store, policy, "test", MARGINS, MARGINS).deleted == []
    assert store.exists(recent.storage_path)
    store.fail("usage", errno.EIO)
    with env.sessions() as s:
        failing = build_plan(s, policy, now, store, MARGINS, MARGINS)
    assert failing.alarms == (f"storage {env.storage} cannot be checked (Input/output error): check the volume",)
    assert failing.deletions == ()
    with env.sessions() as s:
        assert s.get(SegmentRecord, recent.id).deleted_at is None

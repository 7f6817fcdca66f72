"""Tamper tests: each kind of tampering is found by `exam-retention scrub` or `verify-log`, exit 4, item named."""

from __future__ import annotations

import errno
import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import delete, func, select, update

from collector import audit
from collector.footage_store import FilesystemStore
from collector.models import AuditCheckpoint, AuditEntry, AuditHead, ScrubRun, SegmentRecord
from exam_contract.signing import load_private_key
from retention.scrub import run_scrub
from tests.support.faulty_store import FaultyStore

from .conftest import Env

START = datetime(2026, 11, 20, 1, 0, tzinfo=timezone.utc)


def three(env: Env) -> list[SegmentRecord]:
    return [env.store("t101-front", START + timedelta(seconds=2 * i), clip=i) for i in range(3)]


def test_clean_store_scrubs_and_verifies(env: Env, capsys) -> None:
    rows = three(env)
    code, out, err = env.run(capsys, "scrub", "--progress")
    assert code == 0, out + err
    assert "re-hashed 3 files" in out and "0 problems" in out
    assert "MB/s" in err and "3/3 files" in err  # the progress bar
    with env.sessions() as s:
        run = s.scalars(select(ScrubRun)).one()
        assert run.files_checked == 3 and run.problem_count == 0
        assert run.bytes_checked == sum(r.size for r in rows)
        assert s.scalar(select(func.count()).select_from(AuditEntry).where(AuditEntry.action == "retention.scrub")) == 1
    code, out, _ = env.run(capsys, "verify-log")
    assert code == 0 and "audit log verified" in out


def test_flipped_byte_is_named(env: Env, capsys) -> None:
    rows = three(env)
    path = env.storage / rows[1].storage_path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    code, out, _ = env.run(capsys, "scrub")
    assert code == 4
    assert f"hash_mismatch: JL2201001-01/t101-front/2 {rows[1].storage_path}" in out
    with env.sessions() as s:
        run = s.scalars(select(ScrubRun)).one()
        assert run.problem_count == 1 and "hash_mismatch" in run.problems


def test_deleted_file_is_named(env: Env, capsys) -> None:
    rows = three(env)
    (env.storage / rows[2].storage_path).unlink()
    code, out, _ = env.run(capsys, "scrub", "--json")
    assert code == 4
    report = json.loads(out)
    assert report["problems"] == [{"kind": "missing_file", "item": f"JL2201001-01/t101-front/3 {rows[2].storage_path}",
                                   "problem": "stored file is missing"}]


def test_file_the_store_cannot_read_is_named_and_the_scrub_goes_on(env: Env) -> None:
    """A read failing with EIO (a failing disk) is a problem of that file; the other files are re-hashed."""
    rows = three(env)
    store = FaultyStore(FilesystemStore(env.storage))
    store.fail("open", errno.EIO, relpath=rows[1].storage_path)
    result = run_scrub(env.sessions, store, actor="test")
    assert [(p.kind, p.item, p.what) for p in result.problems] == [
        ("unreadable_file", f"JL2201001-01/t101-front/2 {rows[1].storage_path}",
         "stored file cannot be read: Input/output error")]
    assert result.files_checked == 2 and result.bytes_checked == rows[0].size + rows[2].size
    with env.sessions() as s:
        run = s.scalars(select(ScrubRun)).one()
        assert run.problem_count == 1 and "unreadable_file" in run.problems


def test_deleted_segment_row_is_named(env: Env, capsys) -> None:
    rows = three(env)
    with env.engine.begin() as conn:
        conn.execute(delete(SegmentRecord).where(SegmentRecord.id == rows[1].id))
    code, out, _ = env.run(capsys, "scrub")
    assert code == 4
    assert "chain_break: JL2201001-01/t101-front/3: seq 2 is missing although seq 3 was linked to it" in out
    assert f"orphan_file: {rows[1].storage_path}: file in storage has no segment row" in out


def test_deleted_newest_row_leaves_an_orphan(env: Env, capsys) -> None:
    rows = three(env)
    with env.engine.begin() as conn:
        conn.execute(delete(SegmentRecord).where(SegmentRecord.id == rows[2].id))
    code, out, _ = env.run(capsys, "scrub", "--sample", "0.5")
    assert code == 4 and f"orphan_file: {rows[2].storage_path}" in out


@pytest.mark.parametrize("column", ["record_hash", "sha256"])
def test_edited_row_hash_is_named(env: Env, capsys, column: str) -> None:
    rows = three(env)
    with env.engine.begin() as conn:
        conn.execute(update(SegmentRecord).where(SegmentRecord.id == rows[0].id).values({column: "ab" * 32}))
    code, out, _ = env.run(capsys, "scrub")
    assert code == 4
    assert "JL2201001-01/t101-front/1" in out
    if column == "record_hash":
        assert "record_hash: JL2201001-01/t101-front/1: the stored manifest does not hash" in out
        assert "chain_break: JL2201001-01/t101-front/2: prev hash is not the record hash of seq 1" in out
    else:
        assert "manifest_mismatch: JL2201001-01/t101-front/1: row fields sha256 differ" in out
        assert "hash_mismatch: JL2201001-01/t101-front/1" in out


def test_edited_audit_entry_is_named(env: Env, capsys) -> None:
    three(env)
    env.run(capsys, "scrub")  # one more entry
    with env.engine.begin() as conn:
        conn.execute(update(AuditEntry).where(AuditEntry.seq == 1).values(actor="someone-else"))
    code, out, _ = env.run(capsys, "verify-log")
    assert code == 4
    assert "first bad entry 1: entry 1 (agent.enroll jl2201001-01-a" in out and "was altered" in out


def test_deleted_audit_entry_is_named(env: Env, capsys) -> None:
    three(env)
    env.run(capsys, "scrub")
    env.run(capsys, "scrub")
    with env.engine.begin() as conn:
        conn.execute(delete(AuditEntry).where(AuditEntry.seq == 2))
    code, out, _ = env.run(capsys, "verify-log")
    assert code == 4 and "first bad entry 2: entry 2 missing from the log" in out


def test_deleted_newest_audit_entries_named_through_checkpoint(env: Env, capsys) -> None:
    """The CLI path signs a checkpoint (enforce does, with the key from the config), then the tail goes."""
    three(env)
    assert env.run(capsys, "enforce")[0] == 0   # nothing is due; writes its run entry and a checkpoint
    with env.sessions() as s:
        last = s.scalar(select(func.max(AuditEntry.seq)))
    with env.engine.begin() as conn:
        conn.execute(delete(AuditEntry).where(AuditEntry.seq == last))
    code, out, _ = env.run(capsys, "verify-log")
    assert code == 4 and f"first bad entry {last}: entries {last}..{last} missing" in out


def test_row_marked_deleted_without_tombstone_is_named(env: Env, capsys) -> None:
    """Hiding a removed file by marking its row deleted (without enforce) is caught."""
    rows = three(env)
    (env.storage / rows[1].storage_path).unlink()
    with env.engine.begin() as conn:
        conn.execute(update(SegmentRecord).where(SegmentRecord.id == rows[1].id)
                     .values(deleted_at=datetime.now(timezone.utc), deleted_entry=1))
    code, out, _ = env.run(capsys, "scrub")
    assert code == 4
    assert "no_tombstone: JL2201001-01/t101-front/2: row is marked deleted (entry 1)" in out


# ---------------------------------------------------------------------------- checkpoints (version 2)

def _rewrite_after(env: Env, seq: int) -> None:
    """Edit entry `seq` and recompute every hash from there on, head row included."""
    with env.sessions.begin() as s:
        prev = None
        for e in s.scalars(select(AuditEntry).order_by(AuditEntry.seq)):
            if e.seq == seq:
                e.reason = "nothing happened"
            e.prev_hash = prev
            e.entry_hash = audit.entry_hash_of(e)
            prev = e.entry_hash
        s.get(AuditHead, 1).head_hash = prev


def test_commands_leave_the_head_checkpointed(env: Env, capsys, tmp_path) -> None:  # noqa: ANN001
    """scrub and audit append an entry and sign a checkpoint over it: the log verifies even long after."""
    three(env)
    assert env.run(capsys, "scrub")[0] == 0
    code, _, err = env.run(capsys, "audit", "--from", "2026-11-20", "--to", "2026-11-20", "--format", "json",
                           "--out", str(tmp_path / "r.json"))
    assert code in (0, 3), err
    with env.sessions() as s:
        head = s.get(AuditHead, 1)
        cps = list(s.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.id)))
        assert [c.occasion for c in cps] == ["command", "command"]
        assert cps[-1].entry_count == head.seq and cps[-1].head_hash == head.head_hash
        public = load_private_key(env.config.parent / "collector" / "collector.key").public_key()
        assert audit.verify_log(s, public, now=cps[-1].at + timedelta(days=30)).ok
    code, out, _ = env.run(capsys, "verify-log")
    assert code == 0 and "2 signed checkpoints match" in out


def test_deleted_newest_checkpoint_contradicted_by_a_copy(env: Env, capsys, tmp_path) -> None:  # noqa: ANN001
    """Drop the newest checkpoint and rewrite the entries after the one before: the saved copy of the dropped
    checkpoint (the retained MQTT message, or the one an evidence package cites) names the range."""
    three(env)
    assert env.run(capsys, "scrub")[0] == 0
    assert env.run(capsys, "scrub")[0] == 0
    with env.sessions() as s:
        older, newest = s.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.id)).all()
    retained = tmp_path / "retained.json"
    retained.write_bytes(audit.checkpoint_payload(newest))
    package = tmp_path / "package.json"
    package.write_text(json.dumps({"format": "exam-footage evidence package",
                                   "exported": {"audit_checkpoint": audit.checkpoint_document(newest)}}))
    code, out, _ = env.run(capsys, "verify-log", "--checkpoint", str(retained), "--checkpoint", str(package))
    assert code == 0 and "2 checkpoint copies held elsewhere agree" in out
    with env.engine.begin() as conn:
        conn.execute(delete(AuditCheckpoint).where(AuditCheckpoint.id == newest.id))
    _rewrite_after(env, newest.entry_count)
    first = older.entry_count + 1
    for copy in (retained, package):
        code, out, _ = env.run(capsys, "verify-log", "--checkpoint", str(copy))
        assert code == 4, out
        assert f"first bad entry {first}: entries {first}..{newest.entry_count} were rewritten" in out
        assert str(copy) in out.splitlines()[0]


def test_bad_checkpoint_copy_is_one_line_exit_1(env: Env, capsys, tmp_path) -> None:  # noqa: ANN001
    three(env)
    assert env.run(capsys, "scrub")[0] == 0
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json", encoding="utf-8")
    code, out, err = env.run(capsys, "verify-log", "--checkpoint", str(garbage))
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert str(garbage) in err and "not JSON" in err
    with env.sessions() as s:
        cp = s.scalars(select(AuditCheckpoint)).one()
    forged = audit.checkpoint_document(cp)
    forged["entry_count"] += 1
    bad = tmp_path / "forged.json"
    bad.write_text(json.dumps(forged), encoding="utf-8")
    code, out, err = env.run(capsys, "verify-log", "--checkpoint", str(bad))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "not signed by the collector key" in err
    code, out, err = env.run(capsys, "verify-log", "--checkpoint", str(tmp_path / "missing.json"))
    assert code == 1 and "cannot read checkpoint copy" in err

"""The audit log on real SQLite and PostgreSQL: chain, concurrent appends, checkpoints, tamper detection."""

from __future__ import annotations

import threading

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, delete, func, select, update

from collector import audit
from collector.db import make_engine, session_factory, upgrade
from collector.models import AuditCheckpoint, AuditEntry, AuditHead


@pytest.fixture
def engine(database_url: str) -> Engine:
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def append(engine: Engine, n: int, actor: str = "os:test@host") -> None:
    sessions = session_factory(engine)
    for i in range(n):
        with sessions.begin() as s:
            audit.record(s, audit.ACTION_HOLD_ADD, actor=actor, target=f"hold:{i}", reason="案件 case",
                         detail={"i": i, "note": "测试"})


def report(engine: Engine, key: Ed25519PrivateKey) -> audit.LogReport:
    with session_factory(engine)() as s:
        return audit.verify_log(s, key.public_key(), chunk=3)


def test_chain_links_and_verifies(engine: Engine) -> None:
    key = Ed25519PrivateKey.generate()
    append(engine, 7)
    with session_factory(engine)() as s:
        entries = list(s.scalars(select(AuditEntry).order_by(AuditEntry.seq)))
        head = s.get(AuditHead, 1)
    assert [e.seq for e in entries] == list(range(1, 8))
    assert entries[0].prev_hash is None
    assert all(b.prev_hash == a.entry_hash for a, b in zip(entries, entries[1:]))
    assert all(audit.entry_hash_of(e) == e.entry_hash for e in entries)
    assert head.seq == 7 and head.head_hash == entries[-1].entry_hash
    with session_factory(engine).begin() as s:
        audit.checkpoint(s, key, "manual")
    rep = report(engine, key)
    assert rep.ok and rep.entries == 7 and rep.checkpoints == 1, rep.problems


def test_entry_rolls_back_with_its_transaction(engine: Engine) -> None:
    append(engine, 1)
    with pytest.raises(RuntimeError):
        with session_factory(engine).begin() as s:
            audit.record(s, audit.ACTION_HOLD_ADD, actor="a", target="hold:x")
            raise RuntimeError("caller fails")
    append(engine, 1)
    with session_factory(engine)() as s:
        assert list(s.scalars(select(AuditEntry.seq).order_by(AuditEntry.seq))) == [1, 2]
    assert report(engine, Ed25519PrivateKey.generate()).ok


def test_concurrent_appenders_never_fork_the_chain(database_url: str) -> None:
    """Two engines (as two collector instances would have) append at once."""
    engines = [make_engine(database_url) for _ in range(2)]
    upgrade(engines[0])
    errors: list[BaseException] = []

    def worker(engine: Engine, name: str) -> None:
        try:
            append(engine, 25, actor=name)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(e, f"collector-{i}")) for i, e in enumerate(engines)
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with session_factory(engines[0])() as s:
        seqs = list(s.scalars(select(AuditEntry.seq).order_by(AuditEntry.seq)))
    assert seqs == list(range(1, 101))
    assert report(engines[0], Ed25519PrivateKey.generate()).ok
    for e in engines:
        e.dispose()


def test_edited_entry_is_named(engine: Engine) -> None:
    append(engine, 5)
    with engine.begin() as conn:
        conn.execute(update(AuditEntry).where(AuditEntry.seq == 3).values(reason="nothing to see"))
    rep = report(engine, Ed25519PrivateKey.generate())
    assert not rep.ok and rep.first_bad.seq == 3 and "altered" in rep.first_bad.what


def test_deleted_middle_entry_is_named(engine: Engine) -> None:
    append(engine, 5)
    with engine.begin() as conn:
        conn.execute(delete(AuditEntry).where(AuditEntry.seq == 2))
    rep = report(engine, Ed25519PrivateKey.generate())
    assert rep.first_bad.seq == 2 and "missing" in rep.first_bad.what


def test_deleted_newest_entries_caught_by_checkpoint(engine: Engine) -> None:
    key = Ed25519PrivateKey.generate()
    append(engine, 6)
    with session_factory(engine).begin() as s:
        audit.checkpoint(s, key, "schedule")
    with engine.begin() as conn:
        conn.execute(delete(AuditEntry).where(AuditEntry.seq >= 5))
        # a careful attacker also rewinds the head row to the new end of the chain
        last = conn.execute(select(AuditEntry.entry_hash).where(AuditEntry.seq == 4)).scalar_one()
        conn.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=4, head_hash=last))
    rep = report(engine, key)
    assert rep.first_bad.seq == 5 and "checkpoint" in rep.first_bad.what


def test_rewritten_chain_caught_by_checkpoint(engine: Engine) -> None:
    """An attacker edits entry 2 and recomputes every later hash: only the signed checkpoint can tell."""
    key = Ed25519PrivateKey.generate()
    append(engine, 4)
    with session_factory(engine).begin() as s:
        audit.checkpoint(s, key, "schedule")
    with session_factory(engine).begin() as s:
        entries = list(s.scalars(select(AuditEntry).order_by(AuditEntry.seq)))
        prev = None
        for e in entries:
            if e.seq == 2:
                e.reason = "rewritten"
            e.prev_hash = prev
            e.entry_hash = audit.entry_hash_of(e)
            prev = e.entry_hash
        s.get(AuditHead, 1).head_hash = prev
    rep = report(engine, key)
    assert not rep.ok and rep.first_bad.seq == 1 and "rewritten" in rep.first_bad.what


def test_forged_checkpoint_signature_is_caught(engine: Engine) -> None:
    append(engine, 2)
    with session_factory(engine).begin() as s:
        audit.checkpoint(s, Ed25519PrivateKey.generate(), "schedule")  # not the collector's key
    rep = report(engine, Ed25519PrivateKey.generate())
    assert not rep.ok and "signature" in rep.problems[0].what


def test_checkpoint_if_changed_skips_unchanged_head(engine: Engine) -> None:
    key = Ed25519PrivateKey.generate()
    sessions = session_factory(engine)
    append(engine, 1)
    assert audit.checkpoint_if_changed(sessions, key) is not None
    assert audit.checkpoint_if_changed(sessions, key) is None
    append(engine, 1)
    made = audit.checkpoint_if_changed(sessions, key)
    assert made is not None and made.entry_count == 2
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(AuditCheckpoint)) == 2


def test_enrolment_and_ingest_rejection_are_logged(harness) -> None:
    from exam_contract.signing import sign

    from .conftest import payload_bytes

    data = payload_bytes(1)
    m = harness.agent.manifest(1, data, None)
    forged = sign(Ed25519PrivateKey.generate(), m.canonical())
    reply = harness.send(m, data, init=harness.agent.init_payload(m, signature=forged))
    assert reply.state == "rejected"
    with session_factory(harness.engine)() as s:
        entries = list(s.scalars(select(AuditEntry).order_by(AuditEntry.seq)))
        rep = audit.verify_log(s, Ed25519PrivateKey.generate().public_key())
    assert [e.action for e in entries][:2] == [audit.ACTION_ENROLL, audit.ACTION_INGEST_REJECT]
    assert entries[0].target == "jl2201001-01-a" and audit.parse_detail(entries[0])["venue"] == "JL2201001-01"
    assert entries[1].target == "JL2201001-01/t101-front/1" and entries[1].reason == "bad_signature"
    assert entries[1].actor == "agent:jl2201001-01-a"
    assert rep.ok


def test_checkpoint_loop_signs_at_start_and_only_when_grown(engine: Engine) -> None:
    key = Ed25519PrivateKey.generate()
    sessions = session_factory(engine)
    append(engine, 3)
    loop = audit.CheckpointLoop(sessions, key, interval=3600)
    loop.start()
    loop.stop()  # startup checkpoint; the shutdown tick finds the head unchanged
    with sessions() as s:
        cps = list(s.scalars(select(AuditCheckpoint)))
    assert [(c.occasion, c.entry_count) for c in cps] == [("startup", 3)]
    assert report(engine, key).ok

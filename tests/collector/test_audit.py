"""The audit log on real SQLite and PostgreSQL: chain, concurrent appends, checkpoints, tamper detection."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, delete, func, select, text, update

from collector import audit
from collector.db import make_engine, session_factory, upgrade
from collector.models import AuditCheckpoint, AuditEntry, AuditHead
from exam_contract.canonical import canonical_bytes, sha256_hex
from exam_contract.signing import public_key_b64, sign


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


# ---------------------------------------------------------------------------- chained checkpoints, staleness,
# copies held elsewhere (checkpoint version 2)

def sign_checkpoint(engine: Engine, key: Ed25519PrivateKey, occasion: str = "schedule") -> AuditCheckpoint:
    with session_factory(engine).begin() as s:
        return audit.checkpoint(s, key, occasion)


def rewrite_after(engine: Engine, seq: int, reason: str = "rewritten") -> None:
    """The attack: edit entry `seq` and recompute every hash from there on, head row included."""
    with session_factory(engine).begin() as s:
        entries = list(s.scalars(select(AuditEntry).order_by(AuditEntry.seq)))
        prev = None
        for e in entries:
            if e.seq == seq:
                e.reason = reason
            e.prev_hash = prev
            e.entry_hash = audit.entry_hash_of(e)
            prev = e.entry_hash
        s.get(AuditHead, 1).head_hash = prev


def verify_at(engine: Engine, key: Ed25519PrivateKey, now: datetime, copies=()) -> audit.LogReport:  # noqa: ANN001
    with session_factory(engine)() as s:
        return audit.verify_log(s, key.public_key(), chunk=3, now=now, copies=copies)


def test_checkpoints_chain_to_each_other(engine: Engine) -> None:
    key = Ed25519PrivateKey.generate()
    append(engine, 2)
    first = sign_checkpoint(engine, key)
    append(engine, 1)
    second = sign_checkpoint(engine, key)
    assert (first.version, first.prev_hash) == (2, None) and first.host
    assert second.version == 2 and second.prev_hash == sha256_hex(audit.signed_bytes_of(first))
    assert b'"prev":"' + second.prev_hash.encode() + b'"' in audit.signed_bytes_of(second)
    assert report(engine, key).ok


def test_deleted_newest_checkpoint_and_rewritten_tail_are_caught(engine: Engine) -> None:
    """The attack of the review: drop the newest checkpoint, rewrite and re-hash the entries after the one
    before it. The remaining checkpoint is too old for the entries after it, and a copy of the dropped
    checkpoint held elsewhere contradicts the database."""
    key = Ed25519PrivateKey.generate()
    append(engine, 3)
    older = sign_checkpoint(engine, key)
    append(engine, 3)
    newest = sign_checkpoint(engine, key)
    published = audit.checkpoint_copy_from(json.loads(audit.checkpoint_payload(newest)), "published.json")
    with engine.begin() as conn:
        conn.execute(delete(AuditCheckpoint).where(AuditCheckpoint.id == newest.id))
    rewrite_after(engine, 5)

    late = older.at + audit.DEFAULT_MAX_AGE + timedelta(minutes=1)
    stale = verify_at(engine, key, late)
    assert not stale.ok and stale.first_bad.seq == 4
    assert "entries 4..6 are covered by no checkpoint" in stale.first_bad.what
    assert f"checkpoint {older.id} (schedule" in stale.first_bad.what

    # Within the staleness window only the copy held elsewhere tells.
    soon = older.at + timedelta(minutes=1)
    assert verify_at(engine, key, soon).ok
    compared = verify_at(engine, key, soon, copies=[published])
    assert not compared.ok and compared.first_bad.seq == 4
    whats = [p.what for p in compared.problems]
    assert any("entries 4..6 were rewritten" in w and "published.json" in w for w in whats), whats
    assert any("published.json" in w and "no counterpart in the database" in w for w in whats), whats


def test_deleted_middle_or_first_checkpoint_breaks_the_checkpoint_chain(engine: Engine) -> None:
    key = Ed25519PrivateKey.generate()
    made = []
    for _ in range(4):
        append(engine, 1)
        made.append(sign_checkpoint(engine, key))
    assert report(engine, key).ok
    with engine.begin() as conn:
        conn.execute(delete(AuditCheckpoint).where(AuditCheckpoint.id == made[2].id))
    rep = report(engine, key)
    assert not rep.ok and len(rep.problems) == 1
    assert f"checkpoint {made[3].id} (schedule" in rep.problems[0].what
    assert f"does not chain to checkpoint {made[1].id}" in rep.problems[0].what
    assert "entries 3..4" in rep.problems[0].what
    with engine.begin() as conn:
        conn.execute(delete(AuditCheckpoint).where(AuditCheckpoint.id == made[0].id))
    whats = [p.what for p in report(engine, key).problems]
    assert any(f"checkpoint {made[1].id}" in w and "before it were deleted" in w for w in whats), whats


def test_untouched_log_passes_long_after_its_covering_checkpoint(engine: Engine, tmp_path) -> None:  # noqa: ANN001
    from exam_contract.signing import generate_private_key

    key_file = tmp_path / "collector.key"
    key = generate_private_key(key_file)
    sessions = session_factory(engine)
    append(engine, 3)
    cp = audit.checkpoint_after_command(sessions, key_file)
    assert cp is not None and cp.occasion == "command" and cp.entry_count == 3
    assert audit.checkpoint_after_command(sessions, key_file) is None   # nothing new to cover
    much_later = cp.at + timedelta(days=400)
    assert verify_at(engine, key, much_later).ok
    # ... but an entry after it without a checkpoint of its own is stale once that checkpoint is old.
    append(engine, 1)
    assert not verify_at(engine, key, much_later).ok
    assert audit.checkpoint_after_command(sessions, key_file) is not None
    assert verify_at(engine, key, much_later + timedelta(days=1)).ok


def test_uncheckpointed_log_is_stale_by_its_first_entry(engine: Engine) -> None:
    append(engine, 2)
    with session_factory(engine)() as s:
        first_at = s.scalar(select(AuditEntry.at).where(AuditEntry.seq == 1))
    key = Ed25519PrivateKey.generate()
    assert verify_at(engine, key, first_at + timedelta(minutes=1)).ok
    rep = verify_at(engine, key, first_at + timedelta(days=1))
    assert not rep.ok and rep.first_bad.seq == 1 and "covered by no signed checkpoint" in rep.first_bad.what


def test_version_1_checkpoints_still_verify_and_the_first_version_2_chains_to_them(database_url: str) -> None:
    """A database upgraded through 0006_audit_chain: old rows are version 1 with their own signed layout."""
    from alembic import command

    from collector.db import alembic_config

    key = Ed25519PrivateKey.generate()
    engine = make_engine(database_url)
    try:
        command.upgrade(alembic_config(engine), "0005_users")
        at = datetime(2026, 11, 30, 8, 0, tzinfo=timezone.utc)
        public = public_key_b64(key)
        v1 = audit.checkpoint_bytes(0, None, at, "schedule", public)
        assert v1 == canonical_bytes({"v": 1, "kind": audit.CHECKPOINT_KIND, "count": 0, "head": None,
                                      "at": "2026-11-30T08:00:00.000Z", "occasion": "schedule", "key": public})
        with engine.begin() as conn:
            conn.execute(text("insert into audit_checkpoint (at, entry_count, head_hash, occasion, public_key, "
                              "signature) values (:at, 0, null, 'schedule', :key, :sig)"),
                         {"at": at if engine.dialect.name == "postgresql" else at.replace(tzinfo=None),
                          "key": public, "sig": sign(key, v1)})
        upgrade(engine)
        append(engine, 2)
        new = sign_checkpoint(engine, key, "command")
        with session_factory(engine)() as s:
            old = s.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.id)).first()
        assert (old.version, old.prev_hash, old.host) == (1, None, None)
        assert new.version == 2 and new.prev_hash == sha256_hex(v1)
        assert report(engine, key).ok
        document = audit.checkpoint_document(old)
        assert document["version"] == 1
        audit.check_copy_signature(audit.checkpoint_copy_from(document, "old.json"), key.public_key())
    finally:
        engine.dispose()


def test_evidence_verifier_signs_the_same_checkpoint_bytes(engine: Engine) -> None:
    from collector import evidence_verify

    key = Ed25519PrivateKey.generate()
    append(engine, 2)
    cp = sign_checkpoint(engine, key, "export")
    assert evidence_verify.checkpoint_signed_bytes(audit.checkpoint_document(cp)) == audit.signed_bytes_of(cp)
    old_style = {k: v for k, v in audit.checkpoint_document(cp).items() if k not in ("version", "prev_hash", "host")}
    assert evidence_verify.checkpoint_signed_bytes(old_style) == audit.checkpoint_bytes(
        cp.entry_count, cp.head_hash, cp.at, cp.occasion, cp.public_key)


def test_heartbeat_signs_an_unchanged_head_once_the_newest_is_old(engine: Engine) -> None:
    key = Ed25519PrivateKey.generate()
    sessions = session_factory(engine)
    append(engine, 1)
    assert audit.checkpoint_if_changed(sessions, key) is not None
    assert audit.checkpoint_if_changed(sessions, key, max_age=timedelta(hours=1)) is None
    beat = audit.checkpoint_if_changed(sessions, key, max_age=timedelta(0))
    assert beat is not None and beat.entry_count == 1
    assert report(engine, key).ok


def test_checkpoint_loop_publishes_documents_verify_log_accepts(engine: Engine, tmp_path) -> None:  # noqa: ANN001
    key = Ed25519PrivateKey.generate()
    sessions = session_factory(engine)
    append(engine, 2)
    sink: list[bytes] = []
    loop = audit.CheckpointLoop(sessions, key, interval=3600, publish=sink.append)
    loop.start()
    loop.stop()
    assert len(sink) == 1   # the startup checkpoint; the shutdown tick had nothing new to sign
    document = json.loads(sink[0])
    assert document["version"] == 2 and document["entry_count"] == 2 and document["host"]
    assert set(document) == {"kind", "version", "entry_count", "head_hash", "at", "occasion", "public_key",
                             "prev_hash", "host", "signature"}
    # Restarted with nothing new: the newest existing checkpoint is published again.
    again = audit.CheckpointLoop(sessions, key, interval=3600, publish=sink.append)
    again.start()
    again.stop()
    assert len(sink) == 2 and json.loads(sink[1])["signature"] == document["signature"]
    saved = tmp_path / "checkpoint.json"
    saved.write_bytes(sink[0])
    copy = audit.load_checkpoint_copy(saved)
    audit.check_copy_signature(copy, key.public_key())
    with sessions() as s:
        rep = audit.verify_log(s, key.public_key(), copies=[copy])
    assert rep.ok and rep.copies == 1, rep.problems


def test_published_checkpoint_is_retained_on_the_broker(engine: Engine, mosquitto) -> None:  # noqa: ANN001
    import queue

    import paho.mqtt.client as mqtt

    key = Ed25519PrivateKey.generate()
    sessions = session_factory(engine)
    append(engine, 3)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    try:
        loop = audit.CheckpointLoop(sessions, key, interval=3600, publish=lambda payload: pub.publish(
            audit.CHECKPOINT_TOPIC, payload, qos=1, retain=True).wait_for_publish(5))
        loop.start()
        loop.stop()
    finally:
        pub.disconnect()
        pub.loop_stop()
    got: queue.Queue = queue.Queue()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: got.put(m)
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe(audit.CHECKPOINT_TOPIC, qos=1)
    sub.loop_start()
    try:
        message = got.get(timeout=10)
    finally:
        sub.disconnect()
        sub.loop_stop()
    assert message.retain
    copy = audit.checkpoint_copy_from(json.loads(message.payload), "retained message")
    audit.check_copy_signature(copy, key.public_key())
    assert copy.entry_count == 3
    with sessions() as s:
        assert audit.verify_log(s, key.public_key(), copies=[copy]).ok


def test_cli_commands_that_append_sign_a_checkpoint_after(tmp_path, capsys, monkeypatch,  # noqa: ANN001
                                                          database_url: str) -> None:
    import io

    from collector.cli import main
    from collector.config import load_config
    from exam_contract.signing import load_private_key

    from .conftest import AGENT, INSTITUTION, VENUE, SigningAgent

    def run(*argv: str) -> None:
        with pytest.raises(SystemExit) as done:
            main(["--config", str(config), *argv])
        out, err = capsys.readouterr()
        assert done.value.code == 0, (argv, out, err)

    config = tmp_path / "collector.toml"
    run("init", "--data-dir", str(tmp_path / "data"), "--database-url", database_url)
    run("db", "upgrade")
    run("enroll", "--agent", AGENT, "--venue", VENUE, "--institution", INSTITUTION,
        "--pubkey", SigningAgent().pubkey)
    run("hold", "add", "--venue", VENUE, "--camera", "t101-front", "--from", "2026-11-26 09:00",
        "--to", "2026-11-26 10:00", "--reason", "complaint", "--case", "C-1")
    run("hold", "release", "1", "--reason", "closed")
    batch = tmp_path / "b.csv"
    batch.write_text("batch_id,institution,venue,occupation,level,part,room,start,end\n"
                     f"B1,{INSTITUTION},{VENUE},电工,四级,theory,T101,2026-11-26 09:00,2026-11-26 11:00\n",
                     encoding="utf-8")
    run("batches", "import", str(batch), "--actor", "op")
    monkeypatch.setattr("sys.stdin", io.StringIO("a long password 1\n"))
    run("users", "add", "insp", "--role", "inspector", "--institution", INSTITUTION)

    cfg = load_config(config)
    key = load_private_key(cfg.key_file)
    engine = make_engine(cfg.database_url)
    try:
        with session_factory(engine)() as s:
            cps = list(s.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.id)))
            head = s.get(AuditHead, 1)
        assert [c.occasion for c in cps] == ["command"] * 5
        assert cps[-1].entry_count == head.seq == 5 and cps[-1].head_hash == head.head_hash
        assert verify_at(engine, key, cps[-1].at + timedelta(days=30)).ok
    finally:
        engine.dispose()

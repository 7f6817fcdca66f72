"""Rotating the collector key (`exam-collector rotate-key`) on SQLite and PostgreSQL: the whole audit log, and
checkpoint copies saved before the rotation, keep verifying with the new key alone; the retired key signs
nothing more; a key someone inserts into the database is never trusted."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from collector import audit
from collector.cli import main
from collector.config import load_config
from collector.db import make_engine, session_factory
from collector.models import AuditCheckpoint
from exam_contract.signing import key_fingerprint, load_private_key

from .conftest import AGENT, INSTITUTION, VENUE, SigningAgent


@pytest.fixture
def collector(tmp_path: Path, capsys, database_url: str):
    config = tmp_path / "collector.toml"

    def run(*argv: str) -> str:
        with pytest.raises(SystemExit) as done:
            main(["--config", str(config), *argv])
        out, err = capsys.readouterr()
        assert done.value.code == 0, (argv, out, err)
        return out

    run("init", "--data-dir", str(tmp_path / "data"), "--database-url", database_url)
    run("db", "upgrade")
    cfg = load_config(config)
    engine = make_engine(cfg.database_url)
    yield run, cfg, session_factory(engine)
    engine.dispose()


def _checkpoints(sessions) -> list[AuditCheckpoint]:
    with sessions() as session:
        return list(session.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.id)))


def test_rotation_keeps_the_whole_log_verifiable_with_the_new_key(collector, tmp_path: Path) -> None:
    run, cfg, sessions = collector
    run("enroll", "--agent", AGENT, "--venue", VENUE, "--institution", INSTITUTION, "--pubkey", SigningAgent().pubkey)
    old = load_private_key(cfg.key_file)
    copy_before = tmp_path / "retained-before.json"
    copy_before.write_bytes(audit.checkpoint_payload(_checkpoints(sessions)[-1]))

    out = run("rotate-key", "--reason", "yearly rotation")
    new = load_private_key(cfg.key_file)
    assert key_fingerprint(new) != key_fingerprint(old)
    assert f"old SHA-256 {key_fingerprint(old)}, new SHA-256 {key_fingerprint(new)}" in out
    retired = list(cfg.key_file.parent.glob(f"{cfg.key_file.name}.retired-*"))
    assert len(retired) == 1 and key_fingerprint(load_private_key(retired[0])) == key_fingerprint(old)
    assert cfg.key_file.stat().st_mode & 0o777 == 0o600
    assert not cfg.key_file.with_name(cfg.key_file.name + ".new").exists()
    run("enroll", "--agent", "second-agent", "--venue", VENUE, "--institution", INSTITUTION,
        "--pubkey", SigningAgent().pubkey)

    cps = _checkpoints(sessions)
    assert [c.occasion for c in cps] == ["command", "key_handover", "key_rotation", "command"]
    assert {c.public_key for c in cps[:2]} != {c.public_key for c in cps[2:]}
    later = cps[-1].at + timedelta(minutes=1)
    with sessions() as session:
        copies = [audit.load_checkpoint_copy(copy_before)]
        report = audit.verify_log(session, new.public_key(), now=later, copies=copies)
        assert report.ok, report.problems
        # the retired key alone no longer verifies what was signed after it
        assert not audit.verify_log(session, old.public_key(), now=later).ok
    # a collector still running with the old key signs nothing more
    with pytest.raises(audit.AuditError, match=r"retired by the key rotation in audit entry \d+: restart"):
        with sessions.begin() as session:
            audit.checkpoint(session, old, "schedule")


def test_a_key_inserted_into_the_database_is_not_trusted(collector) -> None:
    run, cfg, sessions = collector
    run("enroll", "--agent", AGENT, "--venue", VENUE, "--institution", INSTITUTION, "--pubkey", SigningAgent().pubkey)
    real = load_private_key(cfg.key_file)
    forger = Ed25519PrivateKey.generate()
    # someone with database access but not the collector key stages a "rotation" to a key of their own
    audit.rotate_collector_key(sessions, forger, Ed25519PrivateKey.generate(), "intruder", "fake")
    with sessions() as session:
        report = audit.verify_log(session, real.public_key(), now=_checkpoints(sessions)[-1].at)
    assert not report.ok
    assert sum("signature does not verify with the collector key" in p.what for p in report.problems) == 2


def test_an_interrupted_rotation_is_finished_by_running_it_again(collector) -> None:
    run, cfg, sessions = collector
    old = load_private_key(cfg.key_file)
    pending = cfg.key_file.with_name(cfg.key_file.name + ".new")
    from exam_contract.signing import generate_private_key

    new = generate_private_key(pending)
    audit.rotate_collector_key(sessions, old, new, "op", "rotation")   # recorded, then the process died
    out = run("rotate-key", "--reason", "finish")
    assert "recorded before in audit entry" in out
    assert key_fingerprint(load_private_key(cfg.key_file)) == key_fingerprint(new)
    with sessions() as session:
        rotations = [e for e in session.scalars(select(audit.AuditEntry).where(
            audit.AuditEntry.action == audit.ACTION_KEY_ROTATE))]
    assert len(rotations) == 1 and json.loads(rotations[0].detail)["new_fingerprint"] == key_fingerprint(new)

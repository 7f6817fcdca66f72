"""`exam-collector enroll --revoke AGENT` (issue 14) against the real broker and collector: the revoked agent's next
upload is rejected `agent_revoked`, its earlier footage stays listed and verifiable, re-enrolling needs
`--reinstate`; and migration 0009 on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import select, text

from collector.cli import main
from collector.db import alembic_config, current_revision, head_revision, make_engine, session_factory, upgrade
from collector.models import AuditEntry
from exam_contract.protocol import RETRYABLE_REJECTIONS, RejectionCode

from .conftest import AGENT, INSTITUTION, VENUE, SigningAgent, fin_for, payload_bytes
from .test_service import Uploader, running_service

pytestmark = pytest.mark.mosquitto


def run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_a_revoked_agent_is_rejected_and_its_footage_kept(tmp_path: Path, capsys, database_url: str, mosquitto,
                                                          test_agent: SigningAgent) -> None:
    config = tmp_path / "collector.toml"
    assert run(capsys, "--config", str(config), "init", "--data-dir", str(tmp_path / "data"), "--broker",
               mosquitto.url, "--database-url", database_url)[0] == 0
    cli = ["--config", str(config)]
    enrol = [*cli, "enroll", "--agent", AGENT, "--venue", VENUE, "--institution", INSTITUTION, "--pubkey",
             test_agent.pubkey]
    with running_service(database_url, tmp_path / "data" / "storage", test_agent, mosquitto) as (_, h):
        up = Uploader(mosquitto.port)
        try:
            first = payload_bytes(1)
            m1 = test_agent.manifest(1, first, None)
            assert up.upload(test_agent, m1, first).state == "stored"
            # seq 2 is staged (init and chunks) before the revocation; its fin comes after
            second = payload_bytes(2)
            m2 = test_agent.manifest(2, second, m1.record_hash())
            init2 = test_agent.init_payload(m2)
            assert h.ingest.on_init(AGENT, m2.file_id, init2) is None
            for i in range(4):
                h.ingest.on_chunk(AGENT, m2.file_id, i, second[i * 1000:(i + 1) * 1000])

            code, out, err = run(capsys, *cli, "enroll", "--revoke", AGENT, "--reason", "machine stolen")
            assert (code, err) == (0, "")
            assert out == (f"agent {AGENT} revoked: its uploads are rejected (agent_revoked) from now on; its stored "
                           f"footage is kept; also delete its broker account (mosquitto_passwd -D "
                           f"/etc/mosquitto/exam/passwd {AGENT})\n")
            code, out, _ = run(capsys, *cli, "agents", "--json")
            [view] = json.loads(out)
            revoked_at = view["revoked_at"]
            assert (view["revoked"], view["revoked_reason"], view["records"]) == (True, "machine stolen", 1)
            assert view["revoked_by"].startswith("os:")
            expected = (f"agent_revoked: agent '{AGENT}' was revoked at {revoked_at}: no upload is accepted until an "
                        "operator reinstates it with `exam-collector enroll ... --reinstate`")

            # the fin of the upload staged before: rejected
            reply = h.ingest.on_fin(AGENT, m2.file_id, fin_for(init2))
            assert (reply.state, reply.reason, reply.record) == ("rejected", expected, m2.record_hash())
            # a new upload over the broker: init and fin rejected
            m3 = test_agent.manifest(3, payload_bytes(3), m2.record_hash())
            reply = up.upload(test_agent, m3, payload_bytes(3))
            assert (reply.state, reply.reason) == ("rejected", expected)
            assert reply.reason_code == RejectionCode.AGENT_REVOKED
            assert [r.seq for r in h.records()] == [1]

            # the earlier footage: listed and verifiable; the agent and its key listed as revoked
            code, out, err = run(capsys, *cli, "summary", "--verify", "--lang", "en")
            assert code == 0 and out.splitlines()[-1] == "all hashes and signatures verified"
            assert "segments 1 " in out
            code, out, _ = run(capsys, *cli, "agents")
            assert out.rstrip("\n").endswith(f"1 record(s)  REVOKED {revoked_at} by {view['revoked_by']}: "
                                             "machine stolen")
            code, out, _ = run(capsys, *cli, "keys")
            assert out.rstrip("\n").endswith(f"current  (agent revoked {revoked_at})")
            code, out, _ = run(capsys, *cli, "events", "--json")
            assert {(e["event"], e["reason"]) for e in json.loads(out)} >= {("revoked", None),
                                                                              ("rejected", "agent_revoked")}
            with session_factory(h.engine)() as session:
                entry = session.scalars(select(AuditEntry).where(AuditEntry.action == "agent.revoke")).one()
            assert (entry.target, entry.reason, entry.actor) == (AGENT, "machine stolen", view["revoked_by"])

            # a second revocation changes nothing; enrolling again needs --reinstate
            assert run(capsys, *cli, "enroll", "--revoke", AGENT) == (
                0, f"agent {AGENT} is already revoked since {revoked_at}; nothing changed\n", "")
            assert run(capsys, *enrol) == (
                1, "", f"exam-collector: error: agent {AGENT} was revoked at {revoked_at} by {view['revoked_by']} "
                       "(machine stolen): add --reinstate to accept its uploads again\n")
            assert run(capsys, *enrol, "--reinstate") == (
                0, f"reinstated agent {AGENT} for venue {VENUE} (revoked at {revoked_at})\n", "")
            assert run(capsys, *enrol, "--reinstate") == (
                1, "", f"exam-collector: error: agent {AGENT} is not revoked: leave out --reinstate\n")
            # reinstated: the waiting records are stored when sent again
            assert up.upload(test_agent, m2, second).state == "stored"
            assert up.upload(test_agent, m3, payload_bytes(3)).state == "stored"
            assert [r.seq for r in h.records()] == [1, 2, 3]
        finally:
            up.close()


def test_revoke_command_errors_are_one_line(tmp_path: Path, capsys) -> None:
    config = tmp_path / "collector.toml"
    assert run(capsys, "--config", str(config), "init", "--data-dir", str(tmp_path / "data"))[0] == 0
    assert run(capsys, "--config", str(config), "db", "upgrade")[0] == 0
    cli = ["--config", str(config)]
    assert run(capsys, *cli, "enroll", "--revoke", "nobody") == (
        1, "", "exam-collector: error: agent nobody is not enrolled: see `exam-collector agents` for the enrolled "
               "ids\n")
    assert run(capsys, *cli, "enroll", "--revoke", AGENT, "--agent", AGENT) == (
        1, "", "exam-collector: error: --revoke takes only --reason, not --agent: run `exam-collector enroll --revoke "
               "AGENT --reason TEXT`\n")
    assert run(capsys, *cli, "enroll", "--agent", AGENT, "--venue", VENUE) == (
        1, "", "exam-collector: error: missing --pubkey, --institution: enrolling needs --agent, --venue, "
               "--institution and --pubkey (or revoke with `exam-collector enroll --revoke AGENT --reason TEXT`)\n")
    assert run(capsys, *cli, "enroll", "--agent", AGENT, "--venue", VENUE, "--institution", INSTITUTION,
               "--pubkey", SigningAgent().pubkey, "--reinstate") == (
        1, "", f"exam-collector: error: agent {AGENT} is not revoked: leave out --reinstate\n")
    assert run(capsys, *cli, "agents") == (0, "no enrolled agents: enrol one with `exam-collector enroll`\n", "")


def test_agent_revoked_is_retried_by_agents() -> None:
    """An operator cures it (`--reinstate`): the agent keeps the record and retries with backoff."""
    assert RejectionCode.AGENT_REVOKED in RETRYABLE_REJECTIONS


def test_migration_0009_keeps_agents_enrolled(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        upgrade(engine, "0008_object_storage")
        with engine.begin() as conn:
            conn.execute(text("insert into agent (id, venue, institution, public_key, enrolled_at) values "
                              "('a1', 'v1', 'i1', 'k', :at)"), {"at": datetime(2026, 11, 1, tzinfo=timezone.utc)})
        upgrade(engine)
        assert current_revision(engine) == head_revision() == "0009_agent_revocation"
        with engine.connect() as conn:
            assert conn.execute(text("select id, revoked_at, revoked_by, revoked_reason from agent")).all() == \
                [("a1", None, None, None)]
        command.downgrade(alembic_config(engine), "0008_object_storage")
        with engine.connect() as conn:
            assert conn.execute(text("select id from agent")).scalars().all() == ["a1"]
        upgrade(engine)
        assert current_revision(engine) == "0009_agent_revocation"
    finally:
        engine.dispose()

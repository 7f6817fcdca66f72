"""Agent keys with history, on SQLite and PostgreSQL: a replaced key keeps verifying what it signed."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from collector.admin import agent_keys, enroll, verify_all
from collector.db import session_factory
from exam_contract import protocol as P
from exam_contract.signing import key_fingerprint

from .conftest import AGENT, INSTITUTION, VENUE, Harness, SigningAgent, payload_bytes


def test_replaced_key_keeps_verifying_what_it_signed(harness: Harness) -> None:
    old = harness.agent
    prev = None
    for seq in (1, 2):
        data = payload_bytes(seq)
        m = old.manifest(seq, data, prev)
        assert harness.send(m, data).state == "stored"
        prev = m.record_hash()
    new = SigningAgent(key=Ed25519PrivateKey.generate())
    note = enroll(session_factory(harness.engine), AGENT, VENUE, new.pubkey, INSTITUTION, replace=True)
    assert note.startswith(f"re-enrolled agent {AGENT}") and "retired" in note
    harness.agent = new
    data = payload_bytes(3)
    m3 = new.manifest(3, data, prev)
    assert harness.send(m3, data).state == "stored"  # the chain goes on across the key change
    # the retired key signs nothing new
    harness.agent = old
    data4 = payload_bytes(4)
    m4 = old.manifest(4, data4, m3.record_hash())
    reply = harness.send(m4, data4)
    assert reply.reason_code == P.REJECT_BAD_SIGNATURE and reply.reason_code in P.RETRYABLE_REJECTIONS

    rows = harness.records()
    assert [r.key_fingerprint for r in rows] == [key_fingerprint(old.pubkey)] * 2 + [key_fingerprint(new.pubkey)]
    assert verify_all(session_factory(harness.engine), harness.ingest.store) == []
    with session_factory(harness.engine)() as session:
        keys = agent_keys(session, [AGENT])
    assert [(k.fingerprint, k.valid_to is None) for k in keys] == [
        (key_fingerprint(old.pubkey), False), (key_fingerprint(new.pubkey), True)]
    assert keys[0].valid_to >= rows[1].stored_at and "replaced by key" in keys[0].retired_reason


def test_a_key_missing_from_the_history_is_an_integrity_problem(harness: Harness) -> None:
    from sqlalchemy import delete

    from collector.models import AgentKey

    data = payload_bytes(1)
    assert harness.send(harness.agent.manifest(1, data, None), data).state == "stored"
    with session_factory(harness.engine).begin() as session:
        session.execute(delete(AgentKey))
    [problem] = verify_all(session_factory(harness.engine), harness.ingest.store)
    assert "is not in the key history" in problem.what


def test_enrolment_needs_an_institution_and_valid_ids(harness: Harness) -> None:
    import pytest

    from collector.admin import EnrollError

    sessions = session_factory(harness.engine)
    with pytest.raises(EnrollError, match=r"^--institution is required to enrol agent new-agent"):
        enroll(sessions, "new-agent", VENUE, SigningAgent().pubkey)
    with pytest.raises(EnrollError, match=r"^--institution '\.\./x' is not a usable institution code"):
        enroll(sessions, "new-agent", VENUE, SigningAgent().pubkey, "../x")
    with pytest.raises(EnrollError, match=r"^--venue 'a/b' is not a usable id"):
        enroll(sessions, "new-agent", "a/b", SigningAgent().pubkey, INSTITUTION)


def test_a_venue_belongs_to_one_institution(harness: Harness) -> None:
    import pytest

    from collector.admin import EnrollError

    sessions = session_factory(harness.engine)
    with pytest.raises(EnrollError, match=rf"^venue {VENUE} belongs to institution {INSTITUTION} \(agent {AGENT}"):
        enroll(sessions, "intruder-agent", VENUE, SigningAgent().pubkey, "JL9999999")
    assert enroll(sessions, "second-agent", VENUE, SigningAgent().pubkey, INSTITUTION).startswith("enrolled")

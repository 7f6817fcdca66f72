"""A hostile but enrolled agent, with a valid key, against the real ingest on SQLite and PostgreSQL.

It sends path-escaping names, oversized and inconsistent inits, chunk floods, replays, a mismatched
institution and zero-byte segments. Each is refused with a named reason (or dropped and noted), nothing is
written outside storage_dir, memory stays under a stated bound, and the next valid upload is still stored.
"""

from __future__ import annotations

import os
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import update

from collector.admin import enroll
from collector.admission import IngestLimits
from collector.db import make_engine, session_factory, upgrade
from collector.ingest import Ingest
from collector.models import Agent
from exam_contract import protocol as P
from exam_contract.canonical import sha256_hex
from exam_contract.chunks import chunk_count
from exam_contract.protocol import InitMessage, encode_fin
from exam_contract.signing import sign

from .conftest import AGENT, INSTITUTION, VENUE, Harness, SigningAgent, payload_bytes

CHUNK = 64 * 1024
LIMITS = IngestLimits(max_segment_bytes=1024 * 1024, max_open_transfers=4, max_staging_bytes=2 * 1024 * 1024,
                      max_early_chunks=8, clock_backlog_days=100 * 365)
# What the whole hostile session may allocate in Python at its peak. Building a set of every chunk index of one
# init claiming 12 M chunks took 1.15 GB before the limits; a valid 1 MiB upload needs a few MiB.
MEMORY_BOUND = 64 * 1024 * 1024


@pytest.fixture
def hostile(database_url: str, tmp_path: Path, test_agent: SigningAgent) -> Harness:
    engine = make_engine(database_url)
    upgrade(engine)
    enroll(session_factory(engine), AGENT, VENUE, test_agent.pubkey, INSTITUTION)
    storage = tmp_path / "volume" / "storage"
    yield Harness(Ingest(engine, storage, limits=LIMITS), engine, storage, test_agent)
    engine.dispose()


def _init(h: Harness, manifest, *, chunk_size: int = CHUNK, chunks: int | None = None) -> bytes:
    message = InitMessage(manifest.to_dict(), sign(h.agent.key, manifest.canonical()), chunk_size,
                          chunks if chunks is not None else chunk_count(manifest.size, chunk_size))
    return message.encode()


def _send(h: Harness, manifest, data: bytes | None, **kw):
    return h.send(manifest, data, init=_init(h, manifest, **kw), chunk_size=kw.get("chunk_size", CHUNK))


def _files_outside(root: Path, storage: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and storage not in p.parents and p != storage)


def _assert_still_stores(h: Harness, seq: int = 1, prev: str | None = None) -> None:
    data = payload_bytes(seq, 200_000)
    m = h.agent.manifest(seq, data, prev)
    reply = _send(h, m, data)
    assert reply.state == "stored" and reply.record == m.record_hash(), reply
    assert h.records()[-1].record_hash == m.record_hash()


@pytest.mark.parametrize("field, value", [
    ("institution", "../../x"), ("institution", "/etc/cron.d"), ("venue", "../JL2201001-02"),
    ("camera", "../../../escape"), ("camera", "a/b"), ("room", "T101/.."),
])
def test_path_escaping_ids_are_refused_and_nothing_lands_outside_storage(hostile: Harness, field, value) -> None:
    root = hostile.storage.parent
    data = payload_bytes(1, 100_000)
    m = replace(hostile.agent.manifest(1, data, None), **{field: value})
    reply = _send(hostile, m, data)
    assert reply.state == "rejected" and reply.reason_code == P.REJECT_MALFORMED
    # the camera id is part of the file id in the topic, which is checked first
    assert f"manifest.{field}" in reply.reason or (field == "camera" and "in the topic is not a valid id" in reply.reason)
    assert hostile.records() == [] and _files_outside(root, hostile.storage) == []
    assert not [p for p in hostile.storage.rglob("*") if p.is_file() and "staging" not in p.parts]
    _assert_still_stores(hostile)


def test_another_institution_inside_a_valid_signature_is_refused(hostile: Harness) -> None:
    data = payload_bytes(1, 100_000)
    m = hostile.agent.manifest(1, data, None, institution="JL9999999")
    reply = _send(hostile, m, data)
    assert reply.state == "rejected" and reply.reason_code == P.REJECT_INSTITUTION_MISMATCH
    assert "enrolled for institution 'JL2201001'" in reply.reason and reply.record == m.record_hash()
    _assert_still_stores(hostile)
    assert {r.institution for r in hostile.records()} == {INSTITUTION}


def test_enrolment_without_institution_refuses_until_it_is_set(hostile: Harness, test_agent) -> None:
    with session_factory(hostile.engine).begin() as session:  # an enrolment from before institutions
        session.execute(update(Agent).where(Agent.id == AGENT).values(institution=None))
    data = payload_bytes(1, 100_000)
    m = hostile.agent.manifest(1, data, None)
    reply = _send(hostile, m, data)
    assert reply.reason_code == P.REJECT_INSTITUTION_MISMATCH and "--institution CODE" in reply.reason
    assert P.REJECT_INSTITUTION_MISMATCH in P.RETRYABLE_REJECTIONS  # the agent keeps it and tries again
    note = enroll(session_factory(hostile.engine), AGENT, VENUE, test_agent.pubkey, INSTITUTION)
    assert note == f"agent {AGENT} now belongs to institution {INSTITUTION}"
    assert _send(hostile, m, data).state == "stored"


def test_symlink_out_of_storage_is_refused_before_anything_is_written(hostile: Harness, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    hostile.storage.mkdir(parents=True, exist_ok=True)
    os.symlink(outside, hostile.storage / INSTITUTION)
    data = payload_bytes(1, 100_000)
    m = hostile.agent.manifest(1, data, None)
    reply = _send(hostile, m, data)
    assert reply.state == "rejected" and reply.reason_code == P.REJECT_UNSAFE_PATH
    assert list(outside.rglob("*")) == [] and hostile.records() == []


def test_oversized_and_inconsistent_inits_are_refused_cheaply(hostile: Harness) -> None:
    data = payload_bytes(1, 100_000)
    base = hostile.agent.manifest(1, data, None)
    tracemalloc.start()
    try:
        cases = [
            # 12 M one-byte chunks: refused from the numbers alone
            (replace(base, size=12_000_000), {"chunk_size": 1}, P.REJECT_TOO_LARGE),
            (replace(base, size=1_000_000), {"chunk_size": 1}, P.REJECT_BAD_CHUNK_SIZE),
            (replace(base, size=2**49), {"chunk_size": CHUNK}, P.REJECT_TOO_LARGE),
            (replace(base, size=900_000), {"chunk_size": 8 * 1024 * 1024}, P.REJECT_BAD_CHUNK_SIZE),
            (base, {"chunks": 10**9}, P.REJECT_WRONG_CHUNK_COUNT),
        ]
        for manifest, kw, code in cases:
            reply = hostile.ingest.on_init(AGENT, manifest.file_id, _init(hostile, manifest, **kw))
            assert reply is not None and reply.reason_code == code, (kw, reply)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"refusing five inits allocated {peak} bytes"
    _assert_still_stores(hostile)


@pytest.mark.parametrize("changes, code", [
    ({"size": 0, "sha256": sha256_hex(b"")}, P.REJECT_EMPTY_SEGMENT),
    ({"duration": 0.0}, P.REJECT_IMPLAUSIBLE),
    ({"duration": 86_400.0}, P.REJECT_IMPLAUSIBLE),
    ({"duration": 2.0}, P.REJECT_IMPLAUSIBLE),             # start-to-end span is 10 s
])
def test_empty_or_implausible_segments_never_count_as_coverage(hostile: Harness, changes, code) -> None:
    data = payload_bytes(1, 100_000)
    m = replace(hostile.agent.manifest(1, data, None), **changes)
    reply = _send(hostile, m, data if m.size else None)
    assert reply.state == "rejected" and reply.reason_code == code
    assert hostile.records() == []
    [event] = hostile.events("rejected")
    assert event.reason == code and event.record_hash == m.record_hash()
    _assert_still_stores(hostile)


def test_a_gap_record_with_bytes_is_implausible(hostile: Harness) -> None:
    gap = replace(hostile.agent.manifest(1, None, None, kind="gap"), size=5000)
    reply = _send(hostile, gap, None, chunks=0)
    assert reply.reason_code in (P.REJECT_WRONG_CHUNK_COUNT, P.REJECT_IMPLAUSIBLE)


def test_chunk_floods_are_capped_and_noted(hostile: Harness) -> None:
    staging = hostile.storage / "staging" / AGENT
    # chunks before any init: at most max_early_chunks are held, whatever file ids they claim
    for n in range(40):
        hostile.ingest.on_chunk(AGENT, f"t101-front-{n + 1}", 0, b"x" * 1000)
    held = list(staging.rglob("early/*"))
    assert len(held) == LIMITS.max_early_chunks
    dropped = hostile.events("chunk_dropped")
    assert dropped and dropped[0].reason == "early_chunk_limit"
    assert len(dropped) <= 6  # throttled: notes, not one row per chunk
    # a chunk larger than the largest chunk size, and chunks that do not fit the init, are dropped
    data = payload_bytes(1, 200_000)
    m = hostile.agent.manifest(1, data, None)
    assert hostile.ingest.on_init(AGENT, m.file_id, _init(hostile, m)) is None
    hostile.ingest.on_chunk(AGENT, m.file_id, 0, b"y" * (LIMITS.max_chunk_bytes + 1))
    hostile.ingest.on_chunk(AGENT, m.file_id, 99, b"y" * 10)
    hostile.ingest.on_chunk(AGENT, m.file_id, 3, b"y" * 10)   # the last chunk is 200000 - 3*65536 = 3392 bytes
    hostile.ingest.flush_receipts()
    reply = hostile.ingest.on_fin(AGENT, m.file_id, encode_fin(m.record_hash()))
    assert reply.state == "missing" and reply.missing == [[0, 3]]
    assert {e.reason for e in hostile.events("chunk_dropped")} >= {"early_chunk_limit"}
    for i in range(4):
        hostile.ingest.on_chunk(AGENT, m.file_id, i, data[i * CHUNK:(i + 1) * CHUNK])
    assert hostile.ingest.on_fin(AGENT, m.file_id, encode_fin(m.record_hash())).state == "stored"
    assert (hostile.storage / hostile.records()[0].storage_path).read_bytes() == data


def test_open_transfers_and_staging_are_capped_per_agent(hostile: Harness) -> None:
    prev = None
    manifests = []
    for seq in range(1, 7):
        data = payload_bytes(seq, 600_000)
        m = hostile.agent.manifest(seq, data, prev)
        prev = m.record_hash()
        manifests.append(m)
    replies = [hostile.ingest.on_init(AGENT, m.file_id, _init(hostile, m)) for m in manifests]
    # 600 000 bytes announce 10 chunks of 64 KiB (640 KiB): three fit the 2 MiB quota, the fourth does not
    assert replies[:3] == [None, None, None]
    assert replies[3].reason_code == P.REJECT_STAGING_FULL
    assert {P.REJECT_STAGING_FULL, P.REJECT_TOO_MANY_TRANSFERS} <= P.RETRYABLE_REJECTIONS
    small = replace(LIMITS, max_open_transfers=2)
    hostile.ingest.limits = small
    reply = hostile.ingest.on_init(AGENT, manifests[4].file_id, _init(hostile, manifests[4]))
    assert reply.reason_code == P.REJECT_TOO_MANY_TRANSFERS
    hostile.ingest.limits = LIMITS
    # finishing the open uploads frees the quota: the refused record is stored when the agent retries
    for m in manifests[:3]:
        data = payload_bytes(m.seq, 600_000)
        reply = _send(hostile, m, data)
        assert reply.state == "stored", reply
    assert _send(hostile, manifests[3], payload_bytes(4, 600_000)).state == "stored"


def test_replays_store_nothing_twice_and_never_acknowledge_other_bytes(hostile: Harness) -> None:
    data = payload_bytes(1, 100_000)
    m = hostile.agent.manifest(1, data, None)
    assert _send(hostile, m, data).state == "stored"
    again = _send(hostile, m, data)
    assert again.state == "stored" and again.record == m.record_hash()
    # the same seq with other bytes (a journal lost and seq 1 reused): refused, and its bare fin is no `stored`
    other_data = payload_bytes(1, 120_000)
    other = hostile.agent.manifest(1, other_data, None, start=m.start.replace(hour=5), end=m.end.replace(hour=5))
    assert other.file_id == m.file_id
    fin = hostile.ingest.on_fin(AGENT, other.file_id, encode_fin(other.record_hash()))
    assert fin.state == "missing" and fin.record == other.record_hash()
    reply = _send(hostile, other, other_data)
    assert reply.state == "rejected" and reply.reason_code == P.REJECT_SEQ_REPLAYED
    assert reply.record == other.record_hash()
    assert len(hostile.records()) == 1 and len(hostile.stored_files()) == 1


def test_a_flood_of_rejections_is_recorded_in_bounded_form(hostile: Harness) -> None:
    for n in range(150):
        hostile.ingest.on_init(AGENT, f"t101-front-{n + 1}", b"{not json")
    events = hostile.events("rejected")
    assert 0 < len(events) <= 60
    _assert_still_stores(hostile)


def test_the_whole_hostile_session_stays_under_the_memory_bound(hostile: Harness) -> None:
    tracemalloc.start()
    try:
        base = hostile.agent.manifest(1, payload_bytes(1, 100_000), None)
        for n in range(200):
            hostile.ingest.on_init(AGENT, base.file_id, _init(hostile, replace(base, size=10**12), chunk_size=1))
            hostile.ingest.on_chunk(AGENT, f"t101-front-{n + 10}", n, b"z" * 4096)
            hostile.ingest.on_fin(AGENT, f"t101-front-{n + 10}", encode_fin("f" * 64))
        _assert_still_stores(hostile)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"peak {peak / 2**20:.1f} MiB"


def test_a_record_dated_years_back_is_stored_flagged_and_kept_from_its_arrival(hostile: Harness) -> None:
    """An agent with a reset clock: its footage is evidence and is stored, but its own times are not believed:
    `clock_suspect` is set, an event says why, and retention keeps it a year from its arrival."""
    from datetime import datetime, timedelta, timezone

    from collector.admission import IngestLimits
    from retention.enforce import build_plan
    from retention.policy import RetentionPolicy

    hostile.ingest.limits = replace(LIMITS, clock_backlog_days=IngestLimits().clock_backlog_days)
    data = payload_bytes(1, 100_000)
    two_years_ago = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=730)
    m = hostile.agent.manifest(1, data, None, start=two_years_ago, end=two_years_ago + timedelta(seconds=10))
    assert _send(hostile, m, data).state == "stored"
    [row] = hostile.records()
    assert row.clock_suspect and row.stored_by == hostile.ingest.instance_id
    [event] = hostile.events("clock_suspect")
    assert "days before the collector received it" in event.detail and event.record_hash == m.record_hash()
    with session_factory(hostile.engine)() as session:
        plan = build_plan(session, RetentionPolicy(), row.stored_at + timedelta(seconds=1), hostile.ingest.store,
                          timedelta(minutes=15), timedelta(minutes=15))
    assert plan.deletions == ()

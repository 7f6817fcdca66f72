"""Resume (issue 3): durable receipts in the database, any instance answers a repeated fin, claims of dead
instances are taken over, abandoned staging expires, a full or failing storage volume loses nothing."""

from __future__ import annotations

import errno
import os
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from collector.db import session_factory
from collector.footage_store import FilesystemStore
from collector.ingest import EVENT_STAGING_EXPIRED, REASON_INIT_MISSING, Ingest, storage_relpath
from collector.ingest_alarms import STORAGE_ERROR, STORAGE_FULL, classify
from collector.models import EVENT_REJECTED, ChunkReceipt, ChunkTransfer
from tests.support.faulty_store import FaultyStore
from tests.support.services import small_filesystem

from exam_contract.protocol import encode_fin

from .conftest import AGENT, TEST_LIMITS, Harness, payload_bytes


def _rows(harness: Harness, model) -> list:
    with session_factory(harness.engine)() as s:
        return list(s.scalars(select(model)))


def _chunk(data: bytes, i: int, size: int = 1000) -> bytes:
    return data[i * size:(i + 1) * size]


def test_repeated_fin_on_another_instance_names_missing_ranges(harness: Harness) -> None:
    a, b = harness.ingest, Ingest(harness.engine, harness.storage, limits=TEST_LIMITS)
    data = payload_bytes(1, 9500)
    m = harness.agent.manifest(1, data, None)
    assert a.on_init(AGENT, m.file_id, harness.agent.init_payload(m)) is None
    for i in (0, 1, 4, 5, 9):
        a.on_chunk(AGENT, m.file_id, i, _chunk(data, i))
    # receipts follow the bytes: committed in a batch once the data file is synced (a worker does this
    # whenever its queue runs dry, every RECEIPT_BATCH chunks, and before answering a fin)
    assert _rows(harness, ChunkReceipt) == []
    assert a.flush_receipts() == 5
    assert sorted(r.idx for r in _rows(harness, ChunkReceipt)) == [0, 1, 4, 5, 9]
    reply = b.on_fin(AGENT, m.file_id)  # b never saw a chunk: it answers from the database
    assert reply is not None and reply.state == "missing" and reply.missing == [[2, 3], [6, 8]]
    for i in (2, 3, 6, 7, 8):
        b.on_chunk(AGENT, m.file_id, i, _chunk(data, i))
    assert b.flush_receipts() == 5
    reply = a.on_fin(AGENT, m.file_id)
    assert reply is not None and reply.state == "stored"
    (stored,) = harness.stored_files()
    assert stored.read_bytes() == data
    assert _rows(harness, ChunkReceipt) == [] and _rows(harness, ChunkTransfer) == []
    assert harness.staging_entries() == []
    assert b.on_fin(AGENT, m.file_id, encode_fin(m.record_hash())).state == "stored"  # a repeat after the store


def test_claim_left_by_a_dead_instance_is_taken_over(harness: Harness) -> None:
    data = payload_bytes(1, 4200)
    m = harness.agent.manifest(1, data, None)
    assert harness.ingest.on_init(AGENT, m.file_id, harness.agent.init_payload(m)) is None
    for i in range(5):
        harness.ingest.on_chunk(AGENT, m.file_id, i, _chunk(data, i))
    assert harness.ingest.flush_receipts() == 5
    staging = harness.storage / "staging" / AGENT / m.file_id
    # an instance took the bytes for finishing and was SIGKILLed before it stored anything
    os.rename(staging / "data", staging / "claim.dead-host.4242.abcdef")
    # a late duplicate of chunk 2 then creates a fresh, partial `data`: it must not be mistaken for the file
    harness.ingest.on_chunk(AGENT, m.file_id, 2, _chunk(data, 2))
    reply = Ingest(harness.engine, harness.storage, limits=TEST_LIMITS).on_fin(AGENT, m.file_id)
    assert reply is not None and reply.state == "stored"
    (stored,) = harness.stored_files()
    assert stored.read_bytes() == data and len(harness.records()) == 1


def test_abandoned_transfer_expires_and_is_recorded(harness: Harness) -> None:
    data = payload_bytes(1, 3000)
    m = harness.agent.manifest(1, data, None)
    assert harness.ingest.on_init(AGENT, m.file_id, harness.agent.init_payload(m)) is None
    harness.ingest.on_chunk(AGENT, m.file_id, 0, _chunk(data, 0))
    assert harness.ingest.flush_receipts() == 1
    early = harness.agent.manifest(2, data, "0" * 64)
    harness.ingest.on_chunk(AGENT, early.file_id, 0, _chunk(data, 0))  # chunk of an init that never came

    assert harness.ingest.sweep_staging(timedelta(hours=1)) == 0  # young transfers stay
    assert len(_rows(harness, ChunkTransfer)) == 1

    assert harness.ingest.sweep_staging(timedelta(0)) == 2
    assert harness.staging_entries() == []
    assert _rows(harness, ChunkTransfer) == [] and _rows(harness, ChunkReceipt) == []
    events = harness.events(EVENT_STAGING_EXPIRED)
    assert sorted(e.file_id for e in events) == sorted([m.file_id, early.file_id])
    assert "1 of 3 chunks" in next(e.detail for e in events if e.file_id == m.file_id)
    # the agent's next fin is told to start over; a full resend then stores it
    reply = harness.ingest.on_fin(AGENT, m.file_id)
    assert reply.state == "missing" and reply.reason.startswith(REASON_INIT_MISSING)
    assert harness.send(m, data).state == "stored"


def test_full_storage_keeps_no_receipt_and_recovers(harness: Harness, tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "small", size_kib=64) as volume:
        ingest = Ingest(harness.engine, volume, limits=TEST_LIMITS)
        data = payload_bytes(1, 40_000)
        m = harness.agent.manifest(1, data, None)
        filler = volume / "filler"
        filler.write_bytes(b"\0" * (44 * 1024))  # leaves too little room for the whole file
        assert ingest.on_init(AGENT, m.file_id, harness.agent.init_payload(m)) is None
        failed = []
        for i in range(40):
            try:
                ingest.on_chunk(AGENT, m.file_id, i, _chunk(data, i))
            except OSError:
                failed.append(i)
        assert failed  # the volume filled up part way
        reply = ingest.on_fin(AGENT, m.file_id)
        assert reply.state == "missing"
        got = {r.idx for r in _rows(harness, ChunkReceipt)}
        assert got.isdisjoint(failed) and set(range(40)) - got >= set(failed)
        filler.unlink()  # the operator frees space; the agent resends what is missing
        from exam_contract.chunks import expand_ranges
        for i in expand_ranges(reply.missing):
            ingest.on_chunk(AGENT, m.file_id, i, _chunk(data, i))
        reply = ingest.on_fin(AGENT, m.file_id)
        assert reply.state == "stored"
        stored = [p for p in volume.rglob("*.ts")]
        assert len(stored) == 1 and stored[0].read_bytes() == data


@pytest.mark.parametrize(("code", "alarm"), [(errno.ENOSPC, STORAGE_FULL), (errno.EIO, STORAGE_ERROR)])
def test_store_failing_at_place_stores_nothing_and_a_repeated_fin_stores_it_once(harness: Harness, code: int,
                                                                                 alarm: str) -> None:
    """The store-based twin of the tmpfs test above, at the last step: the verified file cannot be placed.
    on_fin raises (so the service sends no reply and raises the alarm `classify` names), no row and no stored
    file exist, the upload stays staged with its receipts, and the agent's next fin stores it without a resend."""
    store = FaultyStore(FilesystemStore(harness.storage))
    ingest = Ingest(harness.engine, harness.storage, limits=TEST_LIMITS, store=store)
    data = payload_bytes(1, 9500)
    m = harness.agent.manifest(1, data, None)
    fin = encode_fin(m.record_hash())
    assert ingest.on_init(AGENT, m.file_id, harness.agent.init_payload(m)) is None
    for i in range(10):
        ingest.on_chunk(AGENT, m.file_id, i, _chunk(data, i))
    store.fail("place", code)
    with pytest.raises(OSError) as failed:
        ingest.on_fin(AGENT, m.file_id, fin)
    assert failed.value.errno == code and classify(failed.value) == alarm
    assert store.failed == [("place", storage_relpath(m).as_posix())]
    assert harness.records() == [] and list(store.walk()) == []           # nothing half-stored
    assert harness.events(EVENT_REJECTED) == []                          # and nothing refused
    assert sorted(r.idx for r in _rows(harness, ChunkReceipt)) == list(range(10))
    assert [p.name.split(".")[0] for p in harness.staging_entries() if p.name.startswith("claim.")] == ["claim"]

    store.heal()  # space is freed (or the disk replaced); the agent repeats its fin
    reply = ingest.on_fin(AGENT, m.file_id, fin)
    assert reply.state == "stored" and reply.record == m.record_hash()
    [row] = harness.records()
    assert row.storage_path == storage_relpath(m).as_posix()
    assert [p.as_posix() for p in store.walk()] == [row.storage_path]
    assert store.hash(row.storage_path) == (m.sha256, len(data))
    assert harness.staging_entries() == []
    assert _rows(harness, ChunkReceipt) == [] and _rows(harness, ChunkTransfer) == []
    assert ingest.on_fin(AGENT, m.file_id, fin).state == "stored" and len(harness.records()) == 1


def test_restaged_file_drops_receipts_not_yet_committed(harness: Harness) -> None:
    """A changed init restarts staging; chunks written for the old init must never get a receipt, or the
    new file would be finished from bytes that are gone."""
    data = payload_bytes(1, 3000)
    m = harness.agent.manifest(1, data, None)
    assert harness.ingest.on_init(AGENT, m.file_id, harness.agent.init_payload(m)) is None
    for i in range(3):
        harness.ingest.on_chunk(AGENT, m.file_id, i, _chunk(data, i))
    resealed = harness.agent.manifest(1, data, None, duration=9.5)  # same file id, another manifest
    assert harness.ingest.on_init(AGENT, m.file_id, harness.agent.init_payload(resealed)) is None
    assert harness.ingest.flush_receipts() == 0
    reply = harness.ingest.on_fin(AGENT, m.file_id)
    assert reply.state == "missing" and reply.missing == [[0, 2]]
    assert harness.send(resealed, data).state == "stored"

"""Ingest core on real SQLite and PostgreSQL: storage, every rejection, duplicates, chain holes, missing chunks."""

from __future__ import annotations

import threading


from collector.ingest import Ingest, storage_relpath
from collector.models import CHAIN_FIRST, CHAIN_HOLE, CHAIN_LINKED
from exam_contract import protocol as P
from exam_contract.protocol import encode_fin
from exam_contract.signing import sign
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .conftest import AGENT, CAMERA, INSTITUTION, TEST_LIMITS, Harness, payload_bytes


def store_chain(h: Harness, count: int, start_seq: int = 1, prev: str | None = None) -> str | None:
    for seq in range(start_seq, start_seq + count):
        data = payload_bytes(seq)
        m = h.agent.manifest(seq, data, prev)
        reply = h.send(m, data)
        assert reply is not None and reply.state == "stored", reply
        prev = m.record_hash()
    return prev


def assert_keeps_working(h: Harness, prev: str | None, seq: int) -> None:
    data = payload_bytes(seq, 2500)
    m = h.agent.manifest(seq, data, prev)
    reply = h.send(m, data)
    assert reply is not None and reply.state == "stored", reply


def assert_rejected(h: Harness, reply, reason: str, rows_before: int) -> None:
    assert reply is not None and reply.state == "rejected"
    assert reply.reason.split(":")[0] == reason
    assert reply.collector_time.tzinfo is not None
    events = h.events("rejected")
    assert events and events[-1].reason == reason and events[-1].detail
    assert len(h.records()) == rows_before
    assert len(h.stored_files()) == rows_before  # every stored row so far is a segment with a file
    assert not [p for p in h.staging_entries() if p.name != "rejected.json"]


def test_good_segment_is_stored_byte_identical(harness: Harness) -> None:
    data = payload_bytes(1, 3500)
    m = harness.agent.manifest(1, data, None)
    reply = harness.send(m, data)
    assert reply.state == "stored" and reply.missing == [] and reply.file_id == f"{CAMERA}-1"
    [row] = harness.records()
    assert row.chain_status == CHAIN_FIRST and row.storage_path == storage_relpath(m).as_posix()
    assert row.start_at == m.start and row.start_at.tzinfo is not None and row.end_at == m.end
    assert row.record_hash == m.record_hash() and row.manifest.encode() == m.canonical()
    assert (harness.storage / row.storage_path).read_bytes() == data
    assert row.storage_path.startswith("JL2201001/JL2201001-01/t101-front/2026/11/26/t101-front@")
    assert harness.staging_entries() == []


def test_unknown_agent_rejected(harness: Harness) -> None:
    prev = store_chain(harness, 1)
    stranger = harness.agent.__class__(agent="nobody-x")
    data = payload_bytes(2)
    m = stranger.manifest(2, data, prev)
    reply = harness.send(m, data, topic_agent="nobody-x", init=stranger.init_payload(m))
    assert_rejected(harness, reply, P.REJECT_UNKNOWN_AGENT, 1)
    assert_keeps_working(harness, prev, 2)


def test_bad_signature_rejected(harness: Harness) -> None:
    prev = store_chain(harness, 1)
    data = payload_bytes(2)
    m = harness.agent.manifest(2, data, prev)
    forged = sign(Ed25519PrivateKey.generate(), m.canonical())
    reply = harness.send(m, data, init=harness.agent.init_payload(m, signature=forged))
    assert_rejected(harness, reply, P.REJECT_BAD_SIGNATURE, 1)
    assert harness.events("rejected")[-1].seq == 2
    assert_keeps_working(harness, prev, 2)


def test_hash_mismatch_rejected(harness: Harness) -> None:
    prev = store_chain(harness, 1)
    data = payload_bytes(2)
    m = harness.agent.manifest(2, data, prev)
    tampered = bytearray(data)
    tampered[1234] ^= 0x01
    reply = harness.send(m, bytes(tampered))
    assert_rejected(harness, reply, P.REJECT_HASH_MISMATCH, 1)
    assert_keeps_working(harness, prev, 2)


def test_chunk_of_the_wrong_length_is_dropped_and_asked_for_again(harness: Harness) -> None:
    prev = store_chain(harness, 1)
    data = payload_bytes(2, 3500)
    m = harness.agent.manifest(2, data, prev)
    reply = harness.send(m, data + b"x" * 400)  # same chunk count, more bytes in the last chunk
    assert reply.state == "missing" and reply.missing == [[3, 3]] and reply.record == m.record_hash()
    [dropped] = harness.events("chunk_dropped")
    assert dropped.reason == "chunk_out_of_range" and "900 bytes" in dropped.detail
    harness.ingest.on_chunk(AGENT, m.file_id, 3, data[3000:])
    assert harness.ingest.on_fin(AGENT, m.file_id, encode_fin(m.record_hash())).state == "stored"
    assert (harness.storage / harness.records()[-1].storage_path).read_bytes() == data


def test_wrong_chunk_count_rejected(harness: Harness) -> None:
    prev = store_chain(harness, 1)
    data = payload_bytes(2, 3500)
    m = harness.agent.manifest(2, data, prev)
    reply = harness.send(m, data, init=harness.agent.init_payload(m, chunks=7))
    assert_rejected(harness, reply, P.REJECT_WRONG_CHUNK_COUNT, 1)
    assert_keeps_working(harness, prev, 2)


def test_malformed_json_rejected(harness: Harness) -> None:
    prev = store_chain(harness, 1)
    reply = harness.ingest.on_init(AGENT, f"{CAMERA}-2", b"{not json")
    assert_rejected(harness, reply, P.REJECT_MALFORMED, 1)
    # chunks for the rejected file are dropped; its fin repeats the rejection and cleans staging
    harness.ingest.on_chunk(AGENT, f"{CAMERA}-2", 0, b"zzz")
    fin = harness.ingest.on_fin(AGENT, f"{CAMERA}-2")
    assert fin.state == "rejected" and fin.reason.startswith(P.REJECT_MALFORMED)
    assert harness.staging_entries() == []
    assert_keeps_working(harness, prev, 2)


def test_malformed_manifest_rejected(harness: Harness) -> None:
    prev = store_chain(harness, 1)
    data = payload_bytes(2)
    m = harness.agent.manifest(2, data, prev)
    bad = harness.agent.init_payload(m).replace(b'"room_kind":"theory"', b'"room_kind":"kitchen"')
    reply = harness.send(m, data, init=bad)
    assert_rejected(harness, reply, P.REJECT_MALFORMED, 1)
    assert_keeps_working(harness, prev, 2)


def test_topic_agent_differs_from_manifest_agent(harness: Harness, test_agent) -> None:
    prev = store_chain(harness, 1)
    from collector.admin import enroll
    from collector.db import session_factory
    from .conftest import VENUE

    enroll(session_factory(harness.engine), "other-agent", VENUE, test_agent.pubkey, INSTITUTION)
    data = payload_bytes(2)
    m = harness.agent.manifest(2, data, prev)
    reply = harness.send(m, data, topic_agent="other-agent")
    assert_rejected(harness, reply, P.REJECT_AGENT_MISMATCH, 1)
    assert_keeps_working(harness, prev, 2)


def test_venue_mismatch_rejected(harness: Harness) -> None:
    prev = store_chain(harness, 1)
    data = payload_bytes(2)
    m = harness.agent.manifest(2, data, prev, venue="JL9999999-01")
    reply = harness.send(m, data)
    assert_rejected(harness, reply, P.REJECT_VENUE_MISMATCH, 1)
    assert_keeps_working(harness, prev, 2)


def test_replayed_seq_with_other_content_rejected(harness: Harness) -> None:
    prev = store_chain(harness, 2)
    first = harness.records()[0]
    other = payload_bytes(99)
    m = harness.agent.manifest(2, other, harness.records()[0].record_hash)
    reply = harness.send(m, other)
    assert_rejected(harness, reply, P.REJECT_SEQ_REPLAYED, 2)
    assert harness.records()[0].record_hash == first.record_hash
    assert_keeps_working(harness, prev, 3)


def test_chain_broken_rejected(harness: Harness) -> None:
    prev = store_chain(harness, 1)
    data = payload_bytes(2)
    m = harness.agent.manifest(2, data, "ab" * 32)
    reply = harness.send(m, data)
    assert_rejected(harness, reply, P.REJECT_CHAIN_BROKEN, 1)
    assert_keeps_working(harness, prev, 2)


def test_duplicate_gets_same_stored_reply_and_stores_once(harness: Harness) -> None:
    data = payload_bytes(1)
    m = harness.agent.manifest(1, data, None)
    assert harness.send(m, data).state == "stored"
    again = harness.send(m, data)
    assert again.state == "stored" and again.reason is None
    assert again.record == m.record_hash()
    # a repeated fin naming the record asks for its status
    repeat = harness.ingest.on_fin(AGENT, m.file_id, encode_fin(m.record_hash()))
    assert repeat.state == "stored" and repeat.record == m.record_hash()
    # a fin that names no record is never answered `stored`: the agent is asked for the init
    bare = harness.ingest.on_fin(AGENT, m.file_id)
    assert bare.state == "missing" and bare.reason.startswith("init_missing") and bare.record is None
    assert len(harness.records()) == 1 and len(harness.stored_files()) == 1
    assert harness.staging_entries() == []


def test_skipped_seq_is_a_hole_until_it_arrives(harness: Harness) -> None:
    d1, d2, d3 = payload_bytes(1), payload_bytes(2), payload_bytes(3)
    m1 = harness.agent.manifest(1, d1, None)
    m2 = harness.agent.manifest(2, d2, m1.record_hash())
    m3 = harness.agent.manifest(3, d3, m2.record_hash())
    assert harness.send(m1, d1).state == "stored"
    assert harness.send(m3, d3).state == "stored"
    rows = {r.seq: r for r in harness.records()}
    assert rows[3].chain_status == CHAIN_HOLE
    [hole] = harness.events("chain_hole")
    assert hole.seq == 3 and "seq 2 " in hole.detail and hole.camera == CAMERA
    assert harness.send(m2, d2).state == "stored"
    rows = {r.seq: r for r in harness.records()}
    assert [rows[s].chain_status for s in (1, 2, 3)] == [CHAIN_FIRST, CHAIN_LINKED, CHAIN_LINKED]
    [linked] = harness.events("chain_linked")
    assert linked.seq == 3


def test_missing_chunks_reported_as_ranges(harness: Harness) -> None:
    data = payload_bytes(1, 9500)  # 10 chunks of 1000
    m = harness.agent.manifest(1, data, None)
    reply = harness.send(m, data, skip={0, 3, 4, 5, 9})
    assert reply.state == "missing" and reply.missing == [[0, 0], [3, 5], [9, 9]]
    assert harness.records() == []
    for i in (0, 3, 4, 5, 9):
        harness.ingest.on_chunk(AGENT, m.file_id, i, data[i * 1000:(i + 1) * 1000])
    assert harness.ingest.on_fin(AGENT, m.file_id).state == "stored"
    assert (harness.storage / harness.records()[0].storage_path).read_bytes() == data


def test_fin_without_init_asks_for_everything(harness: Harness) -> None:
    reply = harness.ingest.on_fin(AGENT, f"{CAMERA}-5")
    assert reply.state == "missing" and reply.reason.startswith("init_missing")


def test_chunks_before_init_are_kept(harness: Harness) -> None:
    data = payload_bytes(1, 3500)
    m = harness.agent.manifest(1, data, None)
    for i in range(4):  # another instance has not stored the init yet
        harness.ingest.on_chunk(AGENT, m.file_id, i, data[i * 1000:(i + 1) * 1000])
    assert harness.ingest.on_init(AGENT, m.file_id, harness.agent.init_payload(m)) is None
    assert harness.ingest.on_fin(AGENT, m.file_id).state == "stored"
    assert (harness.storage / harness.records()[0].storage_path).read_bytes() == data


def test_gap_record_stored_without_file(harness: Harness) -> None:
    prev = store_chain(harness, 1)
    gap = harness.agent.manifest(2, None, prev, kind="gap")
    assert harness.send(gap, None).state == "stored"
    row = harness.records()[1]
    assert row.kind == "gap" and row.storage_path is None and row.chain_status == CHAIN_LINKED
    assert len(harness.stored_files()) == 1
    assert_keeps_working(harness, gap.record_hash(), 3)


def test_two_instances_finishing_the_same_file(harness: Harness) -> None:
    """Two collectors sharing the volume and database both get a fin: one file, one row, `stored`."""
    other = Ingest(harness.engine, harness.storage, limits=TEST_LIMITS)
    data = payload_bytes(1, 9500)
    m = harness.agent.manifest(1, data, None)
    assert harness.ingest.on_init(AGENT, m.file_id, harness.agent.init_payload(m)) is None
    for i in range(10):
        (harness.ingest if i % 2 else other).on_chunk(AGENT, m.file_id, i, data[i * 1000:(i + 1) * 1000])
    # each service worker commits its receipts when its queue runs dry; the fins below run on other threads
    assert harness.ingest.flush_receipts() == 5 and other.flush_receipts() == 5
    replies = []
    barrier = threading.Barrier(2)

    def finish(ingest: Ingest) -> None:
        barrier.wait()
        replies.append(ingest.on_fin(AGENT, m.file_id))

    threads = [threading.Thread(target=finish, args=(i,)) for i in (harness.ingest, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    states = sorted(r.state if r else "none" for r in replies)
    assert "stored" in states and "rejected" not in states
    assert len(harness.records()) == 1 and len(harness.stored_files()) == 1
    assert harness.ingest.on_fin(AGENT, m.file_id, encode_fin(m.record_hash())).state == "stored"


def counting_hash_file(monkeypatch) -> list:
    """Count the fin-time reads of a claimed file (the fallback of the running digest)."""
    import collector.ingest as ingest_module
    calls: list = []
    real = ingest_module.hash_file

    def counted(path, fsync=False):
        calls.append(path)
        return real(path, fsync=fsync)

    monkeypatch.setattr(ingest_module, "hash_file", counted)
    return calls


def test_chunks_in_order_are_hashed_as_they_arrive(harness: Harness, monkeypatch) -> None:
    reads = counting_hash_file(monkeypatch)
    data = payload_bytes(1, 9500)
    m = harness.agent.manifest(1, data, None)
    assert harness.send(m, data).state == "stored"
    assert reads == []  # verified from the running digest, without reading the file again
    assert (harness.storage / harness.records()[0].storage_path).read_bytes() == data
    assert len(harness.ingest.running) == 0


def test_out_of_order_chunks_fall_back_to_reading_the_file(harness: Harness, monkeypatch) -> None:
    reads = counting_hash_file(monkeypatch)
    data = payload_bytes(1, 3500)
    m = harness.agent.manifest(1, data, None)
    assert harness.ingest.on_init(AGENT, m.file_id, harness.agent.init_payload(m)) is None
    for i in (0, 2, 1, 3):
        harness.ingest.on_chunk(AGENT, m.file_id, i, data[i * 1000:(i + 1) * 1000])
    assert harness.ingest.on_fin(AGENT, m.file_id, encode_fin(m.record_hash())).state == "stored"
    assert len(reads) == 1
    assert (harness.storage / harness.records()[0].storage_path).read_bytes() == data


def test_a_chunk_rewritten_with_other_bytes_is_caught(harness: Harness) -> None:
    """All chunks arrive in order with the signed bytes, then chunk 1 again with other bytes (a duplicate that
    is not one): the file now differs from what was hashed on arrival, and must be refused, never stored."""
    prev = store_chain(harness, 1)
    data = payload_bytes(2, 3500)
    m = harness.agent.manifest(2, data, prev)
    assert harness.ingest.on_init(AGENT, m.file_id, harness.agent.init_payload(m)) is None
    for i in range(4):
        harness.ingest.on_chunk(AGENT, m.file_id, i, data[i * 1000:(i + 1) * 1000])
    harness.ingest.on_chunk(AGENT, m.file_id, 1, b"\xff" * 1000)
    reply = harness.ingest.on_fin(AGENT, m.file_id, encode_fin(m.record_hash()))
    assert_rejected(harness, reply, P.REJECT_HASH_MISMATCH, 1)
    assert_keeps_working(harness, prev, 2)

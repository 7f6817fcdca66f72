"""The MQTT service over a real mosquitto: a plain paho client uploads, the service verifies and replies."""

from __future__ import annotations

import errno
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from collector.config import MqttConfig
from collector.db import make_engine, session_factory, upgrade
from collector.admin import enroll
from collector.footage_store import FilesystemStore, FootageStore
from collector.ingest import Ingest, storage_relpath
from collector.ingest_alarms import STORAGE_FULL
from collector.service import BrokerUnavailable, CollectorService
from exam_contract.canonical import truncate_to_millis
from exam_contract.chunks import chunk_count
from exam_contract.protocol import ChainHeads, ChainRequest, Reply, encode_fin
from exam_contract.topics import (DEFAULT_CHUNK_SIZE, chain_request_topic, chain_topic, chunk_topic, fin_topic,
                                  init_topic, reply_topic)
from tests.support.faulty_store import FaultyStore
from tests.support.services import free_port

from .conftest import AGENT, INSTITUTION, TEST_LIMITS, VENUE, Harness, SigningAgent, payload_bytes

pytestmark = pytest.mark.mosquitto


class Uploader:
    """What an edge agent does on the wire, with nothing but paho."""

    def __init__(self, port: int) -> None:
        self.replies: queue.Queue[Reply] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-agent-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, msg: self.replies.put(Reply.decode(msg.payload))
        subscribed = queue.Queue()
        self.client.on_subscribe = lambda *a: subscribed.put(True)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(reply_topic(AGENT), qos=1)
        subscribed.get(timeout=10)

    def send(self, agent: SigningAgent, manifest, data: bytes, indexes, with_init: bool,
             chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        """Publish the init (with_init) and the chunks `indexes`, each acknowledged by the broker."""
        fid = manifest.file_id
        infos = [self.client.publish(init_topic(AGENT, fid), agent.init_payload(manifest, chunk_size), qos=1)] \
            if with_init else []
        for i in indexes:
            infos.append(self.client.publish(chunk_topic(AGENT, fid, i), data[i * chunk_size:(i + 1) * chunk_size],
                                             qos=1))
        for info in infos:
            info.wait_for_publish(timeout=10)

    def upload(self, agent: SigningAgent, manifest, data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Reply:
        """Send init, chunks and fin; answer `missing` as the agent does (resend what is asked for)."""
        fid = manifest.file_id
        count = chunk_count(len(data), chunk_size)

        def send(indexes, with_init: bool) -> None:
            self.send(agent, manifest, data, indexes, with_init, chunk_size)

        send(range(count), with_init=True)
        seen: list[Reply] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.client.publish(fin_topic(AGENT, fid), b"", qos=1)
            try:
                while True:
                    reply = self.replies.get(timeout=2)
                    if reply.file_id != fid:
                        continue
                    seen.append(reply)
                    if reply.state != "missing":
                        return reply
                    if reply.missing:
                        send([i for a, b in reply.missing for i in range(a, b + 1)], with_init=False)
                    else:  # the collector has no init (it was not subscribed yet): everything again
                        send(range(count), with_init=True)
                    break
            except queue.Empty:
                continue
        raise AssertionError(f"no final reply for {fid}; replies seen: {seen}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class ExplodingIngest(Ingest):
    def on_init(self, agent, file_id, payload):  # noqa: ANN001
        if file_id.startswith("boom"):
            raise RuntimeError("simulated handler bug")
        return super().on_init(agent, file_id, payload)


@contextmanager
def running_service(database_url: str, storage: Path, agent: SigningAgent, mosquitto,  # noqa: ANN001
                    ingest_class: type[Ingest] = Ingest,
                    store: FootageStore | None = None, workers: int = 2,
                    finishers: int = 2) -> Iterator[tuple[CollectorService, Harness]]:
    """The service on a migrated database with the test agent enrolled, subscribed to the test broker."""
    engine = make_engine(database_url)
    upgrade(engine)
    enroll(session_factory(engine), AGENT, VENUE, agent.pubkey, INSTITUTION)
    ingest = ingest_class(engine, storage, limits=TEST_LIMITS, store=store)
    cfg = MqttConfig(url=mosquitto.url, host="127.0.0.1", port=mosquitto.port, tls=False,
                     client_id=f"collector-test-{uuid.uuid4().hex[:6]}")
    service = CollectorService(cfg, ingest, workers=workers, queue_size=100, finishers=finishers)
    service.start()
    try:
        assert service.connected.wait(10)
        yield service, Harness(ingest, engine, storage, agent)
    finally:
        service.shutdown()
        engine.dispose()


@pytest.fixture
def service_harness(tmp_path: Path, test_agent: SigningAgent, mosquitto):
    with running_service(f"sqlite:///{tmp_path / 'c.db'}", tmp_path / "storage", test_agent, mosquitto,
                         ingest_class=ExplodingIngest) as running:
        yield running


def test_upload_over_mqtt_is_stored_byte_identical(service_harness, mosquitto) -> None:
    service, h = service_harness
    up = Uploader(mosquitto.port)
    try:
        data = payload_bytes(1, 700_000)  # 3 chunks of 256 KiB
        m = h.agent.manifest(1, data, None)
        reply = up.upload(h.agent, m, data)
        assert reply.state == "stored", reply
        [row] = h.records()
        assert (h.storage / row.storage_path).read_bytes() == data

        # a handler exception is logged and recorded; the service keeps serving
        boom = h.agent.manifest(2, payload_bytes(2), m.record_hash(), camera="boom")
        up.client.publish(init_topic(AGENT, boom.file_id), h.agent.init_payload(boom), qos=1).wait_for_publish(10)
        deadline = time.monotonic() + 20
        while not h.events("handler_error") and time.monotonic() < deadline:
            time.sleep(0.1)
        [err] = h.events("handler_error")
        assert "simulated handler bug" in err.detail and err.file_id == "boom-2"

        data2 = payload_bytes(2, 300_000)
        m2 = h.agent.manifest(2, data2, m.record_hash())
        assert up.upload(h.agent, m2, data2).state == "stored"
    finally:
        up.close()


def test_broker_restart_does_not_kill_the_service(service_harness, mosquitto) -> None:
    service, h = service_harness
    up = Uploader(mosquitto.port)
    data = payload_bytes(1, 100_000)
    m = h.agent.manifest(1, data, None)
    assert up.upload(h.agent, m, data).state == "stored"
    up.close()
    mosquitto.stop()
    deadline = time.monotonic() + 20
    while service.connected.is_set() and time.monotonic() < deadline:
        time.sleep(0.1)
    mosquitto.start()
    assert service.connected.wait(60), "service did not reconnect"
    assert service.connect_count >= 2
    up = Uploader(mosquitto.port)
    try:
        data2 = payload_bytes(2, 100_000)
        m2 = h.agent.manifest(2, data2, m.record_hash())
        assert up.upload(h.agent, m2, data2).state == "stored"
        assert [r.seq for r in h.records()] == [1, 2]
    finally:
        up.close()


def test_unreachable_broker_names_host_and_port(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    port = free_port()
    cfg = MqttConfig(url=f"mqtt://127.0.0.1:{port}", host="127.0.0.1", port=port, tls=False)
    service = CollectorService(cfg, Ingest(engine, tmp_path / "storage", limits=TEST_LIMITS))
    with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{port}"):
        service.start()



def test_service_is_ready_only_when_the_broker_grants_its_subscription(tmp_path: Path, caplog) -> None:
    """`connected` means "will receive segments": set on a granted SUBACK, not on CONNACK or a refusal.

    Mosquitto 2.0.11 grants every subscription (its ACL applies at delivery), so the refusal is a paho
    reason code handed to the callback the broker would trigger."""
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    port = free_port()
    cfg = MqttConfig(url=f"mqtt://127.0.0.1:{port}", host="127.0.0.1", port=port, tls=False)
    service = CollectorService(cfg, Ingest(engine, tmp_path / "storage", limits=TEST_LIMITS))
    refused = ReasonCode(PacketTypes.SUBACK, identifier=0x87)
    with caplog.at_level("ERROR", logger="collector.service"):
        service.client.on_subscribe(service.client, None, 1, [refused], None)
    assert not service.connected.is_set()
    assert f"127.0.0.1:{port} refused the subscription" in caplog.text and "Not authorized" in caplog.text
    service.client.on_subscribe(service.client, None, 2, [ReasonCode(PacketTypes.SUBACK, identifier=1)], None)
    assert service.connected.is_set()
    engine.dispose()


@pytest.fixture
def db_service(tmp_path: Path, test_agent: SigningAgent, mosquitto, database_url: str):
    """The service on SQLite and on PostgreSQL."""
    with running_service(database_url, tmp_path / "storage", test_agent, mosquitto) as running:
        yield running


def _fin_reply(up: Uploader, file_id: str, record: str) -> Reply:
    up.client.publish(fin_topic(AGENT, file_id), encode_fin(record), qos=1).wait_for_publish(10)
    while True:
        reply = up.replies.get(timeout=10)
        if reply.file_id == file_id:
            return reply


def test_a_stored_reply_is_only_ever_about_the_bytes_the_fin_names(db_service, mosquitto) -> None:
    """A journal lost and seq 1 reused for new footage: asking about the new record under the same file id
    never gets `stored` (the agent would prune footage the collector never received)."""
    service, h = db_service
    up = Uploader(mosquitto.port)
    try:
        data = payload_bytes(1, 100_000)
        first = h.agent.manifest(1, data, None)
        stored = up.upload(h.agent, first, data)
        assert stored.state == "stored" and stored.record == first.record_hash()
        assert _fin_reply(up, first.file_id, first.record_hash()).state == "stored"

        other_data = payload_bytes(1, 120_000)
        reused = h.agent.manifest(1, other_data, None, start=first.start.replace(hour=7),
                                  end=first.end.replace(hour=7))
        assert reused.file_id == first.file_id and reused.record_hash() != first.record_hash()
        asked = _fin_reply(up, reused.file_id, reused.record_hash())
        assert asked.state == "missing" and asked.record == reused.record_hash()
        assert asked.reason.startswith("init_missing")
        final = up.upload(h.agent, reused, other_data)
        assert final.state == "rejected" and final.reason_code == "seq_replayed"
        assert final.record == reused.record_hash()
        # asked again later: still the rejection of *this* record, never the stored one's `stored`
        again = _fin_reply(up, reused.file_id, reused.record_hash())
        assert again.state == "rejected" and again.record == reused.record_hash()
        assert [r.record_hash for r in h.records()] == [first.record_hash()]
    finally:
        up.close()


def test_chain_request_is_answered_with_the_newest_stored_record(db_service, mosquitto) -> None:
    service, h = db_service
    up = Uploader(mosquitto.port)
    answers: queue.Queue[ChainHeads] = queue.Queue()
    try:
        prev = None
        for seq in (1, 2, 3):
            data = payload_bytes(seq, 50_000)
            m = h.agent.manifest(seq, data, prev)
            assert up.upload(h.agent, m, data).state == "stored"
            prev = m.record_hash()
        watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"w-{uuid.uuid4().hex[:6]}",
                              protocol=mqtt.MQTTv5)
        granted: queue.Queue[bool] = queue.Queue()
        watcher.on_message = lambda c, u, msg: answers.put(ChainHeads.decode(msg.payload))
        watcher.on_subscribe = lambda *a: granted.put(True)
        watcher.connect("127.0.0.1", mosquitto.port)
        watcher.loop_start()
        watcher.subscribe(chain_topic(AGENT), qos=1)
        granted.get(timeout=10)  # the subscription is in place before the question
        request = ChainRequest("n1", (h.agent.camera, "never-seen"))
        up.client.publish(chain_request_topic(AGENT), request.encode(), qos=1).wait_for_publish(10)
        answer = answers.get(timeout=15)
        watcher.loop_stop()
        watcher.disconnect()
    finally:
        up.close()
    assert answer.nonce == "n1" and answer.heads["never-seen"] is None
    head = answer.heads[h.agent.camera]
    assert head is not None and head.seq == 3 and head.record == prev
    [event] = h.events("chain_heads")
    assert "after seq 3" in event.detail


def test_a_hostile_agent_over_the_broker_gets_named_refusals_and_the_next_upload_is_stored(
        db_service, mosquitto, tmp_path: Path) -> None:
    """The same attacks as tests/collector/test_hostile.py, through the real broker and service."""
    from dataclasses import replace

    from exam_contract.canonical import sha256_hex
    from exam_contract.protocol import InitMessage
    from exam_contract.signing import sign

    service, h = db_service
    up = Uploader(mosquitto.port)

    def init_reply(manifest, chunk_size: int = DEFAULT_CHUNK_SIZE, chunks: int | None = None) -> Reply:
        message = InitMessage(manifest.to_dict(), sign(h.agent.key, manifest.canonical()), chunk_size,
                              chunks if chunks is not None else chunk_count(manifest.size, chunk_size))
        up.client.publish(init_topic(AGENT, manifest.file_id), message.encode(), qos=1).wait_for_publish(10)
        while True:
            reply = up.replies.get(timeout=10)
            if reply.file_id == manifest.file_id:
                return reply

    try:
        data = payload_bytes(1, 100_000)
        base = h.agent.manifest(1, data, None)
        assert init_reply(replace(base, institution="../../x")).reason_code == "malformed"
        assert init_reply(replace(base, institution="JL9999999")).reason_code == "institution_mismatch"
        assert init_reply(replace(base, size=2**40), chunk_size=1).reason_code == "too_large"
        assert init_reply(replace(base, size=12_000_000), chunk_size=1).reason_code == "bad_chunk_size"
        assert init_reply(replace(base, size=0, sha256=sha256_hex(b""))).reason_code == "empty_segment"
        for n in range(400):  # a flood of chunks that no init announced
            up.client.publish(chunk_topic(AGENT, f"t101-front-{n + 100}", 0), b"f" * 1000, qos=1)
        stored = up.upload(h.agent, base, data)
        assert stored.state == "stored" and stored.record == base.record_hash()
    finally:
        up.close()
    staging = h.storage / "staging" / AGENT
    assert len(list(staging.rglob("early/*"))) <= TEST_LIMITS.max_early_chunks
    assert [r.record_hash for r in h.records()] == [base.record_hash()]
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and h.storage not in p.parents
               and p.suffix == ".ts"]
    assert outside == []


def test_a_full_store_gets_no_stored_reply_raises_storage_full_and_a_repeated_fin_stores_it(
        tmp_path: Path, test_agent: SigningAgent, mosquitto) -> None:
    """The store fails with ENOSPC when the verified file is placed (injected through the store, no tmpfs):
    the service answers nothing, raises (and records) the storage_full alarm; once space is back the agent's
    repeated fin gets `stored`, the first reply it ever gets about the file, and the alarm clears."""
    storage = tmp_path / "storage"
    store = FaultyStore(FilesystemStore(storage))

    def wait_for(condition) -> None:  # noqa: ANN001
        deadline = time.monotonic() + 30
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)

    with running_service(f"sqlite:///{tmp_path / 'c.db'}", storage, test_agent, mosquitto,
                         store=store) as (service, h):
        def alarms() -> set[str]:
            return {a.code for a in service.alarms.active()}

        up = Uploader(mosquitto.port)
        try:
            data = payload_bytes(1, 600_000)
            m = test_agent.manifest(1, data, None)
            store.fail("place", errno.ENOSPC)
            up.send(test_agent, m, data, range(chunk_count(len(data), DEFAULT_CHUNK_SIZE)), with_init=True)
            up.client.publish(fin_topic(AGENT, m.file_id), encode_fin(m.record_hash()), qos=1).wait_for_publish(10)
            wait_for(lambda: STORAGE_FULL in alarms())
            assert alarms() == {STORAGE_FULL} and store.failed == [("place", storage_relpath(m).as_posix())]
            assert h.records() == [] and list(store.walk()) == []

            healed_at = truncate_to_millis(datetime.now(timezone.utc))
            store.heal()
            reply = _fin_reply(up, m.file_id, m.record_hash())
            # Replies on one topic arrive in order: a reply sent while the store was full would come first.
            assert reply.state == "stored" and reply.collector_time >= healed_at
            assert [r.record_hash for r in h.records()] == [m.record_hash()]
            assert store.hash(h.records()[0].storage_path) == (m.sha256, len(data))
            wait_for(lambda: not alarms())
            assert alarms() == set()
            assert [(e.event, e.reason) for e in h.events() if e.event.startswith("alarm")] == [
                ("alarm", STORAGE_FULL), ("alarm_cleared", STORAGE_FULL)]
        finally:
            up.close()


def _send_file(up: Uploader, agent: SigningAgent, manifest, data: bytes) -> None:  # noqa: ANN001
    """Init, every chunk and the fin, as an agent sends them; no waiting for the reply."""
    up.send(agent, manifest, data, range(chunk_count(len(data), DEFAULT_CHUNK_SIZE)), with_init=True)
    up.client.publish(fin_topic(AGENT, manifest.file_id), encode_fin(manifest.record_hash()),
                      qos=1).wait_for_publish(10)


def _reply_about(up: Uploader, file_id: str, seconds: float = 20) -> Reply:
    """The next reply about `file_id`, within `seconds`."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            reply = up.replies.get(timeout=left)
        except queue.Empty:
            break
        if reply.file_id == file_id:
            return reply
    raise AssertionError(f"no reply about {file_id} within {seconds}s")


def _first_held_in_place(up, test_agent: SigningAgent, store: FaultyStore, first_size: int):  # noqa: ANN001, ANN202
    """Seq 1 (`first_size` bytes) sent and held inside the store's `place`; seq 2 made, not sent."""
    first_data = payload_bytes(1, first_size)
    first = test_agent.manifest(1, first_data, None)
    second_data = payload_bytes(2, 300_000)
    second = test_agent.manifest(2, second_data, first.record_hash())
    store.hold("place", storage_relpath(first))
    _send_file(up, test_agent, first, first_data)
    assert store.holding.wait(20), "seq 1 never reached the store"
    return first, first_data, second, second_data


def test_a_slow_store_on_one_file_holds_up_neither_the_chunks_nor_the_finish_of_another(
        tmp_path: Path, test_agent: SigningAgent, mosquitto) -> None:
    """One ingest worker, two finishers: while the store is still placing seq 1 (a slow object upload), seq 2 of
    the same camera is received, finished and answered `stored`; seq 1 is stored once the store goes on."""
    storage = tmp_path / "storage"
    store = FaultyStore(FilesystemStore(storage))
    with running_service(f"sqlite:///{tmp_path / 'c.db'}", storage, test_agent, mosquitto, store=store,
                         workers=1, finishers=2) as (service, h):
        up = Uploader(mosquitto.port)
        try:
            first, first_data, second, second_data = _first_held_in_place(up, test_agent, store, 600_000)

            _send_file(up, test_agent, second, second_data)
            reply = _reply_about(up, second.file_id)
            assert reply.state == "stored" and reply.record == second.record_hash()
            assert [r.seq for r in h.records()] == [2]   # seq 1 is still being placed
            assert store.held == [("place", storage_relpath(first).as_posix())]

            store.release()
            reply = _reply_about(up, first.file_id)
            assert reply.state == "stored" and reply.record == first.record_hash()
            rows = h.records()
            assert [(r.seq, r.record_hash, r.sha256) for r in rows] == [
                (1, first.record_hash(), first.sha256), (2, second.record_hash(), second.sha256)]
            # seq 2 was stored while seq 1 was still being placed: it is linked once seq 1 is in
            assert [r.chain_status for r in rows] == ["first", "linked"]
            assert [store.hash(r.storage_path) for r in rows] == [(first.sha256, len(first_data)),
                                                                  (second.sha256, len(second_data))]
        finally:
            store.release()
            up.close()


def test_shutdown_lets_the_finishers_finish_the_fins_they_hold_and_stops_them(
        tmp_path: Path, test_agent: SigningAgent, mosquitto) -> None:
    """Shut down while seq 1 is being placed and seq 2's fin waits in the finishing queue: shutdown waits for
    both to be stored and answered, then the finishing threads are gone."""
    storage = tmp_path / "storage"
    store = FaultyStore(FilesystemStore(storage))
    with running_service(f"sqlite:///{tmp_path / 'c.db'}", storage, test_agent, mosquitto, store=store,
                         workers=1, finishers=1) as (service, h):
        finishing = [t for t in threading.enumerate() if t.name.startswith("finish-")]
        assert finishing
        up = Uploader(mosquitto.port)
        try:
            first, first_data, second, second_data = _first_held_in_place(up, test_agent, store, 300_000)
            _send_file(up, test_agent, second, second_data)
            deadline = time.monotonic() + 20
            while service._finishing.qsize() < 1 and time.monotonic() < deadline:  # seq 2's fin, queued
                time.sleep(0.05)
            assert service._finishing.qsize() == 1

            stopping = threading.Thread(target=service.shutdown, name="test-shutdown")
            stopping.start()
            deadline = time.monotonic() + 20
            while any(t.name.startswith("ingest-") for t in threading.enumerate()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert stopping.is_alive()   # waiting for the finisher
            store.release()
            stopping.join(30)
            assert not stopping.is_alive()
            assert not [t for t in finishing if t.is_alive()]
            assert [(r.seq, r.record_hash) for r in h.records()] == [(1, first.record_hash()),
                                                                     (2, second.record_hash())]
            # answered before the disconnect, in the order they were finished
            assert _reply_about(up, first.file_id).state == "stored"
            assert _reply_about(up, second.file_id).state == "stored"
        finally:
            store.release()
            up.close()


def test_one_files_fins_are_finished_one_at_a_time_in_arrival_order() -> None:
    """A repeated fin that reaches a second finisher while the first still finishes the file waits for it, and
    the file's fins run in the order they came; other files are not held up."""
    from collector.service import FinishingFiles, Work
    from exam_contract.topics import parse_segment_topic

    def fin(file_id: str, n: int) -> Work:
        return Work(parse_segment_topic(f"exam/v1/{AGENT}/seg/{file_id}/fin"), str(n).encode())

    files = FinishingFiles()
    first, repeat, again = fin("cam-1", 1), fin("cam-1", 2), fin("cam-1", 3)
    assert files.take("a/cam-1", first)                   # this finisher holds the file
    assert not files.take("a/cam-1", repeat)              # another finisher: it waits behind the holder
    assert files.take("a/cam-2", fin("cam-2", 1))          # another file goes at once
    assert not files.take("a/cam-1", again)
    assert files.next("a/cam-1") is repeat and files.next("a/cam-1") is again
    assert files.next("a/cam-1") is None                  # let go
    assert files.take("a/cam-1", fin("cam-1", 4))

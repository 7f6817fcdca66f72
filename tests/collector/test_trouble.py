"""Collector trouble (issue 3): the database becomes unreachable mid-upload. The service sends no `stored`,
raises the database_unreachable alarm, and once the database is back a repeated fin (what every agent does)
gets the file stored, once; the alarm clears. The outage is real: the service reaches PostgreSQL through a
TCP relay that the test takes down and brings back."""

from __future__ import annotations

import queue
import socket
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from collector.admin import enroll
from collector.config import MqttConfig
from collector.db import make_engine, session_factory, upgrade
from collector.ingest import Ingest
from collector.ingest_alarms import DATABASE_UNREACHABLE
from collector.service import CollectorService
from exam_contract.chunks import chunk_count, expand_ranges
from exam_contract.protocol import Reply
from exam_contract.topics import chunk_topic, fin_topic, init_topic, reply_topic
from tests.support.services import free_port

from .conftest import AGENT, INSTITUTION, TEST_LIMITS, VENUE, Harness, SigningAgent, payload_bytes

pytestmark = [pytest.mark.mosquitto, pytest.mark.postgres]
CHUNK = 64 * 1024


class Relay:
    """A TCP relay 127.0.0.1:port -> target; `down()` closes it and every connection through it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
            listener, self._listener = self._listener, None
        for sock in [listener, *socks]:
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Agent:
    """An agent's side of protocol v1 with paho only: init, chunks, then fin until a final reply,
    resending what the collector says is missing."""

    def __init__(self, port: int) -> None:
        self.replies: queue.Queue[Reply] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"agent-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, msg: self.replies.put(Reply.decode(msg.payload))
        subscribed = queue.Queue()
        self.client.on_subscribe = lambda *a: subscribed.put(True)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(reply_topic(AGENT), qos=1)
        subscribed.get(timeout=10)

    def send(self, agent: SigningAgent, manifest, data: bytes, chunks: list[int] | None = None,
             init: bool = True) -> None:
        fid = manifest.file_id
        if init:
            self.client.publish(init_topic(AGENT, fid), agent.init_payload(manifest, CHUNK), qos=1).wait_for_publish(10)
        for i in chunks if chunks is not None else range(chunk_count(len(data), CHUNK)):
            self.client.publish(chunk_topic(AGENT, fid, i), data[i * CHUNK:(i + 1) * CHUNK], qos=1).wait_for_publish(10)

    def ask(self, manifest, wait: float = 3) -> Reply | None:
        self.client.publish(fin_topic(AGENT, manifest.file_id), b"", qos=1).wait_for_publish(10)
        try:
            while True:
                reply = self.replies.get(timeout=wait)
                if reply.file_id == manifest.file_id:
                    return reply
        except queue.Empty:
            return None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_database_outage_no_stored_reply_alarm_then_recovery(tmp_path: Path, mosquitto, pg_url: str,
                                                               test_agent: SigningAgent) -> None:
    parts = urlsplit(pg_url)
    relay = Relay((parts.hostname or "127.0.0.1", parts.port or 5432))
    relay.up()
    url = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{relay.port}"))
    engine = make_engine(url)
    upgrade(engine)
    enroll(session_factory(engine), AGENT, VENUE, test_agent.pubkey, INSTITUTION)
    ingest = Ingest(engine, tmp_path / "storage", limits=TEST_LIMITS)
    cfg = MqttConfig(url=mosquitto.url, host="127.0.0.1", port=mosquitto.port, tls=False,
                     client_id=f"collector-{uuid.uuid4().hex[:6]}")
    service = CollectorService(cfg, ingest, workers=2, queue_size=100)
    service.start()
    assert service.connected.wait(10)
    agent = Agent(mosquitto.port)
    h = Harness(ingest, engine, tmp_path / "storage", test_agent)
    try:
        data1 = payload_bytes(1, 200_000)
        m1 = test_agent.manifest(1, data1, None)
        agent.send(test_agent, m1, data1)
        reply = agent.ask(m1, wait=10)
        assert reply is not None and reply.state == "stored"

        relay.down()  # the database becomes unreachable
        data2 = payload_bytes(2, 300_000)
        m2 = test_agent.manifest(2, data2, m1.record_hash())
        agent.send(test_agent, m2, data2)
        deadline = time.monotonic() + 30
        while DATABASE_UNREACHABLE not in {a.code for a in service.alarms.active()} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert DATABASE_UNREACHABLE in {a.code for a in service.alarms.active()}
        early = agent.ask(m2)
        assert early is None or early.state != "stored"  # never `stored` while the database is away

        relay.up()  # the database is back; the agent keeps asking and resends what is missing
        final = None
        for _ in range(20):
            reply = agent.ask(m2)
            if reply is None:
                continue
            if reply.state != "missing":
                final = reply
                break
            if reply.missing:
                agent.send(test_agent, m2, data2, chunks=expand_ranges(reply.missing), init=False)
            else:  # init_missing: everything again
                agent.send(test_agent, m2, data2)
        assert final is not None and final.state == "stored", final
        assert [r.seq for r in h.records()] == [1, 2]
        assert (h.storage / h.records()[1].storage_path).read_bytes() == data2
        assert DATABASE_UNREACHABLE not in {a.code for a in service.alarms.active()}
        events = {e.event for e in h.events()}
        assert "alarm_cleared" in events  # recorded once the database could take it
    finally:
        agent.close()
        service.shutdown()
        relay.down()
        engine.dispose()

"""MQTT side of the collector: subscribe to protocol v1 segment topics, hand work to ingest workers, reply.

paho's network thread only parses topics and queues work; staging, fsync and database writes run on
worker threads. Messages of one file always go to the same worker, so a file's init, chunks and fin
are handled in order. A worker hands each `fin` (after committing the receipts of the chunks before it) to
the finishing threads, which verify, store and record the file and reply: a store's latency (an object
upload) then holds up only other finishes, never the chunks of other files. A file's fins are finished one at a
time, in arrival order (`FinishingFiles`). Queues are bounded: when they
are full the network thread waits, which pushes back on the broker instead of holding unbounded payloads
in memory.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar
from datetime import datetime, timedelta, timezone

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from exam_contract.alarms import AlarmCode
from exam_contract.identifiers import is_identifier
from exam_contract.mqtt import BrokerUnreachable, MqttSettings, connect, make_client
from exam_contract.protocol import ChainRequest, ProtocolError, Reply, ReplyState
from exam_contract.topics import (COLLECTOR_CHAIN_SUBSCRIPTION, COLLECTOR_SUBSCRIPTION, ROOT, SegmentTopic, TopicError,
                                  chain_topic, parse_chain_request_topic, parse_segment_topic, reply_topic)

from .chains import ChainResponder
from .ingest import DEFAULT_STAGING_TTL, Ingest
from .ingest_alarms import IngestAlarms, classify

log = logging.getLogger(__name__)

# Short on purpose (issue 3): mosquitto keeps handing a shared subscription's share of messages to a
# member's session while it is offline. A collector instance that dies for good would swallow every second
# chunk until its session expires; a restart within this time still gets what was queued for it.
SESSION_EXPIRY_SECONDS = 60
SWEEP_INTERVAL_SECONDS = 600.0
MAX_INFLIGHT_MESSAGES = 100
DEFAULT_CLIENT_ID = "exam-collector-1"  # settings made in code without one; a loaded config always has one

# Mosquitto 2.0 cannot refuse retain per topic, so the collector deletes (an empty retained publish) what
# an agent leaves retained under seg/: live messages as they arrive on the shared subscription, whose
# retainAsPublished keeps the flag visible, and those left while no collector session existed through a
# non-shared subscription held from each CONNACK to its SUBACK. That one's messages carry this
# subscription identifier and are only cleared, never ingested (the shared subscription has the live ones
# too); it is QoS 0 so that nothing is queued on it for this session should it outlive a lost connection.
# The shared subscription asks for no retained messages: mosquitto 2.0.11 would hand it the stored ones at
# every subscribe (brokers differ there), and those are stale, not uploads; the non-shared one clears them.
SEGMENT_TOPICS = f"{ROOT}/+/seg/#"
RETAINED_SWEEP_ID = 1


BrokerUnavailable = BrokerUnreachable  # the name tests and older code use


@dataclass(frozen=True)
class Work:
    topic: SegmentTopic
    payload: bytes


@dataclass(frozen=True)
class ChainQuestion:
    """An agent asks where its cameras' chains end (a new journal); answered on a worker, not paho's thread."""

    agent: str
    payload: bytes


RECEIPT_FLUSH_IDLE_SECONDS = 0.2
FINISH_QUEUE_PER_FINISHER = 8  # a full finishing queue makes the workers wait, and so the network thread


class _Worker(threading.Thread):
    """One ingest worker: takes work from its own bounded queue until it gets None."""

    def __init__(self, index: int, service: "CollectorService", size: int) -> None:
        super().__init__(name=f"ingest-{index}", daemon=True)
        self.queue: queue.Queue[Work | ChainQuestion | None] = queue.Queue(maxsize=size)
        self.service = service

    def run(self) -> None:
        while True:
            try:
                work = self.queue.get(timeout=RECEIPT_FLUSH_IDLE_SECONDS)
            except queue.Empty:
                self.service.flush_receipts()
                continue
            if work is None:
                self.service.flush_receipts()
                return
            if isinstance(work, Work) and work.topic.part == "fin":
                # The fin's chunks were written by this thread: their receipts are committed before any
                # finisher looks for them.
                self.service.flush_receipts()
                self.service.finish_later(work)
                continue
            self.service.handle(work)
            if self.queue.empty():
                self.service.flush_receipts()


class FinishingFiles:
    """The files being finished, each with the fins of it that arrived meanwhile: the finisher that holds a file
    handles them after its own, in arrival order, so one file's fins never run at once or out of order (a repeat
    of `fin` may be answered from what the one before it did)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, deque[Work]] = {}

    def take(self, key: str, work: Work) -> bool:
        """True when the caller now holds the file; else the fin waits for the holder."""
        with self._lock:
            if key in self._waiting:
                self._waiting[key].append(work)
                return False
            self._waiting[key] = deque()
            return True

    def next(self, key: str) -> Work | None:
        """The holder's next fin of the file, or None (and the file is let go)."""
        with self._lock:
            waiting = self._waiting[key]
            if waiting:
                return waiting.popleft()
            del self._waiting[key]
            return None


class _Finisher(threading.Thread):
    """One finishing thread: takes `fin` work from the shared finishing queue until it gets None."""

    def __init__(self, index: int, service: "CollectorService", work: "queue.Queue[Work | None]",
                 files: FinishingFiles) -> None:
        super().__init__(name=f"finish-{index}", daemon=True)
        self.work = work
        self.service = service
        self.files = files

    def run(self) -> None:
        while True:
            work = self.work.get()
            if work is None:
                return
            key = f"{work.topic.agent}/{work.topic.file_id}"
            if not self.files.take(key, work):
                continue
            next_work: Work | None = work
            while next_work is not None:
                self.service.handle(next_work)
                self.service.flush_receipts()  # receipts of early chunks folded in at fin
                next_work = self.files.next(key)


class StagingSweeper:
    """The staging TTL loop: every `interval` seconds, removes abandoned transfers (Ingest.sweep_staging)."""

    def __init__(self, ingest: Ingest, alarms: IngestAlarms, stop: threading.Event, ttl: timedelta,
                 interval: float) -> None:
        self.ingest = ingest
        self.alarms = alarms
        self.stop = stop
        self.ttl = ttl
        self.interval = interval
        self.swept = 0
        self.thread = threading.Thread(target=self.run, name="staging-sweeper", daemon=True)

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                removed = self.ingest.sweep_staging(self.ttl)
            except Exception as exc:  # the loop must survive a database outage
                code = classify(exc)
                if code is None:
                    log.exception("staging sweep failed")
                else:
                    self.alarms.raise_alarm(code, f"staging sweep failed: {type(exc).__name__}: {exc}")
                continue
            self.swept += removed
            if removed:
                log.info("staging sweep removed %s abandoned transfer(s)", removed)


_T = TypeVar("_T", bound=threading.Thread)


def _drain(threads: Sequence[_T], put_stop: Callable[[_T], None], timeout: float) -> None:
    """Queue the stop marker for each live thread (`put_stop`), then wait for them all."""
    for thread in threads:
        if thread.is_alive():
            try:
                put_stop(thread)
            except queue.Full:
                log.warning("%s did not drain in %ss", thread.name, timeout)
    for thread in threads:
        thread.join(timeout)


class CollectorService:
    """Runs MQTT ingest until `stop()` (or the duration given to `run`)."""

    def __init__(self, mqtt_config: MqttSettings, ingest: Ingest, workers: int = 2, queue_size: int = 2000,
                 finishers: int = 2, staging_ttl: timedelta = DEFAULT_STAGING_TTL,
                 sweep_interval: float = SWEEP_INTERVAL_SECONDS) -> None:
        self.config = mqtt_config
        self.ingest = ingest
        self.alarms = IngestAlarms(record=lambda event, code, detail: ingest.record_event(
            None, None, event, code, detail[:4000]))
        self._stop = threading.Event()
        self.sweeper = StagingSweeper(ingest, self.alarms, self._stop, staging_ttl, sweep_interval)
        self._workers = [_Worker(i, self, max(1, queue_size // max(1, workers))) for i in range(max(1, workers))]
        self._finishing: queue.Queue[Work | None] = queue.Queue(maxsize=FINISH_QUEUE_PER_FINISHER * max(1, finishers))
        files = FinishingFiles()
        self._finishers = [_Finisher(i, self, self._finishing, files) for i in range(max(1, finishers))]
        self.connected = threading.Event()
        self.connect_count = 0
        self._counting = threading.Lock()  # workers and finishers count
        self.handled = 0
        self.errors = 0
        self._sweep_mid: int | None = None
        self.chains = ChainResponder(ingest.sessions)
        self.client = self._make_client()

    # ------------------------------------------------------------------ paho

    def _make_client(self) -> mqtt.Client:
        """Raises PasswordFileError (a ConfigError) when [mqtt] password_file cannot be read."""
        client = make_client(self.config, self.config.client_id or DEFAULT_CLIENT_ID,
                             max_inflight=MAX_INFLIGHT_MESSAGES)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            log.error("MQTT broker %s refused the connection: %s", self.config.address, reason_code)
            return
        self.connect_count += 1
        log.info("connected to MQTT broker %s (session present: %s)", self.config.address,
                 flags.session_present)
        live = SubscribeOptions(qos=1, retainAsPublished=True, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        client.subscribe([(COLLECTOR_SUBSCRIPTION, live), (COLLECTOR_CHAIN_SUBSCRIPTION, live)])
        sweep_properties = Properties(PacketTypes.SUBSCRIBE)
        sweep_properties.SubscriptionIdentifier = RETAINED_SWEEP_ID
        self._sweep_mid = client.subscribe(SEGMENT_TOPICS, options=SubscribeOptions(qos=0),
                                           properties=sweep_properties)[1]

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        if mid == self._sweep_mid:
            # The broker queued the retained messages when it granted the subscription: they still arrive.
            client.unsubscribe(SEGMENT_TOPICS)
            return
        # Ready only once the broker confirms the subscription: a message published between CONNACK and
        # SUBACK would not reach this instance.
        refused = [code for code in reason_codes if code.is_failure]
        if refused:
            log.error("MQTT broker %s refused the subscription %s: %s", self.config.address,
                      f"{COLLECTOR_SUBSCRIPTION} and {COLLECTOR_CHAIN_SUBSCRIPTION}",
                      ", ".join(str(code) for code in refused))
            return
        log.info("subscribed to %s and %s on %s", COLLECTOR_SUBSCRIPTION, COLLECTOR_CHAIN_SUBSCRIPTION,
                 self.config.address)
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("disconnected from MQTT broker %s (%s); reconnecting", self.config.address, reason_code)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:  # noqa: ANN001
        if message.retain and message.payload and mqtt.topic_matches_sub(SEGMENT_TOPICS, message.topic):
            self._clear_retained(client, message.topic)
        if RETAINED_SWEEP_ID in (getattr(message.properties, "SubscriptionIdentifier", None) or ()):
            return
        asking = parse_chain_request_topic(message.topic)
        if asking is not None:
            self._enqueue(asking, ChainQuestion(asking, bytes(message.payload)))
            return
        try:
            topic = parse_segment_topic(message.topic)
        except TopicError as exc:
            log.warning("ignored message: %s", exc)
            return
        if message.retain and not message.payload and topic.part != "fin":
            # A deletion of a retained copy (the broker hands our own clears to the share group too): it
            # carries no data, and an empty chunk must not overwrite a received one. An empty fin is a fin.
            return
        self._enqueue(f"{topic.agent}/{topic.file_id}", Work(topic, bytes(message.payload)))

    def _enqueue(self, key: str, work: Work | ChainQuestion) -> None:
        """Messages with the same key (one file, or one agent's chain questions) go to the same worker, in order."""
        worker = self._workers[zlib.crc32(key.encode()) % len(self._workers)]
        while not self._stop.is_set():
            try:
                worker.queue.put(work, timeout=0.5)
                return
            except queue.Full:
                log.debug("worker %s queue full, waiting", worker.name)

    def _clear_retained(self, client: mqtt.Client, topic: str) -> None:
        info = client.publish(topic, b"", qos=1, retain=True)
        agent = topic.split("/")[2]
        if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
            log.warning("agent %s left a retained message on %s; clearing it on %s not queued (rc %s)", agent,
                        topic, self.config.address, info.rc)
        else:
            log.warning("agent %s left a retained message on %s; cleared it on %s", agent, topic,
                        self.config.address)

    # ------------------------------------------------------------------ work

    def handle(self, work: Work | ChainQuestion) -> None:
        """Run one message through ingest; never raises."""
        if isinstance(work, ChainQuestion):
            self.answer_chain_question(work)
            return
        topic = work.topic
        began = time.monotonic()
        try:
            reply: Reply | None
            if topic.part == "init":
                reply = self.ingest.on_init(topic.agent, topic.file_id, work.payload)
            elif topic.part == "chunk":
                assert topic.chunk_index is not None
                self.ingest.on_chunk(topic.agent, topic.file_id, topic.chunk_index, work.payload)
                reply = None
            else:
                reply = self.ingest.on_fin(topic.agent, topic.file_id, work.payload)
            if reply is not None:
                self.publish_reply(topic.agent, reply)
            with self._counting:
                self.handled += 1
            if self.ingest.database_ok_at >= began:
                self.alarms.clear(AlarmCode.DATABASE_UNREACHABLE)
            if topic.part == "chunk" or (reply is not None and reply.state == ReplyState.STORED):
                self.alarms.clear(AlarmCode.STORAGE_FULL, AlarmCode.STORAGE_ERROR)
        except Exception as exc:  # a bad message must never stop the service
            with self._counting:
                self.errors += 1
            code = classify(exc)
            if code is not None:
                # No reply: the agent keeps the file and repeats `fin` with backoff; the alarm records it.
                self.alarms.raise_alarm(code, f"{type(exc).__name__}: {exc}")
                log.warning("agent %s file %s: %s not handled (%s); the agent will resend", topic.agent,
                            topic.file_id, topic.part, code)
                return
            log.exception("agent %s file %s: %s handler failed", topic.agent, topic.file_id, topic.part)
            self.ingest.record_handler_error(
                topic.agent, topic.file_id,
                f"{topic.part} handler failed: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}")

    def answer_chain_question(self, question: ChainQuestion) -> None:
        """Tell an agent with a new journal where its cameras' chains end; never raises."""
        if not is_identifier(question.agent):
            log.warning("chain request on a topic whose agent is not a valid id; ignored")
            return
        try:
            request = ChainRequest.decode(question.payload)
            answer = self.chains.answer(question.agent, request, datetime.now(timezone.utc))
        except ProtocolError as exc:
            log.warning("agent %s: malformed chain request ignored: %s", question.agent, exc)
            return
        except Exception as exc:  # noqa: BLE001 - the agent asks again in a few seconds
            code = classify(exc)
            if code is not None:
                self.alarms.raise_alarm(code, f"{type(exc).__name__}: {exc}")
            log.warning("agent %s: chain request not answered (%s: %s); it will ask again", question.agent,
                        type(exc).__name__, exc)
            return
        if answer is not None:
            self.client.publish(chain_topic(question.agent), answer.encode(), qos=1)

    def finish_later(self, work: Work) -> None:
        """Queue a `fin` for the finishing threads; waits while they are all busy and the queue is full."""
        while True:
            try:
                self._finishing.put(work, timeout=0.5)
                return
            except queue.Full:
                if self._stop.is_set() and not any(finisher.is_alive() for finisher in self._finishers):
                    log.warning("agent %s file %s: fin not finished, the service is stopping; the agent will "
                                "resend it", work.topic.agent, work.topic.file_id)
                    return

    def flush_receipts(self) -> None:
        """Commit the calling worker's chunk receipts; never raises (lost receipts mean resent chunks)."""
        try:
            self.ingest.flush_receipts()
        except Exception as exc:  # noqa: BLE001 - the agent resends what has no receipt
            code = classify(exc)
            if code is not None:
                self.alarms.raise_alarm(code, f"{type(exc).__name__}: {exc}")
            log.warning("chunk receipts not committed (%s: %s); those chunks will be asked for again",
                        type(exc).__name__, exc)

    def publish_reply(self, agent: str, reply: Reply) -> None:
        info = self.client.publish(reply_topic(agent), reply.encode(), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
            log.warning("agent %s file %s: reply %s not queued (rc %s)", agent, reply.file_id, reply.state, info.rc)
        else:
            log.debug("agent %s file %s: replied %s", agent, reply.file_id, reply.state)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect (raises BrokerUnreachable naming host:port) and start the network loop and workers."""
        connect(self.client, self.config, SESSION_EXPIRY_SECONDS)
        for thread in (*self._workers, *self._finishers):
            thread.start()
        self.sweeper.thread.start()
        self.client.loop_start()

    def stop(self) -> None:
        self._stop.set()

    def wait(self, duration: float | None = None) -> bool:
        """Block until `stop()` or `duration` seconds; True if stopped."""
        return self._stop.wait(duration)

    def run(self, duration: float | None = None) -> None:
        self.start()
        try:
            self.wait(duration)
        finally:
            self.shutdown()

    def shutdown(self, timeout: float = 30.0, before_disconnect: Callable[[], None] | None = None) -> None:
        """Drain the workers, run `before_disconnect` (still connected), then disconnect."""
        self._stop.set()
        _drain(self._workers, lambda worker: worker.queue.put(None, timeout=timeout), timeout)
        # after the workers: they hand fins on until they stop
        _drain(self._finishers, lambda _: self._finishing.put(None, timeout=timeout), timeout)
        try:
            if before_disconnect is not None:
                before_disconnect()
        except Exception:  # the disconnect below must still happen
            log.exception("shutdown step failed")
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

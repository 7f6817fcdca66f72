"""Uploads journaled records to the collector over MQTT (protocol v1) and journals the collector's replies: a
record is `stored` only on a `stored` reply naming its hash. See docs/design/states.md (record, transfer, reply).

Bytes published but not yet PUBACKed are bounded (paho keeps queued payloads in memory).
The module stays over 400 lines because the send loop, the reply handling and the PUBACK accounting share the
active transfers and one lock; the per-record state is edge_agent.transfer.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import paho.mqtt.client as mqtt

from exam_contract.alarms import AlarmCode
from exam_contract.canonical import format_time
from exam_contract.chunks import chunk_span, expand_ranges
from exam_contract.mqtt import (BrokerRefused, BrokerUnreachable, MqttSettings, connect, connect_in_background,
                                make_client)
from exam_contract.protocol import (REASON_INIT_MISSING, RETRYABLE_REJECTIONS, ChainHeads, ChainRequest, ProtocolError,
                                    Reply, ReplyState, encode_fin)
from exam_contract.redact import redact_values
from exam_contract.schedule import Schedule, ScheduleError, ScheduleWindow
from exam_contract.topics import (DEFAULT_CHUNK_SIZE, chain_request_topic, chain_topic, chunk_topic, fin_topic,
                                  init_topic, reply_topic, schedule_topic, status_topic)

from .config import SEGMENT_SECONDS_RANGE, EdgeConfig
from .journal import Journal
from .ratecap import CapSchedule, RateMeter, TokenBucket, UploadRate
from .transfer import ClockEstimator, Transfer
from .upload_order import UploadOrder

log = logging.getLogger(__name__)
UTC = timezone.utc

MAX_INFLIGHT_BYTES = 8 * 1024 * 1024
MAX_ACTIVE_FILES = 4
REPLY_TIMEOUT = 10.0
REPLY_TIMEOUT_CAP = 60.0
SESSION_EXPIRY = 7 * 24 * 3600
REQUEUE_INTERVAL = 5.0          # how often due retries of rejected records are looked for
MAX_INFLIGHT_MESSAGES = 64
LONGEST_SEGMENT = timedelta(seconds=2 * SEGMENT_SECONDS_RANGE[1])  # ffmpeg cuts at the keyframe after the length


class Uploader:
    def __init__(self, config: EdgeConfig, journal: Journal, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 max_inflight_bytes: int = MAX_INFLIGHT_BYTES, max_active: int = MAX_ACTIVE_FILES,
                 reply_timeout: float = REPLY_TIMEOUT,
                 on_alarm: Callable[[AlarmCode, str | None], None] | None = None):
        self.config = config
        self.agent = config.agent.id
        self.mqtt: MqttSettings = config.mqtt
        self.journal = journal
        self.chunk_size = chunk_size
        self.max_inflight_bytes = max_inflight_bytes
        self.max_active = max_active
        self.reply_timeout = reply_timeout
        self.clock = ClockEstimator()
        # [upload] cap on the counted messages (init, chunks, fin): the send loop takes their bytes from the
        # bucket, and while it is short _cap_wait holds how long until the next message may go (0: none waits).
        self.caps = CapSchedule(config.upload.max_kbps, config.upload.schedule)
        self._bucket = TokenBucket(min_burst=chunk_size)
        self._cap_wait = 0.0
        self.cap_holds = 0     # times the cap held a message back (each later step that finds it short counts again)
        self._meter = RateMeter(time.monotonic())   # bytes of counted messages published; guarded by _lock
        # Which pending records start next: batch first once the collector's schedule names windows.
        self._order = UploadOrder(timedelta(minutes=config.upload.max_batch_first_minutes),
                                  lambda: datetime.now(UTC))
        # (reply, when it arrived), from paho's network thread to the uploader's thread
        self._replies: queue.Queue[tuple[Reply, datetime]] = queue.Queue()
        self._active: dict[str, Transfer] = {}   # file id -> its transfer, at most max_active
        self._broken: set[int] = set()           # records whose file cannot be read: not tried again in this run
        # In-flight bytes, guarded by _lock: publish() may return after paho's network thread has already run
        # on_publish for the message, so either side may come first.
        # mid -> bytes of a counted message (init, chunk, fin) published and not yet PUBACKed; their sum is
        # _inflight_bytes, which the send loop keeps under max_inflight_bytes. Added by _publish, removed by
        # _on_publish.
        self._inflight: dict[int, int] = {}
        # mids PUBACKed before _publish recorded them (counted or not): _publish removes the mark, records nothing.
        self._early_acks: set[int] = set()
        # mids of uncounted messages (status, chain requests) not yet PUBACKed: _on_publish drops the mark and
        # leaves the count alone.
        self._uncounted: set[int] = set()
        self._inflight_bytes = 0
        self.peak_inflight_bytes = 0
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._reconnected = threading.Event()
        self._connect_result: Any = None
        self._connect_done = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._status: dict[str, Any] = {}
        self._on_alarm = on_alarm
        self._rejected_alarm = False       # the records_rejected alarm is raised
        self._next_requeue = 0.0
        self._chain_lock = threading.Lock()
        self._chain_answers: dict[str, ChainHeads] = {}   # nonce -> answer
        self._chain_answered = threading.Condition(self._chain_lock)
        self.client = self._make_client()

    # --- paho client ---
    def _make_client(self) -> mqtt.Client:
        """Raises PasswordFileError (a ConfigError) when [mqtt] password_file cannot be read."""
        client = make_client(self.mqtt, self.agent, max_inflight=MAX_INFLIGHT_MESSAGES, default_username=self.agent)
        client.will_set(status_topic(self.agent), json.dumps({"agent": self.agent, "state": "offline"}),
                        qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def connect(self, timeout: float = 10.0) -> None:
        """Connect once (before cameras start); raises BrokerUnreachable or BrokerRefused naming host:port."""
        self.client.connect_timeout = min(timeout, 5.0)
        connect(self.client, self.mqtt, SESSION_EXPIRY)
        self.client.loop_start()
        if not self._connect_done.wait(timeout):
            self.client.loop_stop()
            raise BrokerUnreachable.no_answer(self.mqtt.address, timeout)
        code = self._connect_result
        if code is not None and getattr(code, "is_failure", False):
            self.client.disconnect()
            self.client.loop_stop()
            raise BrokerRefused(self.mqtt.address, code)

    def connect_later(self) -> None:
        """Record now, upload later: paho keeps trying to reach the broker in the background (1 to 5 s
        apart) and the uploader starts sending once it is connected."""
        connect_in_background(self.client, self.mqtt, SESSION_EXPIRY)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self._connect_result = reason_code
        self._connect_done.set()
        if reason_code.is_failure:
            log.error("MQTT broker %s refused the connection: %s", self.mqtt.address, reason_code)
            return
        log.info("connected to MQTT broker %s (session present: %s)", self.mqtt.address, flags.session_present)
        client.subscribe([(reply_topic(self.agent), 1), (chain_topic(self.agent), 1),
                          (schedule_topic(self.agent), 1)])
        self._reconnected.set()
        self._connected.set()
        self._publish_status()
        self._wake.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._stop.is_set():
            log.warning("lost connection to MQTT broker %s (%s); reconnecting", self.mqtt.address, reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code is not None and getattr(reason_code, "is_failure", False):
            log.error("broker %s refused a publish (%s): check the broker ACL for agent %s",
                      self.mqtt.address, reason_code, self.agent)
        with self._lock:
            if mid in self._uncounted:
                self._uncounted.discard(mid)
                return
            size = self._inflight.pop(mid, None)
            if size is None:
                self._early_acks.add(mid)
            else:
                self._inflight_bytes -= size
        self._wake.set()

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        received = datetime.now(UTC)
        if message.topic == chain_topic(self.agent):
            self._on_chain_heads(message.payload)
            return
        if message.topic == schedule_topic(self.agent):
            self._on_schedule(message.payload)
            return
        try:
            reply = Reply.decode(message.payload)
        except ProtocolError as exc:
            log.warning("ignoring a malformed reply on %s: %s", message.topic, exc)
            return
        self._replies.put((reply, received))
        self._wake.set()

    def _publish(self, topic: str, payload: bytes | str, retain: bool = False, count: bool = True) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        size = len(payload) if count else 0
        with self._lock:
            if not count:
                if info.mid in self._early_acks:
                    self._early_acks.discard(info.mid)
                else:
                    self._uncounted.add(info.mid)
            else:
                self._meter.add(size, time.monotonic())
                if info.mid in self._early_acks:
                    self._early_acks.discard(info.mid)
                else:
                    self._inflight[info.mid] = size
                    self._inflight_bytes += size
                    self.peak_inflight_bytes = max(self.peak_inflight_bytes, self._inflight_bytes)

    @property
    def inflight_bytes(self) -> int:
        with self._lock:
            return self._inflight_bytes

    def batch_backlog(self) -> tuple[int, int]:
        """(records, bytes) pending that lie in the collector's batch windows: what goes first."""
        windows = self._order.windows
        if not windows:
            return 0, 0
        return self.journal.window_backlog(windows, LONGEST_SEGMENT)

    def upload_rate(self) -> UploadRate:
        """The cap in force now (and its next change) and the bytes published per second over the last minute."""
        with self._lock:
            measured = self._meter.bytes_per_second(time.monotonic())
        return UploadRate(cap=self.caps.at(datetime.now(UTC)), bytes_per_second=measured)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # --- status ---
    def set_status(self, **fields: Any) -> None:
        self._status.update(fields)
        if self._connected.is_set():
            self._publish_status()

    def _publish_status(self, state: str = "online") -> None:
        body = {"agent": self.agent, "state": state, "time": format_time(datetime.now(UTC)), **self._status}
        self._publish(status_topic(self.agent), json.dumps(redact_values(body), ensure_ascii=False), retain=True,
                      count=False)

    # --- the send loop ---
    def start(self) -> None:
        self._update_rejected_alarm()  # rejected records left from an earlier run keep their alarm
        self._thread = threading.Thread(target=self._loop, name="uploader", daemon=True)
        self._thread.start()

    def wake(self, *_: Any) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            # A capped send waits here: replies, PUBACKs, wake() and stop() all set _wake and end the wait early.
            self._wake.wait(min(self._cap_wait, 0.25) if self._cap_wait > 0 else 0.25)
            self._wake.clear()
            try:
                self._step()
            except Exception:  # keep uploading whatever happens to one file
                log.exception("uploader step failed")

    def _step(self) -> None:
        now = time.monotonic()
        if now >= self._next_requeue:
            self._next_requeue = now + REQUEUE_INTERVAL
            requeued = self.journal.requeue_due()
            if requeued:
                log.info("%d rejected record(s) due for another try", requeued)
        while True:
            try:
                reply, received = self._replies.get_nowait()
            except queue.Empty:
                break
            self._handle_reply(reply, received)
        if not self._connected.is_set():
            return
        if self._reconnected.is_set():
            self._reconnected.clear()
            self._ask_again()
        self._fill()
        now = time.monotonic()
        self._cap_wait = 0.0
        for transfer in list(self._active.values()):
            if self.inflight_bytes >= self.max_inflight_bytes or self._cap_wait > 0:
                break
            self._advance(transfer, now)

    def _cap_allows(self, size: int) -> bool:
        """True when `size` bytes may be published now under the [upload] cap (and takes them from the bucket);
        else sets _cap_wait to the wait and the caller leaves the message for a later step."""
        self._cap_wait = self._bucket.take(size, time.monotonic(), self.caps.kbps_at(datetime.now(UTC)))
        if self._cap_wait > 0:
            self.cap_holds += 1
        return self._cap_wait == 0

    def _fill(self) -> None:
        free = self.max_active - len(self._active)
        if free <= 0:
            return
        busy = {t.record.id for t in self._active.values()} | self._broken
        if self._order.active:
            candidates = self.journal.pending_candidates(self._order.windows, free, exclude=busy,
                                                         longest_record=LONGEST_SEGMENT)
            picked = self._order.pick(candidates, free)
            records = [self.journal.record(rowid) for rowid in picked]
        else:
            records = self.journal.pending(free, exclude=busy)
        for record in records:
            transfer = Transfer.for_record(record, self.chunk_size)
            if transfer.chunks:
                try:
                    assert record.path is not None
                    transfer.fd = os.open(record.path, os.O_RDONLY)
                except (OSError, AssertionError) as exc:
                    log.error("camera %s seq %s: cannot read %s (%s); not uploading it", record.camera,
                              record.seq, record.path, exc)
                    self._broken.add(record.id)
                    continue
            self._active[record.file_id] = transfer
            log.debug("camera %s seq %s: upload started (%s chunks)", record.camera, record.seq, transfer.chunks)

    def _advance(self, transfer: Transfer, now: float) -> None:
        if transfer.init_needed:
            if not self._cap_allows(len(transfer.init_payload)):
                return
            self._publish(init_topic(self.agent, transfer.file_id), transfer.init_payload)
            transfer.init_needed = False
        while transfer.to_send and self.inflight_bytes < self.max_inflight_bytes:
            index = transfer.to_send[0]
            offset, length = chunk_span(index, transfer.record.size, transfer.chunk_size)
            if not self._cap_allows(length):
                return
            transfer.to_send.popleft()
            assert transfer.fd is not None
            data = os.pread(transfer.fd, length, offset)
            self._publish(chunk_topic(self.agent, transfer.file_id, index), data)
        if transfer.to_send:
            return
        if transfer.fin_at is not None and now >= transfer.fin_at:
            transfer.fin_at = None
            transfer.fin_needed = True
        if transfer.fin_needed or (transfer.deadline is not None and now >= transfer.deadline):
            fin = encode_fin(transfer.record.record_hash)
            if not self._cap_allows(len(fin)):
                return
            if not transfer.fin_needed:
                log.info("camera %s seq %s: no reply yet, asking again", transfer.record.camera,
                         transfer.record.seq)
            self._publish(fin_topic(self.agent, transfer.file_id), fin)
            transfer.fin_needed = False
            if transfer.first_unanswered_fin is None:
                transfer.first_unanswered_fin = datetime.now(UTC)
            wait = min(self.reply_timeout * (2 ** transfer.asks), REPLY_TIMEOUT_CAP)
            transfer.asks += 1
            transfer.deadline = now + wait

    def _ask_again(self) -> None:
        """After a (re)connect, chunks, fins and replies of the open transfers may have been lost: each one
        sends what it still has queued, then repeats `fin` at once to ask the collector for its status."""
        for transfer in self._active.values():
            transfer.fin_needed = True
            transfer.fin_at = None
            transfer.deadline = None
            transfer.asks = 0
        if self._active:
            log.info("connected again: asking the collector for the status of %d open upload(s)", len(self._active))

    def _handle_reply(self, reply: Reply, received: datetime) -> None:
        transfer = self._active.get(reply.file_id)
        if transfer is not None and reply.record is not None and reply.record != transfer.record.record_hash:
            log.warning("camera %s seq %s: reply %s is about another record (%s), not ours (%s); ignored",
                        transfer.record.camera, transfer.record.seq, reply.state, reply.record[:12],
                        transfer.record.record_hash[:12])
            return
        if transfer is not None and transfer.first_unanswered_fin is not None:
            # With several fins outstanding the reply may answer any of them: measuring from the earliest
            # keeps the sample honest (a longer round trip, which the estimator's min-RTT choice disfavours).
            self.clock.add(transfer.first_unanswered_fin, received, reply.collector_time)
            transfer.first_unanswered_fin = None
        camera, _, seq_text = reply.file_id.rpartition("-")
        if not seq_text.isdigit():
            log.warning("reply for unknown file %s ignored", reply.file_id)
            return
        seq = int(seq_text)
        if reply.state == ReplyState.STORED:
            if reply.record is None:
                log.warning("camera %s seq %s: `stored` reply names no record; not taken as an acknowledgement",
                            camera, seq)
                return
            if self.journal.mark_stored(camera, seq, reply.record):
                log.info("camera %s seq %s stored by the collector", camera, seq)
            else:
                log.warning("camera %s seq %s: `stored` reply for record %s matches no pending record here; "
                            "ignored", camera, seq, reply.record[:12])
            self._finish(reply.file_id)
            if self._rejected_alarm:
                self._update_rejected_alarm()
        elif reply.state == ReplyState.REJECTED:
            code = reply.reason_code or ""
            marked, retry_at = self.journal.mark_rejected(camera, seq, reply.reason, reply.record,
                                                         retryable=code in RETRYABLE_REJECTIONS)
            if marked:
                when = (f"retried at {format_time(retry_at)}" if retry_at else
                        "kept; `exam-edge retry` sends it again")
                log.error("camera %s seq %s rejected by the collector: %s (file kept, %s)", camera, seq,
                          reply.reason, when)
                self._update_rejected_alarm()
            self._finish(reply.file_id)
        elif transfer is not None:  # missing
            if not reply.missing or (reply.reason or "").startswith(REASON_INIT_MISSING):
                transfer.init_needed = True
                transfer.queue_all()
            else:
                queued = set(transfer.to_send)
                for index in expand_ranges(reply.missing):
                    if 0 <= index < transfer.chunks and index not in queued:
                        transfer.to_send.append(index)
                        queued.add(index)
            log.info("camera %s seq %s: collector misses %s; resending", camera, seq,
                     reply.missing or reply.reason)
            answer = (tuple(map(tuple, reply.missing)), reply.reason)
            transfer.repeats = transfer.repeats + 1 if answer == transfer.last_missing else 0
            transfer.last_missing = answer
            transfer.deadline = None
            transfer.asks = 0  # the collector answers: no backoff for the next question
            if transfer.repeats:
                # The same answer again: the resent chunks may still be on their way through another
                # collector instance. Give them a moment (growing) before asking again.
                transfer.fin_needed = False
                transfer.fin_at = time.monotonic() + min(0.5 * 2 ** (transfer.repeats - 1), self.reply_timeout)
            else:
                transfer.fin_needed = True
                transfer.fin_at = None

    def _update_rejected_alarm(self) -> None:
        """Raise `records_rejected` while the journal holds rejected records (they are never pruned, and each
        one is footage the collector does not have), clear it when none are left."""
        count, oldest = self.journal.rejected_summary()
        self._rejected_alarm = count > 0
        if self._on_alarm is None:
            return
        if oldest is None:
            self._on_alarm(AlarmCode.RECORDS_REJECTED, None)
            return
        self._on_alarm(AlarmCode.RECORDS_REJECTED,
                       f"{count} record(s) rejected by the collector, the oldest camera {oldest.camera} seq "
                       f"{oldest.seq}: {oldest.reason}; enrolment and quota rejections are retried with backoff, "
                       "the others after `exam-edge retry`; the files are kept")

    # --- the collector's schedule (batch-first order) ---
    def _on_schedule(self, payload: bytes) -> None:
        if not payload:   # cleared: oldest first again
            windows: tuple[ScheduleWindow, ...] = ()
        else:
            try:
                schedule = Schedule.decode(payload)
            except ScheduleError as exc:
                log.warning("ignoring a malformed schedule: %s", exc)
                return
            if schedule.agent != self.agent:
                log.warning("ignoring a schedule for agent %s (this is %s)", schedule.agent, self.agent)
                return
            windows = schedule.windows
        if self._order.set_windows(windows):
            log.info("schedule from the collector: %d batch window(s); their footage is uploaded first",
                     len(windows))
            self._wake.set()

    # --- chain heads (a journal started anew) ---
    def request_chain_heads(self, cameras: list[str], timeout: float) -> ChainHeads | None:
        """Ask the collector where these cameras' chains end; None when no answer came within `timeout`."""
        nonce = uuid.uuid4().hex
        request = ChainRequest(nonce, tuple(cameras))
        deadline = time.monotonic() + timeout
        next_ask = 0.0
        with self._chain_lock:
            while nonce not in self._chain_answers:
                now = time.monotonic()
                if now >= deadline:
                    return None
                if now >= next_ask and self._connected.is_set():
                    self._publish(chain_request_topic(self.agent), request.encode(), count=False)
                    next_ask = now + 5.0  # asked again in case no collector was subscribed yet
                self._chain_answered.wait(min(1.0, deadline - now))
            return self._chain_answers.pop(nonce)

    def _on_chain_heads(self, payload: bytes) -> None:
        try:
            heads = ChainHeads.decode(payload)
        except ProtocolError as exc:
            log.warning("ignoring a malformed chain answer: %s", exc)
            return
        with self._chain_lock:
            self._chain_answers[heads.nonce] = heads
            while len(self._chain_answers) > 16:
                self._chain_answers.pop(next(iter(self._chain_answers)))
            self._chain_answered.notify_all()

    def _finish(self, file_id: str) -> None:
        transfer = self._active.pop(file_id, None)
        if transfer is not None:
            transfer.close()

    # --- shutdown ---
    def backlog(self) -> int:
        return self.journal.pending_count()

    def drain(self, timeout: float) -> bool:
        """Wait until every journaled record has a final reply, or `timeout` passes."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while time.monotonic() < deadline:
            if self.backlog() == 0:
                return True
            time.sleep(0.2)
        return self.backlog() == 0

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        for transfer in list(self._active.values()):
            transfer.close()
        self._active.clear()
        if self._connected.is_set():
            try:
                self._publish_status("offline")
            except Exception:  # noqa: BLE001
                pass
        self.client.disconnect()
        self.client.loop_stop()

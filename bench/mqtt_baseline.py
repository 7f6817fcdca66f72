"""Raw MQTT throughput on this machine: paho publisher -> private mosquitto -> paho subscriber.

QoS 1, MQTT v5, a payload of N MiB sent as 256 KiB messages; the subscriber counts bytes and the clock
stops when the last byte has arrived. The publisher stays at most AHEAD messages ahead of the subscriber
(end-to-end flow control, as real ingest needs too), so nothing is dropped by the broker's queue limit. Other benchmarks divide their own MB/s by this figure, measured in
the same run, so results compare across machines. Run from the repo root:

    .venv/bin/python -m bench.mqtt_baseline --mib 256
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import paho.mqtt.client as mqtt

from tests.support.services import Mosquitto, mosquitto_binary

MESSAGE_SIZE = 256 * 1024
TOPIC = "bench/v1/baseline"
WINDOW = 32  # unacknowledged publishes in flight
AHEAD = 64   # messages the publisher may run ahead of the subscriber: a PUBACK only means the broker took a
             # message, and mosquitto silently drops what exceeds its subscriber queue (max_queued_messages)


class BenchError(RuntimeError):
    """The benchmark could not run or lost data; the message says why."""


@dataclass(frozen=True)
class BaselineResult:
    total_bytes: int
    message_size: int
    messages: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.total_bytes / 1e6 / self.seconds


def _client(client_id: str) -> mqtt.Client:
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)


class _Counter:
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = 0
        self.messages = 0
        self.progress = threading.Condition()
        self.done = threading.Event()
        self.subscribed = threading.Event()

    def on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.subscribed.set()

    def on_message(self, client, userdata, message) -> None:
        with self.progress:
            self.received += len(message.payload)
            self.messages += 1
            self.progress.notify_all()
        if self.received >= self.expected:
            self.done.set()

    def wait_until_behind_by_less_than(self, sent: int, ahead: int, timeout: float) -> None:
        with self.progress:
            if not self.progress.wait_for(lambda: sent - self.messages < ahead, timeout):
                raise BenchError(f"subscriber stalled at {self.messages} of {sent} messages for {timeout:.0f} s")


def run_on_broker(host: str, port: int, total_mib: int = 256, message_size: int = MESSAGE_SIZE,
                  timeout: float = 300.0) -> BaselineResult:
    """Measure against a running broker at host:port."""
    messages = max(1, (total_mib * 1024 * 1024) // message_size)
    total = messages * message_size
    payload = bytes(range(256)) * (message_size // 256) + bytes(message_size % 256)
    counter = _Counter(total)

    subscriber = _client("bench-sub")
    subscriber.on_subscribe = counter.on_subscribe
    subscriber.on_message = counter.on_message
    publisher = _client("bench-pub")
    publisher.max_inflight_messages_set(WINDOW)
    try:
        subscriber.connect(host, port)
        publisher.connect(host, port)
    except OSError as exc:
        raise BenchError(f"cannot connect to mosquitto at {host}:{port}: {exc}") from exc
    subscriber.loop_start()
    publisher.loop_start()
    try:
        subscriber.subscribe(TOPIC, qos=1)
        if not counter.subscribed.wait(10):
            raise BenchError("subscriber got no SUBACK within 10 s")
        pending = []
        started = time.perf_counter()
        for sent in range(messages):
            counter.wait_until_behind_by_less_than(sent, AHEAD, timeout)
            pending.append(publisher.publish(TOPIC, payload, qos=1))
            if len(pending) >= WINDOW:
                pending.pop(0).wait_for_publish(timeout)
        for info in pending:
            info.wait_for_publish(timeout)
        if not counter.done.wait(timeout):
            raise BenchError(f"subscriber received {counter.received} of {total} bytes within {timeout:.0f} s")
        seconds = time.perf_counter() - started
    finally:
        for client in (publisher, subscriber):
            client.disconnect()
            client.loop_stop()
    return BaselineResult(total_bytes=total, message_size=message_size, messages=messages, seconds=seconds)


def run(total_mib: int = 256, message_size: int = MESSAGE_SIZE, broker_url: str | None = None) -> BaselineResult:
    """Measure on `broker_url` (mqtt://host:port), or on a private mosquitto started for the run."""
    if broker_url:
        parsed = urlparse(broker_url)
        return run_on_broker(parsed.hostname or "127.0.0.1", parsed.port or 1883, total_mib, message_size)
    if mosquitto_binary() is None:
        raise BenchError("mosquitto is not installed; run `make deps` (apt-get install mosquitto)")
    with tempfile.TemporaryDirectory(prefix="bench-mosquitto-") as workdir:
        broker = Mosquitto(workdir=Path(workdir), extra_config="persistence false")
        broker.start()
        try:
            return run_on_broker("127.0.0.1", broker.port, total_mib, message_size)
        finally:
            broker.stop(kill=True)


def measure(total_mib: int = 256, message_size: int = MESSAGE_SIZE, broker_url: str | None = None) -> float:
    """MB/s (10^6 bytes per second) of the raw baseline."""
    return run(total_mib, message_size, broker_url).mb_per_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mqtt_baseline", description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="payload to send, in MiB (default 256)")
    parser.add_argument("--message-kib", type=int, default=MESSAGE_SIZE // 1024,
                        help="message size in KiB (default 256)")
    parser.add_argument("--broker", help="use this broker (mqtt://host:port) instead of a private mosquitto")
    parser.add_argument("--repeat", type=int, default=1, help="runs; the best is reported (default 1)")
    args = parser.parse_args(argv)
    try:
        results = [run(args.mib, args.message_kib * 1024, args.broker) for _ in range(max(1, args.repeat))]
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    for result in results:
        print(f"mqtt baseline: {result.total_bytes / 2**20:.0f} MiB in {result.messages} x "
              f"{result.message_size // 1024} KiB messages, QoS 1, MQTT v5: {result.seconds:.2f} s, "
              f"{result.mb_per_s:.0f} MB/s")
    if len(results) > 1:
        print(f"mqtt baseline best: {max(r.mb_per_s for r in results):.0f} MB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Agents' schedules: the pure window computation, and the loop publishing them retained over a real mosquitto
with batches imported into a real database."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from collector.admin import enroll
from collector.batches import import_batches
from collector.config import MqttConfig
from collector.db import make_engine, session_factory, upgrade
from collector.ingest import Ingest
from collector.revocation import revoke_agent
from collector.schedule import Horizon, PartSpan, ScheduleLoop, agent_windows, fitting_schedule
from collector.service import CollectorService
from exam_contract.schedule import MAX_SCHEDULE_BYTES, Schedule, ScheduleWindow
from exam_contract.signing import generate_private_key, public_key_b64

from .conftest import TEST_LIMITS

UTC = timezone.utc
SHANGHAI = timezone(timedelta(hours=8))
NOW = datetime(2026, 11, 26, 2, 0, tzinfo=UTC)
MARGINS = Horizon(timedelta(minutes=15), timedelta(minutes=10))
V1, V2 = "JL2201001-01", "JL2201001-02"


def part(batch: str, room: str, start_hours: float, hours: float = 2, venue: str = V1) -> PartSpan:
    start = NOW + timedelta(hours=start_hours)
    return PartSpan(batch, venue, room, start, start + timedelta(hours=hours))


def test_windows_are_the_venues_batches_near_now_widened_by_the_margins() -> None:
    parts = [
        part("B-1", "T101", -3), part("B-1", "T102", -3),   # one batch, one span, two rooms: one window
        part("B-1", "P201", 1),                               # the same batch later elsewhere: its own window
        part("B-other", "T101", -3, venue=V2),                # another venue
        part("B-old", "T101", -30),                           # ended more than a day (plus margin) ago
        part("B-edge", "T101", -24 - 2 - 10 / 60 + 0.01),     # ends, widened, just inside the day
        part("B-far", "T101", 7 * 24 + 0.2),                  # starts, widened, just inside the week
        part("B-later", "T101", 7 * 24 + 0.3),                # widened start after the week
        part("B-bad", "理论1室", 0),                           # a room no camera can be in
    ]
    windows = agent_windows(parts, V1, NOW, MARGINS)
    assert [(w.batch, w.rooms) for w in windows] == [
        ("B-edge", ("T101",)), ("B-1", ("T101", "T102")), ("B-1", ("P201",)), ("B-far", ("T101",))]
    b1 = windows[1]
    assert b1.start == NOW - timedelta(hours=3, minutes=15) and b1.end == NOW - timedelta(hours=1, minutes=-10)
    assert agent_windows(parts, "JL2201001-09", NOW, MARGINS) == ()


def test_a_schedule_too_large_for_a_message_keeps_its_oldest_windows() -> None:
    rooms = [f"ROOM-{i:02d}-{'x' * 50}" for i in range(64)]
    windows = tuple(ScheduleWindow.make(f"B-{i:04d}", NOW + timedelta(minutes=i), NOW + timedelta(days=1), rooms)
                    for i in range(200))
    schedule = fitting_schedule("agent-1", NOW, windows)
    assert 0 < len(schedule.windows) < 200 and schedule.windows == windows[:len(schedule.windows)]
    assert len(schedule.encode()) <= MAX_SCHEDULE_BYTES


class Watcher:
    """Subscribes to agents' schedule topics as an agent would and keeps every message, retained or not."""

    def __init__(self, port: int, agents: list[str]) -> None:
        self.messages: dict[str, list[bytes]] = {a: [] for a in agents}
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        subscribed: queue.Queue[bool] = queue.Queue()
        self.client.on_subscribe = lambda *a: subscribed.put(True)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        for agent in agents:
            self.client.subscribe(f"exam/v1/{agent}/schedule", qos=1)
            subscribed.get(timeout=10)

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        with self.lock:
            self.messages[message.topic.split("/")[2]].append(bytes(message.payload))

    def of(self, agent: str) -> list[bytes]:
        with self.lock:
            return list(self.messages[agent])

    def wait(self, agent: str, count: int, timeout: float = 15) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.of(agent)) < count:
            assert time.monotonic() < deadline, f"{agent}: {len(self.of(agent))} schedule(s), expected {count}"
            time.sleep(0.05)
        return self.of(agent)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def batch_csv(batch: str, venue: str, start: datetime, end: datetime, rooms: dict[str, str]) -> str:
    local = [t.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M") for t in (start, end)]
    lines = ["batch_id,institution,venue,occupation,level,part,room,start,end"]
    lines += [f"{batch},JL2201001,{venue},电工,四级,{p},{room},{local[0]},{local[1]}" for room, p in rooms.items()]
    return "\n".join(lines) + "\n"


@pytest.mark.mosquitto
def test_loop_publishes_retained_schedules_per_venue_and_again_only_on_change(database_url: str, tmp_path: Path,
                                                                               mosquitto) -> None:
    engine = make_engine(database_url)
    upgrade(engine)
    sessions = session_factory(engine)
    keys = tmp_path / "keys"
    keys.mkdir()
    for agent, venue in (("agent-a", V1), ("agent-b", V2)):
        enroll(sessions, agent, venue, public_key_b64(generate_private_key(keys / agent)), "JL2201001")
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    with sessions.begin() as session:
        import_batches(session, batch_csv("B-1", V1, now - timedelta(hours=2), now - timedelta(hours=1),
                                          {"T101": "theory", "P201": "practical"}).encode(),
                       source="b1.csv", actor="tester")
    service = CollectorService(MqttConfig(url=mosquitto.url, host="127.0.0.1", port=mosquitto.port, tls=False,
                                          client_id=f"collector-test-{uuid.uuid4().hex[:6]}"),
                               Ingest(engine, tmp_path / "storage", limits=TEST_LIMITS), workers=1, queue_size=10,
                               finishers=1)
    service.start()
    loop = ScheduleLoop(sessions, MARGINS, interval=0.2, publish=lambda topic, payload: service.client.publish(
        topic, payload, qos=1, retain=True).rc == 0)
    watcher = None
    try:
        assert service.connected.wait(10)
        loop.start()
        time.sleep(1.0)   # several checks: one publish each at start, none while nothing changes
        # An agent connecting later gets them retained.
        watcher = Watcher(mosquitto.port, ["agent-a", "agent-b"])
        [first_a] = watcher.wait("agent-a", 1)
        [first_b] = watcher.wait("agent-b", 1)
        a, b = Schedule.decode(first_a), Schedule.decode(first_b)
        assert a.agent == "agent-a" and b.agent == "agent-b"
        assert [(w.batch, w.rooms, w.start, w.end) for w in a.windows] == [
            ("B-1", ("P201", "T101"), now - timedelta(hours=2, minutes=15), now - timedelta(minutes=50))]
        assert b.windows == ()        # the batch is at another venue
        time.sleep(1.0)
        assert len(watcher.of("agent-a")) == 1 and len(watcher.of("agent-b")) == 1

        # A batch imported while serving reaches its venue's agent at the next check, and only that agent.
        with sessions.begin() as session:
            import_batches(session, batch_csv("B-2", V2, now + timedelta(days=2), now + timedelta(days=2, hours=3),
                                              {"T301": "theory"}).encode(), source="b2.csv", actor="tester")
        second_b = Schedule.decode(watcher.wait("agent-b", 2)[1])
        assert [(w.batch, w.rooms) for w in second_b.windows] == [("B-2", ("T301",))]
        time.sleep(1.0)
        assert len(watcher.of("agent-a")) == 1

        # A revoked agent's retained schedule is cleared.
        revoke_agent(sessions, "agent-b", "test", "tester", datetime.now(UTC))
        assert watcher.wait("agent-b", 3)[2] == b""
    finally:
        loop.stop()
        if watcher is not None:
            watcher.close()
        service.shutdown()
        engine.dispose()
    assert not loop._thread.is_alive()


@pytest.mark.mosquitto
def test_serve_publishes_the_schedule_of_an_imported_batch(tmp_path: Path, mosquitto) -> None:
    """`exam-collector serve` runs the loop: real CLIs (init, enroll, batches import, serve) and a real broker."""
    import subprocess
    import sys

    from tests.support.services import free_port

    cli = [str(Path(sys.executable).parent / "exam-collector"), "--config", str(tmp_path / "c.toml")]

    def run(*args: str) -> None:
        done = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

    run("init", "--data-dir", str(tmp_path / "d"), "--broker", mosquitto.url)
    config = tmp_path / "c.toml"
    config.write_text(config.read_text().replace('listen = "127.0.0.1:8080"', f'listen = "127.0.0.1:{free_port()}"'))
    run("db", "upgrade")
    for agent, venue in (("agent-a", V1), ("agent-b", V2)):
        key = generate_private_key(tmp_path / f"{agent}.key")
        run("enroll", "--agent", agent, "--venue", venue, "--institution", "JL2201001", "--pubkey",
            public_key_b64(key))
    start = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(hours=1)
    (tmp_path / "b.csv").write_text(batch_csv("B-9", V1, start, start + timedelta(hours=2), {"T101": "theory"}),
                                    encoding="utf-8")
    run("batches", "import", str(tmp_path / "b.csv"))
    run("serve", "--duration", "2")
    watcher = Watcher(mosquitto.port, ["agent-a", "agent-b"])
    try:
        a = Schedule.decode(watcher.wait("agent-a", 1)[0])
        b = Schedule.decode(watcher.wait("agent-b", 1)[0])
    finally:
        watcher.close()
    # [coverage] margins as `init` writes them: 15 minutes each side
    assert [(w.batch, w.rooms, w.start, w.end) for w in a.windows] == [
        ("B-9", ("T101",), start - timedelta(minutes=15), start + timedelta(hours=2, minutes=15))]
    assert b.windows == ()

"""Live alerts: the pure decision, and the loop on a real database, a real broker and a real webhook."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from collector.alerts import REASON_NO_SEGMENT, AlertLoop, CameraActivity, cameras_in_alert
from collector.batches import import_batches
from collector.db import session_factory
from exam_contract.manifest import ClockInfo

from .conftest import INSTITUTION, VENUE, Harness, payload_bytes

NOW = datetime(2026, 11, 26, 2, 0, tzinfo=timezone.utc)


def activity(camera: str, arrived_ago: float | None, seg: float = 10, newest_gap: str | None = None,
             new_gap: str | None = None) -> CameraActivity:
    arrival = None if arrived_ago is None else NOW - timedelta(seconds=arrived_ago)
    return CameraActivity(VENUE, "T101", camera, "B1", "theory", arrival, seg, newest_gap, new_gap)


def test_decision() -> None:
    alerts = cameras_in_alert([
        activity("fresh", 5), activity("edge", 20), activity("late", 20.5), activity("never", None),
        activity("stated", 1, newest_gap="camera_unreachable"), activity("blip", 1, new_gap="recorder_crashed"),
        activity("slow-seg", 100, seg=60)], NOW)
    assert [(a.camera, a.reason) for a in alerts] == [
        ("late", REASON_NO_SEGMENT), ("never", REASON_NO_SEGMENT), ("stated", "camera_unreachable"),
        ("blip", "recorder_crashed")]


def test_silence_is_flagged_no_later_than_twice_the_segment_length() -> None:
    """Checked every 5 s with 60 s segments: whenever the silence starts, the first check that flags it is at
    most 120 s after the last segment arrived."""
    for offset in (0.0, 1.0, 2.5, 4.9):
        checks = [NOW + timedelta(seconds=offset + 5 * k) for k in range(40)]
        last_arrival = NOW
        camera = CameraActivity(VENUE, "T101", "cam", "B1", "theory", last_arrival, 60.0)
        first = next(t for t in checks if cameras_in_alert([camera], t, 2.0, 5.0))
        assert timedelta(seconds=115) < first - last_arrival <= timedelta(seconds=120), (offset, first)


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


def test_loop_raises_and_clears_on_broker_webhook_and_log(harness: Harness, mosquitto, caplog) -> None:
    sessions = session_factory(harness.engine)
    # A part running now in T101 (times with an offset; naive ones would be Shanghai).
    start = datetime.now(timezone.utc) - timedelta(minutes=1)
    csv = ("batch_id,institution,venue,occupation,level,part,room,start,end\n"
           f"B1,{INSTITUTION},{VENUE},电工,四级,theory,T101,{start.isoformat()},{(start + timedelta(hours=1)).isoformat()}\n")
    with sessions.begin() as s:
        import_batches(s, csv.encode(), source="t.csv", actor="t")
    agent = harness.agent
    prev = None
    for seq in (1, 2):
        data = payload_bytes(seq)
        m = agent.manifest(seq, data, prev, clock=ClockInfo(0.0, True))
        assert harness.send(m, data).state == "stored"
        prev = m.record_hash()

    received: list[tuple[str, bytes, bool]] = []
    got_clear = threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(client, userdata, message) -> None:  # noqa: ANN001
        received.append((message.topic, bytes(message.payload), bool(message.retain)))
        if message.payload == b"":
            got_clear.set()

    sub.on_message = on_message
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe("exam/v1/alerts/#", qos=1)
    sub.loop_start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Hook.received = []
    clock = [datetime.now(timezone.utc)]
    loop = AlertLoop(sessions, lambda t, p, r: pub.publish(t, p, qos=1, retain=r).wait_for_publish(5),
                     webhook_url=f"http://127.0.0.1:{server.server_port}/hook", clock=lambda: clock[0])
    try:
        stored_at = datetime.now(timezone.utc)  # the two segments have just arrived
        clock[0] = stored_at + timedelta(seconds=5)
        assert loop.check() == []
        clock[0] = stored_at + timedelta(seconds=25)           # 2 × 10 s without a segment
        (alert,) = loop.check()
        assert (alert.camera, alert.reason) == (agent.camera, REASON_NO_SEGMENT)
        assert loop.check() == [alert]                          # still on, not sent again
        data = payload_bytes(3)
        m = agent.manifest(3, data, prev, clock=ClockInfo(0.0, True))
        assert harness.send(m, data).state == "stored"
        clock[0] = datetime.now(timezone.utc) + timedelta(seconds=1)
        assert loop.check() == []
        assert got_clear.wait(10)
    finally:
        sub.loop_stop()
        pub.loop_stop()
        server.shutdown()
    topic = f"exam/v1/alerts/{VENUE}/{agent.camera}"
    states = [(t, json.loads(p)["state"] if p else "", r) for t, p, r in received]
    assert states[0][0] == topic
    assert [s for _, s, _ in states] == ["alert", "cleared", ""]
    first = json.loads(received[0][1])
    assert first["reason"] == REASON_NO_SEGMENT and first["batch_id"] == "B1" and first["room"] == "T101"
    assert [h["state"] for h in _Hook.received] == ["alert", "cleared"]
    assert any("ALERT camera" in r.getMessage() for r in caplog.records)
    # A late subscriber finds no retained alert any more.
    late: list[bytes] = []
    sub2 = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub2.on_message = lambda c, u, msg: late.append(bytes(msg.payload))
    sub2.connect("127.0.0.1", mosquitto.port)
    sub2.subscribe(topic, qos=1)
    sub2.loop_start()
    threading.Event().wait(1.0)
    sub2.loop_stop()
    assert late == []


def test_alerts_config(tmp_path) -> None:
    import pytest

    from collector.config import ConfigError, config_from_dict

    base = {"collector": {"data_dir": str(tmp_path)}, "mqtt": {"url": "mqtt://127.0.0.1:1883"}}
    assert config_from_dict(base, tmp_path).alerts.webhook_url is None
    cfg = config_from_dict({**base, "alerts": {"webhook_url": "https://ops.example.cn/h", "interval_seconds": 2}},
                           tmp_path)
    assert (cfg.alerts.webhook_url, cfg.alerts.interval_seconds) == ("https://ops.example.cn/h", 2.0)
    with pytest.raises(ConfigError, match=r"\[alerts\] webhook_url"):
        config_from_dict({**base, "alerts": {"webhook_url": "ops.example.cn"}}, tmp_path)
    with pytest.raises(ConfigError, match=r"\[alerts\] interval_seconds = 0 is out of range"):
        config_from_dict({**base, "alerts": {"interval_seconds": 0}}, tmp_path)

"""Agent status: the retained MQTT status (camera states, spool backlog, health) and `exam-edge status`."""

from __future__ import annotations

import json
import queue
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge_agent.agent import Agent
from edge_agent.config import load_config
from exam_contract.signing import load_private_key
from exam_contract.topics import status_topic
from tests.edge.conftest import AGENT, write_config
from tests.support.pipeline import run_cli, wait_until

pytestmark = [pytest.mark.ffmpeg, pytest.mark.mosquitto]
CAM = "t101-front"


def retained_status(url_port: int) -> dict:
    """A fresh subscriber gets the retained status at once."""
    got: queue.Queue = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="status-reader", protocol=mqtt.MQTTv5)
    client.on_message = lambda c, u, m: got.put(m)
    client.connect("127.0.0.1", url_port)
    client.subscribe(status_topic(AGENT), qos=1)
    client.loop_start()
    try:
        message = got.get(timeout=10)
        assert message.retain
        return json.loads(message.payload)
    finally:
        client.disconnect()
        client.loop_stop()


def test_status_topic_and_cli_show_cameras_backlog_and_health(tmp_path: Path, mosquitto, ffmpeg_available) -> None:
    config_path = write_config(tmp_path, broker_url=mosquitto.url)
    config = load_config(config_path)
    agent = Agent(config, load_private_key(config.agent.key_file), drain_seconds=0)
    agent.status.interval = 0.5
    agent.connect()
    agent.start()
    try:
        wait_until(lambda: len(agent.journal.records(CAM)) >= 1, 40, what="first segment")
        wait_until(lambda: retained_status(mosquitto.port).get("backlog", {}).get("records", 0) >= 1, 20,
                   what="backlog in the status")
        body = retained_status(mosquitto.port)
        assert body["state"] == "online" and body["cameras"] == {CAM: "recording"}
        assert body["spool"][CAM]["pending"] >= 1 and body["spool"][CAM]["last_stored_seq"] is None
        assert body["backlog"]["bytes"] > 0
        assert body["health"][CAM] == []  # testsrc2 is healthy
        upload = body["upload"]   # no [upload] table: unlimited, never changing
        assert upload["cap_kbps"] == 0 and upload["cap_changes_at"] is None and upload["backlog_records"] >= 1
        assert {"rate_kbps", "backlog_bytes", "backlog_eta_seconds"} <= set(upload)
        shown = run_cli("exam-edge", "--config", str(config_path), "status").stdout.splitlines()
        assert shown[0].startswith("代理：运行中，最近报告 北京时间 ")
        english = run_cli("exam-edge", "--config", str(config_path), "status", "--lang", "en").stdout.splitlines()
        assert english[0].startswith("agent: running, last report ") and english[0].endswith(" Asia/Shanghai")
        assert english[1].split() == ["camera", "state", "last", "seq", "last", "stored", "pending", "pending", "MB",
                                      "rejected", "health"]
        row = next(line for line in shown if line.startswith(CAM)).split()
        assert row[1] == "recording" and int(row[4]) >= 1 and row[-1] == "-"
        assert shown[-1].startswith("上传：限速 不限速；近 1 分钟实测 ")
    finally:
        agent.stop()
    assert retained_status(mosquitto.port)["state"] == "offline"
    shown = run_cli("exam-edge", "--config", str(config_path), "status").stdout.splitlines()
    assert shown[0].startswith("代理：未运行，最近报告 北京时间 ")
    assert next(line for line in shown if line.startswith(CAM)).split()[1] == "-"

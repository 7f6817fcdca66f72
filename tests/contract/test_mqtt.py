"""exam_contract.mqtt: the [mqtt] table both configs read, the client both sides build, the broker errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from exam_contract.mqtt import (BrokerError, BrokerRefused, BrokerUnreachable, MqttSettings, PasswordFileError,
                                connect, make_client, parse_mqtt_table)
from exam_contract.tomlconfig import ConfigError


def edge_rules(table: dict, base: Path) -> MqttSettings:
    return parse_mqtt_table(table, base, files_must_exist=True)


def collector_rules(table: dict, base: Path) -> MqttSettings:
    return parse_mqtt_table(table, base, files_must_exist=False, default_client_id=lambda user: f"{user}-derived")


def test_both_sides_read_the_same_table(tmp_path: Path) -> None:
    (tmp_path / "mqtt.pass").write_text("secret\n")
    table = {"url": "mqtts://broker.example.cn", "username": "u1", "password_file": "mqtt.pass"}
    edge, collector = edge_rules(table, tmp_path), collector_rules(table, tmp_path)
    assert (edge.host, edge.port, edge.tls, edge.address) == ("broker.example.cn", 8883, True, "broker.example.cn:8883")
    assert edge.password_file == collector.password_file == (tmp_path / "mqtt.pass").resolve()
    assert edge.password() == collector.password() == "secret"
    assert edge.client_id is None and collector.client_id == "u1-derived"
    assert collector_rules({**table, "client_id": "east"}, tmp_path).client_id == "east"


@pytest.mark.parametrize("rules, table, message", [
    (edge_rules, {"url": "mqtt://h", "client_id": "x"},
     "[mqtt] client_id is not a known key: remove it (known: ca_file, cert_file, key_file, password_file, url, "
     "username)"),
    (edge_rules, {"url": "mqtt://h", "password_file": "nope.pass"},
     "[mqtt] password_file = '{base}/nope.pass' does not exist: create it or fix the path"),
    (collector_rules, {"url": "mqtts://h", "cert_file": "c.pem"},
     "[mqtt] cert_file and key_file must be set together: add the missing one"),
    (collector_rules, {"url": "mqtt://h", "ca_file": "ca.pem"},
     "[mqtt] url = 'mqtt://h' is plain mqtt:// but TLS files are set: use mqtts:// or remove "
     "cert_file/key_file/ca_file"),
    (collector_rules, {"url": "http://h"},
     "[mqtt] url = 'http://h' is not an MQTT URL: use mqtt://host:1883 or mqtts://host:8883"),
])
def test_table_errors_name_the_key_and_the_fix(tmp_path: Path, rules, table: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        rules(table, tmp_path)
    assert str(info.value) == message.format(base=tmp_path)


def test_collector_files_are_read_only_when_used(tmp_path: Path) -> None:
    settings = collector_rules({"url": "mqtt://h", "password_file": "later.pass"}, tmp_path)
    with pytest.raises(PasswordFileError) as info:
        settings.password()
    assert isinstance(info.value, ConfigError) and info.value.path == (tmp_path / "later.pass").resolve()
    assert str(info.value) == (f"[mqtt] password_file = '{tmp_path.resolve() / 'later.pass'}' cannot be read "
                               "(No such file or directory): create it or fix the path")


def test_make_client_credentials(tmp_path: Path) -> None:
    (tmp_path / "mqtt.pass").write_text("secret\n")
    with_password = MqttSettings(url="mqtt://h", host="h", port=1883, tls=False,
                                 password_file=tmp_path / "mqtt.pass")
    # An agent's broker account is its id when [mqtt] names no username.
    agent = make_client(with_password, "agent-1", max_inflight=64, default_username="agent-1")
    assert (agent.username, agent.password, agent.max_inflight_messages) == ("agent-1", "secret", 64)
    anonymous = make_client(MqttSettings(url="mqtt://h", host="h", port=1883, tls=False), "collector-1",
                            max_inflight=100, default_username="nobody")
    assert anonymous.username is None and anonymous.password is None


def test_unreachable_broker_error_names_host_port_and_fix() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: connections are refused
        settings = MqttSettings(url=f"mqtt://127.0.0.1:{port}", host="127.0.0.1", port=port, tls=False)
        with pytest.raises(BrokerUnreachable) as info:
            connect(make_client(settings, "c", max_inflight=1), settings, 60)
    error = info.value
    assert isinstance(error, BrokerError) and error.address == f"127.0.0.1:{port}"
    assert isinstance(error.cause, ConnectionRefusedError) and error.reason_code is None
    assert str(error) == f"MQTT broker 127.0.0.1:{port} is unreachable (Connection refused): start it or fix [mqtt] url"
    assert str(BrokerUnreachable.no_answer("h:1883", 10.0)) == ("MQTT broker h:1883 did not answer within 10 s: "
                                                                "start it or fix [mqtt] url")


def test_refused_connection_carries_the_reason_code() -> None:
    code = ReasonCode(PacketTypes.CONNACK, identifier=0x86)
    error = BrokerRefused("h:8883", code)
    assert isinstance(error, BrokerError) and error.address == "h:8883" and error.reason_code is code
    assert str(error) == ("MQTT broker h:8883 refused the connection (Bad user name or password): check [mqtt] "
                          "username and password_file (or cert_file/key_file)")

"""`exam-edge doctor` against real parts: each check failing one at a time gives its own line and exit code."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from collector.admin import enroll
from collector.config import MqttConfig
from collector.db import make_engine, session_factory, upgrade
from collector.ingest import Ingest
from collector.service import CollectorService
from exam_contract.signing import load_private_key, public_key_b64
from tests.collector.conftest import TEST_LIMITS
from tests.conftest import _unavailable
from tests.edge.conftest import AGENT, write_config
from tests.support.deploy_broker import DeployBroker, add_password, make_test_ca
from tests.support.services import free_port, mosquitto_binary

pytestmark = [pytest.mark.mosquitto]
BIN = Path(sys.executable).parent


def doctor(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "exam-edge"), "--config", str(config), "doctor", "--timeout", "4", *extra],
                          capture_output=True, text=True, timeout=120)


def lines(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """check name -> its line, from doctor's output."""
    out = {}
    for line in result.stdout.splitlines():
        name = line[6:].split(": ", 1)[0]
        out[name] = line
    return out


@pytest.fixture
def collector(tmp_path: Path, mosquitto):
    """A real collector service answering on the test broker, with the agent of `write_config` enrolled."""
    def start(agent_key: Path) -> CollectorService:
        engine = make_engine(f"sqlite:///{tmp_path / 'collector.db'}")
        upgrade(engine)
        enroll(session_factory(engine), AGENT, "JL2201001-01", public_key_b64(load_private_key(agent_key)),
               "JL2201001")
        settings = MqttConfig(url=mosquitto.url, host="127.0.0.1", port=mosquitto.port, tls=False,
                              client_id=f"collector-{uuid.uuid4().hex[:6]}")
        service = CollectorService(settings, Ingest(engine, tmp_path / "storage", limits=TEST_LIMITS))
        service.start()
        assert service.connected.wait(10)
        started.append(service)
        return service

    started: list[CollectorService] = []
    yield start
    for service in started:
        service.shutdown()


def test_everything_in_order_exits_0(tmp_path: Path, mosquitto, collector) -> None:
    config = write_config(tmp_path, broker_url=mosquitto.url)
    collector(tmp_path / "agent.key")
    result = doctor(config)
    assert result.returncode == 0, result.stdout + result.stderr
    found = lines(result)
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["ok"] * 6
    assert found["config"] == (f"ok    config: {config}: agent {AGENT}, institution JL2201001, venue JL2201001-01, "
                               "1 camera(s)")
    assert found["agent key file"].startswith(f"ok    agent key file: {tmp_path / 'agent.key'} (mode 0600, SHA-256 ")
    assert found[f"broker login 127.0.0.1:{mosquitto.port}"] == \
        f"ok    broker login 127.0.0.1:{mosquitto.port}: logged in as {AGENT}"
    assert found["clock"].startswith("ok    clock: ") and found["clock"].endswith("s against the collector (within 2 s)")


def test_a_key_file_others_can_read_fails_with_the_fix(tmp_path: Path, mosquitto, collector) -> None:
    config = write_config(tmp_path, broker_url=mosquitto.url)
    collector(tmp_path / "agent.key")
    key = tmp_path / "agent.key"
    key.chmod(0o644)
    result = doctor(config)
    assert result.returncode == 1
    assert lines(result)["agent key file"] == (f"FAIL  agent key file: {key} has mode 0644, readable by others "
                                               f"than its owner: chmod 600 {key}")


def test_a_data_dir_that_cannot_take_a_file_fails(tmp_path: Path, mosquitto, collector) -> None:
    config = write_config(tmp_path, broker_url=mosquitto.url)
    collector(tmp_path / "agent.key")
    (tmp_path / "data").write_text("a file where the folder should be")
    result = doctor(config)
    assert result.returncode == 1
    line = lines(result)[f"data_dir {tmp_path / 'data'}"]
    assert line.startswith(f"FAIL  data_dir {tmp_path / 'data'}: cannot write and fsync a file there (")
    assert line.endswith("): fix the path, its owner or the mount")


def test_an_unreachable_broker_exits_2_naming_it(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, broker_url=f"mqtt://127.0.0.1:{port}")
    result = doctor(config)
    assert result.returncode == 2
    assert lines(result)[f"broker login 127.0.0.1:{port}"] == (
        f"FAIL  broker login 127.0.0.1:{port}: MQTT broker 127.0.0.1:{port} is unreachable (Connection refused): "
        "start it or fix [mqtt] url")


def test_no_collector_means_no_clock_check(tmp_path: Path, mosquitto) -> None:
    config = write_config(tmp_path, broker_url=mosquitto.url)
    result = doctor(config)
    assert result.returncode == 2
    assert lines(result)["clock"] == "FAIL  clock: the collector did not tell its time: start it, then run doctor again"


def test_a_running_agent_is_not_disturbed(tmp_path: Path, mosquitto) -> None:
    from edge_agent.agent import lock_data_dir

    config = write_config(tmp_path, broker_url=mosquitto.url)
    (tmp_path / "data").mkdir()
    fd = lock_data_dir(tmp_path / "data")   # what a running `exam-edge run` holds
    try:
        result = doctor(config)
    finally:
        os.close(fd)
    assert result.returncode == 0
    assert lines(result)["broker login"].startswith("skip  broker login: exam-edge run holds the agent's broker "
                                                    "session")


def test_tls_and_login_against_the_production_broker_config(tmp_path: Path) -> None:
    """deploy/'s mosquitto: a wrong CA fails the TLS check, a wrong password the login, each with its line."""
    for tool in ("openssl", "mosquitto_passwd"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            _unavailable(tool)
    if mosquitto_binary() is None:
        _unavailable("mosquitto")
    ca = make_test_ca(tmp_path / "ca")
    other_ca = make_test_ca(tmp_path / "other-ca")
    broker = DeployBroker(workdir=tmp_path / "broker", ca=ca)
    broker.workdir.mkdir()
    password = secrets.token_urlsafe(16)
    add_password(broker.passwd, AGENT, password)
    broker.start()
    try:
        root = tmp_path / "edge"
        config = write_config(root, broker_url=f"mqtts://localhost:{broker.port}")
        (root / "mqtt.pass").write_text(password + "\n")

        base = config.read_text()

        def with_tls(ca_file: Path, password_file: Path) -> None:
            config.write_text(base.replace(f'username = "{AGENT}"\n', f'username = "{AGENT}"\npassword_file = '
                                           f'"{password_file}"\nca_file = "{ca_file}"\n', 1))

        with_tls(ca.ca_cert, root / "mqtt.pass")
        good = lines(doctor(config))
        assert good[f"TLS localhost:{broker.port}"].startswith(f"ok    TLS localhost:{broker.port}: certificate for "
                                                               "localhost accepted, valid until ")
        assert good[f"broker login localhost:{broker.port}"] == \
            f"ok    broker login localhost:{broker.port}: logged in as {AGENT}"

        with_tls(other_ca.ca_cert, root / "mqtt.pass")
        result = doctor(config)
        assert result.returncode == 2
        assert lines(result)[f"TLS localhost:{broker.port}"].startswith(
            f"FAIL  TLS localhost:{broker.port}: the broker's certificate is not accepted (")

        (root / "wrong.pass").write_text("not the password\n")
        with_tls(ca.ca_cert, root / "wrong.pass")
        result = doctor(config)
        assert result.returncode == 1
        assert lines(result)[f"broker login localhost:{broker.port}"] == (
            f"FAIL  broker login localhost:{broker.port}: MQTT broker localhost:{broker.port} refused the connection "
            "(Not authorized): check [mqtt] username and password_file (or cert_file/key_file)")
    finally:
        broker.stop()

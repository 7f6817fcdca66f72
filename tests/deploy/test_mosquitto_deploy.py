"""deploy/mosquitto/ on a real broker: TLS with a test CA, per-agent passwords, the topic rights of docs/protocol.md."""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from collector.config import load_config
from collector.db import make_engine
from collector.ingest import Ingest
from collector.service import CollectorService
from exam_contract.protocol import Reply
from exam_contract.topics import COLLECTOR_SUBSCRIPTION, DEFAULT_CHUNK_SIZE
from tests.conftest import _unavailable
from tests.support.deploy_broker import (DEPLOY, MOSQUITTO_DIR, DeployBroker, SyncClient, add_password,
                                         make_test_ca)
from tests.support.services import mosquitto_binary

pytestmark = pytest.mark.mosquitto

ACCOUNTS = ("agent-a", "agent-b", "collector-1", "collector-2", "jl2201001-01-a")
NOT_AUTHORIZED = 0x87


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[DeployBroker, dict[str, str]]]:
    for tool in ("openssl", "mosquitto_passwd"):
        if shutil.which(tool) is None:
            _unavailable(tool)
    if mosquitto_binary() is None:
        _unavailable("mosquitto")
    ca = make_test_ca(tmp_path / "ca")
    instance = DeployBroker(workdir=tmp_path / "broker", ca=ca)
    instance.workdir.mkdir()
    passwords = {name: secrets.token_urlsafe(16) for name in ACCOUNTS}
    for name, password in passwords.items():
        add_password(instance.passwd, name, password)
    instance.start()
    yield instance, passwords
    instance.stop()


def _client(broker: tuple[DeployBroker, dict[str, str]], name: str) -> SyncClient:
    instance, passwords = broker
    client = SyncClient(instance, name, passwords[name])
    code = client.connect()
    assert not code.is_failure, f"{name} refused: {code}"
    return client


def _next(client: SyncClient) -> tuple[str, bytes]:
    return client.messages.get(timeout=10)


def _status_until(client: SyncClient, state: str) -> dict:
    """The next status message of that state (repeats of the previous state may come first)."""
    while True:
        topic, payload = _next(client)
        assert topic == "exam/v1/jl2201001-01-a/status"
        body = json.loads(payload)
        if body["state"] == state:
            return body


def test_agent_cannot_publish_under_another_agents_topics(broker):
    collector = _client(broker, "collector-1")
    agent_a = _client(broker, "agent-a")
    try:
        assert not collector.subscribe(COLLECTOR_SUBSCRIPTION)[0].is_failure
        assert not collector.subscribe("exam/v1/+/status")[0].is_failure
        for topic in ("exam/v1/agent-b/seg/cam-1/init", "exam/v1/agent-b/seg/cam-1/chunk/0",
                      "exam/v1/agent-b/status", "exam/v1/agent-b/reply", "exam/v1/agent-a/reply",
                      "exam/v1/alerts/fake"):
            assert agent_a.publish(topic, b"forged") == NOT_AUTHORIZED, topic
        # Its own topics work, and the collector sees those first: the forged ones were never routed.
        assert not agent_a.publish("exam/v1/agent-a/seg/cam-1/init", b"mine").is_failure
        assert _next(collector) == ("exam/v1/agent-a/seg/cam-1/init", b"mine")
        assert not agent_a.publish("exam/v1/agent-a/status", b"online").is_failure
        assert _next(collector) == ("exam/v1/agent-a/status", b"online")
    finally:
        collector.close()
        agent_a.close()


def test_agent_cannot_read_another_agents_replies_or_uploads(broker):
    collector = _client(broker, "collector-1")
    agent_a = _client(broker, "agent-a")
    agent_b = _client(broker, "agent-b")
    try:
        collector.subscribe(COLLECTOR_SUBSCRIPTION)
        # Mosquitto grants a denied subscription but never delivers on it.
        for topic in ("exam/v1/agent-b/reply", "exam/v1/+/reply", "exam/v1/#", COLLECTOR_SUBSCRIPTION):
            agent_a.subscribe(topic)
        agent_b.subscribe("exam/v1/agent-b/reply")
        assert not agent_b.publish("exam/v1/agent-b/seg/cam-9/init", b"b-upload").is_failure
        assert _next(collector) == ("exam/v1/agent-b/seg/cam-9/init", b"b-upload")
        assert not collector.publish("exam/v1/agent-b/reply", b"for-b").is_failure
        assert _next(agent_b) == ("exam/v1/agent-b/reply", b"for-b")
        assert not collector.publish("exam/v1/agent-a/reply", b"for-a").is_failure
        # agent-a's own reply arrives (once per matching subscription); nothing of agent-b's came before it.
        received = [_next(agent_a)]
        while True:
            try:
                received.append(agent_a.messages.get(timeout=0.5))
            except queue.Empty:
                break
        assert received and all(item == ("exam/v1/agent-a/reply", b"for-a") for item in received), received
    finally:
        for client in (collector, agent_a, agent_b):
            client.close()


def test_anonymous_and_wrong_password_are_refused(broker):
    instance, passwords = broker
    anonymous = SyncClient(instance, None, None, client_id="anonymous")
    code = anonymous.connect()
    anonymous.close()
    assert code.is_failure and code.value in (0x86, 0x87), code
    wrong = SyncClient(instance, "agent-a", passwords["agent-b"], client_id="agent-a")
    code = wrong.connect()
    wrong.close()
    assert code.is_failure and code.value in (0x86, 0x87), code


def test_tls_listener_rejects_a_client_that_does_not_trust_its_ca(broker, tmp_path):
    instance, passwords = broker
    other = make_test_ca(tmp_path / "other-ca")
    client = SyncClient(instance, "agent-a", passwords["agent-a"], ca_file=other.ca_cert)
    with pytest.raises(ssl.SSLError):
        client.client.connect("127.0.0.1", instance.port)


def test_chunk_size_fits_max_packet_size_and_oversize_is_cut_off(broker):
    agent_a = _client(broker, "agent-a")
    disconnected: queue.Queue = queue.Queue()
    agent_a.client.on_disconnect = lambda c, u, f, rc, p: disconnected.put(rc)
    try:
        assert not agent_a.publish("exam/v1/agent-a/seg/cam-1/chunk/0", b"x" * DEFAULT_CHUNK_SIZE).is_failure
        agent_a.client.publish("exam/v1/agent-a/seg/cam-1/chunk/1", b"x" * (600 * 1024), qos=1)
        assert disconnected.get(timeout=10) is not None
    finally:
        agent_a.close()


def test_edge_agent_connects_over_tls_and_its_status_is_retained(broker, tmp_path):
    """The edge uploader with an mqtts:// config, ca_file and password_file, as a venue would run it;
    its retained status goes offline by last will when the link drops, and on a clean stop."""
    from edge_agent.config import load_config
    from edge_agent.spool import Journal
    from edge_agent.uploader import Uploader
    from exam_contract.signing import generate_private_key

    instance, passwords = broker
    (tmp_path / "mqtt.pass").write_text(passwords["jl2201001-01-a"] + "\n")
    generate_private_key(tmp_path / "agent.key")
    config_path = tmp_path / "edge.toml"
    config_path.write_text(
        '[agent]\nid = "jl2201001-01-a"\ninstitution = "JL2201001"\nvenue = "JL2201001-01"\n'
        f'data_dir = "{tmp_path / "data"}"\nkey_file = "{tmp_path / "agent.key"}"\n'
        f'[mqtt]\nurl = "mqtts://localhost:{instance.port}"\nusername = "jl2201001-01-a"\n'
        f'password_file = "{tmp_path / "mqtt.pass"}"\nca_file = "{instance.ca.ca_cert}"\n')
    config = load_config(config_path)
    journal = Journal(config.agent.journal_path)
    uploader = Uploader(config, journal)
    watcher = _client(broker, "collector-1")
    try:
        watcher.subscribe("exam/v1/+/status")
        uploader.connect()
        assert _status_until(watcher, "online")["agent"] == "jl2201001-01-a"
        # The link drops without a DISCONNECT: the broker publishes the last will, then paho reconnects.
        uploader.client.socket().shutdown(socket.SHUT_RDWR)
        assert _status_until(watcher, "offline") == {"agent": "jl2201001-01-a", "state": "offline"}
        assert _status_until(watcher, "online")["agent"] == "jl2201001-01-a"
        uploader.stop()
        assert _status_until(watcher, "offline")["state"] == "offline"
    finally:
        watcher.close()
        journal.close()


def test_add_agent_script_enrols_the_key_and_creates_a_working_broker_account(broker, tmp_path):
    from exam_contract.signing import generate_private_key, public_key_b64
    from tests.support.pipeline import BIN, run_cli

    instance, _ = broker
    collector_config = tmp_path / "collector.toml"
    run_cli("exam-collector", "--config", str(collector_config), "init", "--data-dir", str(tmp_path / "collector"))
    run_cli("exam-collector", "--config", str(collector_config), "db", "upgrade")
    pubkey = public_key_b64(generate_private_key(tmp_path / "venue.key"))
    password_out = tmp_path / "venue.mqtt.pass"
    args = [str(DEPLOY / "add-agent.sh"), "--agent", "jl2201001-02-a", "--venue", "JL2201001-02",
            "--institution", "JL2201001", "--pubkey", pubkey, "--collector-config", str(collector_config), "--passwd-file", str(instance.passwd),
            "--password-out", str(password_out), "--reload-cmd", f"kill -HUP {instance.process.pid}"]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert password_out.stat().st_mode & 0o777 == 0o600
    again = run_cli("exam-collector", "--config", str(collector_config), "enroll", "--agent", "jl2201001-02-a",
                    "--venue", "JL2201001-02", "--institution", "JL2201001", "--pubkey", pubkey)
    assert "already enrolled" in again.stdout
    # mosquitto re-reads the password file when it handles the SIGHUP; wait for that, then log in.
    deadline = time.monotonic() + 15
    while True:
        client = SyncClient(instance, "jl2201001-02-a", password_out.read_text().strip())
        code = client.connect()
        client.close()
        if not code.is_failure or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not code.is_failure, code
    duplicate = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert duplicate.returncode == 1 and "already has a broker account" in duplicate.stderr
    bad = subprocess.run([*args[:2], "bad/id", *args[3:]], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "--agent 'bad/id'" in bad.stderr


def test_client_certificate_listener_uses_the_cn_as_agent_id(tmp_path):
    """The config's optional client-certificate listener: the certificate's CN is the username the ACL sees."""
    from tests.support.deploy_broker import make_client_cert
    from tests.support.services import free_port

    for tool in ("openssl", "mosquitto_passwd"):
        if shutil.which(tool) is None:
            _unavailable(tool)
    ca = make_test_ca(tmp_path / "ca")
    instance = DeployBroker(workdir=tmp_path / "broker", ca=ca, cert_port=free_port())
    instance.workdir.mkdir()
    add_password(instance.passwd, "collector-1", "collector-secret")
    instance.start()
    try:
        collector = SyncClient(instance, "collector-1", "collector-secret")
        assert not collector.connect().is_failure
        collector.subscribe(COLLECTOR_SUBSCRIPTION)
        agent = SyncClient(instance, None, None, client_id="agent-a",
                           client_cert=make_client_cert(ca, tmp_path / "clients", "agent-a"))
        assert not agent.connect().is_failure
        assert agent.publish("exam/v1/agent-b/seg/cam-1/init", b"forged") == NOT_AUTHORIZED
        assert not agent.publish("exam/v1/agent-a/seg/cam-1/init", b"mine").is_failure
        assert _next(collector) == ("exam/v1/agent-a/seg/cam-1/init", b"mine")
        agent.close()
        collector.close()
        # Without a certificate that listener does not even finish the TLS handshake.
        context = ssl.create_default_context(cafile=str(ca.ca_cert))
        with socket.create_connection(("127.0.0.1", instance.cert_port), timeout=10) as raw:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(bytes([0x10, 0x00]))  # the start of a CONNECT
                    if not tls.recv(1):
                        raise ConnectionError("the broker closed the connection")
    finally:
        instance.stop()


def _stays_connected(**clients: SyncClient) -> None:
    """No disconnect and no reconnect (paho reconnects by itself, so a lost session shows as both)."""
    for name, client in clients.items():
        assert client.disconnects.empty() and client.connack.empty(), f"{name} lost its connection"


def test_another_account_cannot_take_over_an_agents_or_a_collectors_session(broker):
    """use_username_as_clientid: agent-b connecting with agent-a's or a collector's client id keeps its own
    session. The collector here sends its pre-fix default id; with the binding its session is `collector-1`
    whatever id it sends, so both are tried."""
    instance, passwords = broker
    collector = SyncClient(instance, "collector-1", passwords["collector-1"], client_id="exam-collector-collector-1")
    assert not collector.connect().is_failure
    agent_a = _client(broker, "agent-a")
    try:
        assert not collector.subscribe(COLLECTOR_SUBSCRIPTION)[0].is_failure
        assert not agent_a.subscribe("exam/v1/agent-a/reply")[0].is_failure
        for stolen in ("agent-a", "exam-collector-collector-1", "collector-1"):
            intruder = SyncClient(instance, "agent-b", passwords["agent-b"], client_id=stolen)
            try:
                assert not intruder.connect().is_failure
                # A PUBACK to each after the intruder's CONNACK: a taken-over session is ended before that
                # CONNACK, and paho reports the disconnect before it reconnects and completes anything else.
                assert not agent_a.publish("exam/v1/agent-a/seg/cam-1-1/init", stolen.encode()).is_failure
                assert not collector.publish("exam/v1/agent-a/reply", stolen.encode()).is_failure
                _stays_connected(agent_a=agent_a, collector=collector)
                assert _next(collector) == ("exam/v1/agent-a/seg/cam-1-1/init", stolen.encode())
                assert _next(agent_a) == ("exam/v1/agent-a/reply", stolen.encode())
            finally:
                intruder.close()
    finally:
        collector.close()
        agent_a.close()


def test_client_ids_are_bound_to_accounts_across_both_listeners(tmp_path):
    """Client ids are one namespace across listeners: neither a password account may take a certificate
    agent's session, nor a certificate agent a password account's (the optional listener keeps the setting)."""
    from tests.support.deploy_broker import make_client_cert
    from tests.support.services import free_port

    if shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None or mosquitto_binary() is None:
        _unavailable("openssl, mosquitto_passwd or mosquitto")
    ca = make_test_ca(tmp_path / "ca")
    instance = DeployBroker(workdir=tmp_path / "broker", ca=ca, cert_port=free_port())
    instance.workdir.mkdir()
    add_password(instance.passwd, "collector-1", "collector-secret")
    add_password(instance.passwd, "agent-b", "agent-b-secret")
    instance.start()
    collector = SyncClient(instance, "collector-1", "collector-secret")
    agent_a = SyncClient(instance, None, None, client_id="agent-a",
                         client_cert=make_client_cert(ca, tmp_path / "clients", "agent-a"))
    intruders = [SyncClient(instance, "agent-b", "agent-b-secret", client_id="agent-a"),
                 SyncClient(instance, None, None, client_id="collector-1",
                            client_cert=make_client_cert(ca, tmp_path / "clients", "agent-b"))]
    try:
        assert not collector.connect().is_failure and not agent_a.connect().is_failure
        collector.subscribe(COLLECTOR_SUBSCRIPTION)
        agent_a.subscribe("exam/v1/agent-a/reply")
        for number, intruder in enumerate(intruders):
            assert not intruder.connect().is_failure
            payload = f"round {number}".encode()
            assert not agent_a.publish("exam/v1/agent-a/seg/cam-1-1/init", payload).is_failure
            assert not collector.publish("exam/v1/agent-a/reply", payload).is_failure
            _stays_connected(agent_a=agent_a, collector=collector)
            assert _next(collector) == ("exam/v1/agent-a/seg/cam-1-1/init", payload)
            assert _next(agent_a) == ("exam/v1/agent-a/reply", payload)
    finally:
        for client in (collector, agent_a, *intruders):
            client.close()
        instance.stop()


def test_chain_schedule_and_audit_checkpoint_rights(broker):
    collector = _client(broker, "collector-1")
    watcher = _client(broker, "collector-2")
    agent_a = _client(broker, "agent-a")
    agent_b = _client(broker, "agent-b")
    try:
        collector.subscribe("$share/collectors/exam/v1/+/chain/request")
        watcher.subscribe("exam/v1/+/chain/request")
        agent_a.subscribe("exam/v1/agent-a/chain")
        agent_a.subscribe("exam/v1/agent-a/schedule")
        for topic in ("exam/v1/agent-a/chain", "exam/v1/agent-a/schedule", "exam/v1/agent-b/chain"):
            agent_b.subscribe(topic)  # agent-a's are granted but deliver nothing
        for topic in ("exam/v1/agent-b/chain/request", "exam/v1/agent-a/chain", "exam/v1/agent-b/chain",
                      "exam/v1/agent-a/schedule", "exam/v1/audit/checkpoint"):
            assert agent_a.publish(topic, b"forged") == NOT_AUTHORIZED, topic
        assert agent_a.publish("exam/v1/audit/checkpoint", b"forged", retain=True) == NOT_AUTHORIZED

        assert not agent_a.publish("exam/v1/agent-a/chain/request", b"heads?").is_failure
        assert _next(collector) == ("exam/v1/agent-a/chain/request", b"heads?")
        assert _next(watcher) == ("exam/v1/agent-a/chain/request", b"heads?")
        assert not collector.publish("exam/v1/agent-a/chain", b"a-heads").is_failure
        assert not collector.publish("exam/v1/agent-a/schedule", b"a-plan").is_failure
        assert not collector.publish("exam/v1/agent-b/chain", b"b-heads").is_failure
        assert _next(agent_a) == ("exam/v1/agent-a/chain", b"a-heads")
        assert _next(agent_a) == ("exam/v1/agent-a/schedule", b"a-plan")
        assert _next(agent_b) == ("exam/v1/agent-b/chain", b"b-heads")  # nothing of agent-a's came first
        assert not collector.publish("exam/v1/audit/checkpoint", b"signed", retain=True).is_failure
        assert not watcher.publish("exam/v1/audit/checkpoint", b"signed", retain=True).is_failure
    finally:
        for client in (collector, watcher, agent_a, agent_b):
            client.close()


def test_every_collector_account_in_the_acl_has_the_same_rights():
    """The ACL's collector block is repeated per instance (one broker account each); the copies must agree."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in (MOSQUITTO_DIR / "acl").read_text().splitlines():
        words = line.split()
        if not words or line.startswith("#"):
            continue
        if words[0] == "user":
            current = blocks.setdefault(words[1], [])
        elif words[0] == "pattern":
            current = None
        elif current is not None:
            current.append(" ".join(words))
    assert sorted(blocks) == [f"collector-{n}" for n in range(1, len(blocks) + 1)] and len(blocks) >= 2, blocks
    assert all(rights == blocks["collector-1"] for rights in blocks.values()), blocks


class RecordingIngest(Ingest):
    """What reaches ingest, in order; stores nothing."""

    def __init__(self, engine, storage_dir: Path) -> None:  # noqa: ANN001
        super().__init__(engine, storage_dir)
        self.calls: queue.Queue[tuple[str, str, str, bytes]] = queue.Queue()

    def on_init(self, agent: str, file_id: str, payload: bytes) -> Reply | None:
        self.calls.put(("init", agent, file_id, payload))
        return None

    def on_chunk(self, agent: str, file_id: str, index: int, payload: bytes) -> None:
        self.calls.put((f"chunk/{index}", agent, file_id, payload))

    def on_fin(self, agent: str, file_id: str) -> Reply | None:
        self.calls.put(("fin", agent, file_id, b""))
        return None


@contextmanager
def _collector_service(broker, directory: Path, name: str) -> Iterator[tuple[CollectorService, RecordingIngest]]:
    """A CollectorService on the deploy broker with a config as an operator writes it (no client_id)."""
    from exam_contract.signing import generate_private_key

    instance, passwords = broker
    directory.mkdir()
    (directory / "mqtt.pass").write_text(passwords[name] + "\n")
    generate_private_key(directory / "collector.key")
    (directory / "collector.toml").write_text(
        f'[collector]\ndata_dir = "{directory}"\n[mqtt]\nurl = "mqtts://127.0.0.1:{instance.port}"\n'
        f'username = "{name}"\npassword_file = "{directory / "mqtt.pass"}"\nca_file = "{instance.ca.ca_cert}"\n')
    config = load_config(directory / "collector.toml")
    engine = make_engine(f"sqlite:///{directory / 'collector.db'}")
    ingest = RecordingIngest(engine, config.storage_dir)
    service = CollectorService(config.mqtt, ingest, workers=1, queue_size=100)
    try:
        service.start()
        assert service.connected.wait(10), "the collector did not subscribe"
        yield service, ingest
    finally:
        service.shutdown()
        engine.dispose()


def _not_retained(broker, agent_a: SyncClient, topic: str) -> None:
    """A new subscription to `topic` gets no retained message: the broker would hand it over right after the
    SUBACK, before agent-a's status message published afterwards."""
    fresh = _client(broker, "collector-1")
    try:
        fresh.subscribe(topic)
        fresh.subscribe("exam/v1/agent-a/status")
        assert not agent_a.publish("exam/v1/agent-a/status", b"control").is_failure
        assert _next(fresh) == ("exam/v1/agent-a/status", b"control")
    finally:
        fresh.close()


def test_a_retained_upload_message_is_ingested_and_cleared_by_the_collector(broker, tmp_path, caplog):
    """Mosquitto cannot refuse retain per topic: the collector deletes what an agent leaves retained under seg/
    (an empty retained publish), and does not take that deletion for data."""
    topic = "exam/v1/agent-a/seg/cam-1-1/init"
    agent_a = _client(broker, "agent-a")
    watcher = _client(broker, "collector-1")
    try:
        with caplog.at_level("WARNING", logger="collector.service"), \
                _collector_service(broker, tmp_path / "collector", "collector-2") as (service, ingest):
            watcher.subscribe(topic)
            assert not agent_a.publish(topic, b"left-retained", retain=True).is_failure
            assert _next(watcher) == (topic, b"left-retained")
            # The clear goes through the broker, which deletes the retained copy before it forwards it.
            assert _next(watcher) == (topic, b"")
            assert ingest.calls.get(timeout=10) == ("init", "agent-a", "cam-1-1", b"left-retained")
            # The clear reached the collector too, before this; the next thing ingested is this chunk.
            assert not agent_a.publish("exam/v1/agent-a/seg/cam-1-1/chunk/0", b"control").is_failure
            assert ingest.calls.get(timeout=10) == ("chunk/0", "agent-a", "cam-1-1", b"control")
            assert f"agent agent-a left a retained message on {topic}; cleared it on 127.0.0.1:" in caplog.text
        watcher.close()
        _not_retained(broker, agent_a, topic)
    finally:
        watcher.close()
        agent_a.close()


def test_a_message_left_retained_while_no_collector_was_connected_is_cleared_when_one_connects(broker, tmp_path):
    topic = "exam/v1/agent-a/seg/cam-1-2/chunk/0"
    agent_a = _client(broker, "agent-a")
    watcher = _client(broker, "collector-1")
    try:
        watcher.subscribe(topic)
        assert not agent_a.publish(topic, b"left-retained", retain=True).is_failure
        assert _next(watcher) == (topic, b"left-retained")
        watcher.subscribe(topic)  # subscribing again hands over the retained copy
        assert _next(watcher) == (topic, b"left-retained")
        with _collector_service(broker, tmp_path / "collector", "collector-2") as (service, ingest):
            assert _next(watcher) == (topic, b"")
            # Cleared only, not ingested: it was no live upload, and the deletion is no data either.
            assert not agent_a.publish("exam/v1/agent-a/seg/cam-1-2/chunk/1", b"control").is_failure
            assert ingest.calls.get(timeout=10) == ("chunk/1", "agent-a", "cam-1-2", b"control")
        watcher.close()
        _not_retained(broker, agent_a, topic)
    finally:
        watcher.close()
        agent_a.close()

"""deploy/mosquitto/ run for real: a test CA made with openssl, the production config with test paths and a
free port, password entries made with mosquitto_passwd, and a small synchronous MQTT 5 client."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt

from tests.support.services import free_port, wait_for_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MOSQUITTO_DIR = DEPLOY / "mosquitto"


@dataclass(frozen=True)
class TestCA:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_test_ca(directory: Path, hosts: tuple[str, ...] = ("DNS:localhost", "IP:127.0.0.1")) -> TestCA:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost (EC P-256, 2 days)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text(f"subjectAltName={','.join(hosts)}\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_crt), "-days", "2",
            "-subj", "/CN=exam-footage test CA")
    openssl("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(crt), "-days", "2", "-extfile", str(ext))
    return TestCA(ca_cert=ca_crt, server_cert=crt, server_key=key)


def add_password(passwd_file: Path, username: str, password: str) -> None:
    args = ["mosquitto_passwd", "-b"]
    if not passwd_file.exists():
        args.append("-c")
    subprocess.run([*args, str(passwd_file), username, password], check=True, capture_output=True)


def enable_client_cert_listener(text: str) -> str:
    """Uncomment the config's optional client-certificate listener block, as an operator enabling it would."""
    lines, out, inside = text.splitlines(), [], False
    for line in lines:
        if line.startswith("#listener "):
            inside = True
        if inside and line.startswith("#") and not line.startswith("# "):
            out.append(line[1:])
            continue
        inside = False
        out.append(line)
    return "\n".join(out) + "\n"


def adapt_config(text: str, replacements: dict[str, str], ports: list[int]) -> str:
    """The production config with its file paths replaced and its TLS listeners moved to 127.0.0.1 on
    `ports` (in order). Every directive in `replacements` must be present, so a renamed key in deploy/
    breaks the test."""
    out, seen, free = [], set(), list(ports)
    for line in text.splitlines():
        words = line.split(None, 1)
        key = words[0] if words and not line.lstrip().startswith("#") else None
        if key == "listener":
            if not free:
                raise AssertionError("deploy/mosquitto/mosquitto.conf has more listeners than the test expects")
            out.append(f"listener {free.pop(0)} 127.0.0.1")
            seen.add(key)
        elif key in replacements:
            out.append(f"{key} {replacements[key]}")
            seen.add(key)
        else:
            out.append(line)
    missing = ({"listener"} | set(replacements)) - seen
    if missing or free:
        raise AssertionError(f"deploy/mosquitto/mosquitto.conf lacks {sorted(missing) or 'a listener'}")
    # As root mosquitto switches to the `mosquitto` user, who cannot enter pytest's 0700 tmp folders.
    if os.geteuid() == 0:
        out.append("user root")
    return "\n".join(out) + "\n"


def make_client_cert(ca: TestCA, directory: Path, common_name: str) -> tuple[Path, Path]:
    """A client certificate whose CN is the agent id, signed by the test CA."""
    directory.mkdir(parents=True, exist_ok=True)
    key, csr, crt = directory / f"{common_name}.key", directory / f"{common_name}.csr", directory / f"{common_name}.crt"
    ext = directory / "client.ext"
    ext.write_text("extendedKeyUsage=clientAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    subprocess.run(["openssl", "req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={common_name}"],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca.ca_cert), "-CAkey",
                    str(ca.ca_cert.with_name("ca.key")), "-CAcreateserial", "-out", str(crt), "-days", "2",
                    "-extfile", str(ext)], check=True, capture_output=True)
    return crt, key


@dataclass
class DeployBroker:
    workdir: Path
    ca: TestCA
    port: int = field(default_factory=free_port)
    cert_port: int | None = None  # set: the optional client-certificate listener is enabled on it
    process: subprocess.Popen | None = None

    @property
    def passwd(self) -> Path:
        return self.workdir / "passwd"

    @property
    def log(self) -> Path:
        return self.workdir / "mosquitto.log"

    def start(self) -> None:
        acl = self.workdir / "acl"
        shutil.copyfile(MOSQUITTO_DIR / "acl", acl)
        (self.workdir / "persist").mkdir(exist_ok=True)
        config = self.workdir / "mosquitto.conf"
        text = (MOSQUITTO_DIR / "mosquitto.conf").read_text()
        if self.cert_port is not None:
            text = enable_client_cert_listener(text)
        config.write_text(adapt_config(text, {
            "password_file": str(self.passwd), "acl_file": str(acl),
            "persistence_location": f"{self.workdir}/persist/", "log_dest": f"file {self.log}",
            "cafile": str(self.ca.ca_cert), "certfile": str(self.ca.server_cert),
            "keyfile": str(self.ca.server_key)}, [self.port] + ([self.cert_port] if self.cert_port else [])))
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.process = subprocess.Popen([binary, "-c", str(config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        try:
            wait_for_port("127.0.0.1", self.port)
        except TimeoutError:
            self.process.kill()
            _, err = self.process.communicate()
            log = self.log.read_text() if self.log.exists() else ""
            raise AssertionError(f"mosquitto did not start: {err.decode()} {log}") from None

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


class SyncClient:
    """A paho MQTT 5 client over TLS whose results (CONNACK, SUBACK, PUBACK reasons, messages, disconnects)
    tests await. paho reconnects by itself: a second CONNACK means the connection was lost meanwhile."""

    def __init__(self, broker: DeployBroker, username: str | None, password: str | None,
                 client_id: str | None = None, ca_file: Path | None = None,
                 client_cert: tuple[Path, Path] | None = None):
        self.broker = broker
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or (username or "anon"),
                                  protocol=mqtt.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.port = broker.port
        if client_cert is None:
            self.client.tls_set(ca_certs=str(ca_file or broker.ca.ca_cert))
        else:
            self.port = broker.cert_port
            self.client.tls_set(ca_certs=str(ca_file or broker.ca.ca_cert), certfile=str(client_cert[0]),
                                keyfile=str(client_cert[1]))
        self.connack: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.messages: queue.Queue = queue.Queue()
        self.disconnects: queue.Queue = queue.Queue()
        self._pubacks: dict[int, object] = {}
        self._puback_cv = threading.Condition()
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.put(rc)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put(rcs)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = lambda c, u, f, rc, p: self.disconnects.put(rc)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._puback_cv:
            self._pubacks[mid] = reason_code
            self._puback_cv.notify_all()

    def connect(self, timeout: float = 10):
        """Returns the CONNACK reason code."""
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        return self.connack.get(timeout=timeout)

    def subscribe(self, topic: str, timeout: float = 10):
        self.client.subscribe(topic, qos=1)
        return self.subacks.get(timeout=timeout)

    def publish(self, topic: str, payload: bytes, retain: bool = False, timeout: float = 10):
        """Returns the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._puback_cv:
            if not self._puback_cv.wait_for(lambda: info.mid in self._pubacks, timeout):
                raise TimeoutError(f"no PUBACK for {topic}")
            return self._pubacks.pop(info.mid)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

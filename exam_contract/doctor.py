"""`doctor` checks both commands share: one line per check with the fix, and the exit code of the first failure.

Each check returns a `Check`; `exam-edge doctor` and `exam-collector doctor` run theirs in order (config first,
then what depends on it) and print `render(checks)`.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import stat
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from . import exitcodes
from .mqtt import BrokerError, BrokerRefused, BrokerUnreachable, MqttSettings, connect, make_client
from .signing import KeyFileError, key_fingerprint, load_private_key
from .tomlconfig import ConfigError

DOCTOR_TIMEOUT = 10.0


@dataclass(frozen=True)
class Check:
    name: str               # what was checked, e.g. "key file"
    ok: bool
    detail: str             # what was found; on a failure, what is wrong and the fix
    code: int = exitcodes.OK  # the exit code a failure stands for (INPUT, UNREACHABLE, INTEGRITY)
    skipped: bool = False   # not run (e.g. it would disturb a running service); not a failure
    warning: bool = False   # passed, but something needs attention soon (e.g. little free space); not a failure

    @classmethod
    def passed(cls, name: str, detail: str) -> Check:
        return cls(name, True, detail)

    @classmethod
    def failed(cls, name: str, detail: str, code: int = exitcodes.INPUT) -> Check:
        return cls(name, False, detail, code)

    @classmethod
    def skip(cls, name: str, detail: str) -> Check:
        return cls(name, True, detail, skipped=True)

    @classmethod
    def warn(cls, name: str, detail: str) -> Check:
        return cls(name, True, detail, warning=True)

    def line(self) -> str:
        mark = "skip" if self.skipped else "WARN" if self.warning else "ok" if self.ok else "FAIL"
        return f"{mark:<5} {self.name}: {self.detail}"


def render(checks: Sequence[Check]) -> str:
    return "\n".join(check.line() for check in checks)


def exit_code(checks: Sequence[Check]) -> int:
    """The code of the first failed check (checks run in dependency order), OK when none failed."""
    return next((check.code for check in checks if not check.ok), exitcodes.OK)


def check_key_file(path: Path, what: str) -> Check:
    """The signing key: readable, an Ed25519 PKCS#8 key, and private to its owner (no group or other bits)."""
    name = f"{what} key file"
    try:
        key = load_private_key(path)
    except KeyFileError as exc:
        return Check.failed(name, f"{exc}: fix the path in the config or create the key")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return Check.failed(name, f"{path} has mode {mode:04o}, readable by others than its owner: "
                                  f"chmod 600 {path}")
    return Check.passed(name, f"{path} (mode {mode:04o}, SHA-256 {key_fingerprint(key)})")


def check_folder(path: Path, what: str, min_free_bytes: int = 0) -> Check:
    """A folder the command writes to: it exists or can be made, takes a file that is written, fsynced and
    removed, and has at least `min_free_bytes` free."""
    name = f"{what} {path}"
    probe = path / f".doctor-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"exam-footage doctor")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
        usage = shutil.disk_usage(path)
    except OSError as exc:
        probe.unlink(missing_ok=True) if probe.parent.is_dir() else None
        return Check.failed(name, f"cannot write and fsync a file there ({exc.strerror or exc}): fix the path, "
                                  "its owner or the mount")
    free_mb = usage.free // 2**20
    if usage.free < min_free_bytes:
        return Check.failed(name, f"only {free_mb} MB free, below the {min_free_bytes // 2**20} MB the config asks "
                                  "for: free space or grow the volume")
    return Check.passed(name, f"writable, fsync works, {free_mb} MB free")


def check_tools(*tools: str) -> Check:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return Check.failed("tools", f"{', '.join(missing)} not on PATH: install ffmpeg (apt-get install ffmpeg)")
    return Check.passed("tools", ", ".join(f"{tool} {shutil.which(tool)}" for tool in tools))


def check_tls(settings: MqttSettings, timeout: float = DOCTOR_TIMEOUT) -> Check:
    """For mqtts://: the broker's certificate chains to the configured CA and names the host."""
    name = f"TLS {settings.address}"
    context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    if settings.cert_file is not None and settings.key_file is not None:
        context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    try:
        with socket.create_connection((settings.host, settings.port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=settings.host) as tls:
            cert = tls.getpeercert() or {}
    except ssl.SSLCertVerificationError as exc:
        return Check.failed(name, f"the broker's certificate is not accepted ({exc.verify_message}): give the CA "
                                  "that signed it in [mqtt] ca_file, and a certificate whose subjectAltName names "
                                  f"{settings.host}", exitcodes.UNREACHABLE)
    except (OSError, ssl.SSLError) as exc:
        return Check.failed(name, f"no TLS connection ({getattr(exc, 'strerror', None) or exc}): start the broker "
                                  "or fix [mqtt] url", exitcodes.UNREACHABLE)
    until = cert.get("notAfter", "?")
    return Check.passed(name, f"certificate for {settings.host} accepted, valid until {until}")


@dataclass
class BrokerSession:
    """A doctor's short connection: the client and when the broker answered."""

    client: mqtt.Client
    messages: list[tuple[str, bytes, float]]
    arrived: threading.Event

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def check_login(settings: MqttSettings, client_id: str, *, default_username: str | None = None,
                subscribe: Sequence[str] = (), timeout: float = DOCTOR_TIMEOUT) -> tuple[Check, BrokerSession | None]:
    """Log in to the broker (credentials, client id) with a session that ends at disconnect; the open session
    is returned for further checks (the caller closes it)."""
    name = f"broker login {settings.address}"
    try:
        client = make_client(settings, client_id, max_inflight=10, default_username=default_username)
    except ConfigError as exc:
        return Check.failed(name, str(exc)), None
    answered = threading.Event()
    result: dict[str, object] = {}
    session = BrokerSession(client, [], threading.Event())

    def on_connect(client: mqtt.Client, userdata: object, flags: object, reason_code: object,
                   properties: object) -> None:
        result["code"] = reason_code
        answered.set()
        for topic in subscribe:
            client.subscribe(topic, qos=1)

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        session.messages.append((message.topic, bytes(message.payload), time.time()))
        session.arrived.set()

    client.on_connect = on_connect
    client.on_message = on_message
    try:
        connect(client, settings, session_expiry=0)
    except BrokerError as exc:
        return Check.failed(name, str(exc), exitcodes.UNREACHABLE), None
    client.loop_start()
    if not answered.wait(timeout):
        session.close()
        return Check.failed(name, str(BrokerUnreachable.no_answer(settings.address, timeout)),
                            exitcodes.UNREACHABLE), None
    code = result["code"]
    if getattr(code, "is_failure", False):
        session.close()
        return Check.failed(name, str(BrokerRefused(settings.address, code)), exitcodes.INPUT), None  # type: ignore[arg-type]  # a paho ReasonCode
    user = settings.username or default_username or "(anonymous)"
    return Check.passed(name, f"logged in as {user}"), session


def check_clock(offset_seconds: float | None, limit_seconds: float, against: str) -> Check:
    """This machine's clock against another's (`offset` = theirs minus ours)."""
    if offset_seconds is None:
        return Check.failed("clock", f"{against} did not tell its time: start it, then run doctor again",
                            exitcodes.UNREACHABLE)
    if abs(offset_seconds) > limit_seconds:
        return Check.failed("clock", f"this machine's clock is {-offset_seconds:+.1f} s off {against}'s (more than "
                                     f"{limit_seconds:g} s): set up NTP (timedatectl set-ntp true)")
    return Check.passed("clock", f"{-offset_seconds:+.3f} s against {against} (within {limit_seconds:g} s)")


def first_failure_stops(steps: Sequence[Callable[[], Check]]) -> list[Check]:
    """Run checks in order until one fails (later ones depend on it)."""
    out: list[Check] = []
    for step in steps:
        check = step()
        out.append(check)
        if not check.ok:
            break
    return out

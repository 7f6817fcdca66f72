"""The MQTT side both commands share: `[mqtt]` settings, the paho client they connect with, broker errors.

The edge agent and the collector read the same `[mqtt]` table (the collector adds `client_id`; the edge checks
its files at load, since it records before it connects) and connect the same way: MQTT 5, a persistent
session, username/password and TLS from the settings. Either side's failure to use its broker is a
`BrokerError` whose message names host:port and the fix.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from . import tomlconfig as toml
from .tomlconfig import ConfigError

KEEPALIVE_SECONDS = 30
RECONNECT_MAX_DELAY = 5  # a venue uplink or a broker back after an outage is used within this many seconds
FILE_KEYS: tuple[str, ...] = ("password_file", "cert_file", "key_file", "ca_file")
TLS_FILE_KEYS: tuple[str, ...] = ("cert_file", "key_file", "ca_file")


class PasswordFileError(ConfigError):
    """`[mqtt] password_file` cannot be read; the message names the file, why and the fix."""

    def __init__(self, path: Path, reason: str, fix: str) -> None:
        super().__init__(f"[mqtt] password_file = {str(path)!r} cannot be read ({reason}): {fix}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class MqttSettings:
    """The `[mqtt]` table of either config."""

    url: str
    host: str
    port: int
    tls: bool
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    client_id: str | None = None  # the collector's; an agent connects as its agent id

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def password(self) -> str | None:
        """The password in password_file (None without one); raises PasswordFileError when it cannot be read."""
        if self.password_file is None:
            return None
        try:
            return self.password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise PasswordFileError(self.password_file, exc.strerror or str(exc),
                                    "create it or fix the path") from exc
        except UnicodeDecodeError as exc:
            raise PasswordFileError(self.password_file, "not UTF-8 text",
                                    "save the password in it as UTF-8 text") from exc


def parse_mqtt_table(table: dict[str, Any], base: Path, *, files_must_exist: bool,
                     default_client_id: Callable[[str | None], str] | None = None) -> MqttSettings:
    """`[mqtt]` as both configs read it; relative paths are taken from `base` (the config file's folder).

    `files_must_exist`: the files are checked now rather than at connect time (the edge agent's rule).
    `default_client_id`: given the username, the client id when `client_id` is unset; without it (the edge
    agent's case), `client_id` is not a known key."""
    known = {"url", "username", *FILE_KEYS} | ({"client_id"} if default_client_id is not None else set())
    toml.unknown_keys(table, "mqtt", known)
    url = toml.string(table, "mqtt", "url", required=True)
    assert url is not None
    host, port, tls = toml.mqtt_url(url)
    files: dict[str, Path | None] = {}
    for key in FILE_KEYS:
        found = toml.path(table, "mqtt", key, base, required=False)
        files[key] = found.resolve() if found is not None else None
        if files_must_exist and found is not None and not found.is_file():
            raise ConfigError(f"[mqtt] {key} = {str(found)!r} does not exist: create it or fix the path")
    if (files["cert_file"] is None) != (files["key_file"] is None):
        raise ConfigError("[mqtt] cert_file and key_file must be set together: add the missing one")
    if not tls and any(files[key] for key in TLS_FILE_KEYS):
        raise ConfigError(f"[mqtt] url = {url!r} is plain mqtt:// but TLS files are set: use mqtts:// "
                          "or remove cert_file/key_file/ca_file")
    username = toml.string(table, "mqtt", "username", required=False)
    client_id = None
    if default_client_id is not None:
        client_id = toml.string(table, "mqtt", "client_id", required=False) or default_client_id(username)
    return MqttSettings(url=url, host=host, port=port, tls=tls, username=username, client_id=client_id, **files)


class BrokerError(Exception):
    """The MQTT broker at `address` (host:port) cannot be used. `reason_code` is the broker's answer and
    `cause` the local error, where known; str() names the broker, what happened and `fix`."""

    fix = "start it or fix [mqtt] url"

    def __init__(self, address: str, what: str, *, reason_code: ReasonCode | None = None,
                 cause: BaseException | None = None) -> None:
        super().__init__(address, what)
        self.address = address
        self.what = what
        self.reason_code = reason_code
        self.cause = cause

    def __str__(self) -> str:
        return f"MQTT broker {self.address} {self.what}: {self.fix}"


class BrokerUnreachable(BrokerError):
    """Nothing usable answers at host:port: no connection, a failed TLS handshake, or no CONNACK in time."""

    @classmethod
    def from_error(cls, address: str, exc: OSError | ValueError) -> BrokerUnreachable:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return cls(address, f"is unreachable ({reason})", cause=exc)

    @classmethod
    def no_answer(cls, address: str, seconds: float) -> BrokerUnreachable:
        return cls(address, f"did not answer within {seconds:.0f} s")


class BrokerRefused(BrokerError):
    """The broker answered the CONNECT with a failure (credentials, client id)."""

    fix = "check [mqtt] username and password_file (or cert_file/key_file)"

    def __init__(self, address: str, reason_code: ReasonCode) -> None:
        super().__init__(address, f"refused the connection ({reason_code})", reason_code=reason_code)


def make_client(settings: MqttSettings, client_id: str, *, max_inflight: int,
                default_username: str | None = None) -> mqtt.Client:
    """A paho MQTT 5 client with the settings' credentials and TLS, reconnecting 1 to RECONNECT_MAX_DELAY s
    apart; the caller adds its callbacks (and a will) before `connect`. `default_username` is the username
    when [mqtt] sets none but a password_file (an agent's broker account is its id). Raises
    PasswordFileError when the password file cannot be read."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    password = settings.password()
    username = settings.username or (default_username if password is not None else None)
    if username is not None:
        client.username_pw_set(username, password)
    if settings.tls:
        client.tls_set(ca_certs=str(settings.ca_file) if settings.ca_file else None,
                       certfile=str(settings.cert_file) if settings.cert_file else None,
                       keyfile=str(settings.key_file) if settings.key_file else None,
                       tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.reconnect_delay_set(min_delay=1, max_delay=RECONNECT_MAX_DELAY)
    client.max_inflight_messages_set(max_inflight)
    return client


def _session(expiry_seconds: int) -> Properties:
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = expiry_seconds
    return properties


def connect(client: mqtt.Client, settings: MqttSettings, session_expiry: int) -> None:
    """Open the connection with a session the broker keeps `session_expiry` seconds (the CONNACK arrives at
    `on_connect` once the network loop runs); raises BrokerUnreachable naming host:port."""
    try:
        client.connect(settings.host, settings.port, keepalive=KEEPALIVE_SECONDS, clean_start=False,
                       properties=_session(session_expiry))
    except (OSError, ValueError) as exc:
        raise BrokerUnreachable.from_error(settings.address, exc) from exc


def connect_in_background(client: mqtt.Client, settings: MqttSettings, session_expiry: int) -> None:
    """Like `connect`, but never raises: starts the network loop, which keeps trying until the broker answers."""
    client.connect_async(settings.host, settings.port, keepalive=KEEPALIVE_SECONDS, clean_start=False,
                         properties=_session(session_expiry))
    client.loop_start()

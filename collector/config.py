"""Collector TOML config (every key in docs/config.md) as frozen dataclasses."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from exam_contract import tomlconfig as toml
from exam_contract.mqtt import MqttSettings, parse_mqtt_table
from exam_contract.tomlconfig import ConfigError

from .admission import KIB, MIB, IngestLimits


MqttConfig = MqttSettings  # the name tests and older code use


@dataclass(frozen=True)
class HttpConfig:
    listen: str = "127.0.0.1:8080"
    export_keep_hours: int = 72  # evidence packages made over HTTP are removed from data_dir/exports after this
    cert_file: Path | None = None  # PEM certificate (chain): serve HTTPS with uvicorn's own TLS
    key_file: Path | None = None   # its private key (may be left out when cert_file holds it too)
    behind_tls_proxy: bool = False  # a TLS proxy on this host forwards to `listen`: cookies are Secure anyway
    login_failures_per_account: int = 5   # failed logins of one user name within login_window_seconds ...
    login_failures_per_address: int = 20  # ... or from one client address, before logins answer 429
    login_window_seconds: int = 300

    @property
    def tls(self) -> bool:
        """uvicorn itself serves HTTPS."""
        return self.cert_file is not None

    @property
    def https(self) -> bool:
        """Browsers reach the portal over HTTPS (uvicorn's TLS or a proxy's): Secure cookies, HSTS."""
        return self.tls or self.behind_tls_proxy


@dataclass(frozen=True)
class CoverageConfig:
    pre_margin_minutes: int = 15
    post_margin_minutes: int = 15
    gap_tolerance_seconds: float = 2


@dataclass(frozen=True)
class AlertsConfig:
    """Live coverage alerts while a batch part runs (issue 4)."""

    webhook_url: str | None = None
    interval_seconds: float = 5.0


@dataclass(frozen=True)
class RetentionConfig:
    margin_days: int = 7
    unlinked_retention_days: int | None = None


STORAGE_BACKENDS = ("filesystem", "s3")
S3_ADDRESSING = ("path", "virtual")


@dataclass(frozen=True)
class StorageConfig:
    """[storage]: where stored footage lives (docs/storage.md). "filesystem": files under [collector]
    storage_dir; "s3": an S3 bucket with Object Lock. Staging stays in storage_dir/staging either way. The S3
    secret is never in the config: it comes from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or from
    `credentials_file` (mode 0600), read when the store is opened."""

    backend: str = "filesystem"
    endpoint: str | None = None
    bucket: str | None = None
    region: str = "us-east-1"
    addressing: str = "path"
    credentials_file: Path | None = None
    ca_file: Path | None = None
    longest_exam_day_hours: float = 24.0


@dataclass(frozen=True)
class CollectorConfig:
    data_dir: Path
    database_url: str
    storage_dir: Path
    key_file: Path
    mqtt: MqttSettings
    http: HttpConfig
    coverage: CoverageConfig
    retention: RetentionConfig
    workers: int = 2
    finishers: int = 2
    queue_size: int = 2000
    source: Path | None = None
    staging_ttl_hours: float = 48.0  # abandoned transfers' staging is removed after this (issue 3)
    alerts: AlertsConfig = AlertsConfig()
    ingest: IngestLimits = IngestLimits()
    storage: StorageConfig = StorageConfig()

    @property
    def staging_dir(self) -> Path:
        return self.storage_dir / "staging"


parse_mqtt_url = toml.mqtt_url


def load_config(path: Path | str) -> CollectorConfig:
    path = Path(path)
    raw = toml.load_file(path, "create it with `exam-collector init` or pass --config PATH")
    return config_from_dict(raw, base=path.parent, source=path)


SECTIONS = frozenset({"collector", "mqtt", "http", "coverage", "alerts", "retention", "storage", "ingest"})
COLLECTOR_KEYS = frozenset({"data_dir", "database_url", "storage_dir", "key_file", "workers", "finishers",
                            "queue_size",
                            "staging_ttl_hours"})
COVERAGE_KEYS = frozenset({"pre_margin_minutes", "post_margin_minutes", "gap_tolerance_seconds"})
RETENTION_KEYS = frozenset({"margin_days", "unlinked_retention_days"})
ALERTS_KEYS = frozenset({"webhook_url", "interval_seconds"})


def config_from_dict(raw: dict[str, Any], base: Path, source: Path | None = None) -> CollectorConfig:
    """Every table, and the top level, refuses keys it does not know (naming the nearest known one)."""
    toml.unknown_sections(raw, SECTIONS)
    section = _table(raw, "collector", required=True)
    toml.unknown_keys(section, "collector", COLLECTOR_KEYS)
    data_dir = _path(section, "collector", "data_dir", base, required=True)
    assert data_dir is not None
    storage_dir = _path(section, "collector", "storage_dir", base) or data_dir / "storage"
    key_file = _path(section, "collector", "key_file", base) or data_dir / "collector.key"
    database_url = _str(section, "collector", "database_url") or f"sqlite:///{data_dir / 'collector.db'}"
    if not (database_url.startswith("sqlite:") or database_url.startswith("postgresql")):
        raise ConfigError(f"[collector] database_url = {database_url!r} is not supported: use "
                          "sqlite:////path/collector.db or postgresql+psycopg://user@host/db")
    workers = _int(section, "collector", "workers", 2, 1, 64)
    finishers = _int(section, "collector", "finishers", 2, 1, 64)
    queue_size = _int(section, "collector", "queue_size", 2000, 10, 1_000_000)
    staging_ttl_hours = _num(section, "collector", "staging_ttl_hours", 48, 1, 24 * 365)

    mqtt = parse_mqtt_table(_table(raw, "mqtt", required=True), base, files_must_exist=False,
                            default_client_id=lambda username: default_client_id(username, key_file))

    http = _http(_table(raw, "http"), base)
    cov_raw = _table(raw, "coverage")
    toml.unknown_keys(cov_raw, "coverage", COVERAGE_KEYS)
    coverage = CoverageConfig(
        pre_margin_minutes=_int(cov_raw, "coverage", "pre_margin_minutes", 15, 0, 24 * 60),
        post_margin_minutes=_int(cov_raw, "coverage", "post_margin_minutes", 15, 0, 24 * 60),
        gap_tolerance_seconds=_num(cov_raw, "coverage", "gap_tolerance_seconds", 2, 0, 3600),
    )
    ret_raw = _table(raw, "retention")
    toml.unknown_keys(ret_raw, "retention", RETENTION_KEYS)
    unlinked = None
    if "unlinked_retention_days" in ret_raw:
        unlinked = _int(ret_raw, "retention", "unlinked_retention_days", 0, 1, 100 * 366)
    retention = RetentionConfig(margin_days=_int(ret_raw, "retention", "margin_days", 7, 0, 3660),
                                unlinked_retention_days=unlinked)
    alerts_raw = _table(raw, "alerts")
    toml.unknown_keys(alerts_raw, "alerts", ALERTS_KEYS)
    webhook = _str(alerts_raw, "alerts", "webhook_url")
    if webhook is not None and not webhook.startswith(("http://", "https://")):
        raise ConfigError(f"[alerts] webhook_url = {webhook!r} is not an http(s) URL: use https://host/path")
    alerts = AlertsConfig(webhook_url=webhook,
                          interval_seconds=_num(alerts_raw, "alerts", "interval_seconds", 5, 1, 60))
    return CollectorConfig(data_dir=data_dir, database_url=database_url, storage_dir=storage_dir,
                           key_file=key_file, mqtt=mqtt, http=http, coverage=coverage,
                           retention=retention, workers=workers, finishers=finishers, queue_size=queue_size,
                           source=source,
                           staging_ttl_hours=staging_ttl_hours, alerts=alerts, ingest=_ingest(_table(raw, "ingest")),
                           storage=storage_from_table(_table(raw, "storage"), base))


STORAGE_KEYS = {"backend", "endpoint", "bucket", "region", "addressing", "credentials_file", "ca_file",
                "longest_exam_day_hours"}
S3_ONLY_KEYS = STORAGE_KEYS - {"backend"}
# S3 bucket names: 3 to 63 lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit.
_BUCKET_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789.-")


def storage_from_table(table: dict[str, Any], base: Path) -> StorageConfig:
    """[storage]: the backend and, for "s3", where the bucket is and how to reach it."""
    toml.unknown_keys(table, "storage", STORAGE_KEYS)
    backend = _str(table, "storage", "backend") or "filesystem"
    if backend not in STORAGE_BACKENDS:
        raise ConfigError(f"[storage] backend = {backend!r} is not supported: use \"filesystem\" (files under "
                          "[collector] storage_dir) or \"s3\" (an S3 bucket with Object Lock)")
    if backend == "filesystem":
        misplaced = sorted(S3_ONLY_KEYS & set(table))
        if misplaced:
            raise ConfigError(f"[storage] {misplaced[0]} applies only to backend = \"s3\": remove it, or set "
                              "backend = \"s3\"")
        return StorageConfig()
    endpoint = _str(table, "storage", "endpoint", required=True)
    assert endpoint is not None
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ConfigError(f"[storage] endpoint = {endpoint!r} is not an http(s) URL of an S3 service: write e.g. "
                          "\"https://s3.example.cn\" or \"http://10.0.0.5:8333\" (no bucket, no path)")
    bucket = _str(table, "storage", "bucket", required=True)
    assert bucket is not None
    if not (3 <= len(bucket) <= 63 and set(bucket) <= _BUCKET_CHARS and bucket[0].isalnum()
            and bucket[-1].isalnum()):
        raise ConfigError(f"[storage] bucket = {bucket!r} is not a valid S3 bucket name: use 3 to 63 lowercase "
                          "letters, digits, dots or hyphens, starting and ending with a letter or digit")
    addressing = _str(table, "storage", "addressing") or "path"
    if addressing not in S3_ADDRESSING:
        raise ConfigError(f"[storage] addressing = {addressing!r} is not supported: use \"path\" "
                          "(https://host/bucket/key, most self-hosted S3) or \"virtual\" (https://bucket.host/key)")
    return StorageConfig(backend=backend, endpoint=endpoint.rstrip("/"), bucket=bucket,
                         region=_str(table, "storage", "region") or "us-east-1", addressing=addressing,
                         credentials_file=_path(table, "storage", "credentials_file", base),
                         ca_file=_path(table, "storage", "ca_file", base),
                         longest_exam_day_hours=_num(table, "storage", "longest_exam_day_hours", 24, 1, 24 * 7))


HTTP_KEYS = {"listen", "export_keep_hours", "cert_file", "key_file", "behind_tls_proxy", "login_failures_per_account",
             "login_failures_per_address", "login_window_seconds"}


def _http(table: dict[str, Any], base: Path) -> HttpConfig:
    """[http]: the portal's address, TLS and login limits. The TLS files are checked by `serve` (collector/web.py),
    which alone reads them: other commands run where they may not be readable."""
    toml.unknown_keys(table, "http", HTTP_KEYS)
    cert_file = _path(table, "http", "cert_file", base)
    key_file = _path(table, "http", "key_file", base)
    if key_file is not None and cert_file is None:
        raise ConfigError("[http] key_file is set without cert_file: set cert_file = \"/etc/exam-collector/tls/"
                          "cert.pem\" (the server certificate chain, PEM) too, or remove key_file to serve plain HTTP")
    default = HttpConfig()
    return HttpConfig(
        listen=_str(table, "http", "listen") or default.listen,
        export_keep_hours=_int(table, "http", "export_keep_hours", default.export_keep_hours, 1, 24 * 366),
        cert_file=cert_file, key_file=key_file,
        behind_tls_proxy=toml.boolean(table, "http", "behind_tls_proxy", default.behind_tls_proxy),
        login_failures_per_account=_int(table, "http", "login_failures_per_account",
                                        default.login_failures_per_account, 1, 1000),
        login_failures_per_address=_int(table, "http", "login_failures_per_address",
                                        default.login_failures_per_address, 1, 100_000),
        login_window_seconds=_int(table, "http", "login_window_seconds", default.login_window_seconds, 1, 24 * 3600))


INGEST_KEYS = {"max_segment_mb", "min_chunk_kb", "max_chunk_kb", "max_open_transfers", "max_staging_mb",
               "max_early_chunks", "clock_future_minutes", "clock_backlog_days"}


def _ingest(table: dict[str, Any]) -> IngestLimits:
    """[ingest]: what one agent may ask of the collector (sizes, open uploads, staging, clock tolerance)."""
    toml.unknown_keys(table, "ingest", INGEST_KEYS)
    default = IngestLimits()
    min_chunk_kb = _int(table, "ingest", "min_chunk_kb", default.min_chunk_bytes // KIB, 1, 64 * 1024)
    max_chunk_kb = _int(table, "ingest", "max_chunk_kb", default.max_chunk_bytes // KIB, 1, 64 * 1024)
    if min_chunk_kb > max_chunk_kb:
        raise ConfigError(f"[ingest] min_chunk_kb = {min_chunk_kb} is above max_chunk_kb = {max_chunk_kb}: set "
                          "min_chunk_kb <= max_chunk_kb (agents send 256 KiB chunks)")
    max_segment_mb = _int(table, "ingest", "max_segment_mb", default.max_segment_bytes // MIB, 1, 1024 * 1024)
    max_staging_mb = _int(table, "ingest", "max_staging_mb", default.max_staging_bytes // MIB, 1, 1024 * 1024 * 1024)
    if max_staging_mb < max_segment_mb:
        raise ConfigError(f"[ingest] max_staging_mb = {max_staging_mb} is below max_segment_mb = {max_segment_mb}: "
                          "an agent could never upload its largest segment; raise max_staging_mb")
    return IngestLimits(
        max_segment_bytes=max_segment_mb * MIB, min_chunk_bytes=min_chunk_kb * KIB, max_chunk_bytes=max_chunk_kb * KIB,
        max_open_transfers=_int(table, "ingest", "max_open_transfers", default.max_open_transfers, 1, 100_000),
        max_staging_bytes=max_staging_mb * MIB,
        max_early_chunks=_int(table, "ingest", "max_early_chunks", default.max_early_chunks, 0, 1_000_000),
        clock_future_minutes=_int(table, "ingest", "clock_future_minutes", default.clock_future_minutes, 1, 24 * 60),
        clock_backlog_days=_int(table, "ingest", "clock_backlog_days", default.clock_backlog_days, 1, 3660))


def default_client_id(username: str | None, key_file: Path) -> str:
    """`{username}-{16 hex}`: the same for one collector key on one host, and not guessable without the key.

    A predictable id let any account that knew it take over the collector's session. It must stay stable
    across restarts, since the session (SESSION_EXPIRY_SECONDS) keeps the shared subscription's queued
    messages for a restart; the HMAC of the hostname under the private key gives that without writing
    anything at config load. Without a readable key, which `serve` refuses to run without anyway, the
    suffix is random. The deploy broker replaces client ids with usernames (use_username_as_clientid);
    this id matters on brokers that do not."""
    try:
        secret = key_file.read_bytes()
    except OSError:
        suffix = secrets.token_hex(8)
    else:
        suffix = hmac.new(secret, socket.gethostname().encode(), hashlib.sha256).hexdigest()[:16]
    return f"{username or 'collector'}-{suffix}"


def _table(raw: dict[str, Any], name: str, required: bool = False) -> dict[str, Any]:
    return toml.table(raw, name, required=required, init_command="exam-collector init")


def _str(table: dict[str, Any], section: str, key: str, required: bool = False) -> str | None:
    return toml.string(table, section, key, required=required)


def _path(table: dict[str, Any], section: str, key: str, base: Path, required: bool = False) -> Path | None:
    found = toml.path(table, section, key, base, required=required)
    return found.resolve() if found is not None else None


_int = toml.integer
_num = toml.number

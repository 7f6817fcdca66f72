"""Collector TOML config (PRODUCT.md, Collector config) as frozen dataclasses."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exam_contract import tomlconfig as toml
from exam_contract.mqtt import MqttSettings, parse_mqtt_table
from exam_contract.tomlconfig import ConfigError

from .admission import KIB, MIB, IngestLimits


MqttConfig = MqttSettings  # the name tests and older code use


@dataclass(frozen=True)
class HttpConfig:
    listen: str = "127.0.0.1:8080"
    export_keep_hours: int = 72  # evidence packages made over HTTP are removed from data_dir/exports after this


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
    queue_size: int = 2000
    source: Path | None = None
    staging_ttl_hours: float = 48.0  # abandoned transfers' staging is removed after this (issue 3)
    alerts: AlertsConfig = AlertsConfig()
    ingest: IngestLimits = IngestLimits()

    @property
    def staging_dir(self) -> Path:
        return self.storage_dir / "staging"


parse_mqtt_url = toml.mqtt_url


def load_config(path: Path | str) -> CollectorConfig:
    path = Path(path)
    raw = toml.load_file(path, "create it with `exam-collector init` or pass --config PATH")
    return config_from_dict(raw, base=path.parent, source=path)


def config_from_dict(raw: dict[str, Any], base: Path, source: Path | None = None) -> CollectorConfig:
    section = _table(raw, "collector", required=True)
    data_dir = _path(section, "collector", "data_dir", base, required=True)
    assert data_dir is not None
    storage_dir = _path(section, "collector", "storage_dir", base) or data_dir / "storage"
    key_file = _path(section, "collector", "key_file", base) or data_dir / "collector.key"
    database_url = _str(section, "collector", "database_url") or f"sqlite:///{data_dir / 'collector.db'}"
    if not (database_url.startswith("sqlite:") or database_url.startswith("postgresql")):
        raise ConfigError(f"[collector] database_url = {database_url!r} is not supported: use "
                          "sqlite:////path/collector.db or postgresql+psycopg://user@host/db")
    workers = _int(section, "collector", "workers", 2, 1, 64)
    queue_size = _int(section, "collector", "queue_size", 2000, 10, 1_000_000)
    staging_ttl_hours = _num(section, "collector", "staging_ttl_hours", 48, 1, 24 * 365)

    mqtt = parse_mqtt_table(_table(raw, "mqtt", required=True), base, files_must_exist=False,
                            default_client_id=lambda username: default_client_id(username, key_file))

    http_raw = _table(raw, "http")
    http = HttpConfig(listen=_str(http_raw, "http", "listen") or "127.0.0.1:8080",
                      export_keep_hours=_int(http_raw, "http", "export_keep_hours", 72, 1, 24 * 366))
    cov_raw = _table(raw, "coverage")
    coverage = CoverageConfig(
        pre_margin_minutes=_int(cov_raw, "coverage", "pre_margin_minutes", 15, 0, 24 * 60),
        post_margin_minutes=_int(cov_raw, "coverage", "post_margin_minutes", 15, 0, 24 * 60),
        gap_tolerance_seconds=_num(cov_raw, "coverage", "gap_tolerance_seconds", 2, 0, 3600),
    )
    ret_raw = _table(raw, "retention")
    unlinked = None
    if "unlinked_retention_days" in ret_raw:
        unlinked = _int(ret_raw, "retention", "unlinked_retention_days", 0, 1, 100 * 366)
    retention = RetentionConfig(margin_days=_int(ret_raw, "retention", "margin_days", 7, 0, 3660),
                                unlinked_retention_days=unlinked)
    alerts_raw = _table(raw, "alerts")
    webhook = _str(alerts_raw, "alerts", "webhook_url")
    if webhook is not None and not webhook.startswith(("http://", "https://")):
        raise ConfigError(f"[alerts] webhook_url = {webhook!r} is not an http(s) URL: use https://host/path")
    alerts = AlertsConfig(webhook_url=webhook,
                          interval_seconds=_num(alerts_raw, "alerts", "interval_seconds", 5, 1, 60))
    return CollectorConfig(data_dir=data_dir, database_url=database_url, storage_dir=storage_dir,
                           key_file=key_file, mqtt=mqtt, http=http, coverage=coverage,
                           retention=retention, workers=workers, queue_size=queue_size, source=source,
                           staging_ttl_hours=staging_ttl_hours, alerts=alerts,
                           ingest=_ingest(_table(raw, "ingest")))


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

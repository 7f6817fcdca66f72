"""`exam-collector doctor`: the collector's setup checked one line at a time, each failure with its fix.

Checks, in order: config; collector key file; database reachable and schema at the newest revision; storage
(storage_dir takes a written, fsynced and removed file, free space; the S3 bucket with backend "s3"); the portal's
TLS certificate and key when [http] cert_file is set; the broker (TCP, TLS for mqtts://, login with the collector's
account unless a `serve` runs on this data_dir); the clock against PostgreSQL's. The exit code is the first
failure's (exam_contract.doctor.exit_code): 1 for what the config or files must fix, 2 for what does not answer.
"""

from __future__ import annotations

import shutil
import socket
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from exam_contract import exitcodes
from exam_contract.doctor import (DOCTOR_TIMEOUT, Check, check_clock, check_folder, check_key_file, check_login,
                                  check_tls)
from exam_contract.mqtt import BrokerUnreachable
from exam_contract.tomlconfig import ConfigError

from .config import CollectorConfig, load_config

if TYPE_CHECKING:
    from sqlalchemy import Engine

CLOCK_LIMIT_SECONDS = 2.0        # the collector's and the database's clocks both stamp records
FREE_WARN_FRACTION = 0.10        # exam-retention enforce raises its ALARM below this too
FREE_WARN_BYTES = 10 * 2**30
PROG = "exam-collector"

__all__ = ["run_doctor", "check_http_tls", "CLOCK_LIMIT_SECONDS"]


def run_doctor(config_path: Path, timeout: float = DOCTOR_TIMEOUT) -> list[Check]:
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        return [Check.failed("config", str(exc))]
    from .db import describe_url

    checks = [Check.passed("config", f"{config_path}: database {describe_url(cfg.database_url)}, storage "
                                     f"{cfg.storage.backend}, broker {cfg.mqtt.address}"),
              check_key_file(cfg.key_file, "collector")]
    database, engine = _database(cfg)
    checks.extend(database)
    checks.extend(_storage(cfg))
    if cfg.http.cert_file is not None:
        checks.append(check_http_tls(cfg))
    checks.extend(_broker(cfg, timeout))
    checks.append(_clock(engine) if engine is not None else
                  Check.skip("clock", "not compared: the database did not answer"))
    if engine is not None:
        engine.dispose()
    return checks


def _database(cfg: CollectorConfig) -> tuple[list[Check], Engine | None]:
    from .db import (DatabaseUnavailable, DatabaseUrlError, check_connection, current_revision, describe_url,
                     head_revision, make_engine)

    where = describe_url(cfg.database_url)
    try:
        engine = make_engine(cfg.database_url)
    except DatabaseUrlError as exc:
        return [Check.failed("database", f"[collector] database_url: {exc}")], None
    try:
        check_connection(engine, cfg.database_url)
    except DatabaseUnavailable as exc:
        engine.dispose()
        return [Check.failed("database", str(exc), exitcodes.UNREACHABLE)], None
    current, head = current_revision(engine), head_revision()
    reachable = Check.passed("database", f"{where} answers")
    if current != head:
        return [reachable, Check.failed("schema", f"database {where} is at schema revision {current or 'none'}, not "
                                                  f"{head}: run `{PROG} db upgrade`")], engine
    return [reachable, Check.passed("schema", f"at revision {head}, the newest")], engine


def _storage(cfg: CollectorConfig) -> list[Check]:
    """storage_dir (the footage with backend "filesystem", staging always): write, fsync, free space; the bucket."""
    folder = check_folder(cfg.storage_dir, "storage_dir")
    checks = [folder]
    if folder.ok:
        usage = shutil.disk_usage(cfg.storage_dir)
        if usage.free < FREE_WARN_BYTES or usage.free < usage.total * FREE_WARN_FRACTION:
            checks[0] = Check.warn(folder.name, f"writable, fsync works, but only {usage.free // 2**20} MB free "
                                                f"({100 * usage.free / usage.total:.0f} % of the volume; warned "
                                                f"below {FREE_WARN_BYTES // 2**30} GiB or {FREE_WARN_FRACTION:.0%}): "
                                                "grow the volume before it fills (stored footage is deleted only by "
                                                "exam-retention enforce)")
    if cfg.storage.backend == "s3":
        checks.append(_bucket(cfg))
    return checks


def _bucket(cfg: CollectorConfig) -> Check:
    from .footage_store import StorageSetupError, StorageUnreachable, open_store

    name = f"storage bucket {cfg.storage.bucket}"
    try:
        store = open_store(cfg)
    except StorageUnreachable as exc:
        return Check.failed(name, str(exc), exitcodes.UNREACHABLE)
    except (StorageSetupError, ConfigError) as exc:
        return Check.failed(name, str(exc))
    return Check.passed(name, f"{store} answers, Object Lock enabled")


def check_http_tls(cfg: CollectorConfig) -> Check:
    """[http] cert_file and key_file: present, PEM, the key belongs to the certificate, valid now."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from .http_security import TlsFilesError, tls_options

    http = cfg.http
    assert http.cert_file is not None
    name = "portal TLS"
    key_path = http.key_file or http.cert_file
    for option, path in (("cert_file", http.cert_file), ("key_file", http.key_file)):
        if path is not None and not path.is_file():
            return Check.failed(name, f"[http] {option} = {str(path)!r} does not exist: create it or fix the path")
    try:
        cert = x509.load_pem_x509_certificate(http.cert_file.read_bytes())
    except (ValueError, OSError) as exc:
        return Check.failed(name, f"[http] cert_file = {str(http.cert_file)!r} is not a readable PEM certificate "
                                  f"({getattr(exc, 'strerror', None) or exc}): give the server certificate chain, "
                                  "PEM, readable by this user")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        where = "key_file" if http.key_file else "cert_file (no key_file)"
        return Check.failed(name, f"[http] {where} = {str(key_path)!r} holds no readable unencrypted PEM private "
                                  f"key ({getattr(exc, 'strerror', None) or exc}): give the certificate's private key "
                                  "in key_file")
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*raw) != cert.public_key().public_bytes(*raw):
        return Check.failed(name, f"[http] key_file = {str(key_path)!r} is not the private key of the certificate "
                                  f"in cert_file = {str(http.cert_file)!r}: give the key the certificate was made for")
    now = datetime.now(timezone.utc)
    subject = cert.subject.rfc4514_string()
    until = cert.not_valid_after_utc
    if now < cert.not_valid_before_utc:
        return Check.failed(name, f"the certificate in {http.cert_file} ({subject}) is valid only from "
                                  f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: check this machine's clock or "
                                  "the certificate")
    if now > until:
        return Check.failed(name, f"the certificate in {http.cert_file} ({subject}) expired on {until:%Y-%m-%d %H:%M} "
                                  "UTC: renew it, then restart serve")
    try:
        tls_options(http)
    except TlsFilesError as exc:
        return Check.failed(name, str(exc))
    return Check.passed(name, f"certificate {subject} valid until {until:%Y-%m-%d %H:%M} UTC, key matches")


def _broker(cfg: CollectorConfig, timeout: float) -> list[Check]:
    from .serve_lock import lock_path, serve_running

    settings = cfg.mqtt
    name = f"broker {settings.address}"
    try:
        with socket.create_connection((settings.host, settings.port), timeout=timeout):
            pass
    except OSError as exc:
        return [Check.failed(name, str(BrokerUnreachable.from_error(settings.address, exc)), exitcodes.UNREACHABLE)]
    checks = [Check.passed(name, "accepts TCP connections")]
    if settings.tls:
        tls = check_tls(settings, timeout)
        checks.append(tls)
        if not tls.ok:
            return checks
    login_name = f"broker login {settings.address}"
    if serve_running(cfg.data_dir):
        # The production broker binds the client id to the account: a second login would end serve's session.
        checks.append(Check.skip(login_name, f"{PROG} serve is running on this data_dir (it holds "
                                             f"{lock_path(cfg.data_dir)}); logging in as "
                                             f"{settings.username or '(anonymous)'} would end its broker session: stop "
                                             "it to check the login"))
        return checks
    client_id = f"{settings.username or 'collector'}-doctor-{uuid.uuid4().hex[:8]}"
    login, session = check_login(settings, client_id, timeout=timeout)
    if session is not None:
        session.close()
    checks.append(login)
    return checks


def _clock(engine: Engine) -> Check:
    """This machine's clock against PostgreSQL's (`now()`); SQLite has no clock of its own."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    if engine.dialect.name != "postgresql":
        return Check.skip("clock", "n/a on SQLite: the database has no clock but this machine's")
    try:
        with engine.connect() as conn:
            sent = time.time()
            theirs = conn.execute(text("select clock_timestamp()")).scalar_one()
            received = time.time()
    except DBAPIError as exc:
        return Check.failed("clock", f"the database server did not tell its time ({type(exc.orig).__name__}): start "
                                     "it, then run doctor again", exitcodes.UNREACHABLE)
    midpoint = datetime.fromtimestamp((sent + received) / 2, timezone.utc)
    return check_clock((theirs - midpoint).total_seconds(), CLOCK_LIMIT_SECONDS, "the database server")

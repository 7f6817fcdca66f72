"""`exam-collector`: central ingest, database and inspection commands.

Kept as one module of about 800 lines on purpose: it is one function per command, each only parsing options
and calling the module that does the work."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from exam_contract import exitcodes
from exam_contract.signing import KeyFileError, generate_private_key

from .config import CollectorConfig, ConfigError, load_config, parse_mqtt_url

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from .footage_store import FootageStore
    from .object_locks import LockReport, LockSettings, Progress

PROG = "exam-collector"
DEFAULT_CONFIG = Path("/etc/exam-collector/collector.toml")
DEFAULT_DATA_DIR = Path("/var/lib/exam-collector")

LABELS = {
    "zh": {"venue": "场所", "camera": "摄像头", "room": "考场", "theory": "理论知识考场",
           "practical": "操作技能考场", "segments": "片段", "gap_records": "缺口记录",
           "seconds": "覆盖秒数", "holes": "链缺口", "from": "起", "to": "止",
           "none": "尚无存储的片段", "verified": "全部哈希与签名已验证",
           "problems": "发现 {n} 个完整性问题", "seq": "序号"},
    "en": {"venue": "venue", "camera": "camera", "room": "room", "theory": "theory room",
           "practical": "practical room", "segments": "segments", "gap_records": "gap records",
           "seconds": "seconds covered", "holes": "chain holes", "from": "from", "to": "to",
           "none": "no stored segments yet", "verified": "all hashes and signatures verified",
           "problems": "{n} integrity problem(s) found", "seq": "seq"},
}


class CommandError(Exception):
    """A command's failure: one line saying what is wrong and how to fix it, and its exit code (exitcodes)."""

    def __init__(self, message: str, code: int = exitcodes.INPUT) -> None:
        super().__init__(message)
        self.code = code


class CliContext:
    """The click context object: the --config path, and the config loaded from it on first use."""

    def __init__(self, config_path: Path | None) -> None:
        self.config_path = config_path
        self._config: CollectorConfig | None = None

    @property
    def path(self) -> Path:
        return self.config_path or DEFAULT_CONFIG

    def config(self) -> CollectorConfig:
        if self._config is None:
            self._config = load_config(self.path)
        return self._config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="EXAM_COLLECTOR_CONFIG", help=f"Collector config TOML (default {DEFAULT_CONFIG}).")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None) -> None:
    """Central collector: verified MQTT ingest of signed exam footage, storage and inspection."""
    ctx.obj = CliContext(config_path)


# ---------------------------------------------------------------------------- init

CONFIG_TEMPLATE = """\
# exam-collector config (written by `exam-collector init`). Relative paths are relative to this file.

[collector]
data_dir = {data_dir}
# SQLite for one collector; PostgreSQL for several: "postgresql+psycopg://user@host/db"
database_url = {database_url}
# Stored footage (backend "filesystem", see [storage]) and staging/ (chunk reassembly) must be on the same
# volume; with backend "s3" only staging/ (and temporary downloads) stay here.
storage_dir = {storage_dir}
# Signs audit checkpoints and evidence packages. Keep it private (mode 0600).
key_file = {key_file}
# workers = 2          # ingest worker threads (chunks into staging)
# finishers = 2        # finishing threads (verify, store, record, reply); raise it when the storage is remote
# queue_size = 2000    # messages waiting for the workers, in total
# staging_ttl_hours = 48  # staging of transfers without init or fin for this long is removed

[mqtt]
url = {broker}
# username = "collector-1"
# password_file = "/etc/exam-collector/mqtt.pass"
# ca_file = "/etc/exam-collector/ca.pem"     # for mqtts://
# client_id: leave unset (derived from this collector's key and host; the production broker binds ids to
# accounts anyway: give each collector instance its own account)

[http]
listen = "127.0.0.1:8080"   # HTTP API and web portal (create accounts with `exam-collector users add`)
# HTTPS with the collector's own TLS; without it keep listen on 127.0.0.1 or put a TLS proxy in front:
# cert_file = "/etc/exam-collector/tls/cert.pem"   # server certificate chain, PEM
# key_file = "/etc/exam-collector/tls/key.pem"
# behind_tls_proxy = false        # true when a TLS proxy on this host forwards to listen (Secure cookies, HSTS)
# login_failures_per_account = 5  # failed logins of one user name, or from one client address, within
# login_failures_per_address = 20 # login_window_seconds; more answer 429 with Retry-After
# login_window_seconds = 300

[coverage]
pre_margin_minutes = 15
post_margin_minutes = 15
gap_tolerance_seconds = 2

[alerts]
# While a batch part runs, a camera of its room without a segment for 2x its segment length (or with a
# gap record) is alerted on MQTT exam/v1/alerts/{{venue}}/{{camera}} (retained), in the log and here:
# webhook_url = "https://ops.example.cn/hooks/exam-footage"
# interval_seconds = 5

[retention]
margin_days = 7
# unlinked_retention_days = 400   # optional, 365 or more: a longer keep for footage never linked to a batch

{storage}
[ingest]
# What one agent may ask of the collector (rejected with a named reason beyond these):
# max_segment_mb = 4096         # largest segment
# min_chunk_kb = 64             # allowed chunk sizes (agents send 256 KiB)
# max_chunk_kb = 1024
# max_open_transfers = 32       # unfinished uploads per agent
# max_staging_mb = 8192         # bytes those uploads announce, per agent
# max_early_chunks = 256        # chunks held per agent before their init arrives
# clock_future_minutes = 10     # a record ending this far after its receipt is flagged clock_suspect
# clock_backlog_days = 30       # ... or ending this long before it
"""

STORAGE_FILESYSTEM = """\
[storage]
backend = "filesystem"   # footage as files under [collector] storage_dir
# An S3 bucket with Object Lock instead (docs/storage.md), e.g.:
# backend = "s3"
# endpoint = "https://s3.example.cn"
# bucket = "exam-footage"
# credentials_file = "/etc/exam-collector/s3.credentials"   # mode 0600: access_key_id, secret_access_key
"""

STORAGE_S3 = """\
[storage]
# An S3 bucket with Object Lock (docs/storage.md): every segment is locked (COMPLIANCE) until its keep ends.
backend = "s3"
endpoint = {endpoint}
bucket = {bucket}
region = {region}
addressing = {addressing}   # "path": https://host/bucket/key; "virtual": https://bucket.host/key
{credentials}
{ca_file}
# longest_exam_day_hours = 24   # locks cover batch parts ending within this after the footage; longer parts are
#                               # extended at batch import and by exam-retention enforce
"""


def _toml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


@cli.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Where the database, key and footage go (default {DEFAULT_DATA_DIR}).")
@click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True, help="MQTT broker URL.")
@click.option("--database-url", default=None, help="Default: SQLite under the data dir.")
@click.option("--storage", type=click.Choice(["filesystem", "s3"]), default="filesystem", show_default=True,
              help="Where footage is kept: files under the data dir, or an S3 bucket with Object Lock.")
@click.option("--s3-endpoint", default=None, help="S3 endpoint URL, e.g. https://s3.example.cn (--storage s3).")
@click.option("--s3-bucket", default=None, help="Bucket; created with Object Lock when it does not exist, refused "
              "when it exists without Object Lock (--storage s3).")
@click.option("--s3-region", default="us-east-1", show_default=True, help="S3 region (--storage s3).")
@click.option("--s3-addressing", type=click.Choice(["path", "virtual"]), default="path", show_default=True,
              help="Bucket in the path (most self-hosted S3) or in the host name (--storage s3).")
@click.option("--s3-credentials-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML file (mode 0600) with access_key_id and secret_access_key; default: the environment's "
                   "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (never written to the config).")
@click.option("--s3-ca-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CA bundle for an https endpoint with a private CA (--storage s3).")
@click.pass_obj
def init(obj: CliContext, data_dir: Path | None, broker: str, database_url: str | None, storage: str,
         s3_endpoint: str | None, s3_bucket: str | None, s3_region: str, s3_addressing: str,
         s3_credentials_file: Path | None, s3_ca_file: Path | None) -> None:
    """Write a commented config and a new collector Ed25519 key (never overwrites); with --storage s3, create
    (or check) the bucket with Object Lock first."""
    data_dir = (data_dir or DEFAULT_DATA_DIR).expanduser().resolve()
    config_path = obj.config_path or DEFAULT_CONFIG
    key_file = data_dir / "collector.key"
    parse_mqtt_url(broker, key="--broker")
    if database_url is not None and not database_url.startswith(("sqlite:", "postgresql")):
        raise CommandError(f"--database-url {database_url!r} is not supported: use sqlite:////path/db or "
                           "postgresql+psycopg://user@host/db")
    if storage == "filesystem" and (s3_endpoint or s3_bucket or s3_credentials_file or s3_ca_file):
        raise CommandError("--s3-* options need --storage s3: add it, or drop them to keep footage on the filesystem")
    if config_path.exists():
        raise CommandError(f"config {config_path} already exists: remove it first or pass another --config PATH")
    if key_file.exists():
        raise CommandError(f"key file {key_file} already exists: remove it first or choose another --data-dir")
    storage_text = STORAGE_FILESYSTEM
    bucket_note = ""
    if storage == "s3":
        storage_text = _s3_storage_text(s3_endpoint, s3_bucket, s3_region, s3_addressing, s3_credentials_file,
                                        s3_ca_file)
        bucket_note = _prepare_bucket(storage_text, data_dir)
    text = CONFIG_TEMPLATE.format(
        data_dir=_toml_str(str(data_dir)),
        database_url=_toml_str(database_url or f"sqlite:///{data_dir / 'collector.db'}"),
        storage_dir=_toml_str(str(data_dir / "storage")), key_file=_toml_str(str(key_file)),
        broker=_toml_str(broker), storage=storage_text)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        config_path.parent.mkdir(parents=True, exist_ok=True)
        generate_private_key(key_file)
        with open(config_path, "x", encoding="utf-8") as handle:
            handle.write(text)
    except KeyFileError as exc:
        raise CommandError(f"{exc}; or choose another --data-dir") from exc
    except OSError as exc:
        raise CommandError(f"cannot write {exc.filename}: {exc.strerror}; "
                           "choose a writable --data-dir/--config") from exc
    if bucket_note:
        click.echo(bucket_note)
    click.echo(f"wrote {config_path} and key {key_file}; next: {PROG} --config {config_path} db upgrade")


def _s3_storage_text(endpoint: str | None, bucket: str | None, region: str, addressing: str,
                     credentials_file: Path | None, ca_file: Path | None) -> str:
    if not endpoint or not bucket:
        raise CommandError("--storage s3 needs --s3-endpoint URL and --s3-bucket NAME: give both")
    credentials = ("# credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY from the environment\n"
                   '# credentials_file = "/etc/exam-collector/s3.credentials"')
    if credentials_file:
        credentials = f"credentials_file = {_toml_str(str(credentials_file.expanduser().resolve()))}"
    ca = '# ca_file = "/etc/exam-collector/s3-ca.pem"   # for https with a private CA'
    if ca_file:
        ca = f"ca_file = {_toml_str(str(ca_file.expanduser().resolve()))}"
    return STORAGE_S3.format(endpoint=_toml_str(endpoint), bucket=_toml_str(bucket), region=_toml_str(region),
                             addressing=_toml_str(addressing), credentials=credentials, ca_file=ca)


def _prepare_bucket(storage_text: str, data_dir: Path) -> str:
    """Read the [storage] table `init` is about to write exactly as `load_config` will, then create the bucket
    with Object Lock or check the existing one. Before anything is written: a refusal leaves nothing behind."""
    import tomllib

    from .config import storage_from_table
    from .footage_store import StorageSetupError, StorageUnreachable
    from .s3_store import DOWNLOADS_FOLDER, S3Store, load_credentials

    settings = storage_from_table(tomllib.loads(storage_text)["storage"], data_dir)
    assert settings.endpoint is not None and settings.bucket is not None
    store = S3Store(endpoint=settings.endpoint, bucket=settings.bucket,
                    credentials=load_credentials(settings.credentials_file),
                    scratch_dir=data_dir / "storage" / DOWNLOADS_FOLDER, region=settings.region,
                    addressing=settings.addressing, ca_file=settings.ca_file)
    try:
        created = store.create_bucket()
    except StorageUnreachable as exc:
        raise CommandError(str(exc), exitcodes.UNREACHABLE) from exc
    except StorageSetupError as exc:
        raise CommandError(str(exc)) from exc
    return (f"created bucket {settings.bucket} at {settings.endpoint} with Object Lock" if created
            else f"bucket {settings.bucket} at {settings.endpoint} exists and has Object Lock enabled")


def _store(cfg: CollectorConfig) -> FootageStore:
    from .footage_store import open_store

    return open_store(cfg)


def _lock_progress(label: str) -> Progress | None:
    """A one-line count of objects on stderr while a pass over many objects runs (when stderr is a terminal)."""
    if not sys.stderr.isatty():
        return None

    def show(report: LockReport) -> None:
        click.echo(f"\r{label}: {report.total} object(s), {len(report.failed)} failed", nl=False, err=True)

    return show


def _storage_pass(obj: CliContext, sessions: sessionmaker[Session], label: str, action: str, target: str,
                  run: Callable[[FootageStore, LockSettings, Progress | None], LockReport], fix: str) -> None:
    """Run a pass over stored objects on a versioned store (legal holds, lock extensions) after the database
    already changed. Its result is printed and audited; an object the storage did not take, or a storage that
    cannot be opened at all, is the `object_lock_failed` alarm, an audit entry and exit 2, never silent."""
    from .audit import local_actor
    from .footage_store import StorageSetupError
    from .object_locks import LockReport, LockSettings, record_report

    cfg = obj.config()
    try:
        store = _store(cfg)
    except StorageSetupError as exc:
        report = LockReport(label, failed=[f"the storage cannot be used: {exc}"])
    else:
        if not store.versioned:
            return
        report = run(store, LockSettings.from_config(cfg), _lock_progress(label))
        if sys.stderr.isatty() and report.total:
            click.echo("", err=True)
        if report.total:
            click.echo(report.line())
    alarm = record_report(sessions, report, action=action, actor=local_actor(), target=target)
    if report.done or alarm:
        _checkpoint_after(obj)
    if alarm:
        raise CommandError(f"ALARM object_lock_failed: {alarm}; {fix}", exitcodes.UNREACHABLE)


def _sync_hold(obj: CliContext, sessions: sessionmaker[Session], hold_id: int) -> None:
    """The storage's legal holds after a hold changed: ON for what an active hold covers, OFF for what a released
    one no longer keeps."""
    from .audit import ACTION_LEGAL_HOLD
    from .object_locks import sync_hold

    _storage_pass(obj, sessions, f"legal holds of hold {hold_id}", ACTION_LEGAL_HOLD, f"hold:{hold_id}",
                  lambda store, locks, progress: sync_hold(sessions, store, hold_id, locks, progress),
                  f"run `{PROG} hold sync {hold_id}` once the storage answers")


# ---------------------------------------------------------------------------- db

def _engine(cfg: CollectorConfig, check_schema: bool = True) -> Engine:
    from .db import DatabaseUrlError, check_connection, current_revision, describe_url, head_revision, make_engine

    try:
        engine = make_engine(cfg.database_url)
    except DatabaseUrlError as exc:
        raise CommandError(f"[collector] database_url: {exc}") from exc
    check_connection(engine, cfg.database_url)
    if check_schema:
        current, head = current_revision(engine), head_revision()
        if current != head:
            raise CommandError(f"database {describe_url(cfg.database_url)} is at schema revision "
                               f"{current or 'none'}, not {head}: run `{PROG} db upgrade`")
    return engine


def _checkpoint_after(obj: CliContext) -> None:
    """Sign an audit checkpoint over what the command just appended (see audit.checkpoint_after_command)."""
    from .audit import checkpoint_after_command
    from .db import session_factory

    cfg = obj.config()
    checkpoint_after_command(session_factory(_engine(cfg)), cfg.key_file)


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.pass_obj
def db_upgrade(obj: CliContext) -> None:
    """Create or migrate the schema to the newest revision (SQLite or PostgreSQL)."""
    from .db import current_revision, describe_url, upgrade

    cfg = obj.config()
    engine = _engine(cfg, check_schema=False)
    upgrade(engine)
    click.echo(f"database {describe_url(cfg.database_url)} is at schema revision {current_revision(engine)}")


# ---------------------------------------------------------------------------- enroll

@cli.command()
@click.option("--agent", default=None, help="Agent id (also its MQTT username).  [required unless --revoke]")
@click.option("--venue", default=None, help="Venue code (备案场所), e.g. JL2201001-01.  [required unless --revoke]")
@click.option("--pubkey", default=None, help="Agent public key as `exam-edge pubkey` prints it.  [required unless "
              "--revoke]")
@click.option("--institution", default=None, help="Institution code (机构代码), e.g. JL2201001; uploads naming "
              "another institution are rejected.  [required unless --revoke]")
@click.option("--replace", is_flag=True, help="Re-enrol an agent with another key or venue (the old key is kept "
              "in the agent's key history and still verifies what it signed).")
@click.option("--revoke", "revoke_agent", default=None, metavar="AGENT", help="Revoke this agent: every new upload "
              "from it is rejected (agent_revoked); its footage and keys are kept. Takes only --reason.")
@click.option("--reason", default=None, help="Why the agent is revoked (audit log; with --revoke).")
@click.option("--reinstate", is_flag=True, help="Enrol a revoked agent again (needed for a revoked agent; with the "
              "usual --agent/--venue/--institution/--pubkey, and --replace for a new key).")
@click.pass_obj
def enroll(obj: CliContext, agent: str | None, venue: str | None, pubkey: str | None, institution: str | None,
           replace: bool, revoke_agent: str | None, reason: str | None, reinstate: bool) -> None:
    """Enrol an edge agent's public key for its venue and institution; or revoke one (--revoke AGENT)."""
    from .admin import EnrollError, enroll as do_enroll
    from .db import session_factory

    if revoke_agent is not None:
        given = [name for name, value in (("--agent", agent), ("--venue", venue), ("--pubkey", pubkey),
                                          ("--institution", institution), ("--replace", replace),
                                          ("--reinstate", reinstate)) if value]
        if given:
            raise CommandError(f"--revoke takes only --reason, not {', '.join(given)}: run `{PROG} enroll --revoke "
                               "AGENT --reason TEXT`")
        _revoke(obj, revoke_agent, reason)
        return
    missing = [name for name, value in (("--agent", agent), ("--venue", venue), ("--pubkey", pubkey),
                                        ("--institution", institution)) if value is None]
    if missing:
        raise CommandError(f"missing {', '.join(missing)}: enrolling needs --agent, --venue, --institution and "
                           f"--pubkey (or revoke with `{PROG} enroll --revoke AGENT --reason TEXT`)")
    if reason is not None:
        raise CommandError("--reason goes with --revoke: leave it out when enrolling")
    assert agent is not None and venue is not None and pubkey is not None
    # Validate the key before touching config or database: bad input answers fast.
    from exam_contract.signing import PublicKeyError, parse_public_key
    try:
        parse_public_key(pubkey)
    except PublicKeyError as exc:
        raise CommandError(f"--pubkey: {exc}; pass the line `exam-edge pubkey` prints") from exc
    engine = _engine(obj.config())
    try:
        click.echo(do_enroll(session_factory(engine), agent, venue, pubkey, institution, replace, reinstate))
    except EnrollError as exc:
        raise CommandError(str(exc)) from exc
    _checkpoint_after(obj)


def _revoke(obj: CliContext, agent: str, reason: str | None) -> None:
    from datetime import datetime, timezone

    from .audit import local_actor
    from .db import session_factory
    from .revocation import RevokeError, revoke_agent

    try:
        click.echo(revoke_agent(session_factory(_engine(obj.config())), agent, reason, local_actor(),
                                datetime.now(timezone.utc)))
    except RevokeError as exc:
        raise CommandError(str(exc)) from exc
    _checkpoint_after(obj)


@cli.command("agents")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def agents_cmd(obj: CliContext, as_json: bool) -> None:
    """Enrolled agents: venue, institution, current key, stored records, and whether revoked (when, by whom, why)."""
    from .db import session_factory
    from .revocation import list_agents

    with session_factory(_engine(obj.config()))() as session:
        views = list_agents(session)
    if as_json:
        click.echo(json.dumps([v.to_json() for v in views], ensure_ascii=False, indent=2))
        return
    if not views:
        click.echo(f"no enrolled agents: enrol one with `{PROG} enroll`")
    for view in views:
        click.echo(view.line())


@cli.command("keys")
@click.option("--agent", default=None, help="Only this agent.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def keys_cmd(obj: CliContext, agent: str | None, as_json: bool) -> None:
    """Every key each agent was enrolled with, and when it was valid (records name the key that signed them)."""
    from exam_contract.canonical import format_time

    from .admin import agent_keys
    from .db import session_factory

    from .revocation import list_agents

    with session_factory(_engine(obj.config()))() as session:
        views = agent_keys(session, [agent] if agent else None)
        revoked = {a.id: a.revoked_at for a in list_agents(session, [agent] if agent else None) if a.revoked_at}
    if agent and not views:
        raise CommandError(f"agent {agent} has no enrolled key: enrol it with `{PROG} enroll`")
    if as_json:
        click.echo(json.dumps([{"agent": v.agent, "public_key": v.public_key, "fingerprint": v.fingerprint,
                                "valid_from": format_time(v.valid_from),
                                "valid_to": format_time(v.valid_to) if v.valid_to else None,
                                "retired_reason": v.retired_reason,
                                "agent_revoked_at": format_time(revoked[v.agent]) if v.agent in revoked else None}
                               for v in views], indent=2))
        return
    for v in views:
        until = f"until {format_time(v.valid_to)} ({v.retired_reason})" if v.valid_to else "current"
        state = f"  (agent revoked {format_time(revoked[v.agent])})" if v.agent in revoked else ""
        click.echo(f"{v.agent}  {v.fingerprint}  from {format_time(v.valid_from)}  {until}{state}")


@cli.command("rotate-key")
@click.option("--reason", required=True,
              help="Why the key is replaced (audit log), e.g. yearly rotation or suspected leak.")
@click.pass_obj
def rotate_key(obj: CliContext, reason: str) -> None:
    """Replace the collector key (it signs audit checkpoints and evidence packages). Stop every `serve` first.

    The old key hands over to the new one in the audit log and the new key vouches for the old, so the whole
    log keeps verifying with the new key alone; packages exported before keep verifying with the key they
    carry. The old private key is kept beside the new one as KEY_FILE.retired-STAMP: store it offline or
    destroy it."""
    import os
    from datetime import datetime, timezone

    from exam_contract.files import fsync_dir
    from exam_contract.signing import key_fingerprint, load_private_key, public_key_b64

    from . import audit
    from .db import session_factory

    cfg = obj.config()
    key_file = cfg.key_file
    old = load_private_key(key_file)
    sessions = session_factory(_engine(cfg))
    pending = key_file.with_name(key_file.name + ".new")
    new = load_private_key(pending) if pending.exists() else generate_private_key(pending)
    with sessions() as session:
        recorded = audit.retired_by_rotation(session, public_key_b64(old))
    if recorded is None:
        handover, rotation = audit.rotate_collector_key(sessions, old, new, audit.local_actor(), reason)
        note = f"audit checkpoints {handover.id} (old key) and {rotation.id} (new key)"
    else:  # an earlier run recorded the rotation and stopped before the files were swapped
        note = f"recorded before in audit entry {recorded}"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    retired = key_file.with_name(f"{key_file.name}.retired-{stamp}")
    os.link(key_file, retired)
    os.replace(pending, key_file)
    fsync_dir(key_file.parent)
    click.echo(f"collector key rotated ({note}): old SHA-256 {key_fingerprint(old)}, new SHA-256 "
               f"{key_fingerprint(new)}; old private key kept in {retired} (store it offline or destroy it); "
               f"start `{PROG} serve` again and publish the new fingerprint to those who pin it")


# ---------------------------------------------------------------------------- serve

@cli.command()
@click.option("--duration", type=click.FloatRange(min=0), default=None,
              help="Stop after this many seconds (default: until SIGTERM/SIGINT).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_obj
def serve(obj: CliContext, duration: float | None, verbose: bool) -> None:
    """Run MQTT ingest, and the HTTP API and web portal on [http] listen."""
    from datetime import timedelta

    from .ingest import Ingest
    from .object_locks import LockSettings
    from .service import CollectorService

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s")
    for noisy in ("sqlalchemy", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = obj.config()
    # Held until this process ends: `doctor` then leaves the broker login alone (collector/serve_lock.py).
    from .serve_lock import hold_serve_lock, lock_path

    try:
        lock_fd = hold_serve_lock(cfg.data_dir)
    except OSError as exc:
        raise CommandError(f"cannot open {lock_path(cfg.data_dir)} ({exc.strerror or exc}): fix [collector] data_dir "
                           "or its owner") from exc
    click.get_current_context().call_on_close(lambda: os.close(lock_fd))
    engine = _engine(cfg)
    ingest = Ingest(engine, cfg.storage_dir, limits=cfg.ingest, store=_store(cfg),
                    locks=LockSettings.from_config(cfg))
    service = CollectorService(cfg.mqtt, ingest, workers=cfg.workers, queue_size=cfg.queue_size,
                               finishers=cfg.finishers, staging_ttl=timedelta(hours=cfg.staging_ttl_hours))
    from exam_contract.signing import load_private_key
    from .audit import CHECKPOINT_TOPIC, CheckpointLoop

    # Signed audit checkpoints, each also published (retained) so that a copy is held off this host.
    checkpoints = CheckpointLoop(ingest.sessions, load_private_key(cfg.key_file), publish=lambda payload: (
        service.client.publish(CHECKPOINT_TOPIC, payload, qos=1, retain=True)))
    from .alerts import AlertLoop

    alerts = AlertLoop(ingest.sessions, lambda topic, payload, retain: service.client.publish(
        topic, payload, qos=1, retain=retain), cfg.alerts.webhook_url, cfg.alerts.interval_seconds)  # issue 4
    from .schedule import Horizon, ScheduleLoop

    # Each agent's schedule (retained): its venue's batch windows, whose footage it uploads first.
    schedules = ScheduleLoop(ingest.sessions, Horizon(timedelta(minutes=cfg.coverage.pre_margin_minutes),
                                                      timedelta(minutes=cfg.coverage.post_margin_minutes)),
                             publish=lambda topic, payload: service.client.publish(
                                 topic, payload, qos=1, retain=True).rc == 0)
    log = logging.getLogger("collector")
    from .http_security import TlsFilesError
    from .web import HttpServer, ListenError, Portal  # issue 6

    try:
        http = HttpServer(Portal(cfg, ingest.sessions, checkpoints.key, store=ingest.store), cfg.http.listen)
    except (ListenError, TlsFilesError) as exc:
        raise CommandError(str(exc)) from exc

    def _stop(signum: int, _frame) -> None:  # noqa: ANN001
        log.info("signal %s: stopping", signum)
        service.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    service.start()
    checkpoints.start()
    try:
        http.start()
    except ListenError as exc:
        # Ingest of evidence must not stop because the portal's port is taken: say so loudly and go on.
        log.error("HTTP API and portal not served: %s", exc)
    alerts.start()
    schedules.start()
    log.info("collector %s serving MQTT ingest from %s, storage %s", ingest.instance_id, cfg.mqtt.address,
             ingest.store)
    def before_disconnect() -> None:
        # The workers have drained: the shutdown checkpoint covers everything they appended, and is still
        # published (retained) while the broker connection is up.
        http.stop()
        schedules.stop()
        checkpoints.stop()

    try:
        service.wait(duration)
    finally:
        service.shutdown(before_disconnect=before_disconnect)
        alerts.stop()
    log.info("stopped; %s messages handled, %s handler errors", service.handled, service.errors)


# ---------------------------------------------------------------------------- summary / events

def _shanghai(utc_text: str | None) -> str:
    """A manifest time (UTC) as people at the venue read it: Asia/Shanghai wall clock."""
    from zoneinfo import ZoneInfo

    from exam_contract.canonical import parse_time

    if utc_text is None:
        return "-"
    return parse_time(utc_text).astimezone(ZoneInfo("Asia/Shanghai")).strftime("%Y-%m-%d %H:%M:%S+08:00")


def _fmt_row(lang: str, item) -> str:  # noqa: ANN001
    L = LABELS[lang]
    kind = L.get(item.room_kind, item.room_kind)
    line = (f"{L['venue']} {item.venue}  {L['camera']} {item.camera}  {L['room']} {item.room} ({kind})  "
            f"{L['segments']} {item.segments}  {L['gap_records']} {item.gap_records}  "
            f"{L['seconds']} {item.seconds_covered:.1f}  {L['holes']} {item.chain_holes}")
    if item.missing_seqs:
        shown = ",".join(str(s) for s in item.missing_seqs[:20]) + ("…" if len(item.missing_seqs) > 20 else "")
        line += f" ({L['seq']} {shown})"
    if item.first_start:
        line += f"  {L['from']} {_shanghai(item.first_start)} {L['to']} {_shanghai(item.last_end)}"
    return line


@cli.command()
@click.option("--verify", "do_verify", is_flag=True,
              help="Re-hash files, re-check signatures and chains (exit 4 on any failure).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--lang", type=click.Choice(["zh", "en"]), default="zh", show_default=True)
@click.option("--venue", default=None, help="Only this venue (备案场所).")
@click.option("--camera", default=None, help="Only this camera id (in every venue unless --venue is given).")
@click.option("--since", "since_text", default=None, metavar="TIME",
              help="Only records ending at or after TIME: a date or ISO 8601 time (no offset: Asia/Shanghai), e.g. "
                   "2026-11-30 or 2026-11-30T08:00; chain holes are then counted from the first seq since then.")
@click.pass_obj
def summary(obj: CliContext, do_verify: bool, as_json: bool, lang: str, venue: str | None, camera: str | None,
            since_text: str | None) -> None:
    """Per venue/camera: room, segments, gap records, seconds covered, chain holes (--verify: of the records
    --venue/--camera/--since select, all by default)."""
    from .admin import FootageFilter, summarize, summary_json, verify_all
    from .db import session_factory
    from .holds import HoldError, parse_moment

    try:
        since = parse_moment(since_text, "--since") if since_text is not None else None
    except HoldError as exc:
        raise CommandError(str(exc)) from exc
    only = FootageFilter(venue=venue, camera=camera, since=since)
    cfg = obj.config()
    sessions = session_factory(_engine(cfg))
    items = summarize(sessions, only)
    problems = verify_all(sessions, _store(cfg), only) if do_verify else []
    L = LABELS[lang]
    if as_json:
        out: dict = {"cameras": summary_json(items)}
        if do_verify:
            out["verified"] = not problems
            out["problems"] = [{"venue": p.venue, "camera": p.camera, "seq": p.seq, "problem": p.what}
                               for p in problems]
        click.echo(json.dumps(out, ensure_ascii=False, indent=2))
    else:
        if not items:
            click.echo(L["none"])
        for item in items:
            click.echo(_fmt_row(lang, item))
        if do_verify:
            if problems:
                click.echo(L["problems"].format(n=len(problems)))
                for p in problems:
                    click.echo(f"  {L['venue']} {p.venue} {L['camera']} {p.camera} {L['seq']} {p.seq}: {p.what}")
            else:
                click.echo(L["verified"])
    if problems:
        raise SystemExit(exitcodes.INTEGRITY)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--limit", type=click.IntRange(min=1), default=200, show_default=True, help="Newest N events.")
@click.pass_obj
def events(obj: CliContext, as_json: bool, limit: int) -> None:
    """Ingest events: rejections (with reason), chain holes and their closing, enrolments, handler errors."""
    from .admin import list_events
    from .db import session_factory

    rows = list_events(session_factory(_engine(obj.config())), limit)
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    for r in rows:
        where = "/".join(x for x in (r["venue"], r["camera"]) if x) or "-"
        reason = f" {r['reason']}" if r["reason"] else ""
        click.echo(f"{r['at']} {r['event']}{reason} agent={r['agent'] or '-'} {where} "
                   f"file={r['file_id'] or '-'}: {r['detail'] or ''}".rstrip())


# ---------------------------------------------------------------------------- holds (issue 5)

@cli.group()
def hold() -> None:
    """Legal holds: footage under an active hold is never deleted."""


@hold.command("add")
@click.option("--batch", "batch_id", default=None, help="Hold every camera and window of this batch.")
@click.option("--camera", default=None, help="Hold this camera's footage between --from and --to.")
@click.option("--venue", default=None, help="Venue of --camera (camera ids are unique within a venue only).")
@click.option("--from", "from_text", default=None, help="Start, ISO 8601 (no offset: Asia/Shanghai).")
@click.option("--to", "to_text", default=None, help="End, ISO 8601 (no offset: Asia/Shanghai).")
@click.option("--reason", required=True, help="Why the footage must be kept.")
@click.option("--case", "case_ref", required=True, help="Case reference (complaint, investigation).")
@click.pass_obj
def hold_add(obj: CliContext, batch_id: str | None, camera: str | None, venue: str | None, from_text: str | None,
             to_text: str | None, reason: str, case_ref: str) -> None:
    """Place a hold by batch, or by camera and time range."""
    from .audit import local_actor
    from .db import session_factory
    from .holds import HoldError, add_hold, parse_moment

    sessions = session_factory(_engine(obj.config()))
    try:
        from_at = parse_moment(from_text, "--from") if from_text else None
        to_at = parse_moment(to_text, "--to") if to_text else None
        view = add_hold(sessions, batch_id=batch_id, venue=venue, camera=camera,
                        from_at=from_at, to_at=to_at, reason=reason, case_ref=case_ref, actor=local_actor())
    except HoldError as exc:
        raise CommandError(str(exc)) from exc
    if camera is not None and venue is None:
        click.echo(f"note: no --venue given, hold {view.id} covers camera {camera} in every venue", err=True)
    if batch_id is not None:
        from .holds import batch_known

        with session_factory(_engine(obj.config()))() as session:
            if not batch_known(session, batch_id):
                click.echo(f"note: batch {batch_id} is not imported; until it is, hold {view.id} keeps ALL footage "
                           "from deletion", err=True)
    click.echo(f"hold {view.id} placed on {view.scope()} (case {view.case_ref})")
    _checkpoint_after(obj)
    _sync_hold(obj, sessions, view.id)


@hold.command("release")
@click.argument("hold_id", type=int)
@click.option("--reason", required=True, help="Why the hold ends (e.g. case closed).")
@click.pass_obj
def hold_release(obj: CliContext, hold_id: int, reason: str) -> None:
    """Release a hold (needs a reason; logged)."""
    from .audit import local_actor
    from .db import session_factory
    from .holds import HoldError, release_hold

    sessions = session_factory(_engine(obj.config()))
    try:
        view = release_hold(sessions, hold_id, reason=reason, actor=local_actor())
    except HoldError as exc:
        raise CommandError(str(exc)) from exc
    click.echo(f"hold {view.id} on {view.scope()} released")
    _checkpoint_after(obj)
    _sync_hold(obj, sessions, view.id)


@hold.command("sync")
@click.argument("hold_id", type=int)
@click.pass_obj
def hold_sync(obj: CliContext, hold_id: int) -> None:
    """Make the storage's legal holds follow a hold again (after an object_lock_failed alarm); object storage only."""
    from .db import session_factory
    from .models import LegalHold

    sessions = session_factory(_engine(obj.config()))
    with sessions() as session:
        if session.get(LegalHold, hold_id) is None:
            raise CommandError(f"hold {hold_id} does not exist: see `{PROG} hold list`")
    _sync_hold(obj, sessions, hold_id)


@hold.command("list")
@click.option("--all", "include_released", is_flag=True, help="Also released holds.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def hold_list(obj: CliContext, include_released: bool, as_json: bool) -> None:
    """Active holds (or all with --all)."""
    from exam_contract.canonical import format_time
    from .db import session_factory
    from .holds import list_holds

    with session_factory(_engine(obj.config()))() as session:
        views = list_holds(session, include_released)
    if as_json:
        def t(m):  # noqa: ANN001, ANN202
            return format_time(m) if m else None
        click.echo(json.dumps([{"id": v.id, "active": v.active, "batch": v.batch_id, "venue": v.venue,
                                "camera": v.camera, "from": t(v.from_at), "to": t(v.to_at), "reason": v.reason,
                                "case": v.case_ref, "created_at": t(v.created_at), "created_by": v.created_by,
                                "released_at": t(v.released_at), "released_by": v.released_by,
                                "release_reason": v.release_reason} for v in views], ensure_ascii=False, indent=2))
        return
    if not views:
        click.echo("no holds" if include_released else "no active holds")
    for v in views:
        state = ("active" if v.released_at is None
                 else f"released {format_time(v.released_at)} by {v.released_by}: {v.release_reason}")
        click.echo(f"{v.id}  {v.scope()}  case {v.case_ref}  by {v.created_by} {format_time(v.created_at)}  "
                   f"[{state}]  {v.reason}")


# ---------------------------------------------------------------------------- batches (issue 4)

@cli.group()
def batches() -> None:
    """Exam batches (批次): import, list, coverage report."""


@batches.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--actor", default=None, help="Who imports (for the audit log; default: the OS user).")
@click.option("--allow-room-change", is_flag=True, help="Accept a re-import that moves a part to other rooms.")
@click.option("--lang", type=click.Choice(["zh", "en"]), default="zh", show_default=True)
@click.pass_obj
def batches_import(obj: CliContext, file: Path, actor: str | None, allow_room_change: bool, lang: str) -> None:
    """Import batch parts from CSV or JSON (batch_id,institution,venue,occupation,level,part,room,start,end)."""
    from .audit import local_actor
    from .batch_view import render_import
    from .batches import BatchImportError, import_file
    from .db import session_factory

    if not file.is_file():
        raise CommandError(f"batch file {file} does not exist: give the path of the CSV or JSON export")
    sessions = session_factory(_engine(obj.config()))
    try:
        result = import_file(sessions, file, actor=actor or local_actor(), allow_room_change=allow_room_change)
    except BatchImportError as exc:
        for error in exc.errors:
            click.echo(f"{file}: {error}", err=True)
        raise CommandError(f"{file}: {len(exc.errors)} problem(s), nothing imported; fix the rows listed above "
                           "and import the file again") from exc
    click.echo(render_import(result, lang))
    _checkpoint_after(obj)
    _extend_locks(obj, sessions, [b.batch_id for b in result.batches])


def _extend_locks(obj: CliContext, sessions: sessionmaker[Session], batch_ids: list[str]) -> None:
    """After an import: lengthen the storage locks of footage linked to a part that ends later than the upload
    lock covers (a part longer than [storage] longest_exam_day_hours)."""
    from datetime import datetime, timezone

    from .audit import ACTION_LOCK_EXTEND
    from .object_locks import extend_linked_locks

    if batch_ids:
        _storage_pass(obj, sessions, "storage locks for batch links", ACTION_LOCK_EXTEND,
                      f"batches:{','.join(batch_ids)}"[:500],
                      lambda store, locks, progress: extend_linked_locks(
                          sessions, store, locks, datetime.now(timezone.utc), batch_ids=batch_ids, progress=progress),
                      "`exam-retention enforce` extends them on its next run, or import the file again once the "
                      "storage answers")


@batches.command("show")
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (times in UTC and Asia/Shanghai).")
@click.option("--lang", type=click.Choice(["zh", "en"]), default="zh", show_default=True)
@click.pass_obj
def batches_show(obj: CliContext, batch_id: str, as_json: bool, lang: str) -> None:
    """Coverage of every part and camera of a batch; exit 3 when a finished part has gaps or no footage."""
    from .batch_view import render_report
    from .batches import STATUS_GAPS, STATUS_NO_FOOTAGE, BatchNotFound, batch_report, report_json
    from .db import session_factory

    cfg = obj.config()
    sessions = session_factory(_engine(cfg))
    try:
        with sessions() as session:
            report = batch_report(session, batch_id, tolerance_seconds=cfg.coverage.gap_tolerance_seconds,
                                  pre_margin_minutes=cfg.coverage.pre_margin_minutes,
                                  post_margin_minutes=cfg.coverage.post_margin_minutes,
                                  staging_dir=cfg.staging_dir)
    except BatchNotFound as exc:
        raise CommandError(str(exc)) from exc
    click.echo(json.dumps(report_json(report), ensure_ascii=False, indent=2) if as_json
               else render_report(report, lang))
    if any(p.status in (STATUS_GAPS, STATUS_NO_FOOTAGE) for p in report.parts):
        raise SystemExit(exitcodes.GAPS)


@batches.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--lang", type=click.Choice(["zh", "en"]), default="zh", show_default=True)
@click.pass_obj
def batches_list(obj: CliContext, as_json: bool, lang: str) -> None:
    """Imported batches, oldest first."""
    from exam_contract.canonical import format_time

    from .batch_view import render_list
    from .batches import list_batches
    from .db import session_factory

    with session_factory(_engine(obj.config()))() as session:
        items = list_batches(session)
    if as_json:
        click.echo(json.dumps([{"batch_id": b.batch_id, "institution": b.institution, "occupation": b.occupation,
                                "level": b.level, "parts": b.parts,
                                "start": format_time(b.first_start) if b.first_start else None,
                                "end": format_time(b.last_end) if b.last_end else None} for b in items],
                              ensure_ascii=False, indent=2))
    else:
        click.echo(render_list(items, lang))


# ---------------------------------------------------------------------------- evidence export (issue 6)

@cli.command("export")
@click.argument("batch_id")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="New folder for the package (with --zip: OUT.zip).")
@click.option("--zip", "make_zip", is_flag=True, help="Write one zip file instead of a folder.")
@click.option("--reason", required=True, help="Why the footage is exported (audit log).")
@click.option("--actor", default=None, help="Who exports (for the audit log; default: the OS user).")
@click.option("--no-viewing", is_flag=True, help="Skip the per-camera viewing MP4s.")
@click.option("--check-hashes", is_flag=True, help="Re-hash each stored file while copying (slower; reports "
              "damaged storage at once instead of at verification).")
@click.pass_obj
def export_cmd(obj: CliContext, batch_id: str, out: Path, make_zip: bool, reason: str, actor: str | None,
               no_viewing: bool, check_hashes: bool) -> None:
    """Write a batch's verifiable evidence package (segments, signed package.json, keys, verify.py)."""
    from exam_contract.signing import load_private_key

    from .audit import local_actor
    from .batches import BatchNotFound
    from .db import session_factory
    from .export import ExportError, ExportSettings, ProgressBar, export_batch

    cfg = obj.config()
    key = load_private_key(cfg.key_file)
    settings = ExportSettings(tolerance_seconds=cfg.coverage.gap_tolerance_seconds,
                              pre_margin_minutes=cfg.coverage.pre_margin_minutes,
                              post_margin_minutes=cfg.coverage.post_margin_minutes,
                              viewing=not no_viewing, make_zip=make_zip, check_hashes=check_hashes)
    bar = ProgressBar(sys.stderr)
    try:
        result = export_batch(session_factory(_engine(cfg)), store=_store(cfg), key=key,
                              batch_id=batch_id, out=out, actor=actor or local_actor(), reason=reason,
                              settings=settings, staging_dir=cfg.staging_dir, progress=bar.update)
    except (ExportError, BatchNotFound) as exc:
        raise CommandError(str(exc)) from exc
    finally:
        bar.close()
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"batch {batch_id}: {result.segments} segments ({result.bytes} bytes), {len(result.clips)} viewing "
               f"MP4s, {len(result.gaps)} coverage gap(s) written to {result.path} (audit entry {result.audit_seq})")
    for gap in result.gaps:
        click.echo(f"  覆盖缺口 {gap['part']} {gap['room']} {gap['camera'] or '-'}: {gap['start_local']} – "
                   f"{gap['end_local']} ({gap['seconds']} s; {', '.join(gap['causes'])})")
    if result.source_problems:
        for problem in result.source_problems:
            click.echo(f"integrity: {problem}", err=True)
        raise CommandError(f"{len(result.source_problems)} integrity problem(s) in the stored footage (listed "
                           "above: missing or altered files, unreadable paths, keys missing from the key history); "
                           f"the package records them and will verify NOT_OK: run `{PROG} summary --verify` to see "
                           "the damage", exitcodes.INTEGRITY)
    click.echo(f"check it with: {PROG} verify-package {result.path}  (or: python3 verify.py in the package)")


@cli.command("verify-package")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--expect-key", default=None, metavar="FINGERPRINT",
              help="The collector key's SHA-256 fingerprint, as the operator publishes it (`exam-collector keys`, "
                   "`rotate-key`); without it the key is only taken from the package.")
@click.option("--collector-key", default=None, hidden=True)  # the earlier spelling: the key itself, base64
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify_package_cmd(package: Path, expect_key: str | None, collector_key: str | None, as_json: bool) -> None:
    """Verify an evidence package: OK (exit 0), OK_WITH_GAPS (exit 3) or NOT_OK (exit 4)."""
    from .evidence_verify import PackageUnreadable, verify_package

    try:
        result = verify_package(package, expect_key or collector_key)
    except PackageUnreadable as exc:
        raise CommandError(str(exc)) from exc
    click.echo(json.dumps(result.to_dict(), ensure_ascii=False, indent=2) if as_json else result.render())
    if result.exit_code:
        raise SystemExit(result.exit_code)


# ---------------------------------------------------------------------------- portal users (issue 6)

@cli.group()
def users() -> None:
    """Accounts of the HTTP API and web portal."""


@users.command("add")
@click.argument("username")
@click.option("--role", type=click.Choice(["inspector", "admin"]), required=True)
@click.option("--institution", "institutions", multiple=True,
              help="Institution code (机构代码) an inspector sees; repeat.")
@click.pass_obj
def users_add(obj: CliContext, username: str, role: str, institutions: tuple[str, ...]) -> None:
    """Create an account (password hashed with scrypt): prompted for twice, or one line on stdin when piped."""
    from .audit import local_actor
    from .db import session_factory
    from .users import UserError, add_user

    if role == "inspector" and not any(c.strip() for c in institutions):
        raise CommandError("an inspector needs at least one --institution CODE (机构代码), e.g. JL2201001")
    password = _new_password()
    try:
        user = add_user(session_factory(_engine(obj.config())), username, password, role, institutions,
                        actor=local_actor())
    except UserError as exc:
        raise CommandError(str(exc)) from exc
    scope = "all institutions" if user.is_admin else ", ".join(user.institutions)
    click.echo(f"user {user.username} ({user.role}) created; sees {scope}")
    _checkpoint_after(obj)


@users.command("list")
@click.pass_obj
def users_list(obj: CliContext) -> None:
    """Accounts, their roles and institutions."""
    from .db import session_factory
    from .users import list_users

    with session_factory(_engine(obj.config()))() as session:
        for user in list_users(session):
            state = "  disabled" if user.disabled else ""
            click.echo(f"{user.username}  {user.role}  {','.join(user.institutions) or '*'}{state}")


def _new_password() -> str:
    """A new password: prompted for twice on a terminal, else one line of stdin."""
    if sys.stdin.isatty():
        return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))
    return sys.stdin.readline().rstrip("\r\n")


def _set_disabled(obj: CliContext, username: str, disabled: bool) -> None:
    from .audit import local_actor
    from .db import session_factory
    from .users import UserError, set_disabled

    try:
        change = set_disabled(session_factory(_engine(obj.config())), username, disabled, actor=local_actor())
    except UserError as exc:
        raise CommandError(str(exc)) from exc
    if not change.changed:
        click.echo(f"user {username} is already {'disabled' if disabled else 'enabled'}; nothing changed")
        return
    click.echo(f"user {username} disabled; {change.sessions_ended} session(s) ended" if disabled
               else f"user {username} enabled; they can log in again")
    _checkpoint_after(obj)


@users.command("disable")
@click.argument("username")
@click.pass_obj
def users_disable(obj: CliContext, username: str) -> None:
    """Disable an account: its sessions end at once, and it cannot log in until `users enable`."""
    _set_disabled(obj, username, True)


@users.command("enable")
@click.argument("username")
@click.pass_obj
def users_enable(obj: CliContext, username: str) -> None:
    """Let a disabled account log in again (its old sessions stay ended)."""
    _set_disabled(obj, username, False)


@users.command("reset-password")
@click.argument("username")
@click.pass_obj
def users_reset_password(obj: CliContext, username: str) -> None:
    """Set a new password (prompted for twice, or one line on stdin when piped); the account's sessions end."""
    from .audit import local_actor
    from .db import session_factory
    from .users import UserError, get_user, reset_password

    sessions = session_factory(_engine(obj.config()))
    try:
        with sessions() as session:
            get_user(session, username)   # an unknown name fails before the password is asked for
        change = reset_password(sessions, username, _new_password(), actor=local_actor())
    except UserError as exc:
        raise CommandError(str(exc)) from exc
    click.echo(f"password of user {username} reset; {change.sessions_ended} session(s) ended")
    _checkpoint_after(obj)


# ---------------------------------------------------------------------------- storage (issue 15)

@cli.group()
def storage() -> None:
    """Stored footage across backends: move it from the filesystem into the S3 bucket, remove the old files."""


def _migration_stores(obj: CliContext, from_dir: Path | None):  # noqa: ANN202 - (sessions, store, source)
    from .db import session_factory
    from .storage_migrate import MigrationError, check_stores, default_source

    cfg = obj.config()
    sessions = session_factory(_engine(cfg))
    source = default_source((from_dir or cfg.storage_dir).expanduser().resolve())
    store = _store(cfg)
    try:
        check_stores(store, source)
    except MigrationError as exc:
        raise CommandError(str(exc)) from exc
    return sessions, store, source


@storage.command("migrate")
@click.option("--to", "target", type=click.Choice(["s3"]), required=True,
              help="The backend to move footage to: the [storage] table of this config (backend \"s3\").")
@click.option("--from-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The folder that held the footage (default: [collector] storage_dir).")
@click.option("--actor", default=None, help="Who migrates (for the audit log; default: the OS user).")
@click.pass_obj
def storage_migrate(obj: CliContext, target: str, from_dir: Path | None, actor: str | None) -> None:
    """Copy every stored segment still on the filesystem into the S3 bucket, locked until its floor, verify it and
    record it in its row. Safe to interrupt and run again; old files stay until `storage prune-migrated`."""
    from .audit import local_actor
    from .export import ProgressBar
    from .object_locks import LockSettings
    from .storage_migrate import MigrationStopped, migrate_to_s3

    sessions, store, source = _migration_stores(obj, from_dir)
    bar = ProgressBar(sys.stderr)
    try:
        report = migrate_to_s3(sessions, store, source, LockSettings.from_config(obj.config()),
                               actor=actor or local_actor(), progress=bar.update)
    except MigrationStopped as exc:
        raise CommandError(str(exc), exitcodes.UNREACHABLE) from exc
    finally:
        bar.close()
        _checkpoint_after(obj)
    click.echo(report.line())
    for failure in report.failed:
        click.echo(f"  not migrated: {failure}", err=True)
    if report.failed:
        raise CommandError(f"{len(report.failed)} segment(s) could not be migrated (listed above; they stay on the "
                           f"filesystem): fix what each line names, then run `{PROG} storage migrate --to s3` again",
                           exitcodes.INTEGRITY)
    click.echo(f"next: {PROG} storage prune-migrated --from-dir {source.root} (a dry run; then --yes)")


@storage.command("prune-migrated")
@click.option("--from-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The folder that held the footage (default: [collector] storage_dir).")
@click.option("--yes", is_flag=True, help="Remove the files (without it: only say what would be removed).")
@click.option("--actor", default=None, help="Who prunes (for the audit log; default: the OS user).")
@click.pass_obj
def storage_prune_migrated(obj: CliContext, from_dir: Path | None, yes: bool, actor: str | None) -> None:
    """Remove old files of migrated segments, each only after its object version in S3 is re-hashed equal to its
    row and locked at least until the row says. A dry run unless --yes."""
    from .audit import local_actor
    from .export import ProgressBar
    from .storage_migrate import prune_migrated

    sessions, store, source = _migration_stores(obj, from_dir)
    bar = ProgressBar(sys.stderr)
    try:
        report = prune_migrated(sessions, store, source, actor=actor or local_actor(), yes=yes,
                                progress=bar.update)
    finally:
        bar.close()
        if yes:
            _checkpoint_after(obj)
    click.echo(report.line())
    for kept in report.kept:
        click.echo(f"  kept: {kept}", err=True)
    if report.kept:
        raise CommandError(f"{len(report.kept)} old file(s) kept because their object did not verify (listed "
                           "above): run `exam-retention scrub` and check the storage before pruning again",
                           exitcodes.INTEGRITY)


# ---------------------------------------------------------------------------- doctor (issue 14)

@cli.command()
@click.option("--timeout", type=click.FloatRange(min=1), default=10.0, show_default=True,
              help="Seconds to wait for the broker (each step).")
@click.pass_obj
def doctor(obj: CliContext, timeout: float) -> None:
    """Check config, collector key file, database and schema, storage (write, fsync, free space; the bucket), the
    portal's TLS files, the broker (TCP, TLS, login) and the clock against PostgreSQL; one line per check with the
    fix; exits with the first failure's code."""
    from exam_contract.doctor import exit_code, render

    from .doctor import run_doctor

    checks = run_doctor(obj.path, timeout)
    click.echo(render(checks))
    sys.exit(exit_code(checks))


# ---------------------------------------------------------------------------- entry point

def run_main(group: click.Group, prog: str, argv: list[str] | None) -> None:
    """Run a click command group as README.md (The three commands) states for every command: each failure is one
    line on stderr (what is wrong and how to fix it) and its exit code. Shared by exam-collector and exam-retention."""
    from exam_contract.mqtt import BrokerRefused, BrokerUnreachable

    from .db import DatabaseUnavailable
    from .footage_store import StorageSetupError, StorageUnreachable

    def error(message: str, code: int) -> None:
        click.echo(f"{prog}: error: {' '.join(str(message).split())}", err=True)
        sys.exit(code)

    try:
        group.main(args=argv, prog_name=prog, standalone_mode=False)
    except click.exceptions.Abort:
        error("aborted", exitcodes.INPUT)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        error(exc.format_message() + (f" (see `{prog} --help`)" if isinstance(exc, click.UsageError) else ""),
              exitcodes.INPUT)
    except CommandError as exc:
        error(str(exc), exc.code)
    except (ConfigError, KeyFileError, BrokerRefused) as exc:
        error(str(exc), exitcodes.INPUT)
    except (DatabaseUnavailable, BrokerUnreachable, StorageUnreachable) as exc:
        error(str(exc), exitcodes.UNREACHABLE)
    except StorageSetupError as exc:
        error(str(exc), exitcodes.INPUT)
    sys.exit(exitcodes.OK)


def main(argv: list[str] | None = None) -> None:
    run_main(cli, PROG, argv)


if __name__ == "__main__":
    main()

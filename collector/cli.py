"""`exam-collector`: central ingest, database and inspection commands."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import click

from exam_contract.signing import KeyFileError, generate_private_key

from .config import CollectorConfig, ConfigError, load_config, parse_mqtt_url

PROG = "exam-collector"
DEFAULT_CONFIG = Path("/etc/exam-collector/collector.toml")
DEFAULT_DATA_DIR = Path("/var/lib/exam-collector")

EXIT_OK, EXIT_INPUT, EXIT_UNREACHABLE, EXIT_GAPS, EXIT_INTEGRITY = 0, 1, 2, 3, 4

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


class Fail(Exception):
    def __init__(self, message: str, code: int = EXIT_INPUT) -> None:
        super().__init__(message)
        self.code = code


class Obj:
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
    ctx.obj = Obj(config_path)


# ---------------------------------------------------------------------------- init

CONFIG_TEMPLATE = """\
# exam-collector config (written by `exam-collector init`). Relative paths are relative to this file.

[collector]
data_dir = {data_dir}
# SQLite for one collector; PostgreSQL for several: "postgresql+psycopg://user@host/db"
database_url = {database_url}
# Stored footage and staging/ (chunk reassembly) must be on the same volume.
storage_dir = {storage_dir}
# Signs audit checkpoints and evidence packages. Keep it private (mode 0600).
key_file = {key_file}
# workers = 2          # ingest worker threads
# queue_size = 2000    # messages waiting for the workers, in total

[mqtt]
url = {broker}
# username = "collector-1"
# password_file = "/etc/exam-collector/mqtt.pass"
# ca_file = "/etc/exam-collector/ca.pem"     # for mqtts://
# client_id = "exam-collector-1"             # stable per instance: the broker keeps its session

[http]
listen = "127.0.0.1:8080"   # not served yet (HTTP API is a later issue)

[coverage]
pre_margin_minutes = 15
post_margin_minutes = 15
gap_tolerance_seconds = 2

[retention]
margin_days = 7
# unlinked_retention_days = 90   # optional: shorter keep for footage never linked to a batch
"""


def _toml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


@cli.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Where the database, key and footage go (default {DEFAULT_DATA_DIR}).")
@click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True, help="MQTT broker URL.")
@click.option("--database-url", default=None, help="Default: SQLite under the data dir.")
@click.pass_obj
def init(obj: Obj, data_dir: Path | None, broker: str, database_url: str | None) -> None:
    """Write a commented config and a new collector Ed25519 key (never overwrites)."""
    data_dir = (data_dir or DEFAULT_DATA_DIR).expanduser().resolve()
    config_path = obj.config_path or DEFAULT_CONFIG
    key_file = data_dir / "collector.key"
    parse_mqtt_url(broker, key="--broker")
    if database_url is not None and not database_url.startswith(("sqlite:", "postgresql")):
        raise Fail(f"--database-url {database_url!r} is not supported: use sqlite:////path/db or "
                   "postgresql+psycopg://user@host/db")
    if config_path.exists():
        raise Fail(f"config {config_path} already exists: remove it first or pass another --config PATH")
    if key_file.exists():
        raise Fail(f"key file {key_file} already exists: remove it first or choose another --data-dir")
    text = CONFIG_TEMPLATE.format(
        data_dir=_toml_str(str(data_dir)),
        database_url=_toml_str(database_url or f"sqlite:///{data_dir / 'collector.db'}"),
        storage_dir=_toml_str(str(data_dir / "storage")), key_file=_toml_str(str(key_file)),
        broker=_toml_str(broker))
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        config_path.parent.mkdir(parents=True, exist_ok=True)
        generate_private_key(key_file)
        with open(config_path, "x", encoding="utf-8") as handle:
            handle.write(text)
    except KeyFileError as exc:
        raise Fail(f"{exc}; or choose another --data-dir")
    except OSError as exc:
        raise Fail(f"cannot write {exc.filename}: {exc.strerror}; choose a writable --data-dir/--config")
    click.echo(f"wrote {config_path} and key {key_file}; next: {PROG} --config {config_path} db upgrade")


# ---------------------------------------------------------------------------- db

def _engine(cfg: CollectorConfig, check_schema: bool = True):  # -> Engine
    from .db import DatabaseUrlError, check_connection, current_revision, describe_url, head_revision, make_engine

    try:
        engine = make_engine(cfg.database_url)
    except DatabaseUrlError as exc:
        raise Fail(f"[collector] database_url: {exc}")
    check_connection(engine, cfg.database_url)
    if check_schema:
        current, head = current_revision(engine), head_revision()
        if current != head:
            raise Fail(f"database {describe_url(cfg.database_url)} is at schema revision {current or 'none'}, "
                       f"not {head}: run `{PROG} db upgrade`")
    return engine


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.pass_obj
def db_upgrade(obj: Obj) -> None:
    """Create or migrate the schema to the newest revision (SQLite or PostgreSQL)."""
    from .db import current_revision, describe_url, upgrade

    cfg = obj.config()
    engine = _engine(cfg, check_schema=False)
    upgrade(engine)
    click.echo(f"database {describe_url(cfg.database_url)} is at schema revision {current_revision(engine)}")


# ---------------------------------------------------------------------------- enroll

@cli.command()
@click.option("--agent", required=True, help="Agent id (also its MQTT username).")
@click.option("--venue", required=True, help="Venue code (备案场所), e.g. JL2201001-01.")
@click.option("--pubkey", required=True, help="Agent public key as `exam-edge pubkey` prints it.")
@click.option("--institution", default=None, help="Institution code (机构代码).")
@click.option("--replace", is_flag=True, help="Re-enrol an agent that is enrolled with another key or venue.")
@click.pass_obj
def enroll(obj: Obj, agent: str, venue: str, pubkey: str, institution: str | None, replace: bool) -> None:
    """Enrol an edge agent's public key for its venue."""
    from .admin import EnrollError, enroll as do_enroll
    from .db import session_factory

    # Validate the key before touching config or database: bad input answers fast.
    from exam_contract.signing import PublicKeyError, parse_public_key
    try:
        parse_public_key(pubkey)
    except PublicKeyError as exc:
        raise Fail(f"--pubkey: {exc}; pass the line `exam-edge pubkey` prints")
    engine = _engine(obj.config())
    try:
        click.echo(do_enroll(session_factory(engine), agent, venue, pubkey, institution, replace))
    except EnrollError as exc:
        raise Fail(str(exc))


# ---------------------------------------------------------------------------- serve

@cli.command()
@click.option("--duration", type=click.FloatRange(min=0), default=None,
              help="Stop after this many seconds (default: until SIGTERM/SIGINT).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_obj
def serve(obj: Obj, duration: float | None, verbose: bool) -> None:
    """Run MQTT ingest (HTTP is a later issue)."""
    from .ingest import Ingest
    from .service import CollectorService

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s")
    for noisy in ("sqlalchemy", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = obj.config()
    engine = _engine(cfg)
    ingest = Ingest(engine, cfg.storage_dir)
    service = CollectorService(cfg.mqtt, ingest, workers=cfg.workers, queue_size=cfg.queue_size)
    log = logging.getLogger("collector")
    log.info("[http] listen %s is not served yet (HTTP API comes in a later issue)", cfg.http.listen)

    def _stop(signum: int, _frame) -> None:  # noqa: ANN001
        log.info("signal %s: stopping", signum)
        service.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    service.start()
    log.info("collector %s serving MQTT ingest from %s, storage %s", ingest.instance_id, cfg.mqtt.address,
             cfg.storage_dir)
    try:
        service.wait(duration)
    finally:
        service.shutdown()
    log.info("stopped; %s messages handled, %s handler errors", service.handled, service.errors)


# ---------------------------------------------------------------------------- summary / events

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
        line += f"  {L['from']} {item.first_start} {L['to']} {item.last_end}"
    return line


@cli.command()
@click.option("--verify", "do_verify", is_flag=True, help="Re-hash files, re-check signatures and chains (exit 4 on any failure).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--lang", type=click.Choice(["zh", "en"]), default="zh", show_default=True)
@click.pass_obj
def summary(obj: Obj, do_verify: bool, as_json: bool, lang: str) -> None:
    """Per venue/camera: room, segments, gap records, seconds covered, chain holes."""
    from .admin import summarize, summary_json, verify_all
    from .db import session_factory

    cfg = obj.config()
    sessions = session_factory(_engine(cfg))
    items = summarize(sessions)
    problems = verify_all(sessions, cfg.storage_dir) if do_verify else []
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
        raise SystemExit(EXIT_INTEGRITY)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--limit", type=click.IntRange(min=1), default=200, show_default=True, help="Newest N events.")
@click.pass_obj
def events(obj: Obj, as_json: bool, limit: int) -> None:
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


# ---------------------------------------------------------------------------- entry point

def _error(message: str) -> None:
    first = " ".join(str(message).split())
    click.echo(f"{PROG}: error: {first}", err=True)


def main(argv: list[str] | None = None) -> None:
    from .db import DatabaseUnavailable
    from .service import BrokerUnavailable

    try:
        cli.main(args=argv, prog_name=PROG, standalone_mode=False)
    except click.exceptions.Abort:
        _error("aborted")
        sys.exit(EXIT_INPUT)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        _error(exc.format_message() + (f" (see `{PROG} --help`)" if isinstance(exc, click.UsageError) else ""))
        sys.exit(EXIT_INPUT)
    except Fail as exc:
        _error(str(exc))
        sys.exit(exc.code)
    except (ConfigError, KeyFileError) as exc:
        _error(str(exc))
        sys.exit(EXIT_INPUT)
    except DatabaseUnavailable as exc:
        _error(str(exc))
        sys.exit(EXIT_UNREACHABLE)
    except BrokerUnavailable as exc:
        _error(str(exc))
        sys.exit(EXIT_UNREACHABLE)
    sys.exit(EXIT_OK)


if __name__ == "__main__":
    main()

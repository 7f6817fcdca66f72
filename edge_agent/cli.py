"""`exam-edge`: init, pubkey, probe, run, retry, status."""

from __future__ import annotations

import logging
import shutil
import signal
import sys
import threading
import tomllib
from pathlib import Path
from typing import NoReturn

import click

from exam_contract import exitcodes
from exam_contract.redact import install_log_redaction
from exam_contract.signing import KeyFileError, generate_private_key, load_private_key, public_key_b64

from .config import ConfigError, EdgeConfig, load_config, parse_config


def fail(message: str, code: int = exitcodes.INPUT) -> NoReturn:
    click.echo(f"exam-edge: error: {message}", err=True)
    sys.exit(code)


def _config_path(ctx: click.Context) -> Path:
    path = ctx.obj.get("config")
    if not path:
        fail("no config file given: pass --config PATH or set EXAM_EDGE_CONFIG")
    return Path(path)


def _load(ctx: click.Context) -> EdgeConfig:
    try:
        return load_config(_config_path(ctx))
    except ConfigError as exc:
        fail(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config", type=click.Path(dir_okay=False), envvar="EXAM_EDGE_CONFIG",
              help="Edge config file (TOML). Env: EXAM_EDGE_CONFIG.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug details.")
@click.pass_context
def cli(ctx: click.Context, config: str | None, verbose: bool) -> None:
    """Edge agent: records exam-room cameras, signs segments, uploads them to the collector."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()  # belt and braces: the modules redact camera credentials themselves
    if not verbose:
        logging.getLogger("watchdog").setLevel(logging.WARNING)


CONFIG_TEMPLATE = """\
# exam-edge configuration (written by `exam-edge init`). Every key: docs/config.md.

[agent]
id = {agent}                     # unique; also the MQTT username
institution = {institution}      # 机构代码
venue = {venue}                  # 备案场所
data_dir = {data_dir}            # recording/, spool/, journal.sqlite
key_file = {key_file}            # Ed25519 signing key (PKCS#8 PEM, 0600); `exam-edge pubkey` prints its public key
local_keep_days = 7              # acknowledged footage kept locally this long
min_free_mb = 1024               # disk budget: below this, acknowledged footage goes early; below half, cameras stop

[mqtt]
url = {broker}                   # mqtts://host:8883, or mqtt:// for a loopback broker
username = {agent}
# password_file = "/etc/exam-edge/mqtt.pass"
# TLS client certificate instead of a password:
# cert_file = "/etc/exam-edge/client.crt"
# key_file = "/etc/exam-edge/client.key"
# ca_file = "/etc/exam-edge/ca.crt"

[recording]
segment_seconds = 60             # 10..300

[health]
enabled = true                   # keyframe analysis of each segment: black, obstructed, frozen, defocused, moved

# Upload cap on a venue link shared with online exams (kbit/s; 0 = unlimited), e.g. unlimited only at night:
# [upload]
# max_kbps = 8000
# [[upload.schedule]]
# from = "22:00"                 # Asia/Shanghai wall clock
# to = "06:00"                   # wraps past midnight
# max_kbps = 0

# Add one [[camera]] table per camera; `source` is rtsp://..., /dev/videoN, a video file or lavfi:FILTER.
# [[camera]]
# id = "t101-front"
# room = "T101"
# room_kind = "theory"           # theory (理论知识考场) or practical (操作技能考场)
# source = "rtsp://192.168.1.64:554/Streaming/Channels/101"
"""


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@cli.command()
@click.option("--agent", required=True, help="Agent id (unique, also its MQTT username).")
@click.option("--institution", required=True, help="Institution code, e.g. JL2201001.")
@click.option("--venue", required=True, help="Venue code, e.g. JL2201001-01.")
@click.option("--broker", required=True, help="Broker URL, e.g. mqtts://collector.example.cn:8883.")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Data directory [default: data/ next to the config].")
@click.option("--key-file", type=click.Path(dir_okay=False), help="Key file [default: agent.key next to the config].")
@click.pass_context
def init(ctx: click.Context, agent: str, institution: str, venue: str, broker: str, data_dir: str | None,
         key_file: str | None) -> None:
    """Write a commented config (no active camera) and a new Ed25519 key."""
    path = _config_path(ctx)
    base = path.resolve().parent
    data = Path(data_dir).resolve() if data_dir else base / "data"
    key = Path(key_file).resolve() if key_file else base / "agent.key"
    if path.exists():
        fail(f"config file {path} already exists: remove it or choose another --config")
    if key.exists():
        fail(f"key file {key} already exists: remove it or pass another --key-file")
    text = CONFIG_TEMPLATE.format(agent=_toml_str(agent), institution=_toml_str(institution),
                                  venue=_toml_str(venue), data_dir=_toml_str(str(data)),
                                  key_file=_toml_str(str(key)), broker=_toml_str(broker))
    try:
        parse_config(tomllib.loads(text), base_dir=base, path=path)
    except ConfigError as exc:
        fail(f"{exc} (given on the command line)")
    try:
        generate_private_key(key)
    except KeyFileError as exc:
        fail(f"{exc}; or pass another --key-file")
    except OSError as exc:
        fail(f"cannot write key file {key} ({exc.strerror or exc}): pass a writable --key-file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        fail(f"cannot write config file {path} ({exc.strerror or exc}): choose a writable --config")
    click.echo(f"wrote {path} and key {key}; add [[camera]] tables, then enroll the agent with:")
    click.echo(f"  exam-collector enroll --agent {agent} --venue {venue} --institution {institution} "
               f"--pubkey {public_key_b64(load_private_key(key))}")


@cli.command()
@click.pass_context
def pubkey(ctx: click.Context) -> None:
    """Print the agent's public key (base64 of the raw 32 bytes)."""
    config = _load(ctx)
    try:
        key = load_private_key(config.agent.key_file)
    except KeyFileError as exc:
        fail(f"[agent] key_file: {exc}; fix the path or create a key with `exam-edge init`")
    click.echo(public_key_b64(key))


@cli.command("rotate-key")
@click.pass_context
def rotate_key(ctx: click.Context) -> None:
    """Replace the agent's signing key; the old one is kept as KEY_FILE.retired-STAMP until you delete it.

    Then enrol the new key on the collector (`exam-collector enroll ... --replace`) and restart the agent: at
    start it signs its records not yet stored again with the new key (records and chain stay the same)."""
    import os
    from datetime import datetime, timezone

    from exam_contract.files import fsync_dir

    config = _load(ctx)
    key_file = config.agent.key_file
    try:
        load_private_key(key_file)
        pending = key_file.with_name(key_file.name + ".new")
        new = load_private_key(pending) if pending.exists() else generate_private_key(pending)
        retired = key_file.with_name(f"{key_file.name}.retired-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
        os.link(key_file, retired)
        os.replace(pending, key_file)
        fsync_dir(key_file.parent)
    except KeyFileError as exc:
        fail(f"[agent] key_file: {exc}")
    except OSError as exc:
        fail(f"cannot replace the key file {key_file} ({exc.strerror or exc}): check its folder's permissions")
    agent = config.agent
    click.echo(f"new key in {key_file}; the old one is in {retired} (delete it once the new key is enrolled)")
    click.echo("enrol it on the collector, then restart the agent:")
    click.echo(f"  exam-collector enroll --agent {agent.id} --venue {agent.venue} --institution {agent.institution} "
               f"--pubkey {public_key_b64(new)} --replace")


@cli.command()
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Stop after this many seconds.")
@click.option("--drain-seconds", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On stop, wait this long for the collector to acknowledge pending segments.")
@click.option("--chain-timeout", type=click.FloatRange(min=1), default=30.0, show_default=True,
              help="For cameras this journal has never recorded, wait this long for the collector to say where "
                   "their chains end (a replaced machine continues them).")
@click.option("--new-chains", is_flag=True,
              help="Start cameras this journal has never recorded at seq 1 without asking the collector: only for "
                   "cameras that have never uploaded (a new venue whose collector is not reachable yet).")
@click.pass_context
def run(ctx: click.Context, duration: float | None, drain_seconds: float, chain_timeout: float,
        new_chains: bool) -> None:
    """Record every camera, seal and upload segments until SIGTERM/SIGINT (or --duration)."""
    from exam_contract.mqtt import BrokerRefused, BrokerUnreachable

    from .agent import Agent, AlreadyRunning, ChainUnknown
    from .journal import JournalError

    config = _load(ctx)
    if not config.cameras:
        fail(f"{config.path} has no [[camera]] table: add one (id, room, room_kind, source)")
    try:
        key = load_private_key(config.agent.key_file)
    except KeyFileError as exc:
        fail(f"[agent] key_file: {exc}; fix the path or create a key with `exam-edge init`")
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            fail(f"{tool} is not on PATH: install ffmpeg (e.g. apt install ffmpeg)")
    try:
        agent = Agent(config, key, drain_seconds=drain_seconds)
    except (ConfigError, AlreadyRunning) as exc:
        fail(str(exc))
    except (OSError, JournalError) as exc:
        fail(f"[agent] data_dir = {str(config.agent.data_dir)!r} is unusable ({exc}): fix its path or permissions")
    first_start = not agent.has_history()
    connected = False
    try:
        agent.connect()
        connected = True
    except BrokerUnreachable as exc:
        if first_start:  # a first start: most likely a wrong [mqtt] url, say so now
            fail(str(exc), exitcodes.UNREACHABLE)
        # A restart during a network outage: recording never waits for the network (store-and-forward).
        logging.getLogger(__name__).warning("%s; recording anyway, the spool is uploaded once the broker "
                                            "answers", exc)
        agent.connect_later()
    except BrokerRefused as exc:
        fail(str(exc))
    try:
        agent.adopt_chain_heads(chain_timeout if connected else 0.001, new_chains=new_chains)
    except ChainUnknown as exc:
        if first_start:  # a new journal: the collector may hold these cameras' chains (a replaced machine)
            fail(str(exc), exitcodes.UNREACHABLE)
        # A camera added to a running venue while the collector is away: record it rather than wait.
        logging.getLogger(__name__).warning("%s; starting them at seq 1", exc)
        agent.adopt_chain_heads(0, new_chains=True)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        logging.getLogger(__name__).info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    agent.start()
    stop.wait(duration)
    agent.stop()
    sys.exit(exitcodes.OK)


@cli.command()
@click.option("--set-reference", is_flag=True,
              help="Store each working camera's snapshot as its reference view (for the 'moved' health flag).")
@click.option("--camera", "camera_ids", multiple=True, metavar="ID", help="Probe only this camera (repeatable).")
@click.option("--timeout", type=click.FloatRange(min=1), default=15.0, show_default=True,
              help="Seconds to wait for each camera.")
@click.pass_context
def probe(ctx: click.Context, set_reference: bool, camera_ids: tuple[str, ...], timeout: float) -> None:
    """Open each camera, print codec, resolution, fps and bitrate, save a snapshot; exit 1 if any fails."""
    from .health import ReferenceViewError, save_reference
    from .probe import format_table, probe_all

    config = _load(ctx)
    if not config.cameras:
        fail(f"{config.path} has no [[camera]] table: add one (id, room, room_kind, source)")
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            fail(f"{tool} is not on PATH: install ffmpeg (e.g. apt install ffmpeg)")
    known = {cam.id: cam for cam in config.cameras}
    unknown = [cam for cam in camera_ids if cam not in known]
    if unknown:
        fail(f"--camera {unknown[0]} is not configured: use one of {', '.join(known)}")
    results = probe_all(config, [known[cam] for cam in camera_ids] or None, timeout)
    click.echo(format_table([probe for probe, _ in results]))
    for probe_result, image in results:
        if probe_result.snapshot is not None:
            click.echo(f"snapshot {probe_result.camera}: {probe_result.snapshot}")
        if set_reference and image is not None:
            try:
                saved = save_reference(config, probe_result.camera, image)
                click.echo(f"reference view {probe_result.camera}: {saved}")
            except ReferenceViewError as exc:
                fail(str(exc))
    failed = [probe_result.camera for probe_result, _ in results if not probe_result.ok]
    if failed:
        fail(f"{len(failed)} of {len(results)} camera(s) failed ({', '.join(failed)}): fix what the table says "
             "and run `exam-edge probe` again")


@cli.command()
@click.option("--camera", default=None, metavar="ID", help="Only this camera's rejected records.")
@click.pass_context
def retry(ctx: click.Context, camera: str | None) -> None:
    """Send every record the collector rejected again (after fixing the enrolment, the key or the venue).
    Works while `exam-edge run` is running: it picks them up within seconds."""
    from .journal import Journal, JournalError

    config = _load(ctx)
    if camera is not None and camera not in {cam.id for cam in config.cameras}:
        fail(f"--camera {camera} is not configured: use one of {', '.join(c.id for c in config.cameras)}")
    if not config.agent.journal_path.exists():
        fail(f"no journal at {config.agent.journal_path}: the agent has not run, so nothing was rejected")
    try:
        journal = Journal(config.agent.journal_path)
        try:
            _, oldest = journal.rejected_summary()
            requeued = journal.requeue_rejected(camera)
        finally:
            journal.close()
    except JournalError as exc:
        fail(str(exc))
    if requeued == 0:
        click.echo("no rejected records" + (f" for camera {camera}" if camera else ""))
        return
    click.echo(f"{requeued} rejected record(s) queued for upload again" +
               (f" (the oldest, camera {oldest.camera} seq {oldest.seq}, was rejected: {oldest.reason})"
                if oldest is not None and camera in (None, oldest.camera) else ""))


@cli.command()
@click.option("--timeout", type=click.FloatRange(min=1), default=10.0, show_default=True,
              help="Seconds to wait for the broker and the collector.")
@click.pass_context
def doctor(ctx: click.Context, timeout: float) -> None:
    """Check config, key file, data_dir (write, fsync, free space), ffmpeg, TLS, broker login and the clock against
    the collector; one line per check with the fix; exits with the first failure's code."""
    from exam_contract.doctor import exit_code, render

    from .doctor import run_doctor

    checks = run_doctor(_config_path(ctx), timeout)
    click.echo(render(checks))
    sys.exit(exit_code(checks))


@cli.command()
@click.option("--lang", type=click.Choice(["zh", "en"]), default="zh", show_default=True,
              help="Language of the output (times are Beijing time either way).")
@click.pass_context
def status(ctx: click.Context, lang: str) -> None:
    """Spool backlog, last acknowledged segment, camera states and health per camera; the upload cap, measured
    rate, backlog and the time to drain it."""
    import dataclasses
    from datetime import datetime, timezone

    from .journal import Journal, JournalError
    from .ratecap import CapSchedule, UploadRate
    from .status import StatusFileError, UploadStatus, read_local_status, upload_line

    from .ratecap import SHANGHAI

    def say(zh: str, en: str) -> str:
        return zh if lang == "zh" else en

    config = _load(ctx)
    if not config.agent.journal_path.exists():
        click.echo(say(f"尚无日志 {config.agent.journal_path}（代理从未运行）",
                       f"no journal yet at {config.agent.journal_path} (the agent has not run)"))
        return
    try:
        journal = Journal(config.agent.journal_path)
        rows = journal.status()
        journal.close()
        local = read_local_status(config)
    except (JournalError, StatusFileError) as exc:
        fail(str(exc))
    if local is None:
        click.echo(say("代理：尚未报告状态（摄像机状态未知）", "agent: no status reported yet (camera states unknown)"))
    else:
        reported = local.time.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(say(f"代理：{'运行中' if local.running else '未运行'}，最近报告 北京时间 {reported}",
                       f"agent: {'running' if local.running else 'NOT RUNNING'}, last report {reported} "
                       "Asia/Shanghai"))
        for code, detail in sorted(local.alarms.items()):
            click.echo(say(f"告警 {code}：{detail}", f"ALARM {code}: {detail}"))
    states = local.cameras if local and local.running else {}
    health = local.health if local else {}
    configured = {cam.id for cam in config.cameras}
    heads = say("摄像机|状态|最新序号|最新已存|待传|待传 MB|被拒|画面检查",
                "camera|state|last seq|last stored|pending|pending MB|rejected|health").split("|")
    widths = (-20, -12, 8, 11, 7, 10, 8)
    click.echo(" ".join(_cell(head, width) for head, width in zip(heads[:-1], widths, strict=True))
               + "  " + heads[-1])
    seen = set()
    for row in rows:
        seen.add(row.camera)
        stored = "-" if row.last_stored_seq is None else str(row.last_stored_seq)
        click.echo(f"{row.camera:<20} {states.get(row.camera, '-'):<12} {row.last_seq:>8} {stored:>11} "
                   f"{row.pending:>7} {row.pending_bytes / 1e6:>10.1f} {row.rejected:>8}  "
                   f"{','.join(health.get(row.camera, [])) or '-'}")
    for cam in sorted(configured - seen):
        click.echo(f"{cam:<20} {states.get(cam, '-'):<12} {0:>8} {'-':>11} {0:>7} {0.0:>10.1f} {0:>8}  -")
    # The cap as configured now and the backlog as journaled now; the measured rate only from a running agent.
    agent_upload = local.upload if local is not None and local.running else None
    rate = agent_upload.rate_kbps * 1000 / 8 if agent_upload else 0.0
    cap = CapSchedule(config.upload.max_kbps, config.upload.schedule).at(datetime.now(timezone.utc))
    # the batch windows are known only to the running agent
    batch = (agent_upload.batch_backlog_records, agent_upload.batch_backlog_bytes) if agent_upload else (0, 0)
    upload = UploadStatus.of(UploadRate(cap, rate), sum(r.pending for r in rows), sum(r.pending_bytes for r in rows),
                             batch)
    if agent_upload is None:
        upload = dataclasses.replace(upload, backlog_eta_seconds=None)
    click.echo(upload_line(upload, lang))


def _cell(text: str, width: int) -> str:
    """`text` padded to `abs(width)` terminal columns (a CJK character takes two); negative: left-aligned."""
    import unicodedata

    columns = sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)
    pad = " " * max(0, abs(width) - columns)
    return text + pad if width < 0 else pad + text


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: click usage errors become one line and exit 1 (exit 2 means an unreachable service)."""
    try:
        cli.main(args=argv, prog_name="exam-edge", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        fail(f"{exc.format_message()}; see exam-edge --help")
    except click.ClickException as exc:
        fail(exc.format_message())
    except click.Abort:
        fail("aborted")
    except ConfigError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(exitcodes.OK)

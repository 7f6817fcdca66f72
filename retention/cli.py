"""`exam-retention`: enforce the one-year floor and legal holds, scrub stored footage, audit coverage, verify the log.

Reads the collector's TOML config (database_url, storage_dir, key_file, [retention], [coverage]).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import click

from collector.cli import DEFAULT_CONFIG, CliContext, CommandError, run_main
from exam_contract import exitcodes

PROG = "exam-retention"


class RetentionContext(CliContext):
    """The collector's CLI context, with the database sessions and the collector key the commands need."""

    def sessions(self):  # -> sessionmaker[Session]
        from collector.db import (DatabaseUrlError, check_connection, current_revision, describe_url,
                                  head_revision, make_engine, session_factory)

        cfg = self.config()
        try:
            engine = make_engine(cfg.database_url)
        except DatabaseUrlError as exc:
            raise CommandError(f"[collector] database_url: {exc}") from exc
        check_connection(engine, cfg.database_url)
        current, head = current_revision(engine), head_revision()
        if current != head:
            raise CommandError(f"database {describe_url(cfg.database_url)} is at schema revision "
                               f"{current or 'none'}, not {head}: run `exam-collector --config {self.path} db upgrade`")
        return session_factory(engine)

    def signing_key(self):  # -> Ed25519PrivateKey
        from exam_contract.signing import load_private_key

        return load_private_key(self.config().key_file)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="EXAM_COLLECTOR_CONFIG", help=f"Collector config TOML (default {DEFAULT_CONFIG}).")
@click.option("-v", "--verbose", is_flag=True, help="Log what is done.")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, verbose: bool) -> None:
    """Enforce the one-year floor and legal holds, scrub and audit stored footage, verify the audit log."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("sqlalchemy", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx.obj = RetentionContext(config_path)


# ---------------------------------------------------------------------------- verify-log

@cli.command("verify-log")
@click.option("--pubkey", default=None, help="Collector public key (base64) to check checkpoints with "
                                             "(default: derived from [collector] key_file).")
@click.option("--max-age", "max_age", type=click.IntRange(min=1), default=20, show_default=True,
              metavar="MINUTES", help="Entries after the newest checkpoint fail verification once that checkpoint "
                                      "was signed longer ago than this (a running collector signs every 15 min).")
@click.option("--checkpoint", "copy_files", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE", help="A checkpoint held elsewhere (the retained exam/v1/audit/checkpoint message "
                                   "saved to a file, or an evidence package's package.json) to compare with "
                                   "the database; repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def verify_log(obj: RetentionContext, pubkey: str | None, max_age: int, copy_files: tuple[Path, ...],
               as_json: bool) -> None:
    """Prove the audit log's hash chain and every signed checkpoint (exit 4 names the first bad entry)."""
    from collector.audit import CheckpointCopyError, check_copy_signature, load_checkpoint_copy
    from collector.audit import verify_log as verify
    from exam_contract.signing import PublicKeyError, parse_public_key, public_key_b64

    if pubkey is not None:
        try:
            public = parse_public_key(pubkey)
        except PublicKeyError as exc:
            raise CommandError(f"--pubkey: {exc}; pass the collector's public key as base64 of 32 bytes") from exc
    else:
        public = obj.signing_key().public_key()
    copies = []
    for path in copy_files:
        try:
            copy = load_checkpoint_copy(path)
            if copy.public_key == public_key_b64(public):
                check_copy_signature(copy, public)
            # a copy signed before a key rotation is checked against the key the rotations vouch for
        except CheckpointCopyError as exc:
            raise CommandError(f"--checkpoint {exc}") from exc
        copies.append(copy)
    with obj.sessions()() as session:
        report = verify(session, public, max_age=timedelta(minutes=max_age), copies=copies)
    if as_json:
        click.echo(json.dumps({"ok": report.ok, "entries": report.entries, "checkpoints": report.checkpoints,
                               "checkpoint_copies": report.copies,
                               "first_bad": report.first_bad.seq if report.first_bad else None,
                               "problems": [{"entry": p.seq, "problem": p.what} for p in report.problems]},
                              ensure_ascii=False, indent=2))
    elif report.ok:
        copies_note = f"; {report.copies} checkpoint copies held elsewhere agree" if report.copies else ""
        click.echo(f"audit log verified: {report.entries} entries chained, {report.checkpoints} signed "
                   f"checkpoints match{copies_note}")
    else:
        first = report.first_bad
        assert first is not None
        click.echo(f"audit log BROKEN: first bad entry {first.seq if first.seq is not None else '-'}: {first.what}")
        for p in report.problems:
            click.echo(f"  entry {p.seq if p.seq is not None else '-'}: {p.what}")
    if not report.ok:
        raise SystemExit(exitcodes.INTEGRITY)


# ---------------------------------------------------------------------------- enforce

@cli.command()
@click.option("--dry-run", is_flag=True, help="Print the plan and totals; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.pass_obj
def enforce(obj: RetentionContext, dry_run: bool, as_json: bool) -> None:
    """Delete footage past its retention floor and not under hold (tombstone first, rows kept)."""
    from collector import audit
    from collector.footage_store import open_store
    from collector.object_locks import LockSettings, extend_linked_locks, record_report
    from exam_contract.alarms import AlarmCode
    from .enforce import ClockError, build_plan, execute, plan_lines
    from .policy import PolicyError, RetentionPolicy

    cfg = obj.config()
    policy = RetentionPolicy(cfg.retention.margin_days, cfg.retention.unlinked_retention_days)
    try:
        policy.check()
    except PolicyError as exc:
        raise CommandError(str(exc)) from exc
    pre = timedelta(minutes=cfg.coverage.pre_margin_minutes)
    post = timedelta(minutes=cfg.coverage.post_margin_minutes)
    key = None if dry_run else obj.signing_key()  # a real run must be able to sign its checkpoint
    sessions = obj.sessions()
    store = open_store(cfg)
    now = datetime.now(timezone.utc)
    try:
        with sessions() as session:
            plan = build_plan(session, policy, now, store, pre, post)
    except ClockError as exc:
        raise CommandError(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(plan.as_json(), ensure_ascii=False, indent=2))
    else:
        for line in plan_lines(plan):
            click.echo(line)
    for alarm in plan.alarms:
        click.echo(f"{PROG}: ALARM: {alarm}", err=True)
    # Object storage: locks of footage linked to a part longer than the longest exam day are lengthened to
    # the linked keep (a dry run only counts them).
    locks = extend_linked_locks(sessions, store, LockSettings.from_config(cfg), now, dry_run=dry_run)
    if locks.total and not as_json:
        click.echo(locks.line())
    if dry_run:
        if not as_json:
            click.echo("dry run: nothing deleted")
        return
    actor = f"retention:{audit.local_actor()}"
    lock_alarm = record_report(sessions, locks, action=audit.ACTION_LOCK_EXTEND, actor=actor, target="storage")
    result = execute(sessions, plan, store, policy, actor, pre, post)
    alarms = list(plan.alarms) + ([f"{AlarmCode.OBJECT_LOCK_FAILED}: {lock_alarm}"] if lock_alarm else [])
    # The storage's lock outlasting the row's: its clock or a lock set outside this code; never forced.
    alarms += [f"{AlarmCode.OBJECT_LOCKED}: the storage refused to delete {line}" for line in result.refused]
    with sessions.begin() as session:
        audit.record(session, audit.ACTION_ENFORCE_RUN, actor=actor, target="storage",
                     detail={"now": plan.now, "deleted_files": len(result.deleted),
                             "deleted_bytes": sum(d.size for d in result.deleted), "skipped": result.skipped,
                             "refused": result.refused, "locks_extended": locks.done,
                             "per_venue": {t.venue: [t.files, t.bytes] for t in plan.per_venue()},
                             "alarms": alarms})
        assert key is not None
        audit.checkpoint(session, key, occasion="retention")
    for alarm in alarms[len(plan.alarms):]:
        click.echo(f"{PROG}: ALARM: {alarm}", err=True)
    for line in result.skipped:
        click.echo(f"skipped {line}", err=True)
    if not as_json:
        refused = f"; {len(result.refused)} refused by the storage (still locked)" if result.refused else ""
        click.echo(f"deleted {len(result.deleted)} files, {sum(d.size for d in result.deleted)} bytes{refused}; "
                   "tombstones are in the audit log")


# ---------------------------------------------------------------------------- scrub

@cli.command()
@click.option("--sample", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="Fraction of stored files to re-hash (chains and signatures are always checked in full).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when a tty).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def scrub(obj: RetentionContext, sample: float, progress: bool | None, as_json: bool) -> None:
    """Re-hash stored files; find missing, orphan and altered files and chain breaks (exit 4 on any)."""
    from collector.audit import checkpoint_after_command
    from collector.footage_store import open_store
    from collector.object_locks import LockSettings
    from .scrub import run_scrub

    cfg = obj.config()
    show = sys.stderr.isatty() if progress is None else progress
    sessions = obj.sessions()
    result = run_scrub(sessions, open_store(cfg), sample=sample, progress=sys.stderr if show else None,
                       actor=f"retention:{_actor()}", locks=LockSettings.from_config(cfg))
    if as_json:
        click.echo(json.dumps(result.as_json(), ensure_ascii=False, indent=2))
    else:
        click.echo(f"scrub {result.run_id}: re-hashed {result.files_checked} files, {result.bytes_checked} bytes "
                   f"in {result.seconds:.1f} s ({result.mb_per_s:.0f} MB/s); checked {result.records_checked} "
                   f"records' signatures and chains; {len(result.problems)} problems")
        for p in result.problems:
            click.echo(f"  {p.kind}: {p.item}: {p.what}")
        for line in result.adopted:
            click.echo(f"  adopted: {line}")
    checkpoint_after_command(sessions, cfg.key_file)
    if result.problems:
        raise SystemExit(exitcodes.INTEGRITY)


def _actor() -> str:
    from collector.audit import local_actor

    return local_actor()


# ---------------------------------------------------------------------------- audit

def _day(text: str, option: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise CommandError(f"{option} {text!r} is not a date: write YYYY-MM-DD (a day in Asia/Shanghai)") from exc


@cli.command("audit")
@click.option("--from", "from_text", required=True, help="First day, YYYY-MM-DD (Asia/Shanghai).")
@click.option("--to", "to_text", required=True, help="Last day, inclusive, YYYY-MM-DD (Asia/Shanghai).")
@click.option("--format", "fmt", type=click.Choice(["json", "csv", "html"]), required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Report file.")
@click.pass_obj
def audit_cmd(obj: RetentionContext, from_text: str, to_text: str, fmt: str, out: Path) -> None:
    """Coverage-gap report for the period across institutions, venues and batches (exit 3 on any gap)."""
    from collector.audit import checkpoint_after_command
    from .report import build_report, write_report

    first, last = _day(from_text, "--from"), _day(to_text, "--to")
    if last < first:
        raise CommandError(f"--to {last} is before --from {first}: swap them")
    cfg = obj.config()
    sessions = obj.sessions()
    report = build_report(sessions, cfg, first, last, now=datetime.now(timezone.utc),
                          actor=f"retention:{_actor()}")
    checkpoint_after_command(sessions, cfg.key_file)
    try:
        write_report(report, fmt, out)
    except OSError as exc:
        raise CommandError(f"cannot write --out {out}: {exc.strerror}; choose a writable path") from exc
    click.echo(f"audit {first}..{last}: {report.totals.parts} batch parts ({report.totals.parts_with_gaps} with gaps), "
               f"{report.totals.cameras} cameras, {report.totals.gaps} gaps totalling "
               f"{report.totals.gap_seconds:.0f} s; wrote {out}")
    if report.totals.gaps:
        raise SystemExit(exitcodes.GAPS)


# ---------------------------------------------------------------------------- entry point

def main(argv: list[str] | None = None) -> None:
    run_main(cli, PROG, argv)


if __name__ == "__main__":
    main()

"""The tamper-evident audit log (PRODUCT.md, Audit log; Article 29 全程留痕、责任可追溯).

Every entry carries the hash of the previous one:

    entry_hash = sha256(canonical_bytes({"v": 1, "seq", "at", "actor", "action", "target",
                                         "reason", "detail", "prev"}))

with `at` in the manifest time format and `detail` a JSON object. Appends are serialized by locking
the single `audit_head` row (`SELECT ... FOR UPDATE` on PostgreSQL; on SQLite a no-op UPDATE of that
row takes the database write lock first), so two collectors never give out the same seq or fork the
chain. An entry is part of its caller's transaction: it commits or rolls back with what it records.

Checkpoints sign (entry count, head hash, time) with the collector's Ed25519 key, so that deleting
the newest entries (which leaves a valid, shorter chain) is detected too. Version-2 checkpoints also sign
the SHA-256 of the previous checkpoint's signed bytes and the signing host, so checkpoints form a chain of
their own: deleting one (say the newest, to rewrite the entries after the one before) breaks that chain
or leaves the newest remaining checkpoint too old for the entries after it (`verify_log(now=...,
max_age=...)`). Copies of checkpoints held elsewhere (published on MQTT, cited in evidence packages) are
compared with the database by `verify_log(copies=...)`.
"""

from __future__ import annotations

import getpass
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from exam_contract.canonical import canonical_bytes, format_time, parse_time, sha256_hex, truncate_to_millis
from exam_contract.signing import (PublicKeyError, key_fingerprint, load_private_key, parse_public_key, public_key_b64,
                                   sign, verify)

from .models import AuditCheckpoint, AuditEntry, AuditHead

log = logging.getLogger(__name__)

ENTRY_VERSION = 1
CHECKPOINT_KIND = "exam-collector audit checkpoint"
CHECKPOINT_VERSION = 2            # what new checkpoints are written as; version 1 still verifies
CHECKPOINT_INTERVAL_SECONDS = 900.0
# A running collector signs at least every interval; the rest is grace for a slow tick or a restart.
DEFAULT_MAX_AGE = timedelta(minutes=20)
CHECKPOINT_TOPIC = "exam/v1/audit/checkpoint"

# Actions. Targets name what was acted on: an agent id, `venue/camera/seq`, a batch id, `hold:ID`.
ACTION_ENROLL = "agent.enroll"
ACTION_INGEST_REJECT = "ingest.reject"
ACTION_BATCH_IMPORT = "batch.import"
ACTION_HOLD_ADD = "hold.add"
ACTION_HOLD_RELEASE = "hold.release"
ACTION_FOOTAGE_VIEW = "footage.view"
ACTION_FOOTAGE_EXPORT = "footage.export"
ACTION_SEGMENT_DELETE = "segment.delete"       # the tombstone, written before the file is unlinked
ACTION_ENFORCE_RUN = "retention.enforce"
ACTION_SCRUB_RUN = "retention.scrub"
ACTION_AUDIT_REPORT = "retention.audit"
ACTION_CHAIN_HEADS = "agent.chain_heads"       # an agent with a new journal was told where its chains end
ACTION_KEY_ROTATE = "collector.key_rotate"     # the collector key was replaced; detail names the old and new key
OCCASION_KEY_HANDOVER = "key_handover"         # signed by the old key: covers the entry naming the new one
OCCASION_KEY_ROTATION = "key_rotation"         # signed by the new key: vouches for the old one before it


class AuditError(Exception):
    """The audit log cannot be written or read as expected."""


class CheckpointCopyError(AuditError):
    """A checkpoint copy given for comparison (a file) is unreadable, malformed or not signed by the key."""


def local_actor() -> str:
    """Who runs a command on this machine, for entries written by operator CLIs."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"os:{user}@{socket.gethostname()}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, float) and value != value:  # NaN has no canonical JSON form
        return None
    return value


def entry_payload(seq: int, at: datetime, actor: str, action: str, target: str, reason: str | None,
                  detail: dict[str, Any], prev: str | None) -> dict[str, Any]:
    return {"v": ENTRY_VERSION, "seq": seq, "at": format_time(at), "actor": actor, "action": action,
            "target": target, "reason": reason, "detail": detail, "prev": prev}


def entry_hash_of(entry: AuditEntry) -> str:
    """The hash an entry's stored fields give (compare with `entry.entry_hash`)."""
    try:
        detail = json.loads(entry.detail)
    except ValueError:
        detail = entry.detail
    return sha256_hex(canonical_bytes(entry_payload(entry.seq, entry.at, entry.actor, entry.action, entry.target,
                                                    entry.reason, detail, entry.prev_hash)))


def _lock_head(session: Session) -> AuditHead:
    """The head row, locked until the caller's transaction ends."""
    query = select(AuditHead).where(AuditHead.id == 1).execution_options(populate_existing=True)
    if session.get_bind().dialect.name == "sqlite":
        # SQLite has no row locks: a write as the first step takes the database write lock (waiting
        # under busy_timeout) before the head is read, so no other writer can read the same head.
        session.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=AuditHead.seq)
                        .execution_options(synchronize_session=False))
    else:
        query = query.with_for_update()
    head = session.scalars(query).first()
    if head is None:
        raise AuditError("the audit log has no head row: run `exam-collector db upgrade`")
    return head


def record(session: Session, action: str, *, actor: str, target: str, reason: str | None = None,
           detail: dict[str, Any] | None = None) -> AuditEntry:
    """Append an entry within the caller's session and transaction (flushed, not committed)."""
    if not action or not actor or target is None:
        raise AuditError("an audit entry needs an action, an actor and a target")
    head = _lock_head(session)
    at = truncate_to_millis(datetime.now(timezone.utc))
    clean = _jsonable(detail or {})
    seq = head.seq + 1
    digest = sha256_hex(canonical_bytes(entry_payload(seq, at, actor, action, target, reason, clean,
                                                      head.head_hash)))
    entry = AuditEntry(seq=seq, at=at, actor=actor, action=action, target=target, reason=reason,
                       detail=canonical_bytes(clean).decode("utf-8"), prev_hash=head.head_hash,
                       entry_hash=digest)
    session.add(entry)
    head.seq, head.head_hash = seq, digest
    session.flush()
    log.debug("audit entry %s: %s %s by %s", seq, action, target, actor)
    return entry


# ---------------------------------------------------------------------------- checkpoints

def checkpoint_bytes(entry_count: int, head_hash: str | None, at: datetime, occasion: str, public_key: str, *,
                     version: int = 1, prev_hash: str | None = None, host: str | None = None) -> bytes:
    """The exact bytes a checkpoint signs. Version 1 (before migration 0006_audit_chain) has no prev/host."""
    fields: dict[str, Any] = {"v": version, "kind": CHECKPOINT_KIND, "count": entry_count, "head": head_hash,
                              "at": format_time(at), "occasion": occasion, "key": public_key}
    if version == 1:
        return canonical_bytes(fields)
    if version == 2:
        return canonical_bytes({**fields, "prev": prev_hash, "host": host})
    raise AuditError(f"audit checkpoint version {version} is unknown to this software (it knows 1 and 2): "
                     "upgrade exam-footage to verify it")


def signed_bytes_of(cp: AuditCheckpoint) -> bytes:
    return checkpoint_bytes(cp.entry_count, cp.head_hash, cp.at, cp.occasion, cp.public_key,
                            version=cp.version or 1, prev_hash=cp.prev_hash, host=cp.host)


def checkpoint_hash_of(cp: AuditCheckpoint) -> str:
    """What the next checkpoint signs as its `prev`: SHA-256 hex of this one's signed bytes."""
    return sha256_hex(signed_bytes_of(cp))


def newest_checkpoint(session: Session) -> AuditCheckpoint | None:
    return session.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.id.desc()).limit(1)).first()


def _host_name() -> str:
    return socket.gethostname()[:256]


def checkpoint(session: Session, key: Ed25519PrivateKey, occasion: str = "manual") -> AuditCheckpoint:
    """Sign the current head within the caller's transaction (the head stays locked until commit). A key that
    a rotation retired signs nothing more (a `serve` started before the rotation must be restarted)."""
    head = _lock_head(session)
    if occasion != OCCASION_KEY_HANDOVER:
        retired = retired_by_rotation(session, public_key_b64(key))
        if retired is not None:
            raise AuditError(f"the collector key {key_fingerprint(key)[:16]}… was retired by the key rotation in audit "
                             f"entry {retired}: restart this collector so it loads the new key from "
                             "[collector] key_file")
    # Read under the head lock: every checkpoint writer takes it first, so this is the newest committed one.
    previous = newest_checkpoint(session)
    prev_hash = checkpoint_hash_of(previous) if previous is not None else None
    at = truncate_to_millis(datetime.now(timezone.utc))
    public = public_key_b64(key)
    host = _host_name()
    signature = sign(key, checkpoint_bytes(head.seq, head.head_hash, at, occasion, public,
                                           version=CHECKPOINT_VERSION, prev_hash=prev_hash, host=host))
    row = AuditCheckpoint(at=at, entry_count=head.seq, head_hash=head.head_hash, occasion=occasion,
                          public_key=public, signature=signature, version=CHECKPOINT_VERSION,
                          prev_hash=prev_hash, host=host)
    session.add(row)
    session.flush()
    log.info("audit checkpoint at entry %s (%s)", head.seq, occasion)
    return row


def checkpoint_for_export(sessions: sessionmaker[Session], key: Ed25519PrivateKey) -> AuditCheckpoint:
    """What `exam-collector export` calls: a committed checkpoint to cite in the package."""
    with sessions.begin() as session:
        return checkpoint(session, key, occasion="export")


def checkpoint_if_changed(sessions: sessionmaker[Session], key: Ed25519PrivateKey, occasion: str = "schedule",
                          max_age: timedelta | None = None) -> AuditCheckpoint | None:
    """A checkpoint unless the newest one already covers the head (and, with `max_age`, is younger)."""
    with sessions.begin() as session:
        head = session.get(AuditHead, 1)
        last = newest_checkpoint(session)
        if head is not None and last is not None and last.entry_count == head.seq and last.head_hash == head.head_hash:
            if max_age is None or datetime.now(timezone.utc) - last.at < max_age:
                return None
        return checkpoint(session, key, occasion)


def checkpoint_after_command(sessions: sessionmaker[Session], key_file: Path) -> AuditCheckpoint | None:
    """What every operator command that appended entries calls last: a checkpoint covering them, so that
    `verify_log` never finds the head uncovered behind an old checkpoint after a command."""
    return checkpoint_if_changed(sessions, load_private_key(key_file), occasion="command")


def checkpoint_document(cp: AuditCheckpoint) -> dict[str, Any]:
    """The JSON form of a checkpoint published on MQTT and cited in evidence packages (all signed fields)."""
    return {"kind": CHECKPOINT_KIND, "version": cp.version or 1, "entry_count": cp.entry_count,
            "head_hash": cp.head_hash, "at": format_time(cp.at), "occasion": cp.occasion,
            "public_key": cp.public_key, "prev_hash": cp.prev_hash, "host": cp.host, "signature": cp.signature}


def checkpoint_payload(cp: AuditCheckpoint) -> bytes:
    return json.dumps(checkpoint_document(cp), ensure_ascii=False, sort_keys=True).encode("utf-8")


class CheckpointLoop:
    """Signs a checkpoint every `interval` seconds while the collector serves: when the log grew, and also
    when it did not but the newest checkpoint is older than half the interval, so that a running collector
    always has a recent checkpoint (verify_log's staleness rule relies on it). `publish`, when given,
    receives the JSON document of each checkpoint written and, at startup, of the newest existing one."""

    def __init__(self, sessions: sessionmaker[Session], key: Ed25519PrivateKey,
                 interval: float = CHECKPOINT_INTERVAL_SECONDS,
                 publish: Callable[[bytes], None] | None = None) -> None:
        self.sessions = sessions
        self.key = key
        self.interval = interval
        self.publish = publish
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _tick(self, occasion: str) -> None:
        made = None
        try:
            made = checkpoint_if_changed(self.sessions, self.key, occasion,
                                         max_age=timedelta(seconds=self.interval / 2))
        except Exception:  # noqa: BLE001 - a failed checkpoint must not stop ingest; the next tick retries
            log.exception("audit checkpoint failed")
        if made is not None or occasion == "startup":
            self._publish(made)

    def _publish(self, row: AuditCheckpoint | None) -> None:
        if self.publish is None:
            return
        try:
            if row is None:
                with self.sessions() as session:
                    row = newest_checkpoint(session)
            if row is not None:
                self.publish(checkpoint_payload(row))
        except Exception:  # noqa: BLE001 - publishing is a copy; the checkpoint itself is stored
            log.exception("publishing the audit checkpoint failed")

    def _run(self) -> None:
        self._tick("startup")
        while not self._stop.wait(self.interval):
            self._tick("schedule")
        self._tick("shutdown")


# ---------------------------------------------------------------------------- copies held elsewhere

@dataclass(frozen=True)
class CheckpointCopy:
    """A checkpoint as published or cited in an evidence package, to compare with the database."""

    source: str            # where it came from (a file name), for messages
    version: int
    entry_count: int
    head_hash: str | None
    at: datetime
    occasion: str
    public_key: str
    prev_hash: str | None
    host: str | None
    signature: str

    def signed_bytes(self) -> bytes:
        return checkpoint_bytes(self.entry_count, self.head_hash, self.at, self.occasion, self.public_key,
                                version=self.version, prev_hash=self.prev_hash, host=self.host)

    def label(self) -> str:
        return f"the checkpoint copy {self.source} ({self.occasion}, signed {format_time(self.at)}, " \
               f"{self.entry_count} entries)"


_COPY_HINT = (f"give the retained message of {CHECKPOINT_TOPIC} saved to a file, or an evidence package's "
              "package.json (or its exported.audit_checkpoint section)")


def checkpoint_copy_from(data: Any, source: str) -> CheckpointCopy:
    """Parse a checkpoint document, or find it in an evidence package's package.json."""
    def bad(what: str) -> CheckpointCopyError:
        return CheckpointCopyError(f"{source}: {what}: {_COPY_HINT}")

    if isinstance(data, dict) and isinstance(data.get("exported"), dict):
        data = data["exported"].get("audit_checkpoint")
    elif isinstance(data, dict) and isinstance(data.get("audit_checkpoint"), dict):
        data = data["audit_checkpoint"]
    if not isinstance(data, dict) or "signature" not in data:
        raise bad("holds no audit checkpoint")
    if data.get("kind", CHECKPOINT_KIND) != CHECKPOINT_KIND:
        raise bad(f"kind {data.get('kind')!r} is not {CHECKPOINT_KIND!r}")
    version = data.get("version", 1)   # evidence packages written before version 2 carry no version
    if version not in (1, 2) or isinstance(version, bool):
        raise bad(f"checkpoint version {version!r} is not 1 or 2")
    count = data.get("entry_count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise bad("entry_count is not a count")
    texts = {}
    for name, optional in (("head_hash", True), ("occasion", False), ("public_key", False), ("signature", False),
                           ("prev_hash", True), ("host", True), ("at", False)):
        value = data.get(name)
        if not (isinstance(value, str) or (optional and value is None)):
            raise bad(f"{name} is {'missing' if value is None else 'not text'}")
        texts[name] = value
    try:
        at = parse_time(texts["at"])
    except ValueError as exc:
        raise bad(f"at: {exc}") from None
    return CheckpointCopy(source=source, version=version, entry_count=count, head_hash=texts["head_hash"], at=at,
                          occasion=texts["occasion"], public_key=texts["public_key"], prev_hash=texts["prev_hash"],
                          host=texts["host"], signature=texts["signature"])


def load_checkpoint_copy(path: Path) -> CheckpointCopy:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CheckpointCopyError(f"cannot read checkpoint copy {path}: {reason}; {_COPY_HINT}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CheckpointCopyError(f"{path}: not JSON ({exc}); {_COPY_HINT}") from None
    return checkpoint_copy_from(data, str(path))


def check_copy_signature(copy: CheckpointCopy, public_key: Ed25519PublicKey) -> None:
    """Raise CheckpointCopyError unless the copy is signed by `public_key`."""
    expected = public_key_b64(public_key)
    if copy.public_key != expected or not verify(public_key, copy.signed_bytes(), copy.signature):
        raise CheckpointCopyError(f"{copy.source}: the checkpoint is not signed by the collector key {expected}: "
                                  "the copy was altered or comes from another collector (give its key with "
                                  "--pubkey)")


# ---------------------------------------------------------------------------- verification

@dataclass(frozen=True)
class LogProblem:
    seq: int | None        # the first entry the problem concerns; None when it is about the log as a whole
    what: str


@dataclass(frozen=True)
class LogReport:
    entries: int
    checkpoints: int
    head_seq: int
    problems: tuple[LogProblem, ...]
    copies: int = 0        # checkpoint copies held elsewhere that were compared

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad(self) -> LogProblem | None:
        numbered = [p for p in self.problems if p.seq is not None]
        if numbered:
            return min(numbered, key=lambda p: p.seq or 0)
        return self.problems[0] if self.problems else None


def _describe(entry: AuditEntry) -> str:
    return f"entry {entry.seq} ({entry.action} {entry.target} at {format_time(entry.at)})"


def verify_log(session: Session, public_key: Ed25519PublicKey, chunk: int = 2000, *, now: datetime | None = None,
               max_age: timedelta = DEFAULT_MAX_AGE, copies: Sequence[CheckpointCopy] = ()) -> LogReport:
    """Walk the whole chain; check every checkpoint's signature, what it signed and the checkpoints' own
    chain; fail when entries after the newest checkpoint sit behind a checkpoint older than `max_age` at
    `now` (default: the current time); and compare `copies` (checkpoints held elsewhere) with the database."""
    now = now or datetime.now(timezone.utc)
    problems: list[LogProblem] = []
    checkpoints = list(session.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.id)))
    wanted = {c.entry_count for c in checkpoints} | {c.entry_count for c in copies}
    hash_at: dict[int, str] = {0: ""}
    expected, prev_hash, count, last_seq = 1, None, 0, 0
    first_at: datetime | None = None
    last_good_checkpoint = 0
    for entry in _entries(session, chunk):
        count += 1
        if first_at is None:
            first_at = entry.at
        if entry.seq != expected:
            if entry.seq > expected:
                missing = f"entry {expected}" if entry.seq == expected + 1 else f"entries {expected}..{entry.seq - 1}"
                problems.append(LogProblem(expected, f"{missing} missing from the log (deleted): the next stored "
                                                     f"entry is {entry.seq}"))
            else:
                problems.append(LogProblem(entry.seq, f"entry {entry.seq} appears twice or out of order"))
        elif entry.prev_hash != prev_hash:
            problems.append(LogProblem(entry.seq, f"{_describe(entry)} does not link to entry {entry.seq - 1}: "
                                                  "its prev hash is not that entry's hash"))
        if entry_hash_of(entry) != entry.entry_hash:
            problems.append(LogProblem(entry.seq, f"{_describe(entry)} was altered: its fields do not hash to "
                                                  "its stored entry hash"))
        if entry.seq in wanted:
            hash_at[entry.seq] = entry.entry_hash
        prev_hash, expected, last_seq = entry.entry_hash, entry.seq + 1, entry.seq
    head = session.get(AuditHead, 1)
    if head is None:
        problems.append(LogProblem(None, "the audit head row is missing"))
    elif head.seq != last_seq or head.head_hash != (prev_hash if last_seq else None):
        if head.seq > last_seq:
            problems.append(LogProblem(last_seq + 1, f"entries {last_seq + 1}..{head.seq} missing from the log "
                                                     f"(the head row counts {head.seq}, the log ends at {last_seq})"))
        else:
            problems.append(LogProblem(None, f"the head row (entry {head.seq}) does not match the log's last "
                                             f"entry {last_seq}"))
    good_counts: list[int] = []
    trusted = trusted_collector_keys(session, checkpoints, public_key)
    for cp in sorted(checkpoints, key=lambda c: (c.entry_count, c.id)):
        label = _label(cp)
        try:
            signed = signed_bytes_of(cp)
        except AuditError as exc:
            problems.append(LogProblem(None, f"{label}: {exc}"))
            continue
        if not _signed_by_trusted(cp, signed, trusted):
            problems.append(LogProblem(None, f"{label}: signature does not verify with the collector key "
                                             "(nor with a predecessor the key rotations vouch for)"))
            continue
        if cp.entry_count > last_seq:
            problems.append(LogProblem(last_seq + 1, f"entries {last_seq + 1}..{cp.entry_count} missing from the "
                                                     f"log (deleted): {label} covered them"))
        elif cp.entry_count and cp.entry_count not in hash_at:
            problems.append(LogProblem(cp.entry_count, f"entry {cp.entry_count}, the last one {label} covered, is "
                                                       "missing from the log (deleted)"))
        elif cp.entry_count and hash_at.get(cp.entry_count) != cp.head_hash:
            first = last_good_checkpoint + 1
            problems.append(LogProblem(first, f"entries {first}..{cp.entry_count} were rewritten: entry "
                                              f"{cp.entry_count} is not what {label} signed"))
        else:
            last_good_checkpoint = cp.entry_count
            good_counts.append(cp.entry_count)
    problems.extend(_chain_problems(checkpoints))
    problems.extend(_staleness_problems(checkpoints, last_seq, first_at, now, max_age))
    for copy in copies:
        problems.extend(_copy_problems(copy, checkpoints, hash_at, last_seq, good_counts, public_key, trusted))
    problems.sort(key=lambda p: (p.seq is None, p.seq or 0))
    return LogReport(entries=count, checkpoints=len(checkpoints), head_seq=head.seq if head else 0,
                     problems=tuple(problems), copies=len(copies))


def _label(cp: AuditCheckpoint) -> str:
    return f"checkpoint {cp.id} ({cp.occasion}, {format_time(cp.at)}, {cp.entry_count} entries)"


def _entry_range(first: int, last: int) -> str:
    return f"entries {first}..{last}" if first <= last else "no entries"


def _chain_problems(checkpoints: Sequence[AuditCheckpoint]) -> list[LogProblem]:
    """Each version-2 checkpoint must sign the hash of the checkpoint stored just before it."""
    problems: list[LogProblem] = []
    previous: AuditCheckpoint | None = None
    for cp in checkpoints:
        if (cp.version or 1) >= 2:
            try:
                expected = checkpoint_hash_of(previous) if previous is not None else None
            except AuditError:
                expected = None   # an unknown version is reported with the signatures
            if cp.prev_hash != expected and previous is None:
                problems.append(LogProblem(None, f"{_label(cp)} chains to an earlier checkpoint that is not in the "
                                                 "database: the checkpoints before it were deleted "
                                                 f"({_entry_range(1, cp.entry_count)} rest on it alone)"))
            elif cp.prev_hash != expected:
                assert previous is not None
                problems.append(LogProblem(None, f"{_label(cp)} does not chain to {_label(previous)} stored "
                                                 "before it: a checkpoint between them was deleted or one of them "
                                                 "altered (covering "
                                                 f"{_entry_range(previous.entry_count + 1, cp.entry_count)})"))
        elif previous is not None and (previous.version or 1) >= 2:
            problems.append(LogProblem(None, f"{_label(cp)} is a version-1 checkpoint stored after a version-2 one: "
                                             "current software never writes one, so it was inserted"))
        previous = cp
    return problems


def _minutes(age: timedelta) -> str:
    return f"{age.total_seconds() / 60:g} min"


def _staleness_problems(checkpoints: Sequence[AuditCheckpoint], last_seq: int, first_at: datetime | None,
                        now: datetime, max_age: timedelta) -> list[LogProblem]:
    """Entries after the newest checkpoint are fine only while that checkpoint is recent: a running collector
    signs every interval, and operator commands sign right after appending. The checkpoint's signed time is
    the evidence; entry times can be rewritten with the entries."""
    if last_seq == 0:
        return []
    newest = checkpoints[-1] if checkpoints else None
    hint = ("compare with a checkpoint copy held elsewhere (`exam-retention verify-log --checkpoint FILE`: the "
            f"retained {CHECKPOINT_TOPIC} message or an evidence package)")
    if newest is None:
        if first_at is not None and now - first_at > max_age:
            return [LogProblem(1, f"{_entry_range(1, last_seq)} are covered by no signed checkpoint although the "
                                  f"first was written {format_time(first_at)} (its own, unsigned time), more than "
                                  f"{_minutes(max_age)} before {format_time(now)}: the checkpoints may have been "
                                  f"deleted; {hint}")]
        return []
    if newest.entry_count < last_seq and now - newest.at > max_age:
        return [LogProblem(newest.entry_count + 1,
                           f"{_entry_range(newest.entry_count + 1, last_seq)} are covered by no checkpoint, and "
                           f"the newest, {_label(newest)}, was signed more than {_minutes(max_age)} before "
                           f"{format_time(now)}: newer checkpoints were deleted and these entries may have been "
                           "rewritten, or the collector stopped without its shutdown checkpoint; " + hint)]
    return []


def _copy_problems(copy: CheckpointCopy, checkpoints: Sequence[AuditCheckpoint], hash_at: dict[int, str],
                   last_seq: int, good_counts: Sequence[int], public_key: Ed25519PublicKey,
                   trusted: dict[str, int | None] | None = None) -> list[LogProblem]:
    label = copy.label()
    predecessor = trusted is not None and copy.public_key != public_key_b64(public_key) \
        and copy.public_key in trusted
    try:
        check_copy_signature(copy, parse_public_key(copy.public_key) if predecessor else public_key)
    except (CheckpointCopyError, PublicKeyError) as exc:
        return [LogProblem(None, str(exc))]
    count = copy.entry_count
    first = max((c for c in good_counts if c < count), default=0) + 1
    problems: list[LogProblem] = []
    if count > last_seq:
        problems.append(LogProblem(last_seq + 1, f"entries {last_seq + 1}..{count} missing from the log (deleted): "
                                                 f"{label} covered them"))
    elif count and count not in hash_at:
        problems.append(LogProblem(count, f"entry {count}, the last one {label} covered, is missing from the log "
                                          "(deleted)"))
    elif count and hash_at.get(count) != copy.head_hash:
        problems.append(LogProblem(first, f"entries {first}..{count} were rewritten: entry {count} is not what "
                                          f"{label} signed"))
    same_head = [c for c in checkpoints if c.entry_count == count and c.head_hash == copy.head_hash]
    if not same_head:
        problems.append(LogProblem(first if count else None,
                                   f"{label} has no counterpart in the database: no stored checkpoint signs its "
                                   f"count and head hash, so checkpoints were deleted ({_entry_range(first, count)} "
                                   "were covered by it)"))
    elif not any(c.signature == copy.signature for c in same_head):
        problems.append(LogProblem(None, f"{label} is not in the database: stored checkpoints sign the same head "
                                         "but not this one, so it was deleted"))
    return problems


def retired_by_rotation(session: Session, public_key: str) -> int | None:
    """The seq of the rotation entry that retired this collector key, or None while it is current."""
    for entry in session.scalars(select(AuditEntry).where(AuditEntry.action == ACTION_KEY_ROTATE)
                                 .order_by(AuditEntry.seq)):
        if parse_detail(entry).get("old_key") == public_key:
            return entry.seq
    return None


def trusted_collector_keys(session: Session, checkpoints: Sequence[AuditCheckpoint],
                           public_key: Ed25519PublicKey) -> dict[str, int | None]:
    """The collector keys whose checkpoints count, each with the checkpoint id it may sign before (None: any).

    The current key is trusted. Walking the key rotations from the newest back, a `key_rotation` checkpoint
    signed by a trusted key, covering a `collector.key_rotate` entry that names it as the new key, vouches for
    the old key that entry names, for the checkpoints before it. Trust flows only backwards from the key the
    verifier holds: a key inserted into the database by someone without that key is never trusted."""
    trusted: dict[str, int | None] = {public_key_b64(public_key): None}
    handovers = {}
    for entry in session.scalars(select(AuditEntry).where(AuditEntry.action == ACTION_KEY_ROTATE)
                                 .order_by(AuditEntry.seq)):
        detail = parse_detail(entry)
        if isinstance(detail.get("new_key"), str) and isinstance(detail.get("old_key"), str):
            handovers[detail["new_key"]] = (entry.seq, detail["old_key"])
    for cp in sorted(checkpoints, key=lambda c: c.id, reverse=True):
        if cp.occasion != OCCASION_KEY_ROTATION or cp.public_key not in trusted:
            continue
        limit = trusted[cp.public_key]
        if limit is not None and cp.id >= limit:
            continue
        handover = handovers.get(cp.public_key)
        try:
            signed_ok = _signed_by(cp, signed_bytes_of(cp), cp.public_key)
        except AuditError:
            signed_ok = False
        if handover is None or not signed_ok or handover[0] > cp.entry_count:
            continue
        old_key = handover[1]
        if old_key not in trusted:
            trusted[old_key] = cp.id
    return trusted


def _signed_by(cp: AuditCheckpoint, signed: bytes, key_text: str) -> bool:
    try:
        return cp.public_key == key_text and verify(parse_public_key(key_text), signed, cp.signature)
    except PublicKeyError:
        return False


def _signed_by_trusted(cp: AuditCheckpoint, signed: bytes, trusted: dict[str, int | None]) -> bool:
    if cp.public_key not in trusted:
        return False
    limit = trusted[cp.public_key]
    return (limit is None or cp.id < limit) and _signed_by(cp, signed, cp.public_key)


def rotate_collector_key(sessions: sessionmaker[Session], old: Ed25519PrivateKey, new: Ed25519PrivateKey,
                         actor: str, reason: str) -> tuple[AuditCheckpoint, AuditCheckpoint]:
    """Record a collector key rotation in one transaction: the entry naming both keys, a checkpoint by the old
    key covering it (the old key hands over to the new one) and one by the new key (which vouches for the old
    one, so everything signed before stays verifiable with the new key alone)."""
    old_b64, new_b64 = public_key_b64(old), public_key_b64(new)
    with sessions.begin() as session:
        record(session, ACTION_KEY_ROTATE, actor=actor, target="collector", reason=reason,
               detail={"old_key": old_b64, "old_fingerprint": key_fingerprint(old), "new_key": new_b64,
                       "new_fingerprint": key_fingerprint(new)})
        handover = checkpoint(session, old, OCCASION_KEY_HANDOVER)
        rotation = checkpoint(session, new, OCCASION_KEY_ROTATION)
    return handover, rotation


def _entries(session: Session, chunk: int) -> Iterable[AuditEntry]:
    after = None
    while True:
        query = select(AuditEntry).order_by(AuditEntry.seq, AuditEntry.id).limit(chunk)
        if after is not None:
            query = query.where((AuditEntry.seq > after[0]) | ((AuditEntry.seq == after[0]) & (AuditEntry.id > after[1])))
        rows = list(session.scalars(query))
        if not rows:
            return
        yield from rows
        after = (rows[-1].seq, rows[-1].id)
        session.expunge_all()


def entries_for(session: Session, action: str, target: str) -> list[AuditEntry]:
    return list(session.scalars(select(AuditEntry).where(AuditEntry.action == action, AuditEntry.target == target)
                                .order_by(AuditEntry.seq)))


def parse_detail(entry: AuditEntry) -> dict[str, Any]:
    try:
        value = json.loads(entry.detail)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


__all__ = ["record", "checkpoint", "checkpoint_for_export", "checkpoint_if_changed", "checkpoint_after_command",
           "checkpoint_document", "checkpoint_payload", "load_checkpoint_copy", "check_copy_signature",
           "CheckpointCopy", "CheckpointCopyError", "verify_log", "LogReport", "LogProblem", "AuditError",
           "CheckpointLoop", "local_actor"]

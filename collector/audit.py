"""The tamper-evident audit log (PRODUCT.md, Audit log; Article 29 全程留痕、责任可追溯).

Every entry carries the hash of the previous one:

    entry_hash = sha256(canonical_bytes({"v": 1, "seq", "at", "actor", "action", "target",
                                         "reason", "detail", "prev"}))

with `at` in the manifest time format and `detail` a JSON object. Appends are serialized by locking
the single `audit_head` row (`SELECT ... FOR UPDATE` on PostgreSQL; on SQLite a no-op UPDATE of that
row takes the database write lock first), so two collectors never give out the same seq or fork the
chain. An entry is part of its caller's transaction: it commits or rolls back with what it records.

Checkpoints sign (entry count, head hash, time) with the collector's Ed25519 key, so that deleting
the newest entries (which leaves a valid, shorter chain) is detected too.
"""

from __future__ import annotations

import getpass
import json
import logging
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from exam_contract.canonical import canonical_bytes, format_time, sha256_hex, truncate_to_millis
from exam_contract.signing import public_key_b64, sign, verify

from .models import AuditCheckpoint, AuditEntry, AuditHead

log = logging.getLogger(__name__)

ENTRY_VERSION = 1
CHECKPOINT_KIND = "exam-collector audit checkpoint"

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


class AuditError(Exception):
    """The audit log cannot be written or read as expected."""


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

def checkpoint_bytes(entry_count: int, head_hash: str | None, at: datetime, occasion: str, public_key: str) -> bytes:
    return canonical_bytes({"v": 1, "kind": CHECKPOINT_KIND, "count": entry_count, "head": head_hash,
                            "at": format_time(at), "occasion": occasion, "key": public_key})


def checkpoint(session: Session, key: Ed25519PrivateKey, occasion: str = "manual") -> AuditCheckpoint:
    """Sign the current head within the caller's transaction (the head stays locked until commit)."""
    head = _lock_head(session)
    at = truncate_to_millis(datetime.now(timezone.utc))
    public = public_key_b64(key)
    signature = sign(key, checkpoint_bytes(head.seq, head.head_hash, at, occasion, public))
    row = AuditCheckpoint(at=at, entry_count=head.seq, head_hash=head.head_hash, occasion=occasion,
                          public_key=public, signature=signature)
    session.add(row)
    session.flush()
    log.info("audit checkpoint at entry %s (%s)", head.seq, occasion)
    return row


def checkpoint_for_export(sessions: sessionmaker[Session], key: Ed25519PrivateKey) -> AuditCheckpoint:
    """What `exam-collector export` calls: a committed checkpoint to cite in the package."""
    with sessions.begin() as session:
        return checkpoint(session, key, occasion="export")


def checkpoint_if_changed(sessions: sessionmaker[Session], key: Ed25519PrivateKey,
                          occasion: str = "schedule") -> AuditCheckpoint | None:
    """A checkpoint unless the newest one already covers the head."""
    with sessions.begin() as session:
        head = session.get(AuditHead, 1)
        last = session.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.id.desc()).limit(1)).first()
        if head is not None and last is not None and last.entry_count == head.seq and last.head_hash == head.head_hash:
            return None
        return checkpoint(session, key, occasion)


class CheckpointLoop:
    """Signs a checkpoint every `interval` seconds while the collector serves (only when the log grew)."""

    def __init__(self, sessions: sessionmaker[Session], key: Ed25519PrivateKey, interval: float = 900.0) -> None:
        self.sessions = sessions
        self.key = key
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _tick(self, occasion: str) -> None:
        try:
            checkpoint_if_changed(self.sessions, self.key, occasion)
        except Exception:  # noqa: BLE001 - a failed checkpoint must not stop ingest; the next tick retries
            log.exception("audit checkpoint failed")

    def _run(self) -> None:
        self._tick("startup")
        while not self._stop.wait(self.interval):
            self._tick("schedule")
        self._tick("shutdown")


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


def verify_log(session: Session, public_key: Ed25519PublicKey, chunk: int = 2000) -> LogReport:
    """Walk the whole chain and check every checkpoint's signature and what it signed."""
    problems: list[LogProblem] = []
    checkpoints = list(session.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.id)))
    wanted = {c.entry_count for c in checkpoints}
    hash_at: dict[int, str] = {0: ""}
    expected, prev_hash, count, last_seq = 1, None, 0, 0
    last_good_checkpoint = 0
    for entry in _entries(session, chunk):
        count += 1
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
    for cp in sorted(checkpoints, key=lambda c: c.entry_count):
        label = f"checkpoint {cp.id} ({cp.occasion}, {format_time(cp.at)}, {cp.entry_count} entries)"
        signed = checkpoint_bytes(cp.entry_count, cp.head_hash, cp.at, cp.occasion, cp.public_key)
        if cp.public_key != public_key_b64(public_key) or not verify(public_key, signed, cp.signature):
            problems.append(LogProblem(None, f"{label}: signature does not verify with the collector key"))
            continue
        if cp.entry_count > last_seq:
            problems.append(LogProblem(last_seq + 1, f"entries {last_seq + 1}..{cp.entry_count} missing from the "
                                                     f"log (deleted): {label} covered them"))
        elif cp.entry_count and hash_at.get(cp.entry_count) != cp.head_hash:
            first = last_good_checkpoint + 1
            problems.append(LogProblem(first, f"entries {first}..{cp.entry_count} were rewritten: entry "
                                              f"{cp.entry_count} is not what {label} signed"))
        else:
            last_good_checkpoint = cp.entry_count
    problems.sort(key=lambda p: (p.seq is None, p.seq or 0))
    return LogReport(entries=count, checkpoints=len(checkpoints), head_seq=head.seq if head else 0,
                     problems=tuple(problems))


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


__all__ = ["record", "checkpoint", "checkpoint_for_export", "checkpoint_if_changed", "verify_log", "LogReport",
           "LogProblem", "AuditError", "CheckpointLoop", "local_actor"]

"""Audit checkpoints: the signed bytes (versions 1 and 2), signing within a transaction, the loop that signs and
publishes while the collector serves, checkpoint copies held elsewhere, and collector key rotation."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from exam_contract.canonical import canonical_bytes, format_time, parse_time, sha256_hex, truncate_to_millis
from exam_contract.signing import key_fingerprint, load_private_key, public_key_b64, sign, verify

from .audit_entries import ACTION_KEY_ROTATE, AuditError, lock_head, parse_detail, record
from .loops import BackgroundLoop
from .models import AuditCheckpoint, AuditEntry, AuditHead

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "exam-collector audit checkpoint"
CHECKPOINT_VERSION = 2            # what new checkpoints are written as; version 1 still verifies
CHECKPOINT_INTERVAL_SECONDS = 900.0
CHECKPOINT_TOPIC = "exam/v1/audit/checkpoint"
OCCASION_KEY_HANDOVER = "key_handover"         # signed by the old key: covers the entry naming the new one
OCCASION_KEY_ROTATION = "key_rotation"         # signed by the new key: vouches for the old one before it


class CheckpointCopyError(AuditError):
    """A checkpoint copy given for comparison (a file) is unreadable, malformed or not signed by the key."""


# ---------------------------------------------------------------------------- signing

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
    head = lock_head(session)
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


class CheckpointLoop(BackgroundLoop):
    """Signs a checkpoint every `interval` seconds while the collector serves: when the log grew, and also
    when it did not but the newest checkpoint is older than half the interval, so that a running collector
    always has a recent checkpoint (verify_log's staleness rule relies on it). `publish`, when given,
    receives the JSON document of each checkpoint written and, at startup, of the newest existing one."""

    def __init__(self, sessions: sessionmaker[Session], key: Ed25519PrivateKey,
                 interval: float = CHECKPOINT_INTERVAL_SECONDS,
                 publish: Callable[[bytes], object] | None = None) -> None:
        self.sessions = sessions
        self.key = key
        self.interval = interval
        self.publish = publish
        super().__init__("audit-checkpoint")

    def _tick(self, occasion: str) -> None:
        made = None
        try:
            made = checkpoint_if_changed(self.sessions, self.key, occasion,
                                         max_age=timedelta(seconds=self.interval / 2))
        except Exception:  # a failed checkpoint must not stop ingest; the next tick retries
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
        except Exception:  # publishing is a copy; the checkpoint itself is stored
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
    texts: dict[str, str] = {}   # an optional one that is null stays out
    for name, optional in (("head_hash", True), ("occasion", False), ("public_key", False), ("signature", False),
                           ("prev_hash", True), ("host", True), ("at", False)):
        value = data.get(name)
        if isinstance(value, str):
            texts[name] = value
        elif not (optional and value is None):
            raise bad(f"{name} is {'missing' if value is None else 'not text'}")
    try:
        at = parse_time(texts["at"])
    except ValueError as exc:
        raise bad(f"at: {exc}") from None
    return CheckpointCopy(source=source, version=version, entry_count=count, head_hash=texts.get("head_hash"), at=at,
                          occasion=texts["occasion"], public_key=texts["public_key"], prev_hash=texts.get("prev_hash"),
                          host=texts.get("host"), signature=texts["signature"])


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


# ---------------------------------------------------------------------------- key rotation

def retired_by_rotation(session: Session, public_key: str) -> int | None:
    """The seq of the rotation entry that retired this collector key, or None while it is current."""
    for entry in session.scalars(select(AuditEntry).where(AuditEntry.action == ACTION_KEY_ROTATE)
                                 .order_by(AuditEntry.seq)):
        if parse_detail(entry).get("old_key") == public_key:
            return entry.seq
    return None


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

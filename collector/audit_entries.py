"""Appending to the audit log: each entry's payload and hash, the locked head row, `record`, the action names.
See docs/design/retention.md; the format of entries and checkpoints is stated once, in docs/retention.md."""

from __future__ import annotations

import getpass
import json
import logging
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from exam_contract.canonical import canonical_bytes, format_time, sha256_hex, truncate_to_millis

from .models import AuditEntry, AuditHead

log = logging.getLogger(__name__)

ENTRY_VERSION = 1

# Actions. Targets name what was acted on: an agent id, `venue/camera/seq`, a batch id, `hold:ID`.
ACTION_ENROLL = "agent.enroll"
ACTION_REVOKE = "agent.revoke"                 # `enroll --revoke`: the agent's uploads are refused (footage kept)
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
ACTION_LEGAL_HOLD = "storage.legal_hold"       # a hold's objects put under (or released from) the storage's legal hold
ACTION_LOCK_EXTEND = "storage.lock_extend"     # storage retention locks lengthened for batch links
ACTION_SEGMENT_ADOPT = "segment.adopt"         # scrub pointed a row at a stored version holding its exact bytes


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


def lock_head(session: Session) -> AuditHead:
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
    head = lock_head(session)
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


def entries_for(session: Session, action: str, target: str) -> list[AuditEntry]:
    return list(session.scalars(select(AuditEntry).where(AuditEntry.action == action, AuditEntry.target == target)
                                .order_by(AuditEntry.seq)))


def parse_detail(entry: AuditEntry) -> dict[str, Any]:
    try:
        value = json.loads(entry.detail)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}

"""Verifying the audit log: `verify_log` walks the entry chain, the checkpoints and their own chain, and compares
copies held elsewhere; `trusted_collector_keys` says which collector keys' signatures count."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from exam_contract.canonical import format_time
from exam_contract.signing import PublicKeyError, parse_public_key, public_key_b64, verify

from .audit_checkpoints import (CHECKPOINT_TOPIC, OCCASION_KEY_ROTATION, CheckpointCopy, CheckpointCopyError,
                                check_copy_signature, checkpoint_hash_of, signed_bytes_of)
from .audit_entries import ACTION_KEY_ROTATE, AuditError, entry_hash_of, parse_detail
from .models import AuditCheckpoint, AuditEntry, AuditHead

# A running collector signs at least every interval; the rest is grace for a slow tick or a restart.
DEFAULT_MAX_AGE = timedelta(minutes=20)


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


def _entries(session: Session, chunk: int) -> Iterable[AuditEntry]:
    after = None
    while True:
        query = select(AuditEntry).order_by(AuditEntry.seq, AuditEntry.id).limit(chunk)
        if after is not None:
            query = query.where((AuditEntry.seq > after[0])
                                | ((AuditEntry.seq == after[0]) & (AuditEntry.id > after[1])))
        rows = list(session.scalars(query))
        if not rows:
            return
        yield from rows
        after = (rows[-1].seq, rows[-1].id)
        session.expunge_all()

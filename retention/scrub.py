"""`exam-retention scrub`: re-hash stored files and re-prove every record's signature and chain link.

Finds: files missing for live rows, orphan files (in storage without a live row), files the footage store
cannot read, hash or size mismatches, records whose stored manifest no longer hashes to the record hash,
signatures that fail, rows that differ from their signed manifest, and chain breaks (including a row deleted
from the middle of a chain, which leaves its successor marked `linked` to a predecessor that is gone).
Stored files are read only through the `FootageStore`.

On object storage each row names an object version, and every version in the bucket is accounted for: a
version no live row names is an orphan (e.g. left by a collector that died after its upload and whose agent
never asked again), unless it is **adopted**: a live row whose own version is not in the bucket (or that names
none) and whose key holds a version with exactly the row's signed bytes (re-hashed now) is pointed at that
version, which is locked for the row's keep, with a `segment.adopt` audit entry. Nothing else is ever changed.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import IO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from collector import audit
from collector.footage_store import FootageStore, StoredFileMissing, StoredObject, UnsafePath
from collector.models import CHAIN_LINKED, Agent, AgentKey, AuditEntry, ScrubRun, SegmentRecord
from collector.object_locks import LockSettings
from exam_contract.canonical import format_time, sha256_hex
from exam_contract.signing import PublicKeyError, parse_public_key, verify

READ_CHUNK = 2000
MAX_PROBLEMS_IN_LOG = 500


@dataclass(frozen=True)
class ScrubProblem:
    kind: str      # missing_file | orphan_file | unreadable_file | hash_mismatch | size_mismatch | record_hash |
                   # signature | manifest_mismatch | chain_break | unknown_agent | no_tombstone
    item: str      # venue/camera/seq and/or the storage path
    what: str


@dataclass
class ScrubResult:
    run_id: int | None = None
    sample: float = 1.0
    records_checked: int = 0
    files_checked: int = 0
    bytes_checked: int = 0
    seconds: float = 0.0
    problems: list[ScrubProblem] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)   # rows pointed at a version holding their exact bytes

    @property
    def mb_per_s(self) -> float:
        return self.bytes_checked / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict:
        return {"run": self.run_id, "sample": self.sample, "records_checked": self.records_checked,
                "files_checked": self.files_checked, "bytes_checked": self.bytes_checked,
                "seconds": round(self.seconds, 3), "mb_per_s": round(self.mb_per_s, 1), "ok": not self.problems,
                "problems": [{"kind": p.kind, "item": p.item, "problem": p.what} for p in self.problems],
                "adopted": self.adopted}


@dataclass(frozen=True)
class FileToHash:
    item: str
    path: PurePosixPath    # in the footage store
    sha256: str | None
    size: int
    version: str | None = None   # the object version the row names (object storage)
    segment_id: int = 0

    @property
    def key(self) -> tuple[str, str | None]:
        return self.path.as_posix(), self.version


@dataclass(frozen=True)
class Hashed:
    file: FileToHash
    digest: str | None = None    # None: not read
    size: int = 0
    error: str | None = None     # why the store could not read it (None with no digest: it vanished)


class Progress:
    """A one-line progress bar with MB/s on a text stream (stderr)."""

    def __init__(self, stream: IO[str] | None, total_files: int, total_bytes: int) -> None:
        self.stream, self.total_files, self.total_bytes = stream, total_files, total_bytes
        self.files = self.bytes = 0
        self.started = time.monotonic()
        self._last = 0.0

    def advance(self, size: int) -> None:
        self.files += 1
        self.bytes += size
        now = time.monotonic()
        if self.stream is not None and (now - self._last >= 0.2 or self.files == self.total_files):
            self._last = now
            share = self.bytes / self.total_bytes if self.total_bytes else 1.0
            bar = "#" * int(30 * share)
            rate = self.bytes / 1e6 / max(now - self.started, 1e-9)
            self.stream.write(f"\rscrub [{bar:<30}] {100 * share:5.1f}% {self.files}/{self.total_files} files "
                              f"{self.bytes / 1e6:,.0f} MB {rate:,.0f} MB/s")
            self.stream.flush()

    def close(self) -> None:
        if self.stream is not None and self.total_files:
            self.stream.write("\n")
            self.stream.flush()


def _records(session: Session) -> Iterator[SegmentRecord]:
    """Every record in (venue, camera, seq) order, by keyset pages."""
    after: tuple[str, str, int] | None = None
    while True:
        query = select(SegmentRecord).order_by(SegmentRecord.venue, SegmentRecord.camera, SegmentRecord.seq)
        if after is not None:
            v, c, s = after
            query = query.where(or_(SegmentRecord.venue > v,
                                    and_(SegmentRecord.venue == v, SegmentRecord.camera > c),
                                    and_(SegmentRecord.venue == v, SegmentRecord.camera == c, SegmentRecord.seq > s)))
        rows = list(session.scalars(query.limit(READ_CHUNK)))
        if not rows:
            return
        yield from rows
        after = (rows[-1].venue, rows[-1].camera, rows[-1].seq)
        session.expunge_all()


def _item(rec: SegmentRecord) -> str:
    return f"{rec.venue}/{rec.camera}/{rec.seq}"


StoredKey = tuple[str, str | None]   # (relative path, object version or None)


def check_records(session: Session,
                  problems: list[ScrubProblem]) -> tuple[int, list[FileToHash], set[StoredKey], set[StoredKey]]:
    """Signatures (each with the key that verified it at ingest, from the agent's key history), manifests and
    chains of every record; returns (records, live files, live (path, version)s, deleted (path, version)s)."""
    def parsed(text: str) -> Ed25519PublicKey | None:
        try:
            return parse_public_key(text)
        except PublicKeyError:
            return None

    current: dict[str, Ed25519PublicKey | None] = {agent.id: parsed(agent.public_key)
                                                   for agent in session.scalars(select(Agent))}
    history: dict[tuple[str, str], Ed25519PublicKey | None] = {(k.agent_id, k.fingerprint): parsed(k.public_key)
                                                               for k in session.scalars(select(AgentKey))}
    # Rows marked deleted must each have their tombstone: otherwise marking a row deleted would hide a
    # removed file from this scrub.
    tombstones: dict[int, tuple[str, str | None]] = {}
    for entry in session.scalars(select(AuditEntry).where(AuditEntry.action == audit.ACTION_SEGMENT_DELETE)):
        tombstones[entry.seq] = (entry.target, audit.parse_detail(entry).get("record_hash"))
    files: list[FileToHash] = []
    live: set[StoredKey] = set()
    deleted: set[StoredKey] = set()
    count = 0
    previous: SegmentRecord | None = None
    for rec in _records(session):
        count += 1
        item = _item(rec)

        def bad(kind: str, what: str) -> None:
            problems.append(ScrubProblem(kind, item, what))  # noqa: B023 - called only within this iteration

        canonical = rec.manifest.encode("utf-8")
        if sha256_hex(canonical) != rec.record_hash:
            bad("record_hash", "the stored manifest does not hash to the row's record hash (row or manifest edited)")
        try:
            manifest = json.loads(rec.manifest)
        except ValueError:
            manifest = {}
        expected = {"seq": rec.seq, "camera": rec.camera, "venue": rec.venue, "kind": rec.kind,
                    "sha256": rec.sha256, "size": rec.size, "prev": rec.prev_hash,
                    "start": format_time(rec.start_at), "end": format_time(rec.end_at)}
        differing = sorted(k for k, v in expected.items() if manifest.get(k) != v)
        if differing:
            bad("manifest_mismatch", f"row fields {', '.join(differing)} differ from the signed manifest")
        if rec.key_fingerprint is not None:
            known = (rec.agent_id, rec.key_fingerprint) in history
            key = history.get((rec.agent_id, rec.key_fingerprint))
            which = f"key {rec.key_fingerprint[:16]}… of {rec.agent_id}"
        else:  # stored before key history: its agent's current key
            known, key = rec.agent_id in current, current.get(rec.agent_id)
            which = f"the key enrolled for {rec.agent_id}"
        if not known:
            bad("unknown_agent", f"{which} is not in the key history: the signature cannot be checked")
        elif key is None or not verify(key, canonical, rec.signature):
            bad("signature", f"the signature does not verify with {which}")
        same = previous is not None and (previous.venue, previous.camera) == (rec.venue, rec.camera)
        if rec.seq == 1 and rec.prev_hash is not None:
            bad("chain_break", "seq 1 names a predecessor")
        elif same and previous is not None and previous.seq == rec.seq - 1:
            if rec.prev_hash != previous.record_hash:
                bad("chain_break", f"prev hash is not the record hash of seq {previous.seq}")
        elif rec.seq > 1 and rec.chain_status == CHAIN_LINKED:
            bad("chain_break", f"seq {rec.seq - 1} is missing although seq {rec.seq} was linked to it "
                               "(its row was deleted)")
        if rec.deleted_at is not None and tombstones.get(rec.deleted_entry or -1) != (item, rec.record_hash):
            bad("no_tombstone", f"row is marked deleted (entry {rec.deleted_entry}) but the audit log has no "
                                "tombstone for this record")
        if rec.storage_path:
            if rec.deleted_at is not None:
                deleted.add((rec.storage_path, rec.storage_version))
            else:
                live.add((rec.storage_path, rec.storage_version))
                files.append(FileToHash(f"{item} {rec.storage_path}", PurePosixPath(rec.storage_path), rec.sha256,
                                        rec.size, rec.storage_version, rec.id))
        elif rec.kind == "segment" and rec.size and rec.deleted_at is None:
            bad("missing_file", "segment row has no stored file")
        previous = rec
    return count, files, live, deleted


def find_orphans(store: FootageStore, live: set[StoredKey]) -> list[StoredObject]:
    """Stored files (object versions) no live row names."""
    return [obj for obj in store.objects() if (obj.relpath.as_posix(), obj.version) not in live]


def report_orphans(orphans: list[StoredObject], live: set[StoredKey], deleted: set[StoredKey],
                   problems: list[ScrubProblem]) -> None:
    live_keys = {path for path, _ in live}
    for obj in orphans:
        rel = obj.relpath.as_posix()
        name = rel if obj.version is None else f"{rel} version {obj.version}"
        if (rel, obj.version) in deleted:
            what = "file of a segment deleted by retention is still in storage"
        elif obj.version is not None and rel in live_keys:
            what = ("another version of a live record's key (a second upload); no row names it: it stays until its "
                    "storage lock ends")
        else:
            what = "file in storage has no segment row (row deleted, file planted, or an upload whose row never " \
                   "committed)"
        problems.append(ScrubProblem("orphan_file", name, what))


def adopt(sessions: sessionmaker[Session], store: FootageStore, candidates: list[FileToHash],
          orphans: list[StoredObject], locks: LockSettings, actor: str) -> list[str]:
    """Point rows whose own version is not in storage (or that name none) at an orphan version of their key
    holding exactly their signed bytes (re-hashed now); lock it for the row's keep. Returns what was adopted and
    removes the adopted versions from `orphans`."""
    by_key: dict[str, list[StoredObject]] = {}
    for obj in orphans:
        by_key.setdefault(obj.relpath.as_posix(), []).append(obj)
    adopted: list[str] = []
    for f in candidates:
        for obj in by_key.get(f.path.as_posix(), []):
            try:
                digest, size = store.hash(obj.relpath, obj.version)
            except OSError:
                continue
            if (digest, size) != (f.sha256, f.size):
                continue
            with sessions.begin() as session:
                row = session.get(SegmentRecord, f.segment_id, with_for_update=True)
                if row is None or row.deleted_at is not None or (row.storage_path, row.storage_version) != f.key:
                    break
                until = store.extend_lock(obj.relpath, obj.version, locks.upload_lock(row.end_at, row.stored_at))
                row.storage_version, row.lock_until = obj.version, until
                audit.record(session, audit.ACTION_SEGMENT_ADOPT, actor=actor, target=_item(row),
                             reason="the row's object version was not in storage; this version holds its exact bytes",
                             detail={"storage_path": row.storage_path, "previous_version": f.version,
                                     "version": obj.version, "sha256": digest, "size": size, "lock_until": until})
            adopted.append(f"{f.item}: version {obj.version} (was {f.version or 'none'})")
            orphans.remove(obj)
            by_key[f.path.as_posix()].remove(obj)
            break
    return adopted


def run_scrub(sessions: sessionmaker[Session], store: FootageStore, sample: float = 1.0,
              progress: IO[str] | None = None, actor: str = "retention", seed: int | None = None,
              workers: int | None = None, locks: LockSettings | None = None) -> ScrubResult:
    started_at = datetime.now(timezone.utc)
    result = ScrubResult(sample=sample)
    problems = result.problems
    with sessions() as session:
        result.records_checked, files, live, deleted = check_records(session, problems)
    present: list[FileToHash] = []
    unpinned: list[FileToHash] = []   # on object storage: rows whose version is gone, or that name none
    for f in files:
        try:
            there = store.exists(f.path, f.version)
        except UnsafePath as exc:
            problems.append(ScrubProblem("missing_file", f.item, f"not checked: {exc}"))
            continue
        if there:
            present.append(f)
        else:
            problems.append(ScrubProblem("missing_file", f.item, "stored file is missing" if f.version is None
                                         else f"stored version {f.version} is missing"))
        if store.versioned and (f.version is None or not there):
            unpinned.append(f)
    orphans = find_orphans(store, live)
    if unpinned and orphans:
        result.adopted = adopt(sessions, store, unpinned, orphans, locks or LockSettings(), actor)
    report_orphans(orphans, live, deleted, problems)
    chosen = present
    if sample < 1.0 and present:
        k = max(1, round(sample * len(present)))
        chosen = sorted(random.Random(seed).sample(present, k), key=lambda f: f.path.as_posix())
    bar = Progress(progress, len(chosen), sum(f.size for f in chosen))
    t0 = time.perf_counter()

    def work(f: FileToHash) -> Hashed:
        try:
            digest, size = store.hash(f.path, f.version)
        except StoredFileMissing:
            return Hashed(f)
        except OSError as exc:   # a failing medium: reported for this file, the scrub goes on
            return Hashed(f, error=str(exc.strerror or exc))
        return Hashed(f, digest, size)

    with ThreadPoolExecutor(max_workers=workers or min(2, os.cpu_count() or 1)) as pool:
        for done in pool.map(work, chosen):
            f, digest, size = done.file, done.digest, done.size
            if done.error is not None:
                problems.append(ScrubProblem("unreadable_file", f.item, f"stored file cannot be read: {done.error}"))
                continue
            if digest is None:
                problems.append(ScrubProblem("missing_file", f.item, "stored file vanished during the scrub"))
                continue
            result.files_checked += 1
            result.bytes_checked += size
            bar.advance(size)
            if size != f.size:
                problems.append(ScrubProblem("size_mismatch", f.item, f"file has {size} bytes, manifest says {f.size}"))
            elif digest != f.sha256:
                problems.append(ScrubProblem("hash_mismatch", f.item,
                                             f"file hashes to {digest}, manifest says {f.sha256}"))
    result.seconds = time.perf_counter() - t0
    bar.close()
    finished_at = datetime.now(timezone.utc)
    problem_json = [{"kind": p.kind, "item": p.item, "problem": p.what} for p in problems]
    with sessions.begin() as session:
        run = ScrubRun(started_at=started_at, finished_at=finished_at, sample=sample,
                       files_checked=result.files_checked, bytes_checked=result.bytes_checked,
                       seconds=result.seconds, problem_count=len(problems),
                       problems=json.dumps(problem_json, ensure_ascii=False))
        session.add(run)
        session.flush()
        result.run_id = run.id
        audit.record(session, audit.ACTION_SCRUB_RUN, actor=actor, target=f"scrub:{run.id}",
                     reason="integrity problems found" if problems else None,
                     detail={"sample": sample, "records": result.records_checked, "files": result.files_checked,
                             "bytes": result.bytes_checked, "problem_count": len(problems),
                             "problems": problem_json[:MAX_PROBLEMS_IN_LOG], "adopted": result.adopted})
    return result

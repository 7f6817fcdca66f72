"""The ingest core, free of MQTT: staging of chunks on the storage volume, verification, storage, chain.

`Ingest.on_init`, `on_chunk` and `on_fin` are what the MQTT service calls per message; tests and
benchmarks call them directly. Any instance that shares `storage_dir` and the database can take any
message of a file: staging lives on the volume, not in memory.

Staging of one file, `storage_dir/staging/{agent}/{file_id}/`:
  init.json            the init payload exactly as received
  data                 the file being reassembled, chunk i written with pwrite at i * chunk_size
  early/{i}            a chunk that arrived before any instance had stored the init
  claim.{instance}     `data` renamed by the instance that finishes the file
  rejected.json        the reply of a rejected init, repeated on fin, then staging is removed

Receipts are durable and shared (issue 3): chunk i's bytes are written and fdatasync'ed first, then a
`chunk_receipt` row is committed, so whichever instance gets a repeated `fin` answers `missing` from the
database. The `chunk_transfer` row of a file is its finishing claim: an instance finishes a file only while
holding that row's lock (PostgreSQL `FOR UPDATE SKIP LOCKED`), so two instances never finish one file, and a
claim left by an instance that died mid-finish is taken over at once (its lock died with its connection).
`Ingest.sweep_staging` removes transfers that saw no init or fin for the staging TTL, recording each.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from exam_contract import protocol as P
from exam_contract.canonical import canonical_bytes, sha256_hex
from exam_contract.files import fsync_dir, hash_file
from exam_contract.chain import ChainPosition, LinkVerdict, judge_link
from exam_contract.chunks import missing_ranges
from exam_contract.manifest import Manifest, ManifestError, segment_file_name
from exam_contract.protocol import InitMessage, ProtocolError, Reply
from exam_contract.signing import PublicKeyError, parse_public_key, verify

from .db import session_factory
from .models import (CHAIN_FIRST, CHAIN_HOLE, CHAIN_LINKED, EVENT_CHAIN_HOLE, EVENT_CHAIN_LINKED,
                     EVENT_HANDLER_ERROR, EVENT_REJECTED, Agent, ChunkReceipt, ChunkTransfer, IngestEvent,
                     SegmentRecord)

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,159}$")
REASON_INIT_MISSING = "init_missing"
EVENT_STAGING_EXPIRED = "staging_expired"
DEFAULT_STAGING_TTL = timedelta(hours=48)
RECEIPT_BATCH = 64  # chunks (16 MiB at 256 KiB) synced and receipted together; fewer when the worker idles


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Rejection(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Staged:
    """A parsed, identity-checked init."""

    message: InitMessage
    manifest: Manifest
    record_hash: str


def _safe_name(value: str) -> bool:
    return bool(NAME_RE.match(value)) and ".." not in value


def _insert_ignore(session: Session, model: type, rows: list[dict]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING on PostgreSQL and SQLite."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    session.execute(insert(model).values(rows).on_conflict_do_nothing())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def storage_relpath(manifest: Manifest) -> Path:
    start = manifest.start.astimezone(timezone.utc)
    return (Path(manifest.institution) / manifest.venue / manifest.camera / f"{start:%Y}" / f"{start:%m}"
            / f"{start:%d}" / segment_file_name(manifest.camera, manifest.start))


class Ingest:
    """Ingest of protocol v1 segment messages into `storage_dir` and the database."""

    def __init__(self, engine: Engine, storage_dir: Path, instance_id: str | None = None) -> None:
        self.engine = engine
        self.sessions = session_factory(engine)
        self.storage_dir = Path(storage_dir)
        self.staging_dir = self.storage_dir / "staging"
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self.instance_id = instance_id or f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self._held = threading.local()  # the (agent, file_id) whose transfer row this thread has locked
        self._receipts = threading.local()  # chunks this thread wrote whose receipts are not committed yet

    # ------------------------------------------------------------------ messages

    def on_init(self, agent: str, file_id: str, payload: bytes) -> Reply | None:
        """Check and stage an init. Returns a reply only when the file is already decided here:
        `rejected`, or `stored` for a resend of a record stored with the same hash."""
        if not (_safe_name(agent) and _safe_name(file_id)):
            return self._reject(agent, file_id, None, P.REJECT_MALFORMED,
                                "agent or file_id in the topic has characters outside [A-Za-z0-9._@+-]",
                                stage=False)
        try:
            staged = self._check_init(agent, file_id, payload)
        except Rejection as rej:
            return self._reject(agent, file_id, _manifest_or_none(payload), rej.code, rej.detail,
                                marker=True)
        manifest = staged.manifest
        with self.sessions() as session:
            existing = self._record(session, manifest.venue, manifest.camera, manifest.seq)
        if existing is not None:
            # A resend of a stored file (e.g. its reply was lost) is answered now, before any upload.
            return self._existing(agent, file_id, staged, existing, marker=True)
        directory = self._dir(agent, file_id)
        directory.mkdir(parents=True, exist_ok=True)
        marker = directory / "rejected.json"
        if marker.exists():
            marker.unlink(missing_ok=True)
        init_path = directory / "init.json"
        try:
            previous = init_path.read_bytes()
        except FileNotFoundError:
            previous = None
        if previous is not None and previous != payload:
            log.warning("agent %s file %s: init changed, restarting its staging", agent, file_id)
            self._forget_pending_receipts(directory)
            self._remove(directory / "data")
            self._delete_receipts(agent, file_id)
        if previous != payload:
            _write_atomic(init_path, payload)
        self._touch_transfer(agent, file_id, staged.message, payload)
        self._fold_early(agent, file_id, directory, staged.message)
        log.debug("agent %s file %s: init staged (%s chunks)", agent, file_id, staged.message.chunks)
        return None

    def on_chunk(self, agent: str, file_id: str, index: int, payload: bytes) -> None:
        """Write chunk `index` into the staged file and mark it received."""
        if not (_safe_name(agent) and _safe_name(file_id)) or index < 0:
            log.warning("agent %s file %s: chunk %s dropped, bad topic names", agent, file_id, index)
            return
        directory = self._dir(agent, file_id)
        if (directory / "rejected.json").exists():
            return
        message = self._load_init_message(directory)
        if message is None:
            if self._stored_row_for(agent, file_id) is not None:
                log.debug("agent %s file %s: late chunk %s of a stored file dropped", agent, file_id, index)
                return
            early = directory / "early"
            early.mkdir(parents=True, exist_ok=True)
            _write_atomic(early / str(index), payload)
            return
        if index >= message.chunks:
            log.warning("agent %s file %s: chunk %s dropped, init announced %s chunks",
                        agent, file_id, index, message.chunks)
            return
        self._write_chunk(agent, file_id, directory, message.chunk_size, index, payload)

    def on_fin(self, agent: str, file_id: str) -> Reply | None:
        """Finish a file: `missing`, `stored` or `rejected`.

        Returns None only when another instance sharing the volume has claimed the file and
        is finishing it right now; that instance replies."""
        if not (_safe_name(agent) and _safe_name(file_id)):
            return self._reject(agent, file_id, None, P.REJECT_MALFORMED,
                                "agent or file_id in the topic has characters outside [A-Za-z0-9._@+-]",
                                stage=False)
        directory = self._dir(agent, file_id)
        marker = directory / "rejected.json"
        if marker.exists():
            try:
                raw = json.loads(marker.read_text())
                reply = self._reply(file_id, "rejected", reason=raw.get("reason"))
            except (OSError, ValueError):
                reply = None
            self._remove_staging(agent, file_id)
            if reply is not None:
                return reply
        try:
            payload = (directory / "init.json").read_bytes()
        except FileNotFoundError:
            return self._status_without_staging(agent, file_id)
        try:
            staged = self._check_init(agent, file_id, payload)
        except Rejection as rej:
            return self._reject(agent, file_id, _manifest_or_none(payload), rej.code, rej.detail)
        manifest = staged.manifest
        with self.sessions() as session:
            existing = self._record(session, manifest.venue, manifest.camera, manifest.seq)
        if existing is not None:
            return self._existing(agent, file_id, staged, existing)
        message = staged.message
        if message.chunks:
            self._fold_early(agent, file_id, directory, message)
            self.flush_receipts()
        if self.engine.dialect.name == "sqlite":
            # SQLite has no row locks: instances on one host (SQLite means one host) exclude each other
            # with a flock on the staging folder, released by the kernel if the holder dies.
            guard = _FolderLock(directory / ".finish.lock")
            if not guard.acquire():
                log.info("agent %s file %s: another instance is finishing it", agent, file_id)
                return None
            try:
                return self._fin_with_row_lock(agent, file_id, staged, directory, payload)
            finally:
                guard.release()
        return self._fin_with_row_lock(agent, file_id, staged, directory, payload)

    def _fin_with_row_lock(self, agent: str, file_id: str, staged: Staged, directory: Path,
                           payload: bytes) -> Reply | None:
        message = staged.message
        touched = False
        for attempt in range(4):
            # The lock session writes only at its very end: on SQLite an earlier write would hold the
            # database lock while _finish writes through other sessions.
            with self.sessions() as lock_session, lock_session.begin():
                transfer = lock_session.scalars(select(ChunkTransfer).where(
                    ChunkTransfer.agent_id == agent, ChunkTransfer.file_id == file_id)
                    .with_for_update(skip_locked=True)).first()
                if transfer is not None:
                    self._held.key = (agent, file_id)
                    try:
                        reply = self._fin_locked(lock_session, agent, file_id, staged, directory)
                    finally:
                        self._held.key = None
                    if reply.state == "missing":
                        transfer.updated_at = utcnow()
                    else:
                        lock_session.execute(delete(ChunkReceipt).where(
                            ChunkReceipt.agent_id == agent, ChunkReceipt.file_id == file_id))
                        lock_session.delete(transfer)
                    return reply
                busy = bool(lock_session.scalar(select(func.count()).select_from(ChunkTransfer).where(
                    ChunkTransfer.agent_id == agent, ChunkTransfer.file_id == file_id)))
            if busy:
                # Locked: another instance is finishing it (it replies), or just refreshing the row for a
                # repeated init. Look again a few times so the latter still gets its answer now.
                time.sleep(0.2)
                continue
            if touched:
                return None
            # staged before its transfer row existed (e.g. the database failed at init): make the row
            self._touch_transfer(agent, file_id, message, payload)
            touched = True
        log.info("agent %s file %s: another instance is finishing it", agent, file_id)
        return None

    def _fin_locked(self, session: Session, agent: str, file_id: str, staged: Staged, directory: Path) -> Reply:
        """The finishing step, run while this instance holds the file's transfer row lock."""
        message = staged.message
        claim: Path | None = None
        if message.chunks:
            received = set(session.scalars(select(ChunkReceipt.idx).where(
                ChunkReceipt.agent_id == agent, ChunkReceipt.file_id == file_id)))
            gaps = missing_ranges(received, message.chunks)
            if gaps:
                log.info("agent %s file %s: %s of %s chunks missing", agent, file_id,
                         message.chunks - len(received & set(range(message.chunks))), message.chunks)
                return self._reply(file_id, "missing", missing=gaps)
            claim = self._claim(directory)
            if claim is None:
                log.warning("agent %s file %s: receipts without data, asking for every chunk", agent, file_id)
                session.execute(delete(ChunkReceipt).where(ChunkReceipt.agent_id == agent,
                                                           ChunkReceipt.file_id == file_id))
                return self._reply(file_id, "missing", missing=missing_ranges((), message.chunks))
        try:
            return self._finish(agent, file_id, staged, claim)
        except Rejection as rej:
            return self._reject(agent, file_id, staged.manifest, rej.code, rej.detail)

    # ------------------------------------------------------------------ staging TTL

    def sweep_staging(self, ttl: timedelta = DEFAULT_STAGING_TTL, limit: int = 500) -> int:
        """Remove transfers without an init or fin for `ttl` (and staging folders without a transfer that
        are older than `ttl`); each removal is recorded as a `staging_expired` event. Returns how many."""
        cutoff = utcnow() - ttl
        removed = 0
        with self.sessions() as session:
            stale = session.execute(select(ChunkTransfer.agent_id, ChunkTransfer.file_id).where(
                ChunkTransfer.updated_at < cutoff).limit(limit)).all()
        for agent, file_id in stale:
            with self.sessions() as session, session.begin():
                row = session.scalars(select(ChunkTransfer).where(
                    ChunkTransfer.agent_id == agent, ChunkTransfer.file_id == file_id,
                    ChunkTransfer.updated_at < cutoff).with_for_update(skip_locked=True)).first()
                if row is None:
                    continue
                chunks = row.chunks
                already = self._stored_row_for(agent, file_id) is not None
                got = session.scalar(select(func.count()).select_from(ChunkReceipt).where(
                    ChunkReceipt.agent_id == agent, ChunkReceipt.file_id == file_id))
                self._remove(self._dir(agent, file_id))
                session.execute(delete(ChunkReceipt).where(ChunkReceipt.agent_id == agent,
                                                           ChunkReceipt.file_id == file_id))
                session.delete(row)
            removed += 1
            if already:  # a late init re-created the row after another instance had stored the file
                log.info("agent %s file %s: leftover staging of a stored file removed", agent, file_id)
                continue
            log.warning("agent %s file %s: abandoned transfer expired (%s of %s chunks, no init or fin for %s); "
                        "staging removed", agent, file_id, got, chunks, ttl)
            self.record_event(agent, file_id, EVENT_STAGING_EXPIRED, None,
                              f"abandoned transfer: {got} of {chunks} chunks received, no init or fin since "
                              f"{cutoff.isoformat()}; staging removed, the agent resends it in full if it asks")
        removed += self._sweep_orphan_folders(cutoff)
        return removed

    def _sweep_orphan_folders(self, cutoff: datetime) -> int:
        removed = 0
        try:
            agents = list(self.staging_dir.iterdir())
        except FileNotFoundError:
            return 0
        for agent_dir in agents:
            if not agent_dir.is_dir():
                continue
            for directory in list(agent_dir.iterdir()):
                try:
                    mtime = datetime.fromtimestamp(directory.stat().st_mtime, timezone.utc)
                except FileNotFoundError:
                    continue
                if mtime >= cutoff:
                    continue
                agent, file_id = agent_dir.name, directory.name
                with self.sessions() as session:
                    if session.get(ChunkTransfer, (agent, file_id)) is not None:
                        continue
                self._remove(directory)
                removed += 1
                log.warning("agent %s file %s: stale staging folder without a transfer removed", agent, file_id)
                self.record_event(agent, file_id, EVENT_STAGING_EXPIRED, None,
                                  "stale staging folder (early chunks or a rejection marker) without an init "
                                  f"or fin since {cutoff.isoformat()}; removed")
        with self.sessions.begin() as session:
            session.execute(delete(ChunkReceipt).where(~select(ChunkTransfer.agent_id).where(
                ChunkTransfer.agent_id == ChunkReceipt.agent_id,
                ChunkTransfer.file_id == ChunkReceipt.file_id).exists()))
        return removed

    # ------------------------------------------------------------------ checks

    def _check_init(self, agent: str, file_id: str, payload: bytes) -> Staged:
        try:
            message = InitMessage.decode(payload)
        except ProtocolError as exc:
            raise Rejection(P.REJECT_MALFORMED, str(exc)) from exc
        try:
            manifest = message.manifest()
        except ManifestError as exc:
            raise Rejection(P.REJECT_MALFORMED, str(exc)) from exc
        if manifest.file_id != file_id:
            raise Rejection(P.REJECT_MALFORMED, f"topic file_id {file_id!r} is not the manifest's "
                                                f"camera-seq {manifest.file_id!r}")
        with self.sessions() as session:
            enrolled = session.get(Agent, agent)
        if enrolled is None:
            raise Rejection(P.REJECT_UNKNOWN_AGENT, f"agent {agent!r} is not enrolled: enrol it with "
                                                    "`exam-collector enroll`")
        if manifest.venue != enrolled.venue:
            raise Rejection(P.REJECT_VENUE_MISMATCH, f"agent {agent!r} is enrolled for venue "
                                                     f"{enrolled.venue!r}, manifest says {manifest.venue!r}")
        if manifest.agent != agent:
            raise Rejection(P.REJECT_AGENT_MISMATCH, f"topic agent {agent!r} is not manifest agent "
                                                     f"{manifest.agent!r}")
        try:
            public = parse_public_key(enrolled.public_key)
        except PublicKeyError as exc:
            raise Rejection(P.REJECT_BAD_SIGNATURE, f"enrolled key of {agent!r} unusable: {exc}") from exc
        canonical = canonical_bytes(message.manifest_raw)
        if not verify(public, canonical, message.signature):
            raise Rejection(P.REJECT_BAD_SIGNATURE, f"signature does not verify with the key enrolled "
                                                    f"for {agent!r}")
        try:
            message.check_chunk_count(manifest)
        except ProtocolError as exc:
            raise Rejection(P.REJECT_WRONG_CHUNK_COUNT, str(exc)) from exc
        return Staged(message, manifest, sha256_hex(canonical))

    # ------------------------------------------------------------------ finishing

    def _finish(self, agent: str, file_id: str, staged: Staged, claim: Path | None) -> Reply:
        manifest = staged.manifest
        if claim is not None:
            digest, size = hash_file(claim, fsync=True)
            if size != manifest.size:
                raise Rejection(P.REJECT_SIZE_MISMATCH, f"received {size} bytes, manifest says {manifest.size}")
            if digest != manifest.sha256:
                raise Rejection(P.REJECT_HASH_MISMATCH, f"received bytes hash to {digest}, manifest says "
                                                        f"{manifest.sha256}")
        elif manifest.kind == "segment":
            if manifest.size != 0:
                raise Rejection(P.REJECT_SIZE_MISMATCH, f"no bytes received, manifest says {manifest.size}")
            if manifest.sha256 != sha256_hex(b""):
                raise Rejection(P.REJECT_HASH_MISMATCH, "an empty segment must carry the hash of no bytes")

        with self.sessions() as session:
            verdict, missing_seqs, successor = self._judge_chain(session, staged)

        relpath: Path | None = None
        created = False
        if claim is not None:
            relpath, created = self._place(claim, manifest)

        now = utcnow()
        row = SegmentRecord(
            agent_id=agent, institution=manifest.institution, venue=manifest.venue, room=manifest.room,
            room_kind=manifest.room_kind, camera=manifest.camera, seq=manifest.seq, file_id=file_id,
            kind=manifest.kind, start_at=manifest.start, end_at=manifest.end, duration=manifest.duration,
            size=manifest.size, sha256=manifest.sha256, record_hash=staged.record_hash,
            prev_hash=manifest.prev, manifest=canonical_bytes(staged.message.manifest_raw).decode("utf-8"),
            signature=staged.message.signature, storage_path=relpath.as_posix() if relpath else None,
            chain_status={LinkVerdict.FIRST: CHAIN_FIRST, LinkVerdict.LINKED: CHAIN_LINKED}.get(verdict, CHAIN_HOLE),
            stored_at=now)
        try:
            with self.sessions.begin() as session:
                session.add(row)
                if verdict == LinkVerdict.HOLE:
                    session.add(self._event(agent, manifest, file_id, EVENT_CHAIN_HOLE, None,
                                            f"seq {_ranges_text(missing_seqs)} not received before seq "
                                            f"{manifest.seq}", at=now))
                if successor is not None:
                    fresh = session.get(SegmentRecord, successor)
                    if fresh is not None and fresh.chain_status == CHAIN_HOLE:
                        fresh.chain_status = CHAIN_LINKED
                        session.add(IngestEvent(
                            at=now, agent_id=fresh.agent_id, venue=fresh.venue, camera=fresh.camera,
                            file_id=fresh.file_id, seq=fresh.seq, event=EVENT_CHAIN_LINKED, reason=None,
                            detail=f"seq {manifest.seq} arrived; seq {fresh.seq} is now linked"))
        except IntegrityError:
            log.info("agent %s file %s: another instance stored it first", agent, file_id)
            with self.sessions() as session:
                winner = self._record(session, manifest.venue, manifest.camera, manifest.seq)
            if created and relpath is not None and (winner is None or winner.storage_path != relpath.as_posix()):
                (self.storage_dir / relpath).unlink(missing_ok=True)
            if winner is None:
                raise
            self._remove_staging(agent, file_id)
            return self._existing(agent, file_id, staged, winner)
        self._remove_staging(agent, file_id)
        log.info("camera %s seq %s stored (%s, chain %s)", manifest.camera, manifest.seq, manifest.kind,
                 row.chain_status)
        return self._reply(file_id, "stored")

    def _judge_chain(self, session: Session, staged: Staged) -> tuple[LinkVerdict, list[int], int | None]:
        manifest = staged.manifest
        predecessor = self._record(session, manifest.venue, manifest.camera, manifest.seq - 1) \
            if manifest.seq > 1 else None
        verdict = judge_link(ChainPosition(manifest.seq, manifest.prev),
                             predecessor.record_hash if predecessor else None)
        if verdict == LinkVerdict.BROKEN:
            raise Rejection(P.REJECT_CHAIN_BROKEN, f"prev {manifest.prev} is not the hash of stored seq "
                                                   f"{manifest.seq - 1}")
        successor = self._record(session, manifest.venue, manifest.camera, manifest.seq + 1)
        if successor is not None and successor.prev_hash != staged.record_hash:
            raise Rejection(P.REJECT_CHAIN_BROKEN, f"stored seq {manifest.seq + 1} names a different "
                                                   f"predecessor ({successor.prev_hash})")
        missing: list[int] = []
        if verdict == LinkVerdict.HOLE:
            below = session.scalar(select(func.max(SegmentRecord.seq)).where(
                SegmentRecord.venue == manifest.venue, SegmentRecord.camera == manifest.camera,
                SegmentRecord.seq < manifest.seq))
            missing = list(range((below or 0) + 1, manifest.seq))
        return verdict, missing, successor.id if successor is not None else None

    def _place(self, claim: Path, manifest: Manifest) -> tuple[Path, bool]:
        """Hard-link the verified file into its final path (never overwriting); (relpath, created).
        The claim stays until the row is committed, so a failed commit can be retried without a re-upload."""
        relpath = storage_relpath(manifest)
        final = self.storage_dir / relpath
        made = self._makedirs(final.parent)
        for attempt in range(2):
            try:
                os.link(claim, final)
            except FileExistsError:
                digest, _ = hash_file(final)
                if digest == manifest.sha256:
                    return relpath, False
                if attempt == 0:
                    relpath = relpath.with_name(f"{relpath.stem}~seq{manifest.seq}{relpath.suffix}")
                    final = self.storage_dir / relpath
                    continue
                raise
            break
        fsync_dir(final.parent)
        for directory in made:
            fsync_dir(directory.parent)
        return relpath, True

    def _makedirs(self, path: Path) -> list[Path]:
        made: list[Path] = []
        current = path
        while not current.exists():
            made.append(current)
            current = current.parent
        path.mkdir(parents=True, exist_ok=True)
        return made

    def _existing(self, agent: str, file_id: str, staged: Staged, existing: SegmentRecord,
                  marker: bool = False) -> Reply:
        if existing.record_hash == staged.record_hash:
            log.info("camera %s seq %s: duplicate of the stored record, nothing stored", existing.camera,
                     existing.seq)
            self._remove_staging(agent, file_id)
            return self._reply(file_id, "stored")
        return self._reject(agent, file_id, staged.manifest, P.REJECT_SEQ_REPLAYED,
                            f"seq {existing.seq} of camera {existing.camera} is already stored with "
                            f"a different manifest (record hash {existing.record_hash})", marker=marker)

    def _status_without_staging(self, agent: str, file_id: str) -> Reply:
        """A fin with no staged init: answer from the database (a repeat after stored or rejected)."""
        row = self._stored_row_for(agent, file_id)
        if row is not None:
            return self._reply(file_id, "stored")
        with self.sessions() as session:
            last = session.scalars(select(IngestEvent).where(
                IngestEvent.agent_id == agent, IngestEvent.file_id == file_id,
                IngestEvent.event == EVENT_REJECTED).order_by(IngestEvent.id.desc()).limit(1)).first()
        if last is not None:
            reason = f"{last.reason}: {last.detail}" if last.detail else last.reason
            return self._reply(file_id, "rejected", reason=reason)
        return self._reply(file_id, "missing", reason=f"{REASON_INIT_MISSING}: no init received for this "
                                                      "file; send init and all chunks again")

    # ------------------------------------------------------------------ staging helpers

    def _dir(self, agent: str, file_id: str) -> Path:
        return self.staging_dir / agent / file_id

    def _load_init_message(self, directory: Path) -> InitMessage | None:
        try:
            payload = (directory / "init.json").read_bytes()
        except FileNotFoundError:
            return None
        try:
            return InitMessage.decode(payload)
        except ProtocolError:
            return None

    def _write_chunk(self, agent: str, file_id: str, directory: Path, chunk_size: int, index: int,
                     payload: bytes) -> None:
        """Write the bytes now; their receipt row follows in `flush_receipts`, once the bytes are synced."""
        data = directory / "data"
        fd = os.open(data, os.O_WRONLY | os.O_CREAT, 0o640)
        try:
            view, offset = memoryview(payload), index * chunk_size
            while view:  # a short write (e.g. the volume filling up) must not pass for a whole chunk
                written = os.pwrite(fd, view, offset)
                if written <= 0:
                    raise OSError(errno.ENOSPC, f"short write to {data}")
                view, offset = view[written:], offset + written
        finally:
            os.close(fd)
        pending = self._pending_receipts()
        pending.setdefault(data, []).append({"agent_id": agent, "file_id": file_id, "idx": index})
        if sum(len(rows) for rows in pending.values()) >= RECEIPT_BATCH:
            self.flush_receipts()

    def _pending_receipts(self) -> dict[Path, list[dict]]:
        pending = getattr(self._receipts, "pending", None)
        if pending is None:
            pending = self._receipts.pending = {}
        return pending

    def _forget_pending_receipts(self, directory: Path) -> None:
        """The staged data is being removed: its unsynced chunks get no receipt."""
        self._pending_receipts().pop(directory / "data", None)

    def flush_receipts(self) -> int:
        """Make this thread's written chunks durable: fdatasync each data file, then commit all their receipt
        rows in one transaction. A receipt is never durable before its bytes; chunks whose receipt is lost
        (crash, database down) are simply asked for again. Returns the receipts committed."""
        pending = self._pending_receipts()
        if not pending:
            return 0
        batches = list(pending.items())
        pending.clear()
        rows: list[dict] = []
        for data, receipts in batches:
            try:
                fd = os.open(data, os.O_WRONLY)
            except FileNotFoundError:
                continue  # removed since (file rejected or restaged): no receipt for bytes that are gone
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            rows.extend(receipts)
        if rows:
            with self.sessions.begin() as session:
                _insert_ignore(session, ChunkReceipt, rows)
        return len(rows)

    def _touch_transfer(self, agent: str, file_id: str, message: InitMessage, payload: bytes) -> None:
        """Create or refresh the file's transfer row (its TTL clock and finishing claim)."""
        now = utcnow()
        digest = sha256_hex(payload)
        with self.sessions.begin() as session:
            _insert_ignore(session, ChunkTransfer, [{
                "agent_id": agent, "file_id": file_id, "chunks": message.chunks, "chunk_size": message.chunk_size,
                "init_sha256": digest, "created_at": now, "updated_at": now}])
            # a plain UPDATE: another instance may finish the file and delete the row at any moment
            session.execute(update(ChunkTransfer).where(
                ChunkTransfer.agent_id == agent, ChunkTransfer.file_id == file_id).values(
                init_sha256=digest, chunks=message.chunks, chunk_size=message.chunk_size, updated_at=now))

    def _delete_receipts(self, agent: str, file_id: str) -> None:
        with self.sessions.begin() as session:
            session.execute(delete(ChunkReceipt).where(ChunkReceipt.agent_id == agent,
                                                       ChunkReceipt.file_id == file_id))

    def _remove_staging(self, agent: str, file_id: str) -> None:
        """Staging folder, receipts and transfer row of a decided file. The transfer row a finishing thread
        holds locked is deleted by that thread's own locking session instead."""
        self._forget_pending_receipts(self._dir(agent, file_id))
        self._remove(self._dir(agent, file_id))
        with self.sessions.begin() as session:
            session.execute(delete(ChunkReceipt).where(ChunkReceipt.agent_id == agent,
                                                       ChunkReceipt.file_id == file_id))
            if getattr(self._held, "key", None) != (agent, file_id):
                session.execute(delete(ChunkTransfer).where(ChunkTransfer.agent_id == agent,
                                                            ChunkTransfer.file_id == file_id))

    def _fold_early(self, agent: str, file_id: str, directory: Path, message: InitMessage) -> None:
        early = directory / "early"
        try:
            names = os.listdir(early)
        except FileNotFoundError:
            return
        for name in names:
            if not name.isdigit():
                continue
            index = int(name)
            path = early / name
            try:
                payload = path.read_bytes()
            except FileNotFoundError:
                continue
            if index < message.chunks:
                self._write_chunk(agent, file_id, directory, message.chunk_size, index, payload)
            path.unlink(missing_ok=True)

    def _claim(self, directory: Path) -> Path | None:
        """Take the complete bytes for finishing (caller holds the transfer row lock): a claim left by an
        earlier attempt (this or a dead instance; it holds every receipted chunk) wins over `data`, which may
        then only hold late duplicates. None when the bytes are gone."""
        mine = directory / f"claim.{self.instance_id}"
        if mine.exists():
            return mine
        for other in sorted(directory.glob("claim.*")):
            try:
                os.rename(other, mine)
            except FileNotFoundError:
                continue
            log.warning("took over the claim %s left by an earlier finishing attempt", other.name)
            return mine
        try:
            os.rename(directory / "data", mine)
            return mine
        except FileNotFoundError:
            return None

    def _remove(self, path: Path) -> None:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ records and replies

    def _record(self, session: Session, venue: str, camera: str, seq: int) -> SegmentRecord | None:
        return session.scalars(select(SegmentRecord).where(
            SegmentRecord.venue == venue, SegmentRecord.camera == camera, SegmentRecord.seq == seq)).first()

    def _stored_row_for(self, agent: str, file_id: str) -> SegmentRecord | None:
        with self.sessions() as session:
            return session.scalars(select(SegmentRecord).where(
                SegmentRecord.agent_id == agent, SegmentRecord.file_id == file_id)).first()

    def _reply(self, file_id: str, state: str, missing: list[list[int]] | None = None,
               reason: str | None = None) -> Reply:
        return Reply(file_id=file_id, state=state, collector_time=utcnow(),  # type: ignore[arg-type]
                     missing=missing or [], reason=reason)

    def _event(self, agent: str | None, manifest: Manifest | None, file_id: str | None, event: str,
               reason: str | None, detail: str | None, at: datetime | None = None) -> IngestEvent:
        return IngestEvent(at=at or utcnow(), agent_id=agent, venue=manifest.venue if manifest else None,
                           camera=manifest.camera if manifest else None, file_id=file_id,
                           seq=manifest.seq if manifest else None, event=event, reason=reason, detail=detail)

    def record_event(self, agent: str | None, file_id: str | None, event: str, reason: str | None,
                     detail: str | None, manifest: Manifest | None = None) -> None:
        """Best effort: an event that cannot be written is logged, never raised."""
        try:
            with self.sessions.begin() as session:
                session.add(self._event(agent, manifest, file_id, event, reason, detail))
                if event == EVENT_REJECTED:
                    from . import audit  # every rejection also goes to the audit log (issue 5)

                    audit.record(session, audit.ACTION_INGEST_REJECT, actor=f"agent:{agent}",
                                 target=f"{manifest.venue}/{manifest.camera}/{manifest.seq}" if manifest
                                 else f"{agent}/{file_id}", reason=reason,
                                 detail={"agent": agent, "file_id": file_id, "detail": detail,
                                         "collector": self.instance_id})
        except Exception:  # noqa: BLE001 - the ingest path must survive a failing event write
            log.exception("could not record %s event for agent %s file %s", event, agent, file_id)

    def record_handler_error(self, agent: str | None, file_id: str | None, detail: str) -> None:
        self.record_event(agent, file_id, EVENT_HANDLER_ERROR, None, detail[:4000])

    def _reject(self, agent: str, file_id: str, manifest: Manifest | None, code: str, detail: str,
                stage: bool = True, marker: bool = False) -> Reply:
        log.warning("agent %s file %s rejected: %s: %s", agent, file_id, code, detail)
        self.record_event(agent, file_id, EVENT_REJECTED, code, detail, manifest)
        reason = f"{code}: {detail}"
        if stage:
            directory = self._dir(agent, file_id)
            self._remove_staging(agent, file_id)
            if marker:
                directory.mkdir(parents=True, exist_ok=True)
                _write_atomic(directory / "rejected.json", json.dumps({"reason": reason}).encode("utf-8"))
        return self._reply(file_id, "rejected", reason=reason)


class _FolderLock:
    """A non-blocking exclusive flock on a file (created if needed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> bool:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        except FileNotFoundError:  # the staging folder is gone: nothing to finish here
            return False
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            return False
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _manifest_or_none(payload: bytes) -> Manifest | None:
    try:
        return InitMessage.decode(payload).manifest()
    except (ProtocolError, ManifestError):
        return None


def _ranges_text(seqs: list[int]) -> str:
    if not seqs:
        return "?"
    return str(seqs[0]) if len(seqs) == 1 else f"{seqs[0]}-{seqs[-1]}"

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

Everything an agent sends is untrusted, even under a valid signature: ids are checked by one rule before
they name a folder or a topic, an init is weighed against `IngestLimits` (collector/admission.py) before
anything is staged, early chunks are capped per agent, and every reply names the record it is about
(`Reply.record`), so a `stored` answer can only ever acknowledge the bytes the agent itself sealed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import Engine, delete, event, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from exam_contract import protocol as P
from exam_contract.canonical import canonical_bytes, sha256_hex
from exam_contract.files import fsync_dir, hash_file
from exam_contract.chain import ChainPosition, LinkVerdict, judge_link
from exam_contract.chunks import chunk_span, ranges_from_sorted
from exam_contract.identifiers import is_file_id, is_identifier
from exam_contract.manifest import Manifest, ManifestError
from exam_contract.protocol import InitMessage, ProtocolError, Reply, decode_fin
from exam_contract.signing import PublicKeyError, key_fingerprint, parse_public_key, verify

from .admission import (AgentLoad, IngestLimits, NoteThrottle, Refusal, check_agent_load, check_init_shape,
                        check_plausible, clock_suspicion)
from .db import session_factory
from .models import (CHAIN_FIRST, CHAIN_HOLE, CHAIN_LINKED, EVENT_CHAIN_HOLE, EVENT_CHAIN_LINKED,
                     EVENT_CHUNK_DROPPED, EVENT_CLOCK_SUSPECT, EVENT_HANDLER_ERROR, EVENT_REJECTED, Agent,
                     ChunkReceipt, ChunkTransfer, IngestEvent, SegmentRecord)
from .placement import UnsafePath, contained, storage_relpath

log = logging.getLogger(__name__)

REASON_INIT_MISSING = "init_missing"
EVENT_STAGING_EXPIRED = "staging_expired"
DEFAULT_STAGING_TTL = timedelta(hours=48)
RECEIPT_BATCH = 64  # chunks (16 MiB at 256 KiB) synced and receipted together; fewer when the worker idles


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Staged:
    """A parsed init whose sender, signature and limits are checked."""

    message: InitMessage
    manifest: Manifest
    record_hash: str
    key_fingerprint: str       # the enrolled key that verified the signature
    institution: str           # the enrolled institution (equal to the manifest's, or it was refused)


def _topic_ids_ok(agent: str, file_id: str) -> bool:
    return is_identifier(agent) and is_file_id(file_id)


class _EarlyChunks:
    """Chunks held per agent before their init arrives (staging/{agent}/*/early/*), capped. The count is kept
    in memory and recounted from the volume when it reaches the cap (at most once a second per agent), so
    files removed by another instance or the sweep free their place."""

    def __init__(self, staging_dir: Path, cap: int) -> None:
        self.staging_dir = staging_dir
        self.cap = cap
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._counted_at: dict[str, float] = {}

    def _recount(self, agent: str) -> int:
        total = 0
        try:
            folders = list(os.scandir(self.staging_dir / agent))
        except FileNotFoundError:
            return 0
        for folder in folders:
            try:
                total += sum(1 for _ in os.scandir(os.path.join(folder.path, "early")))
            except (FileNotFoundError, NotADirectoryError):
                continue
        return total

    def admit(self, agent: str) -> bool:
        with self._lock:
            count = self._counts.get(agent)
            if count is None or (count >= self.cap and time.monotonic() - self._counted_at.get(agent, 0) >= 1):
                count = self._recount(agent)
                self._counted_at[agent] = time.monotonic()
            if count >= self.cap:
                self._counts[agent] = count
                return False
            self._counts[agent] = count + 1
            return True

    def released(self, agent: str, count: int = 1) -> None:
        with self._lock:
            if agent in self._counts:
                self._counts[agent] = max(0, self._counts[agent] - count)


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


class Ingest:
    """Ingest of protocol v1 segment messages into `storage_dir` and the database."""

    def __init__(self, engine: Engine, storage_dir: Path, instance_id: str | None = None,
                 limits: IngestLimits = IngestLimits()) -> None:
        self.engine = engine
        self.limits = limits
        self.sessions = session_factory(engine)
        self.storage_dir = Path(storage_dir)
        self.staging_dir = self.storage_dir / "staging"
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self.instance_id = instance_id or f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self._held = threading.local()  # the (agent, file_id) whose transfer row this thread has locked
        self._receipts = threading.local()  # chunks this thread wrote whose receipts are not committed yet
        self._early = _EarlyChunks(self.staging_dir, limits.max_early_chunks)
        # When a database connection was last checked out successfully: the evidence that clears the
        # database_unreachable alarm (a message answered without the database proves nothing).
        self.database_ok_at = 0.0
        event.listen(engine, "checkout", self._database_answered)
        self._rejection_notes = NoteThrottle(per_minute=60)
        self._drop_notes = NoteThrottle(per_minute=6)

    def _database_answered(self, *_: object) -> None:
        self.database_ok_at = time.monotonic()

    # ------------------------------------------------------------------ messages

    def on_init(self, agent: str, file_id: str, payload: bytes) -> Reply | None:
        """Check and stage an init. Returns a reply only when the file is already decided here:
        `rejected`, or `stored` for a resend of a record stored with the same hash."""
        if not _topic_ids_ok(agent, file_id):
            return self._reject(agent, file_id, None, P.REJECT_MALFORMED,
                                "agent or file_id in the topic is not a valid id", stage=False)
        try:
            staged = self._check_init(agent, file_id, payload)
        except Refusal as rej:
            manifest, record = _manifest_and_hash(payload)
            return self._reject(agent, file_id, manifest, rej.code, rej.detail, marker=True, record=record)
        manifest = staged.manifest
        with self.sessions() as session:
            existing = self._record(session, manifest.venue, manifest.camera, manifest.seq)
            load = None if existing is not None else self._agent_load(session, agent, file_id)
        if existing is not None:
            # A resend of a stored file (e.g. its reply was lost) is answered now, before any upload.
            return self._existing(agent, file_id, staged, existing, marker=True)
        try:
            assert load is not None
            check_agent_load(staged.message, load, self.limits)
        except Refusal as rej:
            return self._reject(agent, file_id, manifest, rej.code, rej.detail, marker=True,
                                record=staged.record_hash)
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
        """Write chunk `index` into the staged file and mark it received. A chunk that cannot belong to the file
        is dropped (and noted); the agent resends whatever the collector still misses."""
        if not _topic_ids_ok(agent, file_id) or index < 0:
            self._note_drop(agent, file_id, "bad_topic", f"chunk {index}: agent or file_id is not a valid id")
            return
        if len(payload) > self.limits.max_chunk_bytes:
            self._note_drop(agent, file_id, "chunk_too_large", f"chunk {index} has {len(payload)} bytes, above "
                                                               f"{self.limits.max_chunk_bytes}")
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
            if (early / str(index)).exists():  # a resend of a chunk already held takes its place
                _write_atomic(early / str(index), payload)
                return
            if not self._early.admit(agent):
                self._note_drop(agent, file_id, "early_chunk_limit",
                                f"chunk {index} arrived before its init and the agent already has "
                                f"{self.limits.max_early_chunks} such chunks held ([ingest] max_early_chunks)")
                return
            early.mkdir(parents=True, exist_ok=True)
            _write_atomic(early / str(index), payload)
            return
        if not _chunk_fits(message, index, payload):
            self._note_drop(agent, file_id, "chunk_out_of_range",
                            f"chunk {index} ({len(payload)} bytes) does not fit the init "
                            f"({message.chunks} chunks of {message.chunk_size} bytes)")
            return
        self._write_chunk(agent, file_id, directory, message.chunk_size, index, payload)

    def on_fin(self, agent: str, file_id: str, payload: bytes = b"") -> Reply | None:
        """Finish a file: `missing`, `stored` or `rejected`. `payload` is the record hash the agent finishes
        (empty from an agent that names none: such a `fin` is never answered `stored` without its init).

        Returns None only when another instance sharing the volume has claimed the file and
        is finishing it right now; that instance replies."""
        if not _topic_ids_ok(agent, file_id):
            return self._reject(agent, file_id, None, P.REJECT_MALFORMED,
                                "agent or file_id in the topic is not a valid id", stage=False)
        try:
            asked = decode_fin(payload)
        except ProtocolError as exc:
            return self._reject(agent, file_id, None, P.REJECT_MALFORMED, str(exc), stage=False)
        directory = self._dir(agent, file_id)
        marker = directory / "rejected.json"
        if marker.exists():
            try:
                raw = json.loads(marker.read_text())
                about = raw.get("record")
                reply = self._reply(file_id, "rejected", reason=raw.get("reason"), record=about)
                if asked is not None and about is not None and about != asked:
                    reply = None  # the rejection was about another record; answer for the one asked about
            except (OSError, ValueError, AttributeError):
                reply = None
            self._remove_staging(agent, file_id)
            if reply is not None:
                return reply
        try:
            init_payload = (directory / "init.json").read_bytes()
        except FileNotFoundError:
            return self._status_without_staging(agent, file_id, asked)
        try:
            staged = self._check_init(agent, file_id, init_payload)
        except Refusal as rej:
            manifest, record = _manifest_and_hash(init_payload)
            return self._reject(agent, file_id, manifest, rej.code, rej.detail, record=record)
        if asked is not None and asked != staged.record_hash:
            # Staging holds the init of another record under this file id (e.g. sent by a previous journal):
            # ask for the init of the record the agent is finishing now; that init replaces the staged one.
            log.info("agent %s file %s: fin names record %s but staging holds %s; asking for its init", agent,
                     file_id, asked[:12], staged.record_hash[:12])
            return self._reply(file_id, "missing", reason=f"{REASON_INIT_MISSING}: staging holds another record's "
                                                          "init; send this record's init and all chunks",
                               record=asked)
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
                return self._fin_with_row_lock(agent, file_id, staged, directory, init_payload)
            finally:
                guard.release()
        return self._fin_with_row_lock(agent, file_id, staged, directory, init_payload)

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
            # Ranges are read off the sorted receipt rows: the work grows with what arrived, never with the
            # chunk count an init claims.
            received = session.scalars(select(ChunkReceipt.idx).where(
                ChunkReceipt.agent_id == agent, ChunkReceipt.file_id == file_id).order_by(ChunkReceipt.idx))
            gaps = ranges_from_sorted(received, message.chunks, limit=P.MAX_MISSING_RANGES)
            if gaps:
                log.info("agent %s file %s: chunks missing in %s range(s) of %s chunks", agent, file_id,
                         len(gaps), message.chunks)
                return self._reply(file_id, "missing", missing=gaps, record=staged.record_hash)
            claim = self._claim(directory)
            if claim is None:
                log.warning("agent %s file %s: receipts without data, asking for every chunk", agent, file_id)
                session.execute(delete(ChunkReceipt).where(ChunkReceipt.agent_id == agent,
                                                           ChunkReceipt.file_id == file_id))
                return self._reply(file_id, "missing", missing=[[0, message.chunks - 1]], record=staged.record_hash)
        try:
            return self._finish(agent, file_id, staged, claim)
        except Refusal as rej:
            return self._reject(agent, file_id, staged.manifest, rej.code, rej.detail, record=staged.record_hash)

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
        """Parse and weigh an init: shape and limits first (cheap, no allocation proportional to its claims),
        then the enrolment it must match, the signature, and whether the record is plausible at all."""
        try:
            message = InitMessage.decode(payload)
        except ProtocolError as exc:
            raise Refusal(P.REJECT_MALFORMED, str(exc)) from exc
        try:
            manifest = message.manifest()
        except ManifestError as exc:
            raise Refusal(P.REJECT_MALFORMED, str(exc)) from exc
        if manifest.file_id != file_id:
            raise Refusal(P.REJECT_MALFORMED, f"topic file_id {file_id!r} is not the manifest's "
                                              f"camera-seq {manifest.file_id!r}")
        check_init_shape(message, manifest, self.limits)
        try:
            message.check_chunk_count(manifest)
        except ProtocolError as exc:
            raise Refusal(P.REJECT_WRONG_CHUNK_COUNT, str(exc)) from exc
        with self.sessions() as session:
            enrolled = session.get(Agent, agent)
        if enrolled is None:
            raise Refusal(P.REJECT_UNKNOWN_AGENT, f"agent {agent!r} is not enrolled: enrol it with "
                                                  "`exam-collector enroll`")
        if manifest.venue != enrolled.venue:
            raise Refusal(P.REJECT_VENUE_MISMATCH, f"agent {agent!r} is enrolled for venue "
                                                   f"{enrolled.venue!r}, manifest says {manifest.venue!r}")
        if enrolled.institution is None:
            raise Refusal(P.REJECT_INSTITUTION_MISMATCH, f"agent {agent!r} is enrolled without an institution: "
                                                         f"set it with `exam-collector enroll --agent {agent} "
                                                         "--institution CODE`")
        if manifest.institution != enrolled.institution:
            raise Refusal(P.REJECT_INSTITUTION_MISMATCH, f"agent {agent!r} is enrolled for institution "
                                                         f"{enrolled.institution!r}, manifest says "
                                                         f"{manifest.institution!r}")
        if manifest.agent != agent:
            raise Refusal(P.REJECT_AGENT_MISMATCH, f"topic agent {agent!r} is not manifest agent "
                                                   f"{manifest.agent!r}")
        try:
            public = parse_public_key(enrolled.public_key)
        except PublicKeyError as exc:
            raise Refusal(P.REJECT_BAD_SIGNATURE, f"enrolled key of {agent!r} unusable: {exc}") from exc
        canonical = canonical_bytes(message.manifest_raw)
        if not verify(public, canonical, message.signature):
            raise Refusal(P.REJECT_BAD_SIGNATURE, f"signature does not verify with the key enrolled "
                                                  f"for {agent!r}")
        check_plausible(manifest, self.limits)
        return Staged(message, manifest, sha256_hex(canonical), key_fingerprint(public), enrolled.institution)

    def _agent_load(self, session: Session, agent: str, file_id: str) -> AgentLoad:
        count, announced = session.execute(select(
            func.count(), func.coalesce(func.sum(ChunkTransfer.chunks * ChunkTransfer.chunk_size), 0)).where(
            ChunkTransfer.agent_id == agent, ChunkTransfer.file_id != file_id)).one()
        return AgentLoad(int(count), int(announced))

    # ------------------------------------------------------------------ finishing

    def _finish(self, agent: str, file_id: str, staged: Staged, claim: Path | None) -> Reply:
        manifest = staged.manifest
        if claim is not None:
            digest, size = hash_file(claim, fsync=True)
            if size != manifest.size:
                raise Refusal(P.REJECT_SIZE_MISMATCH, f"received {size} bytes, manifest says {manifest.size}")
            if digest != manifest.sha256:
                raise Refusal(P.REJECT_HASH_MISMATCH, f"received bytes hash to {digest}, manifest says "
                                                      f"{manifest.sha256}")
        elif manifest.kind == "segment":  # check_plausible refuses empty segments; never store one without bytes
            raise Refusal(P.REJECT_EMPTY_SEGMENT, "a segment without bytes holds no footage")

        with self.sessions() as session:
            verdict, missing_seqs, successor = self._judge_chain(session, staged)

        relpath: Path | None = None
        created = False
        if claim is not None:
            relpath, created = self._place(claim, manifest, staged.institution)

        now = utcnow()
        suspicion = clock_suspicion(manifest, now, self.limits)
        row = SegmentRecord(
            agent_id=agent, institution=staged.institution, venue=manifest.venue, room=manifest.room,
            room_kind=manifest.room_kind, camera=manifest.camera, seq=manifest.seq, file_id=file_id,
            kind=manifest.kind, start_at=manifest.start, end_at=manifest.end, duration=manifest.duration,
            size=manifest.size, sha256=manifest.sha256, record_hash=staged.record_hash,
            prev_hash=manifest.prev, manifest=canonical_bytes(staged.message.manifest_raw).decode("utf-8"),
            signature=staged.message.signature, storage_path=relpath.as_posix() if relpath else None,
            chain_status={LinkVerdict.FIRST: CHAIN_FIRST, LinkVerdict.LINKED: CHAIN_LINKED}.get(verdict, CHAIN_HOLE),
            stored_at=now, key_fingerprint=staged.key_fingerprint, stored_by=self.instance_id,
            clock_suspect=suspicion is not None)
        try:
            with self.sessions.begin() as session:
                session.add(row)
                if suspicion is not None:
                    session.add(self._event(agent, manifest, file_id, EVENT_CLOCK_SUSPECT, None, suspicion, at=now,
                                            record=staged.record_hash))
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
        if suspicion is not None:
            log.warning("camera %s seq %s: clock suspect: %s", manifest.camera, manifest.seq, suspicion)
        return self._reply(file_id, "stored", record=staged.record_hash)

    def _judge_chain(self, session: Session, staged: Staged) -> tuple[LinkVerdict, list[int], int | None]:
        manifest = staged.manifest
        predecessor = self._record(session, manifest.venue, manifest.camera, manifest.seq - 1) \
            if manifest.seq > 1 else None
        verdict = judge_link(ChainPosition(manifest.seq, manifest.prev),
                             predecessor.record_hash if predecessor else None)
        if verdict == LinkVerdict.BROKEN:
            raise Refusal(P.REJECT_CHAIN_BROKEN, f"prev {manifest.prev} is not the hash of stored seq "
                                                   f"{manifest.seq - 1}")
        successor = self._record(session, manifest.venue, manifest.camera, manifest.seq + 1)
        if successor is not None and successor.prev_hash != staged.record_hash:
            raise Refusal(P.REJECT_CHAIN_BROKEN, f"stored seq {manifest.seq + 1} names a different "
                                                   f"predecessor ({successor.prev_hash})")
        missing: list[int] = []
        if verdict == LinkVerdict.HOLE:
            below = session.scalar(select(func.max(SegmentRecord.seq)).where(
                SegmentRecord.venue == manifest.venue, SegmentRecord.camera == manifest.camera,
                SegmentRecord.seq < manifest.seq))
            missing = list(range((below or 0) + 1, manifest.seq))
        return verdict, missing, successor.id if successor is not None else None

    def _place(self, claim: Path, manifest: Manifest, institution: str) -> tuple[Path, bool]:
        """Hard-link the verified file into its final path (never overwriting); (relpath, created).
        The claim stays until the row is committed, so a failed commit can be retried without a re-upload.
        The path is checked to stay inside storage_dir before any folder is made and again after."""
        try:
            relpath = storage_relpath(manifest, institution)
            final = contained(self.storage_dir, relpath)
            made = self._makedirs(final.parent)
            contained(self.storage_dir, relpath)
        except (UnsafePath, ValueError) as exc:
            raise Refusal(P.REJECT_UNSAFE_PATH, str(exc)) from exc
        for attempt in range(2):
            try:
                os.link(claim, final)
            except FileExistsError:
                digest, _ = hash_file(final)
                if digest == manifest.sha256:
                    return relpath, False
                if attempt == 0:
                    relpath = relpath.with_name(f"{relpath.stem}~seq{manifest.seq}{relpath.suffix}")
                    final = contained(self.storage_dir, relpath)
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
            return self._reply(file_id, "stored", record=staged.record_hash)
        return self._reject(agent, file_id, staged.manifest, P.REJECT_SEQ_REPLAYED,
                            f"seq {existing.seq} of camera {existing.camera} is already stored with "
                            f"a different manifest (record hash {existing.record_hash})", marker=marker,
                            record=staged.record_hash)

    def _status_without_staging(self, agent: str, file_id: str, asked: str | None) -> Reply:
        """A fin with no staged init: answer from the database, but only about the record the fin names. A stored
        row or a rejection of another record under the same file id (e.g. from a lost journal) is not an answer
        about this one: the agent is asked for its init instead, and never told `stored` for bytes it did not
        send."""
        if asked is None:
            return self._reply(file_id, "missing", reason=f"{REASON_INIT_MISSING}: this fin names no record; "
                                                          "send init and all chunks again")
        row = self._stored_row_for(agent, file_id)
        if row is not None and row.record_hash == asked:
            return self._reply(file_id, "stored", record=asked)
        with self.sessions() as session:
            last = session.scalars(select(IngestEvent).where(
                IngestEvent.agent_id == agent, IngestEvent.file_id == file_id, IngestEvent.record_hash == asked,
                IngestEvent.event == EVENT_REJECTED).order_by(IngestEvent.id.desc()).limit(1)).first()
        if last is not None:
            reason = f"{last.reason}: {last.detail}" if last.detail else last.reason
            return self._reply(file_id, "rejected", reason=reason, record=asked)
        return self._reply(file_id, "missing", reason=f"{REASON_INIT_MISSING}: no init received for this "
                                                      "record; send init and all chunks again", record=asked)

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
            if _chunk_fits(message, index, payload):
                self._write_chunk(agent, file_id, directory, message.chunk_size, index, payload)
            path.unlink(missing_ok=True)
            self._early.released(agent)

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
               reason: str | None = None, record: str | None = None) -> Reply:
        return Reply(file_id=file_id, state=state, collector_time=utcnow(),  # type: ignore[arg-type]
                     missing=missing or [], reason=reason, record=record)

    def _event(self, agent: str | None, manifest: Manifest | None, file_id: str | None, event: str,
               reason: str | None, detail: str | None, at: datetime | None = None,
               record: str | None = None) -> IngestEvent:
        # Ids from a topic or manifest are stored only when they are valid ids (bounded, plain); else left out.
        return IngestEvent(at=at or utcnow(), agent_id=agent if is_identifier(agent) else None,
                           venue=manifest.venue if manifest else None,
                           camera=manifest.camera if manifest else None,
                           file_id=file_id if is_file_id(file_id) else None,
                           seq=manifest.seq if manifest else None, event=event, reason=reason, detail=detail,
                           record_hash=record)

    def record_event(self, agent: str | None, file_id: str | None, event: str, reason: str | None,
                     detail: str | None, manifest: Manifest | None = None, record: str | None = None) -> None:
        """Best effort: an event that cannot be written is logged, never raised."""
        try:
            with self.sessions.begin() as session:
                session.add(self._event(agent, manifest, file_id, event, reason, detail, record=record))
                if event == EVENT_REJECTED:
                    from . import audit  # every rejection also goes to the audit log (issue 5)

                    audit.record(session, audit.ACTION_INGEST_REJECT, actor=f"agent:{agent}",
                                 target=f"{manifest.venue}/{manifest.camera}/{manifest.seq}" if manifest
                                 else f"{agent}/{file_id}"[:200], reason=reason,
                                 detail={"agent": agent, "file_id": file_id, "detail": detail, "record": record,
                                         "collector": self.instance_id})
        except Exception:  # noqa: BLE001 - the ingest path must survive a failing event write
            log.exception("could not record %s event for agent %s file %s", event, agent, file_id)

    def record_handler_error(self, agent: str | None, file_id: str | None, detail: str) -> None:
        self.record_event(agent, file_id, EVENT_HANDLER_ERROR, None, detail[:4000])

    def _reject(self, agent: str, file_id: str, manifest: Manifest | None, code: str, detail: str,
                stage: bool = True, marker: bool = False, record: str | None = None) -> Reply:
        """Refuse a record: reply `rejected` naming the code, and record an event and an audit entry. A flood
        from one agent is recorded at most 60 times a minute; the count held back goes into the next one."""
        reason = f"{code}: {detail}"
        note, held_back = self._rejection_notes.admit(str(agent)[:64])
        if note:
            log.warning("agent %s file %s rejected: %s", agent, file_id, reason)
            if held_back:
                detail = f"{detail} (and {held_back} earlier rejection(s) of this agent not recorded one by one)"
            self.record_event(agent, file_id, EVENT_REJECTED, code, detail, manifest, record=record)
        if stage:
            directory = self._dir(agent, file_id)
            self._remove_staging(agent, file_id)
            if marker:
                directory.mkdir(parents=True, exist_ok=True)
                _write_atomic(directory / "rejected.json",
                              json.dumps({"reason": reason, "record": record}).encode("utf-8"))
        return self._reply(file_id, "rejected", reason=reason, record=record)

    def _note_drop(self, agent: str, file_id: str, code: str, detail: str) -> None:
        """A chunk dropped before it could belong to a file: logged, and recorded (throttled) as an event. The
        agent is not told; it resends what a later `missing` reply names."""
        note, held_back = self._drop_notes.admit(f"{str(agent)[:64]}/{code}")
        if not note:
            return
        log.warning("agent %s file %s: chunk dropped (%s): %s", str(agent)[:64], str(file_id)[:96], code, detail)
        if held_back:
            detail = f"{detail} (and {held_back} more such chunk(s) dropped since the last note)"
        self.record_event(agent, file_id, EVENT_CHUNK_DROPPED, code, detail)


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


def _chunk_fits(message: InitMessage, index: int, payload: bytes) -> bool:
    """Chunk `index` of the file the init describes has exactly this length."""
    try:
        _, length = chunk_span(index, int(message.manifest_raw["size"]), message.chunk_size)
    except (ValueError, KeyError, TypeError):
        return False
    return index < message.chunks and len(payload) == length


def _manifest_and_hash(payload: bytes) -> tuple[Manifest | None, str | None]:
    """What a refused init names, as far as it can be read: its manifest and record hash (None when not)."""
    try:
        message = InitMessage.decode(payload)
    except ProtocolError:
        return None, None
    record = sha256_hex(canonical_bytes(message.manifest_raw))
    try:
        return message.manifest(), record
    except ManifestError:
        return None, record


def _ranges_text(seqs: list[int]) -> str:
    if not seqs:
        return "?"
    return str(seqs[0]) if len(seqs) == 1 else f"{seqs[0]}-{seqs[-1]}"

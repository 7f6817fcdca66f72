"""The ingest core, free of MQTT: `Ingest` takes a file's init, chunks and fin through staging, receipts, checks
and the footage store to a stored record and a reply (write order: `Ingest._finish`, docs/design/durability.md).

About 500 lines on purpose: the three message handlers and the finishing step under the transfer row lock share
the staging folder, the receipts and the claim, and read best side by side; their parts live in staging.py,
receipts.py, verification.py, footage_store.py (s3_store.py) and object_locks.py.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, event, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from exam_contract import protocol as P
from exam_contract.canonical import canonical_bytes
from exam_contract.chain import LinkVerdict
from exam_contract.files import hash_file
from exam_contract.identifiers import is_file_id, is_identifier
from exam_contract.manifest import Manifest
from exam_contract.protocol import (REASON_INIT_MISSING, InitMessage, ProtocolError, RejectionCode, Reply, ReplyState,
                                    decode_fin)

from .admission import IngestLimits, NoteThrottle, Refusal, check_agent_load, clock_suspicion
from .db import session_factory
from .footage_store import STAGING_FOLDER, FilesystemStore, FootageStore, ObjectLocked, Placed, UnsafePath
from .holds import holds_covering
from .models import (CHAIN_FIRST, CHAIN_HOLE, CHAIN_LINKED, EVENT_CHAIN_HOLE, EVENT_CHAIN_LINKED,
                     EVENT_CHUNK_DROPPED, EVENT_CLOCK_SUSPECT, EVENT_HANDLER_ERROR, EVENT_REJECTED, IngestEvent,
                     SegmentRecord)
from .object_locks import LockSettings
from .placement import alternate_relpath, storage_relpath
from .receipts import DEFAULT_STAGING_TTL, Receipts, delete_receipts, utcnow
from .running_hash import RunningHashes
from .staging import Claim, StagingArea, chunk_fits
from .verification import (Staged, check_init, judge_chain, lock_camera_chain, manifest_and_hash, ranges_text,
                           stored_record, stored_record_of_file, topic_ids_ok)

__all__ = ["DEFAULT_STAGING_TTL", "EVENT_STAGING_EXPIRED", "REASON_INIT_MISSING", "Ingest", "Staged",
           "storage_relpath", "utcnow"]

log = logging.getLogger(__name__)

EVENT_STAGING_EXPIRED = "staging_expired"


class Ingest:
    """Ingest of protocol v1 segment messages into the footage store and the database.

    `on_init`, `on_chunk` and `on_fin` are what the MQTT service calls per message; tests and benchmarks call
    them directly. Any instance that shares `storage_dir` (its staging) and the database can take any message
    of a file. Everything an agent sends is untrusted, even under a valid signature; every reply names the
    record it is about (`Reply.record`), so a `stored` answer only ever acknowledges the bytes the agent itself
    sealed."""

    def __init__(self, engine: Engine, storage_dir: Path, instance_id: str | None = None,
                 limits: IngestLimits = IngestLimits(), store: FootageStore | None = None,
                 locks: LockSettings | None = None) -> None:
        self.engine = engine
        self.limits = limits
        self.locks = locks or LockSettings()   # a versioned store's lock dates (`LockSettings.from_config`)
        self.sessions = session_factory(engine)
        self.storage_dir = Path(storage_dir)
        self.staging_dir = self.storage_dir / STAGING_FOLDER
        self.store: FootageStore = store if store is not None else FilesystemStore(self.storage_dir)
        self.staging = StagingArea(self.staging_dir, limits.max_early_chunks)
        self.receipts = Receipts(self.sessions)
        self.running = RunningHashes()
        self.instance_id = instance_id or f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
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
        if not topic_ids_ok(agent, file_id):
            return self._reject(agent, file_id, None, P.REJECT_MALFORMED,
                                "agent or file_id in the topic is not a valid id", stage=False)
        try:
            staged = check_init(self.sessions, agent, file_id, payload, self.limits)
        except Refusal as rej:
            manifest, record = manifest_and_hash(payload)
            return self._reject(agent, file_id, manifest, rej.code, rej.detail, marker=True, record=record)
        manifest = staged.manifest
        with self.sessions() as session:
            existing = stored_record(session, manifest.venue, manifest.camera, manifest.seq)
            load = None if existing is not None else Receipts.agent_load(session, agent, file_id)
        if existing is not None:
            # A resend of a stored file (e.g. its reply was lost) is answered now, before any upload.
            return self._existing(agent, file_id, staged, existing, marker=True)
        try:
            assert load is not None
            check_agent_load(staged.message, load, self.limits)
        except Refusal as rej:
            return self._reject(agent, file_id, manifest, rej.code, rej.detail, marker=True,
                                record=staged.record_hash)
        previous = self.staging.open_for_init(agent, file_id)
        if previous is not None and previous != payload:
            # Bytes staged for another init must never be finished under this one: their pending receipts,
            # the data and the committed receipts go before the new init is written.
            log.warning("agent %s file %s: init changed, restarting its staging", agent, file_id)
            self.receipts.forget(self.staging.data(agent, file_id))
            self.staging.remove_data(agent, file_id)
            self.receipts.delete(agent, file_id)
        if previous != payload:
            self.running.forget((agent, file_id))
            self.staging.write_init(agent, file_id, payload)
        self.receipts.touch_transfer(agent, file_id, staged.message, payload)
        self._fold_early(agent, file_id, staged.message)
        log.debug("agent %s file %s: init staged (%s chunks)", agent, file_id, staged.message.chunks)
        return None

    def on_chunk(self, agent: str, file_id: str, index: int, payload: bytes) -> None:
        """Write chunk `index` into the staged file and mark it received. A chunk that cannot belong to the file
        is dropped (and noted); the agent resends whatever the collector still misses."""
        if not topic_ids_ok(agent, file_id) or index < 0:
            self._note_drop(agent, file_id, "bad_topic", f"chunk {index}: agent or file_id is not a valid id")
            return
        if len(payload) > self.limits.max_chunk_bytes:
            self._note_drop(agent, file_id, "chunk_too_large", f"chunk {index} has {len(payload)} bytes, above "
                                                               f"{self.limits.max_chunk_bytes}")
            return
        if self.staging.is_rejected(agent, file_id):
            return
        message = self.staging.init_message(agent, file_id)
        if message is None:
            if stored_record_of_file(self.sessions, agent, file_id) is not None:
                log.debug("agent %s file %s: late chunk %s of a stored file dropped", agent, file_id, index)
                return
            if not self.staging.hold_early(agent, file_id, index, payload):
                self._note_drop(agent, file_id, "early_chunk_limit",
                                f"chunk {index} arrived before its init and the agent already has "
                                f"{self.limits.max_early_chunks} such chunks held ([ingest] max_early_chunks)")
            return
        if not chunk_fits(message, index, payload):
            self._note_drop(agent, file_id, "chunk_out_of_range",
                            f"chunk {index} ({len(payload)} bytes) does not fit the init "
                            f"({message.chunks} chunks of {message.chunk_size} bytes)")
            return
        self._write_chunk(agent, file_id, message, index, payload)

    def on_fin(self, agent: str, file_id: str, payload: bytes = b"") -> Reply | None:
        """Finish a file: `missing`, `stored` or `rejected`. `payload` is the record hash the agent finishes
        (empty from an agent that names none: such a `fin` is never answered `stored` without its init).

        Returns None only when another instance sharing the volume has claimed the file and
        is finishing it right now; that instance replies."""
        if not topic_ids_ok(agent, file_id):
            return self._reject(agent, file_id, None, P.REJECT_MALFORMED,
                                "agent or file_id in the topic is not a valid id", stage=False)
        try:
            asked = decode_fin(payload)
        except ProtocolError as exc:
            return self._reject(agent, file_id, None, P.REJECT_MALFORMED, str(exc), stage=False)
        if self.staging.is_rejected(agent, file_id):
            rejection = self.staging.rejection(agent, file_id)
            self._remove_staging(agent, file_id)
            # a rejection about another record than the one asked about is no answer about this one
            if rejection is not None and (asked is None or rejection.record is None or rejection.record == asked):
                return self._reply(file_id, ReplyState.REJECTED, reason=rejection.reason, record=rejection.record)
        init_payload = self.staging.init_payload(agent, file_id)
        if init_payload is None:
            return self._status_without_staging(agent, file_id, asked)
        try:
            staged = check_init(self.sessions, agent, file_id, init_payload, self.limits)
        except Refusal as rej:
            manifest, record = manifest_and_hash(init_payload)
            return self._reject(agent, file_id, manifest, rej.code, rej.detail, record=record)
        if asked is not None and asked != staged.record_hash:
            # Staging holds the init of another record under this file id (e.g. sent by a previous journal):
            # ask for the init of the record the agent is finishing now; that init replaces the staged one.
            log.info("agent %s file %s: fin names record %s but staging holds %s; asking for its init", agent,
                     file_id, asked[:12], staged.record_hash[:12])
            return self._reply(file_id, ReplyState.MISSING,
                               reason=f"{REASON_INIT_MISSING}: staging holds another record's "
                                      "init; send this record's init and all chunks",
                               record=asked)
        manifest = staged.manifest
        with self.sessions() as session:
            existing = stored_record(session, manifest.venue, manifest.camera, manifest.seq)
        if existing is not None:
            return self._existing(agent, file_id, staged, existing)
        message = staged.message
        if message.chunks:
            self._fold_early(agent, file_id, message)
            self.flush_receipts()

        def locked(session: Session) -> Reply:
            return self._fin_locked(session, agent, file_id, staged)

        if self.engine.dialect.name == "sqlite":
            # SQLite has no row locks: instances on one host (SQLite means one host) exclude each other
            # with a flock on the staging folder, released by the kernel if the holder dies.
            guard = self.staging.finish_lock(agent, file_id)
            if not guard.acquire():
                log.info("agent %s file %s: another instance is finishing it", agent, file_id)
                return None
            try:
                return self.receipts.finish(agent, file_id, message, init_payload, locked)
            finally:
                guard.release()
        return self.receipts.finish(agent, file_id, message, init_payload, locked)

    def flush_receipts(self) -> int:
        """Make this thread's written chunks durable, then commit their receipts (`Receipts.flush`)."""
        return self.receipts.flush()

    # ------------------------------------------------------------------ finishing

    def _fin_locked(self, session: Session, agent: str, file_id: str, staged: Staged) -> Reply:
        """The finishing step, run while this instance holds the file's transfer row lock."""
        message = staged.message
        claim: Claim | None = None
        if message.chunks:
            gaps = Receipts.missing(session, agent, file_id, message.chunks)
            if gaps:
                log.info("agent %s file %s: chunks missing in %s range(s) of %s chunks", agent, file_id,
                         len(gaps), message.chunks)
                return self._reply(file_id, ReplyState.MISSING, missing=gaps, record=staged.record_hash)
            claim = self.staging.claim(agent, file_id, self.instance_id)
            if claim is None:
                log.warning("agent %s file %s: receipts without data, asking for every chunk", agent, file_id)
                session.execute(delete_receipts(agent, file_id))
                return self._reply(file_id, ReplyState.MISSING, missing=[[0, message.chunks - 1]],
                                   record=staged.record_hash)
        try:
            return self._finish(agent, file_id, staged, claim)
        except Refusal as rej:
            return self._reject(agent, file_id, staged.manifest, rej.code, rej.detail, record=staged.record_hash)

    def _finish(self, agent: str, file_id: str, staged: Staged, claim: Claim | None) -> Reply:
        """Verify, place and record a claimed file. The order is what makes a crash at any step safe:
        1. the claim's bytes are fsynced, and their digest (computed as the chunks arrived, else by reading the
           claim) is checked against the signed manifest;
        2. the store places them and is durable when it returns: a hard link and folder fsyncs on the
           filesystem; on object storage an upload only if the key is absent, with the signed SHA-256 as its
           checksum and a compliance lock counted from this arrival, then checked (size, checksum, lock);
        3. only then is the row committed, naming the placed path (and the object version and its lock);
        4. staging, receipts and the transfer row go;
        5. the `stored` reply is sent last, by the caller.
        A crash before 3 leaves the claim in staging (the next fin finishes it: `place` takes an identical file,
        or object version, already in place as placed, and never stores the bytes twice); a failing store
        raises OSError before any row, so no `stored` reply."""
        manifest = staged.manifest
        if claim is not None:
            digest, size = self._claimed_digest(agent, file_id, staged.message, claim)
            if size != manifest.size:
                raise Refusal(P.REJECT_SIZE_MISMATCH, f"received {size} bytes, manifest says {manifest.size}")
            if digest != manifest.sha256:
                raise Refusal(P.REJECT_HASH_MISMATCH, f"received bytes hash to {digest}, manifest says "
                                                      f"{manifest.sha256}")
        elif manifest.kind == "segment":  # check_plausible refuses empty segments; never store one without bytes
            raise Refusal(P.REJECT_EMPTY_SEGMENT, "a segment without bytes holds no footage")

        with self.sessions() as session:
            judge_chain(session, staged)  # refuse a contradicting record before storing its bytes

        now = utcnow()   # the arrival: the row's stored_at, and what the storage lock is counted from
        placed: Placed | None = None
        if claim is not None:
            placed = self._place(claim.path, staged, now)
        relpath = placed.relpath if placed is not None else None

        suspicion = clock_suspicion(manifest, now, self.limits)
        row = SegmentRecord(
            agent_id=agent, institution=staged.institution, venue=manifest.venue, room=manifest.room,
            room_kind=manifest.room_kind, camera=manifest.camera, seq=manifest.seq, file_id=file_id,
            kind=manifest.kind, start_at=manifest.start, end_at=manifest.end, duration=manifest.duration,
            size=manifest.size, sha256=manifest.sha256, record_hash=staged.record_hash,
            prev_hash=manifest.prev, manifest=canonical_bytes(staged.message.manifest_raw).decode("utf-8"),
            signature=staged.message.signature, storage_path=relpath.as_posix() if relpath else None,
            storage_version=placed.version if placed else None, lock_until=placed.lock_until if placed else None,
            chain_status=CHAIN_HOLE, stored_at=now, key_fingerprint=staged.key_fingerprint,
            stored_by=self.instance_id, clock_suspect=suspicion is not None)
        try:
            with self.sessions.begin() as session:
                # Neighbours finishing at the same time (other finishers, other instances) must see each other:
                # the camera's chain is judged again after this row is written, while its transaction holds the
                # camera's chain lock (PostgreSQL) or the database write lock (SQLite, taken by the insert).
                lock_camera_chain(session, manifest.venue, manifest.camera)
                session.add(row)
                session.flush()
                chain = judge_chain(session, staged)
                row.chain_status = {LinkVerdict.FIRST: CHAIN_FIRST, LinkVerdict.LINKED: CHAIN_LINKED}.get(
                    chain.verdict, CHAIN_HOLE)
                if suspicion is not None:
                    session.add(self._event(agent, manifest, file_id, EVENT_CLOCK_SUSPECT, None, suspicion, at=now,
                                            record=staged.record_hash))
                if chain.verdict == LinkVerdict.HOLE:
                    session.add(self._event(agent, manifest, file_id, EVENT_CHAIN_HOLE, None,
                                            f"seq {ranges_text(chain.missing_seqs)} not received before seq "
                                            f"{manifest.seq}", at=now))
                if chain.successor is not None:
                    fresh = session.get(SegmentRecord, chain.successor)
                    if fresh is not None and fresh.chain_status == CHAIN_HOLE:
                        fresh.chain_status = CHAIN_LINKED
                        session.add(IngestEvent(
                            at=now, agent_id=fresh.agent_id, venue=fresh.venue, camera=fresh.camera,
                            file_id=fresh.file_id, seq=fresh.seq, event=EVENT_CHAIN_LINKED, reason=None,
                            detail=f"seq {manifest.seq} arrived; seq {fresh.seq} is now linked"))
        except Refusal:
            # a neighbour stored meanwhile contradicts this record: no row, and what was placed for it goes
            if placed is not None and placed.created:
                self._discard(placed)
            raise
        except IntegrityError:
            log.info("agent %s file %s: another instance stored it first", agent, file_id)
            with self.sessions() as session:
                winner = stored_record(session, manifest.venue, manifest.camera, manifest.seq)
            if placed is not None and placed.created and (winner is None or (
                    winner.storage_path, winner.storage_version) != (placed.relpath.as_posix(), placed.version)):
                self._discard(placed)
            if winner is None:
                raise
            self._remove_staging(agent, file_id)
            return self._existing(agent, file_id, staged, winner)
        self._remove_staging(agent, file_id)
        log.info("camera %s seq %s stored (%s, chain %s)", manifest.camera, manifest.seq, manifest.kind,
                 row.chain_status)
        if suspicion is not None:
            log.warning("camera %s seq %s: clock suspect: %s", manifest.camera, manifest.seq, suspicion)
        return self._reply(file_id, ReplyState.STORED, record=staged.record_hash)

    def _claimed_digest(self, agent: str, file_id: str, message: InitMessage, claim: Claim) -> tuple[str, int]:
        """(SHA-256, size) of the claimed bytes, made durable first. The digest fed chunk by chunk is used only
        for bytes this instance's chunks went into, in order, each once (`RunningHashes`), and when the file
        holds exactly the bytes fed; otherwise the claim is read and hashed."""
        running = self.running.take((agent, file_id), message.chunk_size, message.chunks)
        if running is not None and claim.from_data:
            fd = os.open(claim.path, os.O_RDONLY)
            try:
                os.fsync(fd)
                on_disk = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if on_disk == running.size:
                return running.sha256, running.size
            log.warning("agent %s file %s: staged file has %s bytes, its chunks %s; hashing the file", agent,
                        file_id, on_disk, running.size)
        return hash_file(claim.path, fsync=True)

    def _place(self, claim: Path, staged: Staged, now: datetime) -> Placed:
        """Place the verified claim in the store (never overwriting). The claim stays in staging until the row is
        committed, so a failed commit can be retried without a re-upload. On a versioned store the object is
        locked until the keep floor plus the longest exam day (`LockSettings.upload_lock`), and under legal hold
        when an active hold already covers it."""
        manifest = staged.manifest
        assert manifest.sha256 is not None  # a claim exists only for a file with bytes, checked against it
        retain_until: datetime | None = None
        held = False
        if self.store.versioned:
            retain_until = self.locks.upload_lock(manifest.end, now)
            with self.sessions() as session:
                held = bool(holds_covering(session, venue=manifest.venue, room=manifest.room, camera=manifest.camera,
                                           start=manifest.start, end=manifest.end, pre=self.locks.pre_margin,
                                           post=self.locks.post_margin))
        try:
            relpath = storage_relpath(manifest, staged.institution)
            return self.store.place(claim, relpath, sha256=manifest.sha256,
                                    alternate=alternate_relpath(relpath, manifest.seq), retain_until=retain_until,
                                    legal_hold=held)
        except (UnsafePath, ValueError) as exc:
            raise Refusal(P.REJECT_UNSAFE_PATH, str(exc)) from exc

    def _discard(self, placed: Placed) -> None:
        """Remove what this instance placed for a record another instance stored first. A locked object version
        cannot be removed before its lock ends: it stays, and scrub reports it (`orphan_file`)."""
        try:
            self.store.unlink(placed.relpath, placed.version)
        except ObjectLocked as exc:
            log.warning("%s; it stays until its lock ends and scrub reports it as an orphan", exc)

    def _existing(self, agent: str, file_id: str, staged: Staged, existing: SegmentRecord,
                  marker: bool = False) -> Reply:
        if existing.record_hash == staged.record_hash:
            log.info("camera %s seq %s: duplicate of the stored record, nothing stored", existing.camera,
                     existing.seq)
            self._remove_staging(agent, file_id)
            return self._reply(file_id, ReplyState.STORED, record=staged.record_hash)
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
            return self._reply(file_id, ReplyState.MISSING, reason=f"{REASON_INIT_MISSING}: this fin names no record; "
                                                          "send init and all chunks again")
        row = stored_record_of_file(self.sessions, agent, file_id)
        if row is not None and row.record_hash == asked:
            return self._reply(file_id, ReplyState.STORED, record=asked)
        with self.sessions() as session:
            last = session.scalars(select(IngestEvent).where(
                IngestEvent.agent_id == agent, IngestEvent.file_id == file_id, IngestEvent.record_hash == asked,
                IngestEvent.event == EVENT_REJECTED).order_by(IngestEvent.id.desc()).limit(1)).first()
        if last is not None:
            reason = f"{last.reason}: {last.detail}" if last.detail else last.reason
            return self._reply(file_id, ReplyState.REJECTED, reason=reason, record=asked)
        return self._reply(file_id, ReplyState.MISSING, reason=f"{REASON_INIT_MISSING}: no init received for this "
                                                      "record; send init and all chunks again", record=asked)

    # ------------------------------------------------------------------ staging

    def _write_chunk(self, agent: str, file_id: str, message: InitMessage, index: int, payload: bytes) -> None:
        """Write the bytes now; their receipt row follows in `flush_receipts`, once the bytes are synced."""
        data = self.staging.write_chunk(agent, file_id, message.chunk_size, index, payload)
        self.receipts.note(data, agent, file_id, index)
        self.running.chunk((agent, file_id), message.chunk_size, message.chunks, index, payload)

    def _fold_early(self, agent: str, file_id: str, message: InitMessage) -> None:
        """Write the chunks held before the init into `data` (those that do not fit it are dropped)."""
        for index, payload in self.staging.take_early(agent, file_id):
            if chunk_fits(message, index, payload):
                self._write_chunk(agent, file_id, message, index, payload)

    def _remove_staging(self, agent: str, file_id: str) -> None:
        """Staging folder, receipts and transfer row of a decided file."""
        self.receipts.forget(self.staging.data(agent, file_id))
        self.running.forget((agent, file_id))
        self.staging.remove(agent, file_id)
        self.receipts.remove(agent, file_id)

    def _drop_staging(self, agent: str, file_id: str) -> None:
        self.running.forget((agent, file_id))
        self.staging.remove(agent, file_id)

    def sweep_staging(self, ttl: timedelta = DEFAULT_STAGING_TTL, limit: int = 500) -> int:
        """Remove transfers without an init or fin for `ttl` (and staging folders without a transfer that
        are older than `ttl`); each removal is recorded as a `staging_expired` event. Returns how many."""
        cutoff = utcnow() - ttl
        removed = 0
        for gone in self.receipts.expire(cutoff, limit, self._is_stored, self._drop_staging):
            removed += 1
            if gone.stored:  # a late init re-created the row after another instance had stored the file
                log.info("agent %s file %s: leftover staging of a stored file removed", gone.agent, gone.file_id)
                continue
            log.warning("agent %s file %s: abandoned transfer expired (%s of %s chunks, no init or fin for %s); "
                        "staging removed", gone.agent, gone.file_id, gone.received, gone.chunks, ttl)
            self.record_event(gone.agent, gone.file_id, EVENT_STAGING_EXPIRED, None,
                              f"abandoned transfer: {gone.received} of {gone.chunks} chunks received, no init or "
                              f"fin since {cutoff.isoformat()}; staging removed, the agent resends it in full if "
                              "it asks")
        for agent, file_id in self.staging.stale_folders(cutoff):
            if self.receipts.has_transfer(agent, file_id):
                continue
            self._drop_staging(agent, file_id)
            removed += 1
            log.warning("agent %s file %s: stale staging folder without a transfer removed", agent, file_id)
            self.record_event(agent, file_id, EVENT_STAGING_EXPIRED, None,
                              "stale staging folder (early chunks or a rejection marker) without an init "
                              f"or fin since {cutoff.isoformat()}; removed")
        self.receipts.delete_orphans()
        return removed

    def _is_stored(self, agent: str, file_id: str) -> bool:
        return stored_record_of_file(self.sessions, agent, file_id) is not None

    # ------------------------------------------------------------------ events and replies

    def _reply(self, file_id: str, state: ReplyState, missing: list[list[int]] | None = None,
               reason: str | None = None, record: str | None = None) -> Reply:
        return Reply(file_id=file_id, state=state, collector_time=utcnow(),
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
        except Exception:  # the ingest path must survive a failing event write
            log.exception("could not record %s event for agent %s file %s", event, agent, file_id)

    def record_handler_error(self, agent: str | None, file_id: str | None, detail: str) -> None:
        self.record_event(agent, file_id, EVENT_HANDLER_ERROR, None, detail[:4000])

    def _reject(self, agent: str, file_id: str, manifest: Manifest | None, code: RejectionCode, detail: str,
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
            self._remove_staging(agent, file_id)
            if marker:
                self.staging.mark_rejected(agent, file_id, reason, record)
        return self._reply(file_id, ReplyState.REJECTED, reason=reason, record=record)

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

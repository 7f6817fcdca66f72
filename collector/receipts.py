"""Chunk receipts and transfer rows in the database: what of a staged file is durably received, who may finish
it, and when an abandoned transfer expires (crash safety: docs/design/durability.md)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import Delete, delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from exam_contract import protocol as P
from exam_contract.canonical import sha256_hex
from exam_contract.chunks import ranges_from_sorted
from exam_contract.protocol import InitMessage, Reply, ReplyState

from .admission import AgentLoad
from .models import ChunkReceipt, ChunkTransfer

log = logging.getLogger(__name__)

DEFAULT_STAGING_TTL = timedelta(hours=48)
RECEIPT_BATCH = 64  # chunks (16 MiB at 256 KiB) synced and receipted together; fewer when the worker idles


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def insert_ignore(session: Session, model: type, rows: list[dict]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING on PostgreSQL and SQLite."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql
        session.execute(postgresql.insert(model).values(rows).on_conflict_do_nothing())
    else:
        from sqlalchemy.dialects import sqlite
        session.execute(sqlite.insert(model).values(rows).on_conflict_do_nothing())


def delete_receipts(agent: str, file_id: str) -> Delete:
    """The statement that deletes a file's receipts."""
    return delete(ChunkReceipt).where(ChunkReceipt.agent_id == agent, ChunkReceipt.file_id == file_id)


@dataclass(frozen=True)
class ExpiredTransfer:
    agent: str
    file_id: str
    received: int      # chunk receipts it had
    chunks: int        # chunks its init announced
    stored: bool       # the file is stored: a late init re-created the row, nothing of an upload was lost


class Receipts:
    """Receipt and transfer rows through `sessions`.

    Receipts are durable and shared: chunk i's bytes are written and fdatasync'ed first, then its
    `chunk_receipt` row is committed (`flush`), so whichever instance gets a repeated `fin` answers `missing`
    from the database. The receipts a thread wrote bytes for but has not synced yet are kept per thread. The
    `chunk_transfer` row of a file is its finishing claim: an instance finishes a file only while holding that
    row's lock (PostgreSQL `FOR UPDATE SKIP LOCKED`, `finish`), so two instances never finish one file, and a
    claim left by an instance that died mid-finish is taken over at once (its lock died with its connection).
    Transfers without an init or fin for the staging TTL expire (`expire`)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._pending = threading.local()  # data file -> receipt rows of chunks written but not synced yet
        self._held = threading.local()     # the (agent, file_id) whose transfer row this thread has locked

    # ------------------------------------------------------------------ receipts

    def _pending_rows(self) -> dict[Path, list[dict]]:
        pending = getattr(self._pending, "rows", None)
        if pending is None:
            pending = self._pending.rows = {}
        return pending

    def note(self, data: Path, agent: str, file_id: str, index: int) -> None:
        """Chunk `index` was written to `data`; its receipt waits for `flush` (at once after RECEIPT_BATCH)."""
        pending = self._pending_rows()
        pending.setdefault(data, []).append({"agent_id": agent, "file_id": file_id, "idx": index})
        if sum(len(rows) for rows in pending.values()) >= RECEIPT_BATCH:
            self.flush()

    def forget(self, data: Path) -> None:
        """The staged `data` is being removed: its unsynced chunks get no receipt."""
        self._pending_rows().pop(data, None)

    def flush(self) -> int:
        """Make this thread's written chunks durable: fdatasync each data file, then commit all their receipt
        rows in one transaction. A receipt is never durable before its bytes; chunks whose receipt is lost
        (crash, database down) are simply asked for again. Returns the receipts committed."""
        pending = self._pending_rows()
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
                insert_ignore(session, ChunkReceipt, rows)
        return len(rows)

    def delete(self, agent: str, file_id: str) -> None:
        with self.sessions.begin() as session:
            session.execute(delete_receipts(agent, file_id))

    @staticmethod
    def missing(session: Session, agent: str, file_id: str, chunks: int) -> list[list[int]]:
        """The chunk ranges without a receipt, read off the sorted receipt rows: the work grows with what
        arrived, never with the chunk count an init claims."""
        received = session.scalars(select(ChunkReceipt.idx).where(
            ChunkReceipt.agent_id == agent, ChunkReceipt.file_id == file_id).order_by(ChunkReceipt.idx))
        return ranges_from_sorted(received, chunks, limit=P.MAX_MISSING_RANGES)

    # ------------------------------------------------------------------ transfers

    def touch_transfer(self, agent: str, file_id: str, message: InitMessage, payload: bytes) -> None:
        """Create or refresh the file's transfer row (its TTL clock and finishing claim)."""
        now = utcnow()
        digest = sha256_hex(payload)
        with self.sessions.begin() as session:
            insert_ignore(session, ChunkTransfer, [{
                "agent_id": agent, "file_id": file_id, "chunks": message.chunks, "chunk_size": message.chunk_size,
                "init_sha256": digest, "created_at": now, "updated_at": now}])
            # a plain UPDATE: another instance may finish the file and delete the row at any moment
            session.execute(update(ChunkTransfer).where(
                ChunkTransfer.agent_id == agent, ChunkTransfer.file_id == file_id).values(
                init_sha256=digest, chunks=message.chunks, chunk_size=message.chunk_size, updated_at=now))

    @staticmethod
    def agent_load(session: Session, agent: str, file_id: str) -> AgentLoad:
        """The agent's other unfinished transfers: how many, and the bytes they announce."""
        count, announced = session.execute(select(
            func.count(), func.coalesce(func.sum(ChunkTransfer.chunks * ChunkTransfer.chunk_size), 0)).where(
            ChunkTransfer.agent_id == agent, ChunkTransfer.file_id != file_id)).one()
        return AgentLoad(int(count), int(announced))

    def has_transfer(self, agent: str, file_id: str) -> bool:
        with self.sessions() as session:
            return session.get(ChunkTransfer, (agent, file_id)) is not None

    def remove(self, agent: str, file_id: str) -> None:
        """Receipts and transfer row of a decided file. For the file whose transfer row this thread holds locked,
        its own locking session deletes both when `finish` ends (one commit fewer per stored file; should the
        process die in between, the staging sweep removes what is left of a stored file)."""
        if getattr(self._held, "key", None) == (agent, file_id):
            return
        with self.sessions.begin() as session:
            session.execute(delete_receipts(agent, file_id))
            session.execute(delete(ChunkTransfer).where(ChunkTransfer.agent_id == agent,
                                                        ChunkTransfer.file_id == file_id))

    def finish(self, agent: str, file_id: str, message: InitMessage, init_payload: bytes,
               locked: Callable[[Session], Reply]) -> Reply | None:
        """Run `locked` while holding the file's transfer row lock, the finishing claim; None when another
        instance holds it (that instance replies). After a `missing` reply the row's TTL clock restarts; after
        any other the row and its receipts are deleted in the locking transaction."""
        touched = False
        for _ in range(4):
            # The lock session writes only at its very end: on SQLite an earlier write would hold the
            # database lock while `locked` writes through other sessions.
            with self.sessions() as lock_session, lock_session.begin():
                transfer = lock_session.scalars(select(ChunkTransfer).where(
                    ChunkTransfer.agent_id == agent, ChunkTransfer.file_id == file_id)
                    .with_for_update(skip_locked=True)).first()
                if transfer is not None:
                    self._held.key = (agent, file_id)
                    try:
                        reply = locked(lock_session)
                    finally:
                        self._held.key = None
                    if reply.state == ReplyState.MISSING:
                        transfer.updated_at = utcnow()
                    else:
                        lock_session.execute(delete_receipts(agent, file_id))
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
            self.touch_transfer(agent, file_id, message, init_payload)
            touched = True
        log.info("agent %s file %s: another instance is finishing it", agent, file_id)
        return None

    # ------------------------------------------------------------------ staging TTL

    def expire(self, cutoff: datetime, limit: int, is_stored: Callable[[str, str], bool],
               remove_staging: Callable[[str, str], None]) -> Iterator[ExpiredTransfer]:
        """Delete the transfers not touched since `cutoff` (at most `limit`) with their receipts, calling
        `remove_staging` for each while its row is locked; yields each once its deletion is committed."""
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
                stored = is_stored(agent, file_id)
                got = session.scalar(select(func.count()).select_from(ChunkReceipt).where(
                    ChunkReceipt.agent_id == agent, ChunkReceipt.file_id == file_id))
                remove_staging(agent, file_id)
                session.execute(delete_receipts(agent, file_id))
                expired = ExpiredTransfer(agent, file_id, int(got or 0), row.chunks, stored)
                session.delete(row)
            yield expired

    def delete_orphans(self) -> None:
        """Receipts whose transfer row is gone."""
        with self.sessions.begin() as session:
            session.execute(delete(ChunkReceipt).where(~select(ChunkTransfer.agent_id).where(
                ChunkTransfer.agent_id == ChunkReceipt.agent_id,
                ChunkTransfer.file_id == ChunkReceipt.file_id).exists()))

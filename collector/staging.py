"""Ingest's staging area: one folder per file being received, on the storage volume so that a finished file
is hard-linked into place (layout in `StagingArea`; crash safety: docs/design/durability.md)."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from exam_contract.chunks import chunk_span
from exam_contract.protocol import InitMessage, ProtocolError

log = logging.getLogger(__name__)

INIT = "init.json"
DATA = "data"
EARLY = "early"
REJECTED = "rejected.json"
FINISH_LOCK = ".finish.lock"


@dataclass(frozen=True)
class Rejection:
    """What `rejected.json` says: the reason sent, and the record it was about (None when unknown)."""

    reason: str | None
    record: str | None


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def chunk_fits(message: InitMessage, index: int, payload: bytes) -> bool:
    """Chunk `index` of the file the init describes has exactly this length."""
    try:
        _, length = chunk_span(index, int(message.manifest_raw["size"]), message.chunk_size)
    except (ValueError, KeyError, TypeError):
        return False
    return index < message.chunks and len(payload) == length


class EarlyChunks:
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
                total += sum(1 for _ in os.scandir(os.path.join(folder.path, EARLY)))
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


@dataclass(frozen=True)
class Claim:
    """The bytes taken for finishing; `from_data` when they are the `data` this instance's chunks went into (not
    a claim an earlier attempt left), so that a digest of those chunks describes them."""

    path: Path
    from_data: bool


class FolderLock:
    """A non-blocking exclusive flock on a file (created if needed), released by the kernel if the holder dies."""

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


class StagingArea:
    """The staging folders under `root` (storage_dir/staging). Any instance sharing the volume can take any
    message of a file: nothing of a transfer lives in memory. Ids are checked by the caller: they name folders.

    `{agent}/{file_id}/` holds:
      init.json            the init payload exactly as received
      data                 the file being reassembled, chunk i written with pwrite at i * chunk_size
      early/{i}            a chunk that arrived before any instance had stored the init (capped per agent)
      claim.{instance}     `data` renamed by the instance that finishes the file
      rejected.json        the reply of a rejected init, repeated on fin, then staging is removed
      .finish.lock         the flock that stands in for the transfer row lock on SQLite (one host)
    """

    def __init__(self, root: Path, max_early_chunks: int) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.early = EarlyChunks(root, max_early_chunks)

    def folder(self, agent: str, file_id: str) -> Path:
        return self.root / agent / file_id

    def data(self, agent: str, file_id: str) -> Path:
        return self.folder(agent, file_id) / DATA

    # ------------------------------------------------------------------ init and rejection marker

    def init_payload(self, agent: str, file_id: str) -> bytes | None:
        try:
            return (self.folder(agent, file_id) / INIT).read_bytes()
        except FileNotFoundError:
            return None

    def init_message(self, agent: str, file_id: str) -> InitMessage | None:
        payload = self.init_payload(agent, file_id)
        if payload is None:
            return None
        try:
            return InitMessage.decode(payload)
        except ProtocolError:
            return None

    def open_for_init(self, agent: str, file_id: str) -> bytes | None:
        """Make the file's folder ready for a checked init (a rejection marker goes); the init staged before."""
        directory = self.folder(agent, file_id)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / REJECTED).unlink(missing_ok=True)
        return self.init_payload(agent, file_id)

    def write_init(self, agent: str, file_id: str, payload: bytes) -> None:
        write_atomic(self.folder(agent, file_id) / INIT, payload)

    def is_rejected(self, agent: str, file_id: str) -> bool:
        return (self.folder(agent, file_id) / REJECTED).exists()

    def rejection(self, agent: str, file_id: str) -> Rejection | None:
        """The marker's reply; None when there is no marker or it cannot be read."""
        marker = self.folder(agent, file_id) / REJECTED
        if not marker.exists():
            return None
        try:
            raw = json.loads(marker.read_text())
            return Rejection(raw.get("reason"), raw.get("record"))
        except (OSError, ValueError, AttributeError):
            return None

    def mark_rejected(self, agent: str, file_id: str, reason: str, record: str | None) -> None:
        directory = self.folder(agent, file_id)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / REJECTED, json.dumps({"reason": reason, "record": record}).encode("utf-8"))

    # ------------------------------------------------------------------ chunks

    def write_chunk(self, agent: str, file_id: str, chunk_size: int, index: int, payload: bytes) -> Path:
        """pwrite chunk `index` into `data`; returns `data`. The bytes are not synced here: the caller syncs
        them (`Receipts.flush`) before their receipt is committed."""
        data = self.data(agent, file_id)
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
        return data

    def hold_early(self, agent: str, file_id: str, index: int, payload: bytes) -> bool:
        """Keep a chunk that came before its init; False when the agent's cap of such chunks is reached."""
        early = self.folder(agent, file_id) / EARLY
        if (early / str(index)).exists():  # a resend of a chunk already held takes its place
            write_atomic(early / str(index), payload)
            return True
        if not self.early.admit(agent):
            return False
        early.mkdir(parents=True, exist_ok=True)
        write_atomic(early / str(index), payload)
        return True

    def take_early(self, agent: str, file_id: str) -> Iterator[tuple[int, bytes]]:
        """The early chunks held for the file, each removed (and its place under the cap freed) once the caller
        has taken it."""
        early = self.folder(agent, file_id) / EARLY
        try:
            names = os.listdir(early)
        except FileNotFoundError:
            return
        for name in names:
            if not name.isdigit():
                continue
            path = early / name
            try:
                payload = path.read_bytes()
            except FileNotFoundError:
                continue
            yield int(name), payload
            path.unlink(missing_ok=True)
            self.early.released(agent)

    # ------------------------------------------------------------------ finishing

    def claim(self, agent: str, file_id: str, instance_id: str) -> Claim | None:
        """Take the complete bytes for finishing (the caller holds the transfer row lock): a claim left by an
        earlier attempt (this or a dead instance; it holds every receipted chunk) wins over `data`, which may
        then only hold late duplicates. The rename makes the bytes this instance's alone: a late chunk can only
        create a fresh `data`. None when the bytes are gone."""
        directory = self.folder(agent, file_id)
        mine = directory / f"claim.{instance_id}"
        if mine.exists():
            return Claim(mine, from_data=False)
        for other in sorted(directory.glob("claim.*")):
            try:
                os.rename(other, mine)
            except FileNotFoundError:
                continue
            log.warning("agent %s file %s: took over the claim %s left by an earlier finishing attempt", agent,
                        file_id, other.name)
            return Claim(mine, from_data=False)
        try:
            os.rename(directory / DATA, mine)
            return Claim(mine, from_data=True)
        except FileNotFoundError:
            return None

    def finish_lock(self, agent: str, file_id: str) -> FolderLock:
        return FolderLock(self.folder(agent, file_id) / FINISH_LOCK)

    # ------------------------------------------------------------------ removal

    def remove(self, agent: str, file_id: str) -> None:
        shutil.rmtree(self.folder(agent, file_id), ignore_errors=True)

    def remove_data(self, agent: str, file_id: str) -> None:
        self.data(agent, file_id).unlink(missing_ok=True)

    def stale_folders(self, cutoff: datetime) -> Iterator[tuple[str, str]]:
        """(agent, file_id) of every staging folder not modified since `cutoff`."""
        try:
            agents = list(self.root.iterdir())
        except FileNotFoundError:
            return
        for agent_dir in agents:
            if not agent_dir.is_dir():
                continue
            for directory in list(agent_dir.iterdir()):
                try:
                    mtime = datetime.fromtimestamp(directory.stat().st_mtime, timezone.utc)
                except FileNotFoundError:
                    continue
                if mtime < cutoff:
                    yield agent_dir.name, directory.name

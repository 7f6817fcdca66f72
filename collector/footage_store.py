"""The footage store: the one interface to where and how stored footage lives, and its filesystem backend
(storage rules: docs/design/storage.md). Ingest places through it; export, portal, verify, scrub, enforce read
and delete only through it. The object-storage backend (S3 with Object Lock) is `collector.s3_store.S3Store`."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol

from exam_contract.files import fsync_dir

from .placement import UnsafePath, check_relpath, contained

if TYPE_CHECKING:
    from .config import CollectorConfig

__all__ = ["STAGING_FOLDER", "FilesystemStore", "FootageStore", "ObjectLocked", "PathOccupied", "Placed", "RelPath",
           "StorageSetupError", "StorageUnreachable", "StoreUsage", "StoredFileMissing", "StoredObject",
           "UnsafePath", "open_store", "store_for"]

RelPath = str | PurePosixPath
STAGING_FOLDER = "staging"   # ingest's working area in storage_dir (same volume, so a claim can be hard-linked)
READ_BLOCK = 1 << 20


class StoredFileMissing(FileNotFoundError):
    """A stored file a caller named is not in the store."""

    def __init__(self, relpath: RelPath, store: object) -> None:
        super().__init__(errno.ENOENT, f"stored file {relpath} is missing from {store}")
        self.relpath = str(relpath)

    def __str__(self) -> str:
        return str(self.strerror)


class PathOccupied(FileExistsError):
    """A path (and its alternate) already holds other bytes than the file to place: nothing is overwritten."""

    def __init__(self, relpaths: list[PurePosixPath], store: object) -> None:
        names = " and ".join(str(p) for p in relpaths)
        super().__init__(errno.EEXIST, f"{names} in {store} already hold other bytes; nothing overwritten")

    def __str__(self) -> str:
        return str(self.strerror)


class StorageSetupError(Exception):
    """The configured store cannot be used as it is (a bucket missing or without Object Lock, credentials
    refused); the message names the bucket and endpoint and the fix."""


class StorageUnreachable(StorageSetupError):
    """The configured store does not answer (its endpoint cannot be reached)."""


class ObjectLocked(PermissionError):
    """The storage refused to delete a stored version, or to shorten its lock, because its retention lock or a
    legal hold is still on. Nothing can lift a compliance lock early: wait until it ends (or release the hold)."""

    def __init__(self, relpath: RelPath, version: str | None, store: object, detail: str) -> None:
        super().__init__(errno.EPERM, f"{store} refused: {relpath} version {version} is locked ({detail}); "
                                      "a compliance lock cannot be lifted early: wait until it ends, and release "
                                      "any hold on it")
        self.relpath = str(relpath)
        self.version = version

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass(frozen=True)
class Placed:
    relpath: PurePosixPath    # where the file is: the asked path, or the alternate when the asked one was taken
    created: bool             # False: the path already held these very bytes (a retry after a failed commit)
    version: str | None = None          # the object version holding them; None on a store without versions
    lock_until: datetime | None = None  # the storage's own retention lock of that version; None: no lock


@dataclass(frozen=True)
class StoredObject:
    """One stored thing: a file, or one version of an object."""

    relpath: PurePosixPath
    version: str | None = None


@dataclass(frozen=True)
class StoreUsage:
    total: int    # bytes
    free: int


class FootageStore(Protocol):
    """Stored footage by relative path (a POSIX path: an object key for a backend without folders).

    Every method raises `UnsafePath` for a path that is not a plain relative path inside the store, before
    reading or writing anything. A failing medium raises `OSError`, with errno ENOSPC or EDQUOT when the store is
    full: `collector.ingest_alarms.classify` turns those into the `storage_full` / `storage_error` alarms, so a
    backend maps its own errors onto them.

    A versioned store (object storage with Object Lock) keeps every write as a version of its key, and locks it
    until a retain-until date: `place` says which version holds the bytes and until when it is locked, the row
    records both, and every read, delete and lock names that version (`version=`). A store without versions
    takes `version=None` everywhere and has no locks (those calls do nothing)."""

    versioned: bool   # True: versions, retention locks and legal holds (object storage); False: plain files

    def check(self) -> None:
        """The store can be used now; raises StorageUnreachable or StorageSetupError naming the fix."""
        ...

    def place(self, claim: Path, relpath: RelPath, *, sha256: str, alternate: RelPath | None = None,
              retain_until: datetime | None = None, legal_hold: bool = False) -> Placed:
        """Store the verified file `claim` (its bytes already durable, hashing to `sha256`) at `relpath`, never
        overwriting: a path holding the same bytes is taken as placed (`created` False); one holding other bytes
        makes it try `alternate` the same way, then `PathOccupied`. Durable (and verified, on object storage)
        when it returns. A versioned store locks the version until at least `retain_until` (extending the lock
        of a version it finds already there) and puts it under legal hold when `legal_hold`."""
        ...

    def open(self, relpath: RelPath, version: str | None = None) -> io.RawIOBase:
        """The stored bytes for reading (a context manager); `StoredFileMissing` when absent."""
        ...

    def read_range(self, relpath: RelPath, offset: int, length: int, version: str | None = None) -> bytes:
        """Up to `length` bytes from `offset` (fewer at the end of the file)."""
        ...

    def local_path(self, relpath: RelPath, version: str | None = None) -> AbstractContextManager[Path]:
        """A filesystem path holding the stored bytes while the context lasts, for tools that need one (ffmpeg,
        a kernel copy); `StoredFileMissing` when absent. Read only: never write to it. On object storage it is
        a temporary download, removed when the context ends."""
        ...

    def exists(self, relpath: RelPath, version: str | None = None) -> bool:
        ...

    def size(self, relpath: RelPath, version: str | None = None) -> int:
        ...

    def hash(self, relpath: RelPath, version: str | None = None) -> tuple[str, int]:
        """(sha256 hex, size) of the stored bytes, read now."""
        ...

    def unlink(self, relpath: RelPath, version: str | None = None) -> None:
        """Delete the stored file, or that version (an absent one is no error); durable when it returns.
        `ObjectLocked` when the storage refuses because the version is locked or held."""
        ...

    def extend_lock(self, relpath: RelPath, version: str | None, until: datetime) -> datetime | None:
        """Lock the version until at least `until` (never shortening); the lock's date now, None without locks.
        `StoredFileMissing` when the version is gone."""
        ...

    def set_legal_hold(self, relpath: RelPath, version: str | None, on: bool) -> None:
        """Turn the version's legal hold on or off (nothing without locks); `StoredFileMissing` when gone."""
        ...

    def walk(self) -> Iterator[PurePosixPath]:
        """Every stored relative path (ingest's staging is not footage and is left out)."""
        ...

    def objects(self) -> Iterator[StoredObject]:
        """Every stored file or object version (a key with two versions is two items)."""
        ...

    def usage(self) -> StoreUsage | None:
        """Capacity and free space; None for a store without a fixed capacity."""
        ...


class FilesystemStore:
    """Footage as files under `root`, placed by hard link from ingest's staging (same volume), never
    overwritten. Paths are checked by `collector.placement.contained` (symlinks resolved) at every call. No
    versions and no locks: `version` arguments are ignored, and write-once is a rule of this code only."""

    versioned = False

    def __init__(self, root: Path, skip: frozenset[str] = frozenset({STAGING_FOLDER})) -> None:
        self.root = Path(root)
        self.skip = skip     # top-level folders that are not footage (walk leaves them out)

    def __str__(self) -> str:
        return f"storage {self.root}"

    def __repr__(self) -> str:
        return f"FilesystemStore({str(self.root)!r})"

    def check(self) -> None:
        pass   # a missing or failing volume shows at the first write or read, as OSError

    def _path(self, relpath: RelPath) -> Path:
        return contained(self.root, relpath)

    def place(self, claim: Path, relpath: RelPath, *, sha256: str, alternate: RelPath | None = None,
              retain_until: datetime | None = None, legal_hold: bool = False) -> Placed:
        # Durability (docs/design/durability.md): the caller fsynced the claim's bytes; the hard link is made,
        # then its folder and every folder this call created are fsynced, all before the caller commits the row
        # that names the path. Paths are checked before any folder is made and again after (a symlink planted
        # on the way is caught before the link).
        asked = check_relpath(relpath)
        final = self._path(asked)
        made = _makedirs(final.parent)
        self._path(asked)
        tried: list[PurePosixPath] = []
        for candidate in (asked, alternate):
            if candidate is None:
                break
            candidate = check_relpath(candidate)
            target = self._path(candidate)
            tried.append(candidate)
            try:
                os.link(claim, target)
            except FileExistsError:
                if hash_stream(io.open(target, "rb", buffering=0))[0] != sha256:
                    continue
                # The same bytes: an earlier attempt linked them and may have died before its folder fsync.
                _fsync_folders(target.parent, self.root)
                return Placed(candidate, created=False)
            fsync_dir(target.parent)
            for directory in made:
                fsync_dir(directory.parent)
            return Placed(candidate, created=True)
        raise PathOccupied(tried, self)

    def open(self, relpath: RelPath, version: str | None = None) -> io.RawIOBase:
        path = self._path(relpath)
        try:
            return io.open(path, "rb", buffering=0)   # unbuffered: readers read large blocks with readinto
        except FileNotFoundError:
            raise StoredFileMissing(relpath, self) from None

    def read_range(self, relpath: RelPath, offset: int, length: int, version: str | None = None) -> bytes:
        check_range(relpath, offset, length)
        blocks: list[bytes] = []
        with self.open(relpath) as handle:
            handle.seek(offset)
            while length > 0 and (block := handle.read(length)):
                blocks.append(block)
                length -= len(block)
        return b"".join(blocks)

    @contextmanager
    def local_path(self, relpath: RelPath, version: str | None = None) -> Iterator[Path]:
        path = self._path(relpath)
        if not path.is_file():
            raise StoredFileMissing(relpath, self)
        yield path

    def exists(self, relpath: RelPath, version: str | None = None) -> bool:
        return self._path(relpath).is_file()

    def size(self, relpath: RelPath, version: str | None = None) -> int:
        try:
            return self._path(relpath).stat().st_size
        except FileNotFoundError:
            raise StoredFileMissing(relpath, self) from None

    def hash(self, relpath: RelPath, version: str | None = None) -> tuple[str, int]:
        path = self._path(relpath)
        try:
            return hash_stream(io.open(path, "rb", buffering=0))
        except FileNotFoundError:
            raise StoredFileMissing(relpath, self) from None

    def unlink(self, relpath: RelPath, version: str | None = None) -> None:
        # Durability: the removal is made durable (folder fsync) before the caller records the file deleted.
        path = self._path(relpath)
        path.unlink(missing_ok=True)
        if path.parent.is_dir():  # a file already missing may have lost its folder too
            fsync_dir(path.parent)

    def extend_lock(self, relpath: RelPath, version: str | None, until: datetime) -> None:
        self._path(relpath)   # no locks on plain files: only the path is checked

    def set_legal_hold(self, relpath: RelPath, version: str | None, on: bool) -> None:
        self._path(relpath)

    def walk(self) -> Iterator[PurePosixPath]:
        for root, dirs, names in os.walk(self.root):
            rel_root = PurePosixPath(Path(root).relative_to(self.root).as_posix())
            if rel_root == PurePosixPath("."):
                dirs[:] = [d for d in dirs if d not in self.skip]
            for name in names:
                yield rel_root / name

    def objects(self) -> Iterator[StoredObject]:
        return (StoredObject(relpath) for relpath in self.walk())

    def usage(self) -> StoreUsage:
        usage = shutil.disk_usage(self.root)
        return StoreUsage(usage.total, usage.free)


def store_for(config: CollectorConfig) -> FootageStore:
    """The store `[storage]` configures: files under `[collector] storage_dir` (backend "filesystem"), or an
    S3 bucket with Object Lock (backend "s3"; boto3 is imported only then). Staging stays in storage_dir."""
    if config.storage.backend == "s3":
        from .s3_store import S3Store

        return S3Store.from_config(config)
    return FilesystemStore(config.storage_dir)


def open_store(config: CollectorConfig) -> FootageStore:
    """`store_for(config)`, checked now: a store that does not answer raises StorageUnreachable (commands: exit 2),
    one unusable as configured StorageSetupError (exit 1)."""
    store = store_for(config)
    store.check()
    return store


def check_range(relpath: RelPath, offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"read_range of {relpath}: offset {offset} and length {length} must not be negative")


def hash_stream(handle: io.RawIOBase) -> tuple[str, int]:
    """(sha256 hex, size) of everything `handle` yields, read into one reused buffer (the digest releases the GIL
    on large blocks); closes `handle`."""
    digest = hashlib.sha256()
    buffer = bytearray(READ_BLOCK)
    view = memoryview(buffer)
    size = 0
    with handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size


def _makedirs(path: Path) -> list[Path]:
    """Create `path` and its missing parents; the folders created, deepest first."""
    made: list[Path] = []
    current = path
    while not current.exists():
        made.append(current)
        current = current.parent
    path.mkdir(parents=True, exist_ok=True)
    return made


def _fsync_folders(folder: Path, root: Path) -> None:
    """fsync `folder` and each folder above it up to `root`: the entries an interrupted place may have left."""
    fsync_dir(folder)
    while folder != root and folder != folder.parent:
        folder = folder.parent
        fsync_dir(folder)

"""The footage store: the one interface to where and how stored footage lives, and its filesystem backend
(storage rules: docs/design/storage.md). Ingest places through it; export, portal, verify, scrub, enforce read
and delete only through it."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol

from exam_contract.files import fsync_dir

from .placement import UnsafePath, check_relpath, contained

if TYPE_CHECKING:
    from .config import CollectorConfig

__all__ = ["STAGING_FOLDER", "FilesystemStore", "FootageStore", "PathOccupied", "Placed", "RelPath",
           "StoreUsage", "StoredFileMissing", "UnsafePath", "store_for"]

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


@dataclass(frozen=True)
class Placed:
    relpath: PurePosixPath    # where the file is: the asked path, or the alternate when the asked one was taken
    created: bool             # False: the path already held these very bytes (a retry after a failed commit)


@dataclass(frozen=True)
class StoreUsage:
    total: int    # bytes
    free: int


class FootageStore(Protocol):
    """Stored footage by relative path (a POSIX path: an object key for a backend without folders).

    Every method raises `UnsafePath` for a path that is not a plain relative path inside the store, before
    reading or writing anything. A failing medium raises `OSError`, with errno ENOSPC or EDQUOT when the store is
    full: `collector.ingest_alarms.classify` turns those into the `storage_full` / `storage_error` alarms, so a
    backend maps its own errors onto them."""

    def place(self, claim: Path, relpath: RelPath, *, sha256: str, alternate: RelPath | None = None) -> Placed:
        """Store the verified file `claim` (its bytes already durable, hashing to `sha256`) at `relpath`, never
        overwriting: a path holding the same bytes is taken as placed (`created` False); one holding other bytes
        makes it try `alternate` the same way, then `PathOccupied`. Durable when it returns."""
        ...

    def open(self, relpath: RelPath) -> io.RawIOBase:
        """The stored bytes for reading (a context manager); `StoredFileMissing` when absent."""
        ...

    def read_range(self, relpath: RelPath, offset: int, length: int) -> bytes:
        """Up to `length` bytes from `offset` (fewer at the end of the file)."""
        ...

    def local_path(self, relpath: RelPath) -> AbstractContextManager[Path]:
        """A filesystem path holding the stored bytes while the context lasts, for tools that need one (ffmpeg,
        a kernel copy); `StoredFileMissing` when absent. Read only: never write to it."""
        ...

    def exists(self, relpath: RelPath) -> bool:
        ...

    def size(self, relpath: RelPath) -> int:
        ...

    def hash(self, relpath: RelPath) -> tuple[str, int]:
        """(sha256 hex, size) of the stored bytes, read now."""
        ...

    def unlink(self, relpath: RelPath) -> None:
        """Delete the stored file (an absent one is no error); durable when it returns."""
        ...

    def walk(self) -> Iterator[PurePosixPath]:
        """Every stored relative path (ingest's staging is not footage and is left out)."""
        ...

    def usage(self) -> StoreUsage | None:
        """Capacity and free space; None for a store without a fixed capacity."""
        ...


class FilesystemStore:
    """Footage as files under `root`, placed by hard link from ingest's staging (same volume), never
    overwritten. Paths are checked by `collector.placement.contained` (symlinks resolved) at every call."""

    def __init__(self, root: Path, skip: frozenset[str] = frozenset({STAGING_FOLDER})) -> None:
        self.root = Path(root)
        self.skip = skip     # top-level folders that are not footage (walk leaves them out)

    def __str__(self) -> str:
        return f"storage {self.root}"

    def __repr__(self) -> str:
        return f"FilesystemStore({str(self.root)!r})"

    def _path(self, relpath: RelPath) -> Path:
        return contained(self.root, relpath)

    def place(self, claim: Path, relpath: RelPath, *, sha256: str, alternate: RelPath | None = None) -> Placed:
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
                if self._hash_file(target)[0] != sha256:
                    continue
                # The same bytes: an earlier attempt linked them and may have died before its folder fsync.
                _fsync_folders(target.parent, self.root)
                return Placed(candidate, created=False)
            fsync_dir(target.parent)
            for directory in made:
                fsync_dir(directory.parent)
            return Placed(candidate, created=True)
        raise PathOccupied(tried, self)

    def open(self, relpath: RelPath) -> io.RawIOBase:
        path = self._path(relpath)
        try:
            return io.open(path, "rb", buffering=0)   # unbuffered: readers read large blocks with readinto
        except FileNotFoundError:
            raise StoredFileMissing(relpath, self) from None

    def read_range(self, relpath: RelPath, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"read_range of {relpath}: offset {offset} and length {length} must not be negative")
        blocks: list[bytes] = []
        with self.open(relpath) as handle:
            handle.seek(offset)
            while length > 0 and (block := handle.read(length)):
                blocks.append(block)
                length -= len(block)
        return b"".join(blocks)

    @contextmanager
    def local_path(self, relpath: RelPath) -> Iterator[Path]:
        path = self._path(relpath)
        if not path.is_file():
            raise StoredFileMissing(relpath, self)
        yield path

    def exists(self, relpath: RelPath) -> bool:
        return self._path(relpath).is_file()

    def size(self, relpath: RelPath) -> int:
        try:
            return self._path(relpath).stat().st_size
        except FileNotFoundError:
            raise StoredFileMissing(relpath, self) from None

    def hash(self, relpath: RelPath) -> tuple[str, int]:
        path = self._path(relpath)
        try:
            return self._hash_file(path)
        except FileNotFoundError:
            raise StoredFileMissing(relpath, self) from None

    @staticmethod
    def _hash_file(path: Path) -> tuple[str, int]:
        """(sha256 hex, size), reading into one reused buffer (the digest releases the GIL on large blocks)."""
        digest = hashlib.sha256()
        buffer = bytearray(READ_BLOCK)
        view = memoryview(buffer)
        size = 0
        with open(path, "rb", buffering=0) as handle:
            while n := handle.readinto(buffer):
                digest.update(view[:n])
                size += n
        return digest.hexdigest(), size

    def unlink(self, relpath: RelPath) -> None:
        # Durability: the removal is made durable (folder fsync) before the caller records the file deleted.
        path = self._path(relpath)
        path.unlink(missing_ok=True)
        if path.parent.is_dir():  # a file already missing may have lost its folder too
            fsync_dir(path.parent)

    def walk(self) -> Iterator[PurePosixPath]:
        for root, dirs, names in os.walk(self.root):
            rel_root = PurePosixPath(Path(root).relative_to(self.root).as_posix())
            if rel_root == PurePosixPath("."):
                dirs[:] = [d for d in dirs if d not in self.skip]
            for name in names:
                yield rel_root / name

    def usage(self) -> StoreUsage:
        usage = shutil.disk_usage(self.root)
        return StoreUsage(usage.total, usage.free)


def store_for(config: CollectorConfig) -> FootageStore:
    """The store `[collector]` configures: files under storage_dir."""
    return FilesystemStore(config.storage_dir)


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

"""A footage store that fails on command, for "disk full" and "disk failing" tests without tmpfs or root.

`FaultyStore` wraps the real `FilesystemStore`: every call goes through to it, except those of an operation told
to fail, which raise `OSError(errno, ...)` before anything is touched, and those of an operation told to hold, which
wait until `release` (a slow volume or object upload). `open` stands for every read of stored bytes (open,
read_range, local_path, hash). The one allowed test double of the project's house rules: it wraps
the real store, and fails exactly as an OSError from the volume would.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import datetime
from io import RawIOBase
from pathlib import Path, PurePosixPath

from collector.footage_store import FilesystemStore, Placed, RelPath, StoredObject, StoreUsage

OPERATIONS = ("place", "open", "unlink", "usage")


class FaultyStore:
    versioned = False

    def __init__(self, inner: FilesystemStore) -> None:
        self.inner = inner
        self.faults: dict[str, tuple[int, str | None]] = {}   # operation -> (errno, only this relpath or all)
        self.usage_reported: StoreUsage | None = None   # when set, what `usage` says instead of the volume
        self.failed: list[tuple[str, str]] = []           # (operation, relpath) of each injected failure
        self.holds: dict[str, str | None] = {}            # operation -> only this relpath or all, until release
        self.held: list[tuple[str, str]] = []             # (operation, relpath) of each call made to wait
        self.holding = threading.Event()                  # set once a call is waiting on a hold
        self._released = threading.Event()

    def __str__(self) -> str:
        return str(self.inner)

    def fail(self, operation: str, code: int = errno.EIO, relpath: RelPath | None = None) -> None:
        """Make `operation` raise OSError(code) until `heal`: on every path, or on `relpath` only."""
        if operation not in OPERATIONS:
            raise ValueError(f"no operation {operation!r} to fail: choose one of {', '.join(OPERATIONS)}")
        self.faults[operation] = (code, None if relpath is None else PurePosixPath(relpath).as_posix())

    def heal(self) -> None:
        self.faults.clear()

    def hold(self, operation: str, relpath: RelPath | None = None) -> None:
        """Make `operation` wait until `release`: on every path, or on `relpath` only. `holding` is set when a
        call waits."""
        if operation not in OPERATIONS:
            raise ValueError(f"no operation {operation!r} to hold: choose one of {', '.join(OPERATIONS)}")
        self._released.clear()
        self.holding.clear()
        self.holds[operation] = None if relpath is None else PurePosixPath(relpath).as_posix()

    def release(self) -> None:
        """Let every held call go on (and hold no more)."""
        self.holds.clear()
        self._released.set()

    def _hold(self, operation: str, relpath: RelPath | None) -> None:
        try:
            only = self.holds[operation]
        except KeyError:   # not held (or just released)
            return
        if only is not None and PurePosixPath(str(relpath)).as_posix() != only:
            return
        self.held.append((operation, str(relpath)))
        self.holding.set()
        self._released.wait()

    def _check(self, operation: str, relpath: RelPath | None = None) -> None:
        self._hold(operation, relpath)
        fault = self.faults.get(operation)
        if fault is None:
            return
        code, only = fault
        if only is not None and PurePosixPath(str(relpath)).as_posix() != only:
            return
        self.failed.append((operation, str(relpath)))
        raise OSError(code, os.strerror(code), str(relpath))   # as the volume would: errno, strerror, file

    def check(self) -> None:
        self.inner.check()

    def place(self, claim: Path, relpath: RelPath, *, sha256: str, alternate: RelPath | None = None,
              retain_until: datetime | None = None, legal_hold: bool = False) -> Placed:
        self._check("place", relpath)
        return self.inner.place(claim, relpath, sha256=sha256, alternate=alternate)

    def open(self, relpath: RelPath, version: str | None = None) -> RawIOBase:
        self._check("open", relpath)
        return self.inner.open(relpath)

    def read_range(self, relpath: RelPath, offset: int, length: int, version: str | None = None) -> bytes:
        self._check("open", relpath)
        return self.inner.read_range(relpath, offset, length)

    def local_path(self, relpath: RelPath, version: str | None = None) -> AbstractContextManager[Path]:
        self._check("open", relpath)
        return self.inner.local_path(relpath)

    def exists(self, relpath: RelPath, version: str | None = None) -> bool:
        return self.inner.exists(relpath)

    def size(self, relpath: RelPath, version: str | None = None) -> int:
        return self.inner.size(relpath)

    def hash(self, relpath: RelPath, version: str | None = None) -> tuple[str, int]:
        self._check("open", relpath)
        return self.inner.hash(relpath)

    def unlink(self, relpath: RelPath, version: str | None = None) -> None:
        self._check("unlink", relpath)
        self.inner.unlink(relpath)

    def extend_lock(self, relpath: RelPath, version: str | None, until: datetime) -> None:
        self.inner.extend_lock(relpath, version, until)

    def set_legal_hold(self, relpath: RelPath, version: str | None, on: bool) -> None:
        self.inner.set_legal_hold(relpath, version, on)

    def walk(self) -> Iterator[PurePosixPath]:
        return self.inner.walk()

    def objects(self) -> Iterator[StoredObject]:
        return self.inner.objects()

    def usage(self) -> StoreUsage:
        self._check("usage")
        return self.usage_reported or self.inner.usage()

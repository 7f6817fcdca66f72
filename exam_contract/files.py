"""The two file operations both sides trust footage to: hashing exact bytes, and making a rename durable."""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

READ_BLOCK = 1 << 20


def hash_file(path: Path, fsync: bool = False) -> tuple[str, int]:
    """(sha256 hex, size) of a file. With `fsync` its bytes are made durable through the same descriptor
    first: a record must never name bytes that a power loss could take back."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(READ_BLOCK):
            digest.update(block)
            size += len(block)
        if fsync:
            os.fsync(handle.fileno())
    return digest.hexdigest(), size


def fsync_dir(path: Path) -> None:
    """Make the entries of a folder (a rename or link into it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_is_held(path: Path, *, probe_exclusive: bool) -> bool:
    """True while another process holds a flock on `path` that conflicts with the probe: probe exclusively to find
    shared holders, shared to find an exclusive one. A missing file (or folder) is no lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if probe_exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False

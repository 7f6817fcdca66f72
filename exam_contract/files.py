"""The two file operations both sides trust footage to: hashing exact bytes, and making a rename durable."""

from __future__ import annotations

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

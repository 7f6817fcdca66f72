"""Whether an `exam-collector serve` runs on this data_dir: it holds a shared flock on `{data_dir}/serve.lock` for its
whole life (the kernel drops it when the process ends, even by SIGKILL).

`exam-collector doctor` asks before it logs in to the broker: with mosquitto's `use_username_as_clientid` (the
production config) a second login with the collector's account takes over the running `serve`'s session. Several
`serve` instances may share a data_dir (each with its own broker account), so the lock is shared, not exclusive.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from exam_contract.files import lock_is_held

LOCK_NAME = "serve.lock"


def lock_path(data_dir: Path) -> Path:
    return data_dir / LOCK_NAME


def hold_serve_lock(data_dir: Path) -> int:
    """Take the shared lock for a starting `serve`; returns the descriptor to close at exit."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(data_dir), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def serve_running(data_dir: Path) -> bool:
    """True while some `serve` holds the lock of `data_dir`."""
    return lock_is_held(lock_path(data_dir), probe_exclusive=True)

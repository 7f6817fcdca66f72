"""SHA-256 of a transfer's bytes, computed as its chunks arrive, so that `fin` need not read the file again.

Chunks of one file are written by one worker thread, in the order the broker delivered them; when that order is
0, 1, 2, ... with each index exactly once, the running digest is the digest of the staged file. Anything else
(a chunk out of order or repeated, a changed init, a collector restart that lost the state, chunks of one file
split between collector instances) leaves no running digest, and `fin` hashes the claimed file instead, as it
always did. No I/O here: the caller writes the chunk first and feeds the same bytes after.

A state is small (one hashlib object); their number is capped, and a transfer beyond the cap simply gets none.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_STATES = 10_000

TransferKey = tuple[str, str]  # (agent, file_id)


@dataclass
class _Running:
    chunk_size: int
    chunks: int
    next_index: int = 0
    size: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)


@dataclass(frozen=True)
class RunningDigest:
    sha256: str
    size: int


class RunningHashes:
    """Running digests per transfer. `chunk` is called by the one thread writing the file's chunks; `take` by
    whichever thread finishes it, after that thread saw every chunk's write (the worker hands `fin` on only
    after its chunks)."""

    def __init__(self, max_states: int = DEFAULT_MAX_STATES) -> None:
        self.max_states = max_states
        self._states: dict[TransferKey, _Running] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._states)

    def chunk(self, key: TransferKey, chunk_size: int, chunks: int, index: int, payload: bytes) -> None:
        """Chunk `index` of `chunks` was written with these bytes."""
        with self._lock:
            state = self._states.get(key)
            if state is None:
                if index != 0 or len(self._states) >= self.max_states:
                    return
                state = self._states[key] = _Running(chunk_size, chunks)
            elif (index != state.next_index or (state.chunk_size, state.chunks) != (chunk_size, chunks)):
                # out of order, repeated (a rewrite may carry other bytes) or under another init: no shortcut
                del self._states[key]
                return
            state.next_index += 1
            state.size += len(payload)
        state.hasher.update(payload)  # outside the lock: only this file's writer feeds this state

    def forget(self, key: TransferKey) -> None:
        with self._lock:
            self._states.pop(key, None)

    def take(self, key: TransferKey, chunk_size: int, chunks: int) -> RunningDigest | None:
        """The digest of all `chunks` chunks fed in order exactly once, or None; the state goes either way."""
        with self._lock:
            state = self._states.pop(key, None)
        if state is None or (state.chunk_size, state.chunks, state.next_index) != (chunk_size, chunks, chunks):
            return None
        return RunningDigest(state.hasher.hexdigest(), state.size)

"""Which pending records the uploader starts next: batch first (no I/O; docs/design/states.md, Transfer).

Without a schedule from the collector (exam_contract.schedule), or with one naming no window, records go oldest
first, as they were journaled. With windows, a record whose room is one of a window's rooms and whose time
overlaps that window goes first: oldest window first, and within a window the oldest record first. The rest
follow, oldest first, but never wait for ever: once the oldest of them has been passed over by window footage
for `max_batch_first`, it takes the next free slot (and the wait starts again for the next one).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from exam_contract.schedule import ScheduleWindow


@dataclass(frozen=True)
class Candidate:
    """A pending record as the order needs it: its journal id (journal order is oldest first), the room in its
    manifest and its time span (UTC)."""

    id: int
    room: str
    start: datetime
    end: datetime


def window_index(candidate: Candidate, windows: Sequence[ScheduleWindow]) -> int | None:
    """The first (oldest) window whose rooms include the record's room and whose time overlaps it."""
    for index, window in enumerate(windows):
        if candidate.room in window.rooms and window.overlaps(candidate.start, candidate.end):
            return index
    return None


def batch_first(candidates: Sequence[Candidate], windows: Sequence[ScheduleWindow]
                ) -> tuple[list[Candidate], list[Candidate]]:
    """(window footage in upload order, the rest oldest first); `candidates` come in journal order and
    `windows` oldest first."""
    matched: list[tuple[int, datetime, int, Candidate]] = []
    rest: list[Candidate] = []
    for candidate in candidates:
        index = window_index(candidate, windows)
        if index is None:
            rest.append(candidate)
        else:
            matched.append((index, candidate.start, candidate.id, candidate))
    matched.sort(key=lambda item: item[:3])
    return [item[3] for item in matched], sorted(rest, key=lambda c: c.id)


class UploadOrder:
    """The batch-first order with its one piece of state: since when the rest has been passed over.
    `set_windows` may be called from another thread (the MQTT client's) than `pick`."""

    def __init__(self, max_batch_first: timedelta, clock: Callable[[], datetime]) -> None:
        self.max_batch_first = max_batch_first
        self.clock = clock
        self._windows: tuple[ScheduleWindow, ...] = ()
        self._passed_over_since: datetime | None = None   # the rest waits for window footage since then
        self._lock = threading.Lock()

    def set_windows(self, windows: tuple[ScheduleWindow, ...]) -> bool:
        """The collector's newest windows (() when it sent none); returns whether they changed."""
        with self._lock:
            changed = windows != self._windows
            self._windows = windows
            return changed

    @property
    def windows(self) -> tuple[ScheduleWindow, ...]:
        with self._lock:
            return self._windows

    @property
    def active(self) -> bool:
        """Windows are known: `pick` needs every pending record. Otherwise the journal's order is the order."""
        with self._lock:
            return bool(self._windows)

    def pick(self, candidates: Sequence[Candidate], free: int) -> list[int]:
        """The ids of the records to start in the `free` slots, in that order."""
        with self._lock:
            window_first, rest = batch_first(candidates, self._windows)
            now = self.clock()
            picked: list[int] = []
            while len(picked) < free and (window_first or rest):
                if not rest:
                    self._passed_over_since = None
                    picked.append(window_first.pop(0).id)
                elif window_first and (self._passed_over_since is None
                                       or now - self._passed_over_since < self.max_batch_first):
                    if self._passed_over_since is None:
                        self._passed_over_since = now
                    picked.append(window_first.pop(0).id)
                else:   # no window footage, or the rest has waited long enough: its oldest goes now
                    self._passed_over_since = None
                    picked.append(rest.pop(0).id)
            if not rest:
                self._passed_over_since = None
            return picked

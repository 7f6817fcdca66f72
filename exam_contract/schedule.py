"""The schedule message (docs/protocol.md, Schedule): collector -> agent, retained on `exam/v1/{agent}/schedule`.

It names the time windows of the exam batches at the agent's venue (already widened by the collector's coverage
margins) and the rooms each window covers, so that the agent uploads that footage before the rest of its
backlog. It changes only the order of uploads, never what is uploaded; an agent without one uploads oldest first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .canonical import canonical_bytes, format_time, parse_time, truncate_to_millis
from .identifiers import is_identifier
from .topics import DEFAULT_MAX_PACKET_SIZE

SCHEDULE_VERSION = 1
MAX_SCHEDULE_WINDOWS = 2000
MAX_WINDOW_ROOMS = 64
BATCH_ID_MAX = 128                      # exam_batch.id; batch ids come from the exam-affairs system, not our ids
MAX_WINDOW_LENGTH = timedelta(days=3)   # a part lasts at most 24 h, each coverage margin at most 24 h
MAX_SCHEDULE_BYTES = DEFAULT_MAX_PACKET_SIZE // 2   # well under the broker's packet limit
_KEYS = frozenset({"v", "agent", "generated_at", "windows"})
_WINDOW_KEYS = frozenset({"batch", "start", "end", "rooms"})


class ScheduleError(ValueError):
    """A schedule payload does not follow protocol v1; the message names the field."""


def is_batch_id(value: object) -> bool:
    """1 to BATCH_ID_MAX printable characters (any script), no surrounding space."""
    return (isinstance(value, str) and 0 < len(value) <= BATCH_ID_MAX and value.isprintable()
            and value == value.strip())


@dataclass(frozen=True, order=True)
class ScheduleWindow:
    """One window of a batch: [start, end) in UTC (margins included) and the rooms of its parts."""

    start: datetime
    end: datetime
    batch: str
    rooms: tuple[str, ...]

    @classmethod
    def make(cls, batch: str, start: datetime, end: datetime, rooms: tuple[str, ...] | list[str]) -> "ScheduleWindow":
        """The canonical form (millisecond times, rooms sorted and unique); ScheduleError when invalid."""
        window = cls(truncate_to_millis(start), truncate_to_millis(end), batch, tuple(sorted(set(rooms))))
        window.check()
        return window

    def check(self) -> None:
        if not is_batch_id(self.batch):
            raise ScheduleError(f"schedule window batch {self.batch!r}: expected 1 to {BATCH_ID_MAX} printable "
                                "characters")
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ScheduleError(f"schedule window {self.batch}: naive time (UTC inside)")
        if not self.start < self.end:
            raise ScheduleError(f"schedule window {self.batch}: start must be before end")
        if self.end - self.start > MAX_WINDOW_LENGTH:
            raise ScheduleError(f"schedule window {self.batch}: longer than {MAX_WINDOW_LENGTH}")
        if not self.rooms or len(self.rooms) > MAX_WINDOW_ROOMS:
            raise ScheduleError(f"schedule window {self.batch}: expected 1 to {MAX_WINDOW_ROOMS} rooms")
        if not all(is_identifier(room) for room in self.rooms):
            raise ScheduleError(f"schedule window {self.batch}: a room is not a valid id")
        if list(self.rooms) != sorted(set(self.rooms)):
            raise ScheduleError(f"schedule window {self.batch}: rooms must be sorted and unique")

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "start": format_time(self.start), "end": format_time(self.end),
                "rooms": list(self.rooms)}

    def overlaps(self, start: datetime, end: datetime) -> bool:
        return start < self.end and end > self.start


@dataclass(frozen=True)
class Schedule:
    agent: str
    generated_at: datetime
    windows: tuple[ScheduleWindow, ...]   # sorted: oldest start first
    version: int = SCHEDULE_VERSION

    @classmethod
    def make(cls, agent: str, generated_at: datetime, windows: list[ScheduleWindow] | tuple[ScheduleWindow, ...]
             ) -> "Schedule":
        schedule = cls(agent, truncate_to_millis(generated_at), tuple(sorted(set(windows))))
        schedule.check()
        return schedule

    def check(self) -> None:
        if self.version != SCHEDULE_VERSION:
            raise ScheduleError(f"schedule.v: {self.version!r} is not {SCHEDULE_VERSION}")
        if not is_identifier(self.agent):
            raise ScheduleError("schedule.agent: not a valid agent id")
        if len(self.windows) > MAX_SCHEDULE_WINDOWS:
            raise ScheduleError(f"schedule.windows: more than {MAX_SCHEDULE_WINDOWS}")
        for window in self.windows:
            window.check()
        if list(self.windows) != sorted(set(self.windows)):
            raise ScheduleError("schedule.windows: must be sorted by start and unique")

    def windows_bytes(self) -> bytes:
        """The windows alone, canonical: what a collector compares to tell whether the schedule changed."""
        return canonical_bytes([w.to_dict() for w in self.windows])

    def encode(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces)."""
        return canonical_bytes({"v": self.version, "agent": self.agent, "generated_at": format_time(self.generated_at),
                                "windows": [w.to_dict() for w in self.windows]})

    @classmethod
    def decode(cls, payload: bytes) -> "Schedule":
        """Strict: every field present, no other, each bounded; ScheduleError naming what is wrong."""
        if len(payload) > MAX_SCHEDULE_BYTES:
            raise ScheduleError(f"schedule: larger than {MAX_SCHEDULE_BYTES} bytes")
        try:
            raw = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ScheduleError(f"schedule: malformed JSON ({exc})") from exc
        if not isinstance(raw, dict) or set(raw) != _KEYS:
            raise ScheduleError(f"schedule: expected an object with exactly {sorted(_KEYS)}")
        version = raw["v"]
        if not isinstance(version, int) or isinstance(version, bool) or version != SCHEDULE_VERSION:
            raise ScheduleError(f"schedule.v: {version!r} is not {SCHEDULE_VERSION}")
        windows_raw = raw["windows"]
        if not isinstance(windows_raw, list) or len(windows_raw) > MAX_SCHEDULE_WINDOWS:
            raise ScheduleError(f"schedule.windows: expected a list of at most {MAX_SCHEDULE_WINDOWS}")
        windows = [_window(item, index) for index, item in enumerate(windows_raw)]
        schedule = cls(raw["agent"], _time(raw["generated_at"], "schedule.generated_at"), tuple(windows), version)
        schedule.check()
        return schedule


def _time(value: object, what: str) -> datetime:
    if not isinstance(value, str):
        raise ScheduleError(f"{what}: not a time string")
    try:
        return parse_time(value)
    except ValueError as exc:
        raise ScheduleError(f"{what}: {exc}") from exc


def _window(raw: object, index: int) -> ScheduleWindow:
    what = f"schedule.windows[{index}]"
    if not isinstance(raw, dict) or set(raw) != _WINDOW_KEYS:
        raise ScheduleError(f"{what}: expected an object with exactly {sorted(_WINDOW_KEYS)}")
    rooms = raw["rooms"]
    if not isinstance(rooms, list) or len(rooms) > MAX_WINDOW_ROOMS or not all(isinstance(r, str) for r in rooms):
        raise ScheduleError(f"{what}.rooms: expected a list of at most {MAX_WINDOW_ROOMS} room ids")
    if not is_batch_id(raw["batch"]):
        raise ScheduleError(f"{what}.batch: expected 1 to {BATCH_ID_MAX} printable characters")
    window = ScheduleWindow(_time(raw["start"], f"{what}.start"), _time(raw["end"], f"{what}.end"), raw["batch"],
                            tuple(rooms))
    window.check()
    return window

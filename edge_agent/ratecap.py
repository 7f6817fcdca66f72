"""The upload rate cap, pure (no I/O, the clock is always passed in): the cap in force at an instant under a daily
schedule on the Asia/Shanghai wall clock ([upload] in edge.toml), a token bucket that says how long to wait before
publishing N bytes under that cap, a meter of the bytes actually published, and the backlog's drain estimate.

Rates are in kilobits per second (1 kbit = 1000 bits); 0 means unlimited. Instants are aware UTC datetimes;
the bucket and the meter work on monotonic seconds.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

SHANGHAI = ZoneInfo("Asia/Shanghai")
UTC = timezone.utc
MINUTES_PER_DAY = 24 * 60
BURST_SECONDS = 1.0       # the bucket holds about one second of the cap (at least one chunk)
RATE_WINDOW = 60.0        # the measured upload rate is over the last minute

_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


def bytes_per_second(kbps: int) -> float:
    return kbps * 1000 / 8


def parse_hhmm(text: str) -> time | None:
    """"HH:MM" (00:00 .. 23:59) as a time of day; None when it is not one."""
    match = _HHMM.match(text)
    return time(int(match.group(1)), int(match.group(2))) if match else None


@dataclass(frozen=True)
class CapWindow:
    """[[upload.schedule]]: from `start` to `end` (Asia/Shanghai wall clock, half open) the cap is `max_kbps`;
    `end` before `start` wraps past midnight."""

    start: time
    end: time
    max_kbps: int

    def _spans(self) -> list[tuple[int, int]]:
        """The window as minute ranges [a, b) within one day (two when it wraps)."""
        a = self.start.hour * 60 + self.start.minute
        b = self.end.hour * 60 + self.end.minute
        return [(a, b)] if a < b else [(a, MINUTES_PER_DAY), (0, b)]

    def contains(self, local: datetime) -> bool:
        minute = local.hour * 60 + local.minute
        return any(a <= minute < b for a, b in self._spans())


def overlapping(windows: tuple[CapWindow, ...] | list[CapWindow]) -> tuple[int, int] | None:
    """Indexes (i < j) of the first two windows that share a minute, or None."""
    for i, first in enumerate(windows):
        for j in range(i + 1, len(windows)):
            if any(a1 < b2 and a2 < b1 for a1, b1 in first._spans() for a2, b2 in windows[j]._spans()):
                return i, j
    return None


@dataclass(frozen=True)
class CapState:
    """The cap in force (kbps, 0 = unlimited) and when it next changes (UTC) to what; `changes_at` is None when
    it never changes (no schedule, or every window and the rest of the day have the same cap)."""

    kbps: int
    changes_at: datetime | None = None
    next_kbps: int | None = None


@dataclass(frozen=True)
class CapSchedule:
    max_kbps: int = 0
    windows: tuple[CapWindow, ...] = ()

    def kbps_at(self, now: datetime) -> int:
        if not self.windows:   # asked for every message the uploader sends
            return self.max_kbps
        local = now.astimezone(SHANGHAI)
        for window in self.windows:
            if window.contains(local):
                return window.max_kbps
        return self.max_kbps

    def at(self, now: datetime) -> CapState:
        """The cap at the UTC instant `now` and its next change (looked for within the next 48 hours)."""
        kbps = self.kbps_at(now)
        if not self.windows:
            return CapState(kbps)
        local = now.astimezone(SHANGHAI)
        edges = sorted({w.start for w in self.windows} | {w.end for w in self.windows})
        for day in range(3):
            date = local.date() + timedelta(days=day)
            for edge in edges:
                at = datetime.combine(date, edge, tzinfo=SHANGHAI)
                if at <= local:
                    continue
                after = self.kbps_at(at)
                if after != kbps:
                    return CapState(kbps, at.astimezone(UTC), after)
        return CapState(kbps)


class TokenBucket:
    """A token bucket in bytes, refilled at the cap's rate and holding BURST_SECONDS of it, at least
    `min_burst` bytes (one chunk, so any chunk can go). A message larger than the bucket goes when the bucket is
    full and leaves it in debt. Under no cap nothing waits, and a cap that starts finds the bucket full."""

    def __init__(self, min_burst: int):
        self.min_burst = min_burst
        self._tokens = 0.0
        self._last: float | None = None
        self._kbps = 0

    def capacity(self, kbps: int) -> float:
        return max(bytes_per_second(kbps) * BURST_SECONDS, float(self.min_burst))

    def _refill(self, now: float, kbps: int) -> None:
        if self._last is None or self._kbps == 0:
            self._tokens = self.capacity(kbps) if kbps else 0.0   # a cap starting now: a full bucket
        elif now > self._last:
            self._tokens += (now - self._last) * bytes_per_second(self._kbps)   # at the cap in force till now
        self._kbps = kbps
        self._last = now if self._last is None else max(now, self._last)
        if kbps:
            self._tokens = min(self._tokens, self.capacity(kbps))

    def delay(self, size: int, now: float, kbps: int) -> float:
        """Seconds to wait before `size` bytes may go (0: now). Takes nothing."""
        self._refill(now, kbps)
        if kbps == 0:
            return 0.0
        need = min(float(size), self.capacity(kbps))
        return 0.0 if self._tokens >= need else (need - self._tokens) / bytes_per_second(kbps)

    def take(self, size: int, now: float, kbps: int) -> float:
        """Take `size` bytes when they may go now and return 0; else take nothing and return the wait."""
        wait = self.delay(size, now, kbps)
        if wait == 0 and kbps:
            self._tokens -= size
        return wait


class RateMeter:
    """Bytes published per second over the last `window` seconds (or since the meter started, if later)."""

    def __init__(self, started: float, window: float = RATE_WINDOW):
        self.started = started
        self.window = window
        self._seconds: deque[list[float]] = deque()   # [whole second, bytes], oldest first

    def add(self, size: int, now: float) -> None:
        second = float(int(now))
        if self._seconds and self._seconds[-1][0] == second:
            self._seconds[-1][1] += size
        else:
            self._seconds.append([second, float(size)])
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._seconds and self._seconds[0][0] < now - self.window:
            self._seconds.popleft()

    def bytes_per_second(self, now: float) -> float:
        self._trim(now)
        span = min(self.window, now - self.started)
        if span <= 0:
            return 0.0
        return sum(size for _, size in self._seconds) / max(span, 1.0)


def drain_seconds(backlog_bytes: int, rate_bps: float, cap_kbps: int) -> float | None:
    """Estimated seconds to send `backlog_bytes`: at the measured rate (bytes/s) while something is being sent,
    else at the cap; None when neither is known (nothing sent lately and no cap)."""
    if backlog_bytes <= 0:
        return 0.0
    rate = rate_bps if rate_bps > 0 else bytes_per_second(cap_kbps)
    return backlog_bytes / rate if rate > 0 else None


@dataclass(frozen=True)
class UploadRate:
    """What the uploader reports for the status: the cap now (with its next change) and the measured rate."""

    cap: CapState
    bytes_per_second: float

"""The login rate limit of the HTTP API: failed logins in a sliding window, per account name and per client address.

`[http] login_failures_per_account` failures of one user name (known or not: the limit must not tell which names
exist) or `login_failures_per_address` failures from one client address within `login_window_seconds` make
further logins of that name, or from that address, answer 429 with Retry-After until the oldest of those failures
leaves the window. Refused attempts are not counted (a victim's lock ends on time however long a guesser keeps
trying), and a successful login clears its name's failures but not its address's.

The counts are kept in memory: each `serve` process limits on its own, and a restart forgets them.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .config import HttpConfig

SWEEP_SECONDS = 60.0   # how often names and addresses without a failure in the window are forgotten


class LoginThrottled(Exception):
    """Too many failed logins; the message names the account or address and the wait."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Attempt:
    """A login under way: counted as a failure until `LoginThrottle.succeeded` says otherwise."""

    username: str
    address: str
    at: float


class LoginThrottle:
    def __init__(self, per_account: int, per_address: int, window_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = {"account": per_account, "address": per_address}
        self.window = window_seconds
        self._clock = clock
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()
        self._swept = clock()

    @classmethod
    def from_config(cls, http: HttpConfig) -> LoginThrottle:
        return cls(http.login_failures_per_account, http.login_failures_per_address, http.login_window_seconds)

    def begin(self, username: str, address: str) -> Attempt:
        """Count an attempt as a failure, or raise LoginThrottled when its name or address is at its limit.
        Checking and counting are one step, so that parallel guesses cannot all slip under the limit."""
        with self._lock:
            now = self._clock()
            self._sweep(now)
            keys = (("account", username), ("address", address))
            for key in keys:
                wait = self._wait(key, now)
                if wait is not None:
                    what = f"user {username!r}" if key[0] == "account" else f"address {address}"
                    raise LoginThrottled(f"too many failed logins for {what}: try again in {wait} s", wait)
            for key in keys:
                self._failures.setdefault(key, deque()).append(now)
            return Attempt(username, address, now)

    def succeeded(self, attempt: Attempt) -> None:
        """The attempt logged in: it was no failure, and its name's earlier failures are forgiven."""
        with self._lock:
            self._failures.pop(("account", attempt.username), None)
            failures = self._failures.get(("address", attempt.address))
            if failures is not None and attempt.at in failures:
                failures.remove(attempt.at)

    def _wait(self, key: tuple[str, str], now: float) -> int | None:
        """Whole seconds until `key` is below its limit again; None when it is below now."""
        failures = self._failures.get(key)
        if failures is None:
            return None
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        limit = self.limits[key[0]]
        if len(failures) < limit:
            return None
        frees_at = failures[len(failures) - limit] + self.window
        return max(1, math.ceil(frees_at - now))

    def _sweep(self, now: float) -> None:
        if now - self._swept < SWEEP_SECONDS:
            return
        self._swept = now
        for key in [k for k, failures in self._failures.items() if not failures or failures[-1] <= now - self.window]:
            del self._failures[key]

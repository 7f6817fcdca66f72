"""A background loop of the collector: one daemon thread per loop, stopped promptly by `stop()`."""

from __future__ import annotations

import threading


class BackgroundLoop:
    """Runs `_run` on a daemon thread named `name`. A subclass loops with `while not self._stop.wait(interval)`,
    so `stop()` ends it at once rather than after its interval."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    def _run(self) -> None:
        raise NotImplementedError

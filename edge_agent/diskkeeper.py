"""The edge disk budget: one loop that deletes acknowledged footage and holds the cameras (`disk_full`) when
unacknowledged footage alone fills the disk. See docs/design/durability.md (what may be pruned) and
docs/design/states.md (the hold)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Protocol

from exam_contract.alarms import AlarmCode
from exam_contract.manifest import GapCause

from .config import EdgeConfig
from .journal import Journal

log = logging.getLogger(__name__)

CHECK_INTERVAL = 2.0
PRUNE_BATCH = 50


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


class CameraHold(Protocol):
    """What the disk keeper needs from the recorders (implemented by recorder.Recorders)."""

    def hold_all(self, cause: GapCause, detail: str) -> None: ...

    def release_all(self) -> None: ...


class DiskKeeper:
    def __init__(self, config: EdgeConfig, journal: Journal, cameras: CameraHold,
                 on_alarm: Callable[[AlarmCode, str | None], None] | None = None, interval: float = CHECK_INTERVAL,
                 free: Callable[[], int] | None = None) -> None:
        self.config = config
        self.journal = journal
        self.cameras = cameras
        self.on_alarm = on_alarm  # (code, detail) when raised, (code, None) when cleared
        self.interval = interval
        self.min_free = config.agent.min_free_mb * 1024 * 1024
        self._free = free or (lambda: free_bytes(config.agent.data_dir))
        self.full = False
        self.deleted = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="disk-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:  # the first check ran synchronously in Agent.start, before the cameras
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # the keeper must outlive one bad check
                log.exception("disk keeper check failed")

    def check(self) -> None:
        keep = timedelta(days=self.config.agent.local_keep_days)
        while self._prune(self.journal.prunable(PRUNE_BATCH, datetime.now(timezone.utc) - keep),
                          f"acknowledged and older than local_keep_days = {self.config.agent.local_keep_days}"):
            pass
        free = self._free()
        while free < self.min_free:
            batch = self.journal.prunable(PRUNE_BATCH)
            if not batch:
                break
            for record in batch:
                self._prune([record], f"acknowledged; free space {free // 2**20} MiB below min_free_mb = "
                                      f"{self.config.agent.min_free_mb}")
                free = self._free()
                if free >= self.min_free:
                    break
        if not self.full and free < self.min_free // 2:
            self.full = True
            detail = (f"only {free // 2**20} MiB free on {self.config.agent.data_dir} and every local segment "
                      "is still unacknowledged")
            log.error("ALARM %s: %s; cameras stopped until space returns (check the uplink to the collector, "
                      "or free space on the disk)", AlarmCode.DISK_FULL, detail)
            self.cameras.hold_all(GapCause.DISK_FULL, detail)
            if self.on_alarm:
                self.on_alarm(AlarmCode.DISK_FULL, detail)
        elif self.full and free >= self.min_free:
            self.full = False
            log.warning("ALARM %s cleared: %s MiB free; cameras resume", AlarmCode.DISK_FULL, free // 2**20)
            self.cameras.release_all()
            if self.on_alarm:
                self.on_alarm(AlarmCode.DISK_FULL, None)

    def _prune(self, records: list, reason: str) -> bool:
        for record in records:
            if record.path is not None:
                try:
                    record.path.unlink()
                except FileNotFoundError:
                    pass
            self.journal.mark_pruned(record.id, reason)
            self.deleted += 1
            log.info("camera %s seq %s: local copy %s deleted (%s)", record.camera, record.seq,
                     record.path.name if record.path else "-", reason)
        return bool(records)

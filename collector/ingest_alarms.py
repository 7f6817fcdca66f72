"""Alarms of the ingest path (issue 3): storage full, storage failing, database unreachable.

While one is active the collector sends no `stored` reply for the files it concerns (the failing step raises
before the reply), the agents keep their footage and repeat `fin` with backoff, and the alarm clears itself
on the next success. Raising and clearing are logged once per change (ERROR / WARNING, prefix `ALARM`) and
recorded as `alarm` / `alarm_cleared` ingest events when the database can take them.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy.exc import DBAPIError, OperationalError

from .db import DatabaseUnavailable

log = logging.getLogger(__name__)

STORAGE_FULL = "storage_full"
STORAGE_ERROR = "storage_error"
DATABASE_UNREACHABLE = "database_unreachable"

ADVICE = {
    STORAGE_FULL: "free space on [collector] storage_dir (or grow the volume); agents keep their footage and "
                  "resend it by themselves once space is back",
    STORAGE_ERROR: "check the storage volume (mount, permissions, disk errors) in the collector log",
    DATABASE_UNREACHABLE: "start the database or fix [collector] database_url; agents keep their footage and "
                          "resend it by themselves once the database answers",
}

EVENT_ALARM = "alarm"
EVENT_ALARM_CLEARED = "alarm_cleared"


@dataclass(frozen=True)
class ActiveAlarm:
    code: str
    detail: str
    since: datetime


def classify(exc: BaseException) -> str | None:
    """The alarm an ingest failure stands for, or None for a plain bug."""
    if isinstance(exc, DatabaseUnavailable):
        return DATABASE_UNREACHABLE
    if isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        return DATABASE_UNREACHABLE
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return STORAGE_FULL
        return STORAGE_ERROR
    return None


class IngestAlarms:
    """Active alarms of one collector instance; thread-safe."""

    def __init__(self, record: Callable[[str, str, str], None] | None = None) -> None:
        self._active: dict[str, ActiveAlarm] = {}
        self._lock = threading.Lock()
        self._record = record  # (event, code, detail): best effort, must not raise

    def raise_alarm(self, code: str, detail: str) -> bool:
        """Returns True when the alarm was not active before."""
        with self._lock:
            if code in self._active:
                return False
            self._active[code] = ActiveAlarm(code, detail, datetime.now(timezone.utc))
        log.error("ALARM %s: %s; %s", code, detail, ADVICE.get(code, "see docs/operations.md"))
        if self._record is not None:
            self._record(EVENT_ALARM, code, detail)
        return True

    def clear(self, *codes: str) -> None:
        for code in codes:
            with self._lock:
                alarm = self._active.pop(code, None)
            if alarm is None:
                continue
            log.warning("ALARM %s cleared (active since %s)", code, alarm.since.isoformat())
            if self._record is not None:
                self._record(EVENT_ALARM_CLEARED, code, f"active since {alarm.since.isoformat()}: {alarm.detail}")

    def active(self) -> list[ActiveAlarm]:
        with self._lock:
            return list(self._active.values())

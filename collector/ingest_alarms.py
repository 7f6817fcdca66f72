"""Alarms of the ingest path: storage full, storage failing, database unreachable; no `stored` reply while one
is active. See docs/design/states.md (alarm codes) and docs/operations.md (what to do)."""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy.exc import DBAPIError, OperationalError

from exam_contract.alarms import AlarmCode

from .db import DatabaseUnavailable

log = logging.getLogger(__name__)

# The names tests and older code use.
STORAGE_FULL = AlarmCode.STORAGE_FULL
STORAGE_ERROR = AlarmCode.STORAGE_ERROR
DATABASE_UNREACHABLE = AlarmCode.DATABASE_UNREACHABLE

ADVICE = {
    AlarmCode.STORAGE_FULL: "free space on [collector] storage_dir (or grow the volume); agents keep their footage and "
                  "resend it by themselves once space is back",
    AlarmCode.STORAGE_ERROR: "check the storage volume (mount, permissions, disk errors) in the collector log",
    AlarmCode.DATABASE_UNREACHABLE: "start the database or fix [collector] database_url; agents keep their footage and "
                          "resend it by themselves once the database answers",
}

EVENT_ALARM = "alarm"
EVENT_ALARM_CLEARED = "alarm_cleared"


@dataclass(frozen=True)
class ActiveAlarm:
    code: AlarmCode
    detail: str
    since: datetime


def classify(exc: BaseException) -> AlarmCode | None:
    """The alarm an ingest failure stands for, or None for a plain bug."""
    if isinstance(exc, DatabaseUnavailable):
        return AlarmCode.DATABASE_UNREACHABLE
    if isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        return AlarmCode.DATABASE_UNREACHABLE
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return AlarmCode.STORAGE_FULL
        return AlarmCode.STORAGE_ERROR
    return None


class IngestAlarms:
    """Active alarms of one collector instance; thread-safe."""

    def __init__(self, record: Callable[[str, str, str], None] | None = None) -> None:
        self._active: dict[AlarmCode, ActiveAlarm] = {}
        self._lock = threading.Lock()
        self._record = record  # (event, code, detail): best effort, must not raise

    def raise_alarm(self, code: AlarmCode, detail: str) -> bool:
        """Returns True when the alarm was not active before."""
        with self._lock:
            if code in self._active:
                return False
            self._active[code] = ActiveAlarm(code, detail, datetime.now(timezone.utc))
        log.error("ALARM %s: %s; %s", code, detail, ADVICE.get(code, "see docs/operations.md"))
        if self._record is not None:
            self._record(EVENT_ALARM, code, detail)
        return True

    def clear(self, *codes: AlarmCode) -> None:
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

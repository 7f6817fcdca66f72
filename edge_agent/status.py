"""The agent's status for technicians: spool backlog per camera, camera states, last health flags, alarms.

`StatusReporter` refreshes it periodically: into the retained `exam/v1/{agent}/status` (through the uploader;
the last will there marks the agent offline) and into `{data_dir}/status.json`, which `exam-edge status`
shows locally. `read_local_status` is that reader.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from exam_contract.alarms import AlarmCode
from exam_contract.canonical import format_time, parse_time
from exam_contract.files import lock_is_held
from exam_contract.redact import redact_values

from .config import EdgeConfig
from .journal import Journal

log = logging.getLogger(__name__)
UTC = timezone.utc
STATUS_INTERVAL = 15.0
STATUS_FILE = "status.json"


class StatusFileError(Exception):
    """status.json is unreadable; the message names the file."""


@dataclass(frozen=True)
class LocalStatus:
    """What the running agent last wrote, and whether it is still running."""

    time: datetime
    running: bool
    cameras: dict[str, str]
    health: dict[str, list[str]]
    alarms: dict[str, str]


def status_path(config: EdgeConfig) -> Path:
    return config.agent.data_dir / STATUS_FILE


def agent_running(config: EdgeConfig) -> bool:
    """True while an exam-edge holds the data_dir lock (agent.lock, taken exclusively)."""
    return lock_is_held(config.agent.data_dir / "agent.lock", probe_exclusive=False)


def read_local_status(config: EdgeConfig) -> LocalStatus | None:
    path = status_path(config)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return LocalStatus(time=parse_time(raw["time"]), running=agent_running(config),
                           cameras=dict(raw.get("cameras", {})), health=dict(raw.get("health", {})),
                           alarms=dict(raw.get("alarms", {})))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StatusFileError(f"{path} is unreadable ({exc}): delete it; the agent rewrites it") from exc


class StatusReporter:
    def __init__(self, config: EdgeConfig, journal: Journal, camera_states: Callable[[], Mapping[str, str]],
                 publish: Callable[..., None], alarms: Callable[[], dict[AlarmCode, str]] = dict,
                 health: Callable[[], dict[str, tuple[str, ...]]] = dict, interval: float = STATUS_INTERVAL):
        self.config = config
        self.journal = journal
        self._camera_states = camera_states
        self._publish = publish
        self._alarms = alarms
        self._health = health
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def fields(self) -> dict[str, Any]:
        """Status fields added to the uploader's (which owns `cameras` states and `alarms`)."""
        rows = self.journal.status()
        spool = {row.camera: {"last_seq": row.last_seq, "last_stored_seq": row.last_stored_seq,
                              "pending": row.pending, "pending_bytes": row.pending_bytes,
                              "rejected": row.rejected} for row in rows}
        return {"backlog": {"records": sum(r.pending for r in rows), "bytes": sum(r.pending_bytes for r in rows)},
                "spool": spool, "health": {cam: list(flags) for cam, flags in self._health().items()}}

    def report(self) -> None:
        fields = redact_values(self.fields())
        self._publish(**fields)
        local = redact_values({"agent": self.config.agent.id, "time": format_time(datetime.now(UTC)),
                               "cameras": self._camera_states(), "alarms": self._alarms(), **fields})
        path = status_path(self.config)
        tmp = path.with_name(f".{STATUS_FILE}.tmp")
        try:
            tmp.write_text(json.dumps(local, ensure_ascii=False, indent=1), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="status", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                self.report()
            except Exception:  # status must never take the agent down
                log.exception("status report failed")
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        try:
            self.report()
        except Exception:
            log.exception("final status report failed")

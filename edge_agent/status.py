"""The agent's status for technicians: spool backlog per camera, camera states, last health flags, alarms, and the
upload cap, measured rate, backlog and its drain estimate (`upload`, an UploadStatus).

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
from .ratecap import UploadRate, drain_seconds

log = logging.getLogger(__name__)
UTC = timezone.utc
STATUS_INTERVAL = 15.0
STATUS_FILE = "status.json"


class StatusFileError(Exception):
    """status.json is unreadable; the message names the file."""


@dataclass(frozen=True)
class UploadStatus:
    """`upload` in the status: the [upload] cap in force (kbit/s, 0 = unlimited) and its next change (UTC), the
    bytes published per second over the last minute (in kbit/s), the backlog (records and bytes not yet stored) and
    the estimated seconds to send it (None: unknown). Backlog names start `backlog_`; a narrower backlog gets its
    own prefix (e.g. `batch_backlog_bytes`, `batch_backlog_eta_seconds`)."""

    cap_kbps: int
    cap_changes_at: datetime | None
    cap_next_kbps: int | None
    rate_kbps: float
    backlog_records: int
    backlog_bytes: int
    backlog_eta_seconds: float | None
    batch_backlog_records: int = 0      # of the backlog, footage of the collector's batch windows (sent first)
    batch_backlog_bytes: int = 0
    batch_backlog_eta_seconds: float | None = None

    @classmethod
    def of(cls, rate: UploadRate, backlog_records: int, backlog_bytes: int,
           batch_backlog: tuple[int, int] = (0, 0)) -> UploadStatus:
        eta = drain_seconds(backlog_bytes, rate.bytes_per_second, rate.cap.kbps)
        # batch footage goes first, so it drains at the whole rate
        batch_eta = drain_seconds(batch_backlog[1], rate.bytes_per_second, rate.cap.kbps) if batch_backlog[0] else None
        return cls(cap_kbps=rate.cap.kbps, cap_changes_at=rate.cap.changes_at, cap_next_kbps=rate.cap.next_kbps,
                   rate_kbps=round(rate.bytes_per_second * 8 / 1000, 1), backlog_records=backlog_records,
                   backlog_bytes=backlog_bytes, backlog_eta_seconds=None if eta is None else round(eta),
                   batch_backlog_records=batch_backlog[0], batch_backlog_bytes=batch_backlog[1],
                   batch_backlog_eta_seconds=None if batch_eta is None else round(batch_eta))

    def to_json(self) -> dict[str, Any]:
        return {"cap_kbps": self.cap_kbps,
                "cap_changes_at": None if self.cap_changes_at is None else format_time(self.cap_changes_at),
                "cap_next_kbps": self.cap_next_kbps, "rate_kbps": self.rate_kbps,
                "backlog_records": self.backlog_records, "backlog_bytes": self.backlog_bytes,
                "backlog_eta_seconds": self.backlog_eta_seconds, "batch_backlog_records": self.batch_backlog_records,
                "batch_backlog_bytes": self.batch_backlog_bytes,
                "batch_backlog_eta_seconds": self.batch_backlog_eta_seconds}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> UploadStatus:
        changes = raw.get("cap_changes_at")
        return cls(cap_kbps=int(raw["cap_kbps"]), cap_changes_at=None if changes is None else parse_time(changes),
                   cap_next_kbps=raw.get("cap_next_kbps"), rate_kbps=float(raw["rate_kbps"]),
                   backlog_records=int(raw["backlog_records"]), backlog_bytes=int(raw["backlog_bytes"]),
                   backlog_eta_seconds=raw.get("backlog_eta_seconds"),
                   batch_backlog_records=int(raw.get("batch_backlog_records") or 0),
                   batch_backlog_bytes=int(raw.get("batch_backlog_bytes") or 0),
                   batch_backlog_eta_seconds=raw.get("batch_backlog_eta_seconds"))


@dataclass(frozen=True)
class LocalStatus:
    """What the running agent last wrote, and whether it is still running."""

    time: datetime
    running: bool
    cameras: dict[str, str]
    health: dict[str, list[str]]
    alarms: dict[str, str]
    upload: UploadStatus | None = None


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
                           alarms=dict(raw.get("alarms", {})),
                           upload=UploadStatus.from_json(raw["upload"]) if raw.get("upload") else None)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StatusFileError(f"{path} is unreadable ({exc}): delete it; the agent rewrites it") from exc


class StatusReporter:
    def __init__(self, config: EdgeConfig, journal: Journal, camera_states: Callable[[], Mapping[str, str]],
                 publish: Callable[..., None], alarms: Callable[[], dict[AlarmCode, str]] = dict,
                 health: Callable[[], dict[str, tuple[str, ...]]] = dict, interval: float = STATUS_INTERVAL,
                 upload: Callable[[], UploadRate] | None = None,
                 batch_backlog: Callable[[], tuple[int, int]] = lambda: (0, 0)):
        self.config = config
        self.journal = journal
        self._camera_states = camera_states
        self._publish = publish
        self._alarms = alarms
        self._health = health
        self._upload = upload
        self._batch_backlog = batch_backlog
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def fields(self) -> dict[str, Any]:
        """Status fields added to the uploader's (which owns `cameras` states and `alarms`)."""
        rows = self.journal.status()
        spool = {row.camera: {"last_seq": row.last_seq, "last_stored_seq": row.last_stored_seq,
                              "pending": row.pending, "pending_bytes": row.pending_bytes,
                              "rejected": row.rejected} for row in rows}
        records, size = sum(r.pending for r in rows), sum(r.pending_bytes for r in rows)
        fields: dict[str, Any] = {"backlog": {"records": records, "bytes": size}, "spool": spool,
                                  "health": {cam: list(flags) for cam, flags in self._health().items()}}
        if self._upload is not None:
            fields["upload"] = UploadStatus.of(self._upload(), records, size, self._batch_backlog()).to_json()
        return fields

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


def _kbps_text(kbps: int | float, lang: str) -> str:
    if kbps == 0:
        return "不限速" if lang == "zh" else "unlimited"
    return f"{kbps:g} kbit/s"


def _duration_text(seconds: float, lang: str) -> str:
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    h, m, s = ("小时", "分", "秒") if lang == "zh" else ("h", "min", "s")
    if hours:
        return f"{hours} {h} {minutes} {m}"
    return f"{minutes} {m} {secs} {s}" if minutes else f"{secs} {s}"


def upload_line(upload: UploadStatus, lang: str = "zh") -> str:
    """One human line for `exam-edge status`: cap (and its next change, Asia/Shanghai), measured rate, backlog,
    drain estimate; `lang` is "zh" or "en"."""
    from .ratecap import SHANGHAI

    cap = _kbps_text(upload.cap_kbps, lang)
    if upload.cap_changes_at is not None and upload.cap_next_kbps is not None:
        when = upload.cap_changes_at.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M")
        nxt = _kbps_text(upload.cap_next_kbps, lang)
        cap += f"（北京时间 {when} 起为 {nxt}）" if lang == "zh" else f" ({nxt} from {when} Asia/Shanghai)"
    size = f"{upload.backlog_bytes / 1e6:.1f} MB"
    if upload.backlog_records == 0:
        eta = "已全部上传" if lang == "zh" else "nothing to drain"
    elif upload.backlog_eta_seconds is None:
        eta = "预计传完时间未知" if lang == "zh" else "time to drain unknown"
    else:
        took = _duration_text(upload.backlog_eta_seconds, lang)
        eta = f"预计 {took} 传完" if lang == "zh" else f"drains in about {took}"
    batch = ""
    if upload.batch_backlog_records:
        batch_size = f"{upload.batch_backlog_bytes / 1e6:.1f} MB"
        if upload.batch_backlog_eta_seconds is None:
            batch = (f"；其中考试批次录像 {upload.batch_backlog_records} 条、{batch_size}（优先上传）" if lang == "zh"
                     else f"; of it, exam batch footage {upload.batch_backlog_records} record(s), {batch_size} "
                          "(sent first)")
        else:
            took = _duration_text(upload.batch_backlog_eta_seconds, lang)
            batch = (f"；其中考试批次录像 {upload.batch_backlog_records} 条、{batch_size}（优先上传，预计 {took} 传完）"
                     if lang == "zh" else f"; of it, exam batch footage {upload.batch_backlog_records} record(s), "
                                          f"{batch_size} (sent first, drains in about {took})")
    if lang == "zh":
        return (f"上传：限速 {cap}；近 1 分钟实测 {upload.rate_kbps:.1f} kbit/s；积压 {upload.backlog_records} 条记录、"
                f"{size}；{eta}{batch}")
    return (f"upload: cap {cap}; measured {upload.rate_kbps:.1f} kbit/s over the last minute; backlog "
            f"{upload.backlog_records} record(s), {size}; {eta}{batch}")

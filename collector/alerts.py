"""Live coverage alerts: while a batch part runs, a camera of its room that stops delivering is reported at
once, so a technician can fix it during the exam.

A camera is in alert when no segment of it has arrived for `factor` × its segment length, when its newest
record is a stated gap, or when a gap record of it arrived since the previous check. The alert goes to the
retained MQTT topic `exam/v1/alerts/{venue}/{camera}`, to the optional webhook and to the log; when footage
flows again (or the part ends) a `cleared` message follows and the retained alert is removed (empty payload).

`cameras_in_alert` is the decision, pure; `AlertLoop` gathers the facts from the database and acts.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from exam_contract.canonical import format_time

from .batches import room_cameras
from .models import ExamBatchPart, SegmentRecord

log = logging.getLogger(__name__)

ALERT_TOPIC = "exam/v1/alerts/{venue}/{camera}"
REASON_NO_SEGMENT = "no_segment"
DEFAULT_SEGMENT_SECONDS = 60.0
WEBHOOK_TIMEOUT = 5.0


@dataclass(frozen=True)
class CameraActivity:
    """What the collector knows about one camera of a running part's room."""

    venue: str
    room: str
    camera: str
    batch_id: str
    part: str
    last_segment_arrival: datetime | None   # collector time the newest segment was stored
    segment_seconds: float                  # the camera's segment length
    newest_gap_cause: str | None = None     # the newest record is a gap record with this cause
    new_gap_cause: str | None = None        # a gap record arrived since the previous check


@dataclass(frozen=True)
class CameraAlert:
    venue: str
    room: str
    camera: str
    batch_id: str
    part: str
    reason: str                             # no_segment, or the cause of a gap record
    last_segment_arrival: datetime | None

    @property
    def key(self) -> tuple[str, str]:
        return self.venue, self.camera


def cameras_in_alert(activity: Sequence[CameraActivity], now: datetime, factor: float = 2.0,
                     check_interval: float = 0.0) -> list[CameraAlert]:
    """Cameras in alert now. Checked every `check_interval` seconds, a silence is flagged up to one interval
    before it reaches `factor` × the segment length, so the alert is never later than that (2 min for 60 s
    segments), however the silence falls between two checks."""
    out: list[CameraAlert] = []
    for a in activity:
        reason: str | None = a.new_gap_cause or a.newest_gap_cause
        allowed = timedelta(seconds=max(0.0, factor * a.segment_seconds - check_interval))
        if reason is None and (a.last_segment_arrival is None or now - a.last_segment_arrival > allowed):
            reason = REASON_NO_SEGMENT
        if reason is not None:
            out.append(CameraAlert(a.venue, a.room, a.camera, a.batch_id, a.part, reason, a.last_segment_arrival))
    return out


def alert_payload(alert: CameraAlert, state: str, now: datetime) -> bytes:
    body = {"state": state, "venue": alert.venue, "room": alert.room, "camera": alert.camera,
            "batch_id": alert.batch_id, "part": alert.part, "reason": alert.reason, "at": format_time(now),
            "last_segment_arrival": format_time(alert.last_segment_arrival) if alert.last_segment_arrival else None}
    return json.dumps(body, ensure_ascii=False, sort_keys=True).encode("utf-8")


def gather(session: Session, now: datetime, gap_watermark: int) -> list[CameraActivity]:
    """Activity of every camera of every room with a part running now. A room shared by two running parts
    is reported once, under the part that started first."""
    parts = session.scalars(select(ExamBatchPart).where(ExamBatchPart.start_at <= now, ExamBatchPart.end_at > now)
                            .order_by(ExamBatchPart.start_at, ExamBatchPart.batch_id)).all()
    out: list[CameraActivity] = []
    seen: set[tuple[str, str]] = set()
    for part in parts:
        for camera in room_cameras(session, part.venue, part.room):
            if (part.venue, camera) in seen:
                continue
            seen.add((part.venue, camera))
            base = select(SegmentRecord).where(SegmentRecord.venue == part.venue, SegmentRecord.camera == camera)
            newest = session.scalars(base.order_by(SegmentRecord.seq.desc()).limit(1)).first()
            if newest is not None and newest.room != part.room:
                continue  # the camera has moved to another room
            recent = session.execute(
                select(SegmentRecord.stored_at, SegmentRecord.duration).where(
                    SegmentRecord.venue == part.venue, SegmentRecord.camera == camera, SegmentRecord.kind == "segment")
                .order_by(SegmentRecord.seq.desc()).limit(5)).all()
            new_gap = session.scalars(base.where(SegmentRecord.kind == "gap", SegmentRecord.id > gap_watermark,
                                                 SegmentRecord.end_at > part.start_at)
                                      .order_by(SegmentRecord.id.desc()).limit(1)).first()
            out.append(CameraActivity(
                part.venue, part.room, camera, part.batch_id, part.part,
                max((r.stored_at for r in recent), default=None),
                max((r.duration for r in recent), default=DEFAULT_SEGMENT_SECONDS) or DEFAULT_SEGMENT_SECONDS,
                _cause(newest) if newest is not None and newest.kind == "gap" else None,
                _cause(new_gap) if new_gap is not None else None))
    return out


def _cause(record: SegmentRecord) -> str:
    try:
        return json.loads(record.manifest).get("cause") or "unknown"
    except ValueError:
        return "unknown"


class AlertLoop:
    """Checks running parts every `interval` seconds and raises or clears alerts."""

    def __init__(self, sessions: sessionmaker[Session], publish: Callable[[str, bytes, bool], object],
                 webhook_url: str | None = None, interval: float = 5.0, factor: float = 2.0,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        self.sessions = sessions
        self.publish = publish
        self.webhook_url = webhook_url
        self.interval = interval
        self.factor = factor
        self.clock = clock
        self.active: dict[tuple[str, str], CameraAlert] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watermark: int | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # a failed check (database away) must not end the loop
                log.exception("alert check failed; retrying in %.0f s", self.interval)

    def check(self) -> list[CameraAlert]:
        """One pass: raise new alerts, clear the ones that no longer hold. Returns the alerts now active."""
        now = self.clock()
        with self.sessions() as session:
            top = session.scalar(select(func.max(SegmentRecord.id))) or 0
            if self._watermark is None:
                self._watermark = top  # gap records stored before the loop started are not news
            activity = gather(session, now, self._watermark)
        self._watermark = max(self._watermark, top)
        current = {a.key: a for a in cameras_in_alert(activity, now, self.factor, self.interval)}
        for key, alert in current.items():
            previous = self.active.get(key)
            if previous is None or previous.reason != alert.reason:
                log.warning("ALERT camera %s/%s in room %s (batch %s %s): %s; last segment arrived %s",
                            alert.venue, alert.camera, alert.room, alert.batch_id, alert.part, alert.reason,
                            format_time(alert.last_segment_arrival) if alert.last_segment_arrival else "never")
                self._send(alert, "alert", now)
        for key, alert in list(self.active.items()):
            if key not in current:
                log.info("alert cleared: camera %s/%s delivers again (or part %s %s ended)", alert.venue,
                         alert.camera, alert.batch_id, alert.part)
                self._send(alert, "cleared", now)
        self.active = current
        return list(current.values())

    def _send(self, alert: CameraAlert, state: str, now: datetime) -> None:
        topic = ALERT_TOPIC.format(venue=alert.venue, camera=alert.camera)
        payload = alert_payload(alert, state, now)
        try:
            if state == "alert":
                self.publish(topic, payload, True)
            else:
                self.publish(topic, payload, False)
                self.publish(topic, b"", True)  # removes the retained alert
        except Exception:  # the webhook and the log still get it
            log.exception("camera %s/%s: could not publish %s to %s", alert.venue, alert.camera, state, topic)
        if self.webhook_url:
            request = urllib.request.Request(self.webhook_url, data=payload, method="POST",
                                             headers={"Content-Type": "application/json; charset=utf-8"})
            try:
                with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT) as response:
                    response.read()
            except (urllib.error.URLError, OSError) as exc:
                log.warning("camera %s/%s: webhook %s failed: %s", alert.venue, alert.camera, self.webhook_url, exc)

"""Publishing each agent's schedule (exam_contract.schedule): the windows of its venue's exam batches, so that the
agent uploads that footage first (docs/protocol.md, Schedule).

`agent_windows` is the pure computation; `ScheduleLoop` reads the database, and publishes (retained) a schedule
whenever an agent's windows changed since it last published them, and every agent's once at start.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from exam_contract.identifiers import is_identifier
from exam_contract.schedule import (MAX_SCHEDULE_BYTES, MAX_SCHEDULE_WINDOWS, MAX_WINDOW_ROOMS, Schedule,
                                    ScheduleWindow, is_batch_id)
from exam_contract.topics import schedule_topic

from .loops import BackgroundLoop
from .models import Agent, ExamBatchPart

log = logging.getLogger(__name__)
UTC = timezone.utc

SCHEDULE_INTERVAL_SECONDS = 45.0
LOOK_BACK = timedelta(days=1)
LOOK_AHEAD = timedelta(days=7)


@dataclass(frozen=True)
class PartSpan:
    """One batch part as the schedule needs it."""

    batch: str
    venue: str
    room: str
    start: datetime
    end: datetime


@dataclass(frozen=True)
class Horizon:
    """Which windows a schedule names, and how they are widened."""

    pre_margin: timedelta
    post_margin: timedelta
    look_back: timedelta = LOOK_BACK
    look_ahead: timedelta = LOOK_AHEAD


def agent_windows(parts: Iterable[PartSpan], venue: str, now: datetime, horizon: Horizon
                  ) -> tuple[ScheduleWindow, ...]:
    """The windows of the venue's batch parts that, widened by the margins, overlap [now - look_back,
    now + look_ahead]: one window per batch and (widened) time span, naming the rooms of the parts in it.
    Rooms that are not valid ids (no agent can have a camera there) are left out; at most
    MAX_SCHEDULE_WINDOWS windows, the oldest."""
    lo, hi = now - horizon.look_back, now + horizon.look_ahead
    rooms: dict[tuple[str, datetime, datetime], set[str]] = defaultdict(set)
    for part in parts:
        start, end = part.start - horizon.pre_margin, part.end + horizon.post_margin
        if part.venue != venue or not (start < hi and end > lo) or not start < end:
            continue
        if not is_identifier(part.room) or not is_batch_id(part.batch):
            log.debug("batch %s room %r cannot be named in a schedule; left out", part.batch, part.room)
            continue
        rooms[(part.batch, start, end)].add(part.room)
    windows = sorted(ScheduleWindow.make(batch, start, end, sorted(names)[:MAX_WINDOW_ROOMS])
                     for (batch, start, end), names in rooms.items())
    return tuple(windows[:MAX_SCHEDULE_WINDOWS])


def fitting_schedule(agent: str, now: datetime, windows: tuple[ScheduleWindow, ...]) -> Schedule:
    """The schedule, its newest windows left out while its encoding exceeds MAX_SCHEDULE_BYTES."""
    schedule = Schedule.make(agent, now, windows)
    while len(schedule.encode()) > MAX_SCHEDULE_BYTES and schedule.windows:
        count = len(schedule.windows)
        schedule = Schedule.make(agent, now, schedule.windows[:min(count - 1, count * 9 // 10)])
    return schedule


def enrolled_agents(session: Session) -> dict[str, str]:
    """Agent id -> venue of every enrolled agent not revoked."""
    return {a.id: a.venue for a in session.scalars(select(Agent).where(Agent.revoked_at.is_(None)))}


def parts_near(session: Session, venues: Iterable[str], now: datetime, horizon: Horizon) -> list[PartSpan]:
    venues = sorted(set(venues))
    if not venues:
        return []
    rows = session.scalars(select(ExamBatchPart).where(
        ExamBatchPart.venue.in_(venues),
        ExamBatchPart.start_at < now + horizon.look_ahead + horizon.pre_margin,
        ExamBatchPart.end_at > now - horizon.look_back - horizon.post_margin))
    return [PartSpan(p.batch_id, p.venue, p.room, p.start_at, p.end_at) for p in rows]


class ScheduleLoop(BackgroundLoop):
    """Every `interval` seconds, computes each enrolled agent's windows and publishes its schedule (retained,
    QoS 1) when they changed since its last publish; every agent's once at start. An agent revoked or removed
    after a publish has its retained schedule cleared. `publish(topic, payload)` returns whether the client
    took the message; one it refused is tried again at the next check."""

    def __init__(self, sessions: sessionmaker[Session], horizon: Horizon,
                 publish: Callable[[str, bytes], bool], interval: float = SCHEDULE_INTERVAL_SECONDS,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.sessions = sessions
        self.horizon = horizon
        self.publish = publish
        self.interval = interval
        self.clock = clock
        self._published: dict[str, bytes] = {}    # agent -> the windows it was last sent (Schedule.windows_bytes)
        super().__init__("schedule")

    def tick(self) -> int:
        """One check; returns how many schedules were published."""
        now = self.clock()
        with self.sessions() as session:
            agents = enrolled_agents(session)
            parts = parts_near(session, agents.values(), now, self.horizon)
        by_venue: dict[str, list[PartSpan]] = defaultdict(list)
        for part in parts:
            by_venue[part.venue].append(part)
        sent = 0
        for agent, venue in sorted(agents.items()):
            if not is_identifier(agent):
                continue
            schedule = fitting_schedule(agent, now, agent_windows(by_venue[venue], venue, now, self.horizon))
            key = schedule.windows_bytes()
            if self._published.get(agent) == key:
                continue
            if self.publish(schedule_topic(agent), schedule.encode()):
                self._published[agent] = key
                sent += 1
                log.info("schedule for agent %s published: %d window(s)", agent, len(schedule.windows))
        for agent in sorted(set(self._published) - set(agents)):
            if self.publish(schedule_topic(agent), b""):   # an empty retained message clears it
                del self._published[agent]
                log.info("schedule for agent %s cleared (revoked or removed)", agent)
        return sent

    def _tick(self) -> None:
        try:
            self.tick()
        except Exception:  # a failed check must not stop ingest; the next one retries
            log.exception("publishing schedules failed")

    def _run(self) -> None:
        self._tick()
        while not self._stop.wait(self.interval):
            self._tick()

"""The retention decision: pure, no I/O, no clock, no database; `exam-retention enforce` feeds it facts.
See docs/design/retention.md (the keep rule); for operators: docs/retention.md."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

# The calendar and hold-scope rules live in the collector, which uses them for the storage's locks and legal
# holds too (and may not import this package); re-exported here as part of the policy.
from collector.keep import SHANGHAI, HoldFacts, HoldWindow, add_calendar_years, hold_covers, keep_floor

__all__ = ["MIN_UNLINKED_DAYS", "SHANGHAI", "BatchLink", "Decision", "Floor", "HoldFacts", "HoldWindow",
           "PolicyError", "RetentionPolicy", "SegmentFacts", "add_calendar_years", "decide",
           "earliest_possible_floor", "holds_on", "keep_until", "plan", "retention_floor", "shanghai_text"]

MIN_UNLINKED_DAYS = 365


class PolicyError(ValueError):
    """The retention settings would allow deleting footage before the one-year floor."""


@dataclass(frozen=True)
class RetentionPolicy:
    margin_days: int = 7
    unlinked_retention_days: int | None = None

    def check(self) -> None:
        if self.margin_days < 0:
            raise PolicyError(f"[retention] margin_days = {self.margin_days} is negative: set 0 or more (default 7)")
        if self.unlinked_retention_days is not None and self.unlinked_retention_days < MIN_UNLINKED_DAYS:
            raise PolicyError(
                f"[retention] unlinked_retention_days = {self.unlinked_retention_days} is below one year: footage "
                "not linked to a batch may be an exam whose batch is not imported yet, and Article 11 keeps exam "
                f"footage one year or more; set it to {MIN_UNLINKED_DAYS} or more, or remove it")


@dataclass(frozen=True)
class BatchLink:
    batch_id: str
    end: datetime          # end of the linked batch part (UTC)


@dataclass(frozen=True)
class SegmentFacts:
    id: int
    venue: str
    room: str
    camera: str
    start: datetime
    end: datetime
    size: int = 0
    links: tuple[BatchLink, ...] = ()
    # Arrival at the collector (its own clock). None only for facts built by hand: then `end` alone counts.
    stored_at: datetime | None = None

    @property
    def basis(self) -> datetime:
        """The moment the base floor counts from: the later of the agent's `end` and the arrival."""
        return self.end if self.stored_at is None else max(self.end, self.stored_at)

    @property
    def counted_from_arrival(self) -> bool:
        return self.stored_at is not None and self.stored_at > self.end


@dataclass(frozen=True)
class Decision:
    segment_id: int
    delete: bool
    keep_until: datetime
    rule: str                      # "linked" or "unlinked"
    reason: str
    holds: tuple[int, ...] = ()


@dataclass(frozen=True)
class Floor:
    until: datetime        # the earliest moment the segment may be deleted
    rule: str              # "linked" or "unlinked"
    base: bool             # True when the base floor (from `SegmentFacts.basis`) sets `until`


def retention_floor(segment: SegmentFacts, policy: RetentionPolicy) -> Floor:
    """The earliest moment the segment may be deleted, which rule set it, and whether the base floor (one
    calendar year plus margin after the later of end and arrival) is the one that binds."""
    basis = segment.basis
    base = keep_floor(basis, policy.margin_days)
    floor = base
    if segment.links:
        for link in segment.links:
            floor = max(floor, keep_floor(link.end, policy.margin_days))
        return Floor(floor, "linked", floor == base)
    if policy.unlinked_retention_days is not None:
        floor = max(floor, basis + timedelta(days=policy.unlinked_retention_days))
    return Floor(floor, "unlinked", floor == base)


def keep_until(segment: SegmentFacts, policy: RetentionPolicy) -> tuple[datetime, str]:
    """The earliest moment the segment may be deleted, and which rule set it."""
    floor = retention_floor(segment, policy)
    return floor.until, floor.rule


def holds_on(segment: SegmentFacts, holds: Iterable[HoldFacts]) -> tuple[int, ...]:
    batches = {link.batch_id for link in segment.links}
    return tuple(hold.id for hold in holds
                 if hold_covers(hold, venue=segment.venue, room=segment.room, camera=segment.camera,
                                start=segment.start, end=segment.end, batches=batches))


def shanghai_text(moment: datetime) -> str:
    return moment.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M:%S+08:00")


def decide(segment: SegmentFacts, holds: Sequence[HoldFacts], now: datetime, policy: RetentionPolicy) -> Decision:
    if now.tzinfo is None:
        raise ValueError("naive `now`: attach a timezone (UTC inside)")
    floor = retention_floor(segment, policy)
    until, rule = floor.until, floor.rule
    if rule == "linked":
        latest = max(segment.links, key=lambda link: link.end)
        basis = f"linked to batch {latest.batch_id} (part ended {shanghai_text(latest.end)})"
    else:
        basis = "not linked to any batch"
    if floor.base and segment.counted_from_arrival:
        assert segment.stored_at is not None
        basis += (f"; kept from its arrival at the collector ({shanghai_text(segment.stored_at)}): its end time "
                  f"({shanghai_text(segment.end)}) is earlier than its arrival")
    held = holds_on(segment, holds)
    if held:
        return Decision(segment.id, False, until, rule,
                        f"held by hold {', '.join(str(h) for h in held)}; {basis}", held)
    if now < until:
        return Decision(segment.id, False, until, rule, f"keep until {shanghai_text(until)}: {basis}")
    return Decision(segment.id, True, until, rule, f"expired {shanghai_text(until)}: {basis}")


def plan(segments: Iterable[SegmentFacts], holds: Sequence[HoldFacts], now: datetime,
         policy: RetentionPolicy) -> list[Decision]:
    policy.check()
    return [decide(segment, holds, now, policy) for segment in segments]


def earliest_possible_floor(now: datetime) -> datetime:
    """Segments that ended or arrived after this cannot be due: every floor is at least one calendar year
    (>= 365 days) after both the end and the arrival."""
    return now - timedelta(days=365)

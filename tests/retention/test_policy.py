"""The pure retention policy: property tests over random segments, batches, holds and clocks; calendar cases."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings, strategies as st

from retention.policy import (SHANGHAI, BatchLink, HoldFacts, HoldWindow, PolicyError, RetentionPolicy,
                              SegmentFacts, add_calendar_years, decide, earliest_possible_floor, keep_until, plan)

UTC = timezone.utc
T0 = datetime(2023, 1, 1, tzinfo=UTC)
moments = st.integers(min_value=0, max_value=5 * 366 * 86400).map(lambda s: T0 + timedelta(seconds=s))
CAMERAS = ["c1", "c2"]
VENUES = ["V1", "V2"]


@st.composite
def segments(draw, seg_id: int = 1) -> SegmentFacts:
    start = draw(moments)
    end = start + timedelta(seconds=draw(st.integers(min_value=1, max_value=600)))
    links = tuple(BatchLink(f"B{draw(st.integers(0, 3))}", end + timedelta(seconds=draw(st.integers(-3600, 86400 * 3))))
                  for _ in range(draw(st.integers(0, 2))))
    # Arrival: usually seconds to days after the end; any moment at all when the agent's clock is wrong.
    stored_at = draw(st.one_of(st.integers(0, 3 * 86400).map(lambda s: end + timedelta(seconds=s)), moments))
    return SegmentFacts(id=seg_id, venue=draw(st.sampled_from(VENUES)), room=draw(st.sampled_from(["T1", "T2"])),
                        camera=draw(st.sampled_from(CAMERAS)), start=start, end=end, size=1, links=links,
                        stored_at=stored_at)


@st.composite
def holds(draw, hold_id: int) -> HoldFacts:
    kind = draw(st.sampled_from(["batch", "camera", "camera_open", "unresolved"]))
    if kind == "batch":
        start = draw(moments)
        window = HoldWindow(draw(st.sampled_from(VENUES)), draw(st.sampled_from([None, "T1", "T2"])), start,
                            start + timedelta(hours=draw(st.integers(1, 5))))
        return HoldFacts(hold_id, batch_id=f"B{draw(st.integers(0, 3))}", windows=(window,))
    if kind == "unresolved":
        return HoldFacts(hold_id, batch_id="B-unknown", resolved=False)
    lo = draw(moments)
    hi = lo + timedelta(hours=draw(st.integers(0, 48)))
    open_ended = kind == "camera_open"
    return HoldFacts(hold_id, venue=draw(st.sampled_from([None, *VENUES])), camera=draw(st.sampled_from(CAMERAS)),
                     start=None if open_ended and draw(st.booleans()) else lo, end=None if open_ended else hi)


policies = st.builds(RetentionPolicy, margin_days=st.integers(0, 60),
                     unlinked_retention_days=st.one_of(st.none(), st.integers(365, 1000)))


def truly_held(seg: SegmentFacts, hold: HoldFacts) -> bool:
    """Independent restatement of "held" for the property (brute force over the definitions)."""
    if hold.batch_id is not None:
        if not hold.resolved or hold.batch_id in {l.batch_id for l in seg.links}:
            return True
        return any(w.venue == seg.venue and w.room in (None, seg.room) and seg.end >= w.start and seg.start <= w.end
                   for w in hold.windows)
    return (hold.camera == seg.camera and hold.venue in (None, seg.venue)
            and (hold.start is None or seg.end >= hold.start) and (hold.end is None or seg.start <= hold.end))


def plus_year(m: datetime) -> datetime:
    local = m.astimezone(SHANGHAI)
    try:
        moved = local.replace(year=local.year + 1)
    except ValueError:
        moved = local.replace(year=local.year + 1, month=3, day=1)
    return moved.astimezone(UTC)


def floor_of(seg: SegmentFacts, policy: RetentionPolicy) -> datetime:
    """Independent restatement of the floor: one calendar year in Shanghai wall time plus the margin, from the
    later of the end (agent's clock) and the arrival (collector's clock); batch parts; unlinked days."""
    margin = timedelta(days=policy.margin_days)
    basis = seg.end if seg.stored_at is None else max(seg.end, seg.stored_at)
    floors = [plus_year(basis) + margin] + [plus_year(l.end) + margin for l in seg.links]
    if not seg.links and policy.unlinked_retention_days:
        floors.append(basis + timedelta(days=policy.unlinked_retention_days))
    return max(floors)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), policy=policies, now=moments)
def test_never_deletes_before_floor_or_while_held(data, policy: RetentionPolicy, now: datetime) -> None:
    segs = [data.draw(segments(i)) for i in range(data.draw(st.integers(1, 6)))]
    hs = [data.draw(holds(100 + i)) for i in range(data.draw(st.integers(0, 3)))]
    decisions = plan(segs, hs, now, policy)
    assert [d.segment_id for d in decisions] == [s.id for s in segs]
    for seg, d in zip(segs, decisions):
        held = [h.id for h in hs if truly_held(seg, h)]
        floor = floor_of(seg, policy)
        assert d.keep_until == floor
        if d.delete:
            assert now >= floor, (seg, d)
            assert now >= seg.end + timedelta(days=365) and now >= seg.stored_at + timedelta(days=365)
            assert seg.end <= earliest_possible_floor(now) and seg.stored_at <= earliest_possible_floor(now)
            assert not held, (seg, hs, d)
        else:
            assert held or now < floor
        assert d.delete == (not held and now >= floor)


@settings(max_examples=200, deadline=None)
@given(seg=segments(), policy=policies, now=moments, back=st.integers(1, 400 * 86400))
def test_clock_going_backwards_never_deletes_more(seg: SegmentFacts, policy: RetentionPolicy, now: datetime,
                                                  back: int) -> None:
    """Deletion is monotone in time: an earlier clock can only keep more."""
    earlier = now - timedelta(seconds=back)
    if decide(seg, [], earlier, policy).delete:
        assert decide(seg, [], now, policy).delete


@settings(max_examples=400, deadline=None)
@given(seg=segments(), end=moments, stored_at=moments, now=moments, policy=policies)
def test_never_deletes_before_a_year_after_end_and_arrival(seg: SegmentFacts, end: datetime, stored_at: datetime,
                                                            now: datetime, policy: RetentionPolicy) -> None:
    """Whatever the agent's clock wrote as `end` and whenever the footage arrived: never deleted before one
    calendar year (plus margin) after the later of the two; a wrong agent clock never shortens a keep."""
    seg = replace(seg, start=end - (seg.end - seg.start), end=end, stored_at=stored_at)
    d = decide(seg, [], now, policy)
    assert d.keep_until >= add_calendar_years(max(end, stored_at)) + timedelta(days=policy.margin_days)
    if d.delete:
        assert now >= add_calendar_years(max(end, stored_at))
        assert now >= plus_year(max(end, stored_at)) + timedelta(days=policy.margin_days)
    if stored_at > end and d.keep_until == add_calendar_years(stored_at) + timedelta(days=policy.margin_days) \
            and d.keep_until > add_calendar_years(end) + timedelta(days=policy.margin_days):
        assert "kept from its arrival at the collector" in d.reason


def test_agent_clock_two_years_behind_is_kept_a_year_from_arrival() -> None:
    """An agent with a reset clock: the segment says it ended two years before it arrived. One second after
    arrival it is not deleted; it is kept one calendar year plus margin after its arrival."""
    stored_at = shanghai(2026, 12, 1, 10, 0)
    end = add_calendar_years(stored_at, -2)
    seg = SegmentFacts(1, "V1", "T1", "c1", end - timedelta(minutes=1), end, stored_at=stored_at)
    policy = RetentionPolicy(margin_days=7)
    d = decide(seg, [], stored_at + timedelta(seconds=1), policy)
    assert not d.delete
    assert d.keep_until == add_calendar_years(stored_at) + timedelta(days=7) == shanghai(2027, 12, 8, 10, 0)
    assert "kept from its arrival at the collector (2026-12-01 10:00:00+08:00)" in d.reason
    assert "its end time (2024-12-01 10:00:00+08:00) is earlier than its arrival" in d.reason
    assert not decide(seg, [], shanghai(2027, 12, 8, 9, 59), policy).delete
    assert decide(seg, [], shanghai(2027, 12, 8, 10, 0), policy).delete
    # Footage from the future (agent clock ahead): kept from its end, the later moment.
    ahead = SegmentFacts(2, "V1", "T1", "c1", shanghai(2099, 1, 1), shanghai(2099, 1, 1, 0, 1), stored_at=stored_at)
    assert keep_until(ahead, policy) == (shanghai(2100, 1, 8, 0, 1), "unlinked")
    assert "arrival" not in decide(ahead, [], stored_at, policy).reason


def shanghai(y: int, mo: int, d: int, h: int = 0, mi: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, tzinfo=SHANGHAI).astimezone(UTC)


def test_leap_day_plus_one_year_is_first_of_march() -> None:
    assert add_calendar_years(shanghai(2024, 2, 29, 10, 30)) == shanghai(2025, 3, 1, 10, 30)
    assert add_calendar_years(shanghai(2024, 2, 28, 23, 59)) == shanghai(2025, 2, 28, 23, 59)
    assert add_calendar_years(shanghai(2023, 3, 1)) == shanghai(2024, 3, 1)
    assert add_calendar_years(shanghai(2024, 2, 29), 4) == shanghai(2028, 2, 29)


def test_leap_day_segment_kept_until_first_of_march() -> None:
    end = shanghai(2024, 2, 29, 10, 0)
    seg = SegmentFacts(1, "V1", "T1", "c1", end - timedelta(minutes=1), end)
    policy = RetentionPolicy(margin_days=0)
    assert not decide(seg, [], shanghai(2025, 2, 28, 23, 59), policy).delete
    assert not decide(seg, [], shanghai(2025, 3, 1, 9, 59), policy).delete
    assert decide(seg, [], shanghai(2025, 3, 1, 10, 0), policy).delete


def test_year_end_in_shanghai_not_utc() -> None:
    """31 Dec 23:30 Shanghai is still 31 Dec 15:30 UTC: the year is counted on the Shanghai calendar."""
    end = shanghai(2025, 12, 31, 23, 30)
    seg = SegmentFacts(1, "V1", "T1", "c1", end - timedelta(minutes=5), end)
    until, rule = keep_until(seg, RetentionPolicy(margin_days=0))
    assert until == shanghai(2026, 12, 31, 23, 30) and rule == "unlinked"
    assert not decide(seg, [], shanghai(2026, 12, 31, 23, 29), RetentionPolicy(margin_days=0)).delete
    assert decide(seg, [], shanghai(2026, 12, 31, 23, 30), RetentionPolicy(margin_days=0)).delete
    # The default margin (7 days) applies to unlinked footage too.
    assert keep_until(seg, RetentionPolicy())[0] == shanghai(2027, 1, 7, 23, 30)


def test_linked_footage_waits_for_batch_end_plus_year_plus_margin() -> None:
    end = shanghai(2025, 6, 1, 9, 0)
    seg = SegmentFacts(1, "V1", "T1", "c1", end - timedelta(minutes=1), end,
                       links=(BatchLink("B1", shanghai(2025, 6, 1, 11, 0)),))
    policy = RetentionPolicy(margin_days=7)
    d = decide(seg, [], shanghai(2026, 6, 8, 10, 59), policy)
    assert not d.delete and d.rule == "linked" and "B1" in d.reason
    assert decide(seg, [], shanghai(2026, 6, 8, 11, 0), policy).delete


def test_clock_going_backwards_keeps_what_it_would_have_deleted() -> None:
    end = shanghai(2024, 5, 1)
    seg = SegmentFacts(1, "V1", "T1", "c1", end - timedelta(minutes=1), end)
    assert decide(seg, [], shanghai(2025, 5, 9), RetentionPolicy()).delete
    assert not decide(seg, [], shanghai(2025, 5, 7), RetentionPolicy()).delete


def test_hold_blocks_expired_footage_and_unresolved_batch_hold_blocks_all() -> None:
    end = shanghai(2020, 1, 1)
    seg = SegmentFacts(1, "V1", "T1", "c1", end - timedelta(minutes=1), end)
    now = shanghai(2026, 1, 1)
    assert decide(seg, [], now, RetentionPolicy()).delete
    camera_hold = HoldFacts(7, venue="V1", camera="c1", start=end - timedelta(hours=1), end=end + timedelta(hours=1))
    d = decide(seg, [camera_hold], now, RetentionPolicy())
    assert not d.delete and d.holds == (7,)
    other_venue = HoldFacts(8, venue="V2", camera="c1", start=None, end=None)
    assert decide(seg, [other_venue], now, RetentionPolicy()).delete
    assert decide(seg, [HoldFacts(9, batch_id="BX", resolved=False)], now, RetentionPolicy()).holds == (9,)


def test_policy_below_one_year_is_refused() -> None:
    with pytest.raises(PolicyError, match="unlinked_retention_days = 90"):
        plan([], [], T0, RetentionPolicy(unlinked_retention_days=90))
    plan([], [], T0, RetentionPolicy(unlinked_retention_days=365))

"""edge_agent.ratecap, pure: the cap in force under the Asia/Shanghai daily schedule, the token bucket's
arithmetic, the measured rate and the drain estimate. The clock is always passed in."""

from __future__ import annotations

from datetime import datetime, time, timedelta, timezone

import pytest

from edge_agent.ratecap import (CapSchedule, CapState, CapWindow, RateMeter, TokenBucket, drain_seconds,
                                overlapping, parse_hhmm)

UTC = timezone.utc
CHUNK = 256 * 1024
# 8000 kbit/s by day, unlimited 22:00-06:00 Shanghai (14:00-22:00 UTC), 2000 kbit/s 12:00-13:00 Shanghai.
NIGHT = CapWindow(time(22, 0), time(6, 0), 0)
NOON = CapWindow(time(12, 0), time(13, 0), 2000)
SCHEDULE = CapSchedule(8000, (NIGHT, NOON))


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(("instant", "kbps"), [
    ("2026-12-01T13:59:59", 8000),   # 21:59:59 Shanghai
    ("2026-12-01T14:00:00", 0),      # 22:00 Shanghai: the night window starts
    ("2026-12-01T15:59:00", 0),      # 23:59
    ("2026-12-01T16:00:00", 0),      # 00:00 next day: still in the window that wrapped past midnight
    ("2026-12-01T21:59:59", 0),      # 05:59:59
    ("2026-12-01T22:00:00", 8000),   # 06:00: the window ends (half open)
    ("2026-12-02T04:00:00", 2000),   # 12:00 Shanghai
    ("2026-12-02T05:00:00", 8000),   # 13:00 Shanghai
])
def test_cap_across_midnight_and_the_wrap(instant: str, kbps: int) -> None:
    assert SCHEDULE.kbps_at(utc(instant)) == kbps


def test_shanghai_has_no_dst_so_the_window_is_the_same_utc_hours_all_year() -> None:
    """22:00 Shanghai is 14:00 UTC in January, in July and on the days other zones change their clocks."""
    for day in ("2026-01-15", "2026-03-08", "2026-03-29", "2026-07-15", "2026-10-25", "2026-11-01"):
        assert SCHEDULE.kbps_at(utc(f"{day}T13:59:00")) == 8000
        assert SCHEDULE.kbps_at(utc(f"{day}T14:00:00")) == 0


def test_next_change_and_what_it_changes_to() -> None:
    assert SCHEDULE.at(utc("2026-12-01T10:00:00")) == CapState(8000, utc("2026-12-01T14:00:00"), 0)
    # inside the night window, across UTC midnight: it ends at 06:00 Shanghai
    assert SCHEDULE.at(utc("2026-12-01T16:30:00")) == CapState(0, utc("2026-12-01T22:00:00"), 8000)
    assert SCHEDULE.at(utc("2026-12-01T23:00:00")) == CapState(8000, utc("2026-12-02T04:00:00"), 2000)
    assert CapSchedule(8000).at(utc("2026-12-01T10:00:00")) == CapState(8000)
    # a window with the same cap as the rest of the day changes nothing
    assert CapSchedule(500, (CapWindow(time(1, 0), time(2, 0), 500),)).at(utc("2026-12-01T10:00:00")) == \
        CapState(500)


def test_windows_overlap_only_when_they_share_a_minute() -> None:
    assert overlapping([NIGHT, NOON]) is None
    assert overlapping([NIGHT, CapWindow(time(6, 0), time(8, 0), 1)]) is None   # end is exclusive
    assert overlapping([NIGHT, CapWindow(time(5, 59), time(8, 0), 1)]) == (0, 1)  # in the wrapped part
    assert overlapping([NOON, NIGHT, CapWindow(time(23, 0), time(23, 30), 1)]) == (1, 2)
    assert parse_hhmm("06:00") == time(6, 0) and parse_hhmm("23:59") == time(23, 59)
    assert parse_hhmm("24:00") is None and parse_hhmm("6:00") is None and parse_hhmm("06:60") is None


def test_bucket_arithmetic() -> None:
    bucket = TokenBucket(min_burst=CHUNK)
    kbps = 8000   # 1e6 bytes/s: the bucket holds one second, 1e6 bytes (more than a chunk)
    assert bucket.capacity(kbps) == 1_000_000
    assert bucket.take(600_000, 100.0, kbps) == 0              # a cap starting finds the bucket full
    assert bucket.take(300_000, 100.0, kbps) == 0              # 100_000 left
    assert bucket.take(300_000, 100.0, kbps) == pytest.approx(0.2)   # 200_000 short at 1e6/s
    assert bucket.delay(300_000, 100.1, kbps) == pytest.approx(0.1)  # waiting refills
    assert bucket.take(300_000, 100.2, kbps) == 0
    assert bucket.delay(1, 100.2, kbps) == pytest.approx(1e-6)  # empty now
    assert bucket.delay(1, 200.0, kbps) == 0 and bucket.take(1_000_000, 200.0, kbps) == 0  # full, never more


def test_burst_is_at_least_one_chunk_and_a_larger_message_goes_into_debt() -> None:
    bucket = TokenBucket(min_burst=CHUNK)
    kbps = 100    # 12_500 bytes/s, far less than a chunk in a second
    assert bucket.capacity(kbps) == CHUNK
    assert bucket.take(CHUNK, 0.0, kbps) == 0
    assert bucket.take(CHUNK, 0.0, kbps) == pytest.approx(CHUNK / 12_500)
    big = CHUNK + 1000   # more than the bucket holds: goes once it is full, leaving a debt
    assert bucket.take(big, CHUNK / 12_500, kbps) == 0
    assert bucket.delay(1, CHUNK / 12_500, kbps) == pytest.approx(1001 / 12_500)


def test_unlimited_never_waits_and_a_cap_change_at_a_window_edge() -> None:
    bucket = TokenBucket(min_burst=CHUNK)
    for step in range(100):
        assert bucket.take(10 * CHUNK, step * 0.001, 0) == 0
    # unlimited -> capped: a full bucket at the new cap
    assert bucket.take(CHUNK, 1.0, 2000) == 0
    assert bucket.delay(CHUNK, 1.0, 2000) == pytest.approx(CHUNK / 250_000)
    # capped at 2000 -> 8000 kbit/s half a second later: 0.5 s refilled at the old rate, then the new rate
    assert bucket.delay(CHUNK, 1.5, 8000) == pytest.approx((CHUNK - 125_000) / 1_000_000)
    # 8000 -> 100 kbit/s: the bucket shrinks to the new capacity (one chunk)
    assert bucket.take(CHUNK, 10.0, 100) == 0
    assert bucket.delay(CHUNK, 10.0, 100) == pytest.approx(CHUNK / 12_500)
    # the schedule gives the cap: at 06:00 Shanghai the night window ends and the wait begins
    before, after = utc("2026-12-01T21:59:59"), utc("2026-12-01T22:00:00")
    edge = TokenBucket(min_burst=CHUNK)
    assert edge.take(50 * CHUNK, 20.0, SCHEDULE.kbps_at(before)) == 0
    assert edge.take(4 * CHUNK, 21.0, SCHEDULE.kbps_at(after)) == 0     # the new cap's full bucket
    assert edge.take(CHUNK, 21.0, SCHEDULE.kbps_at(after)) == pytest.approx(
        (CHUNK - (1_000_000 - 4 * CHUNK)) / 1_000_000)


def test_meter_averages_over_the_last_minute() -> None:
    meter = RateMeter(started=0.0)
    assert meter.bytes_per_second(0.0) == 0
    meter.add(500_000, 0.2)
    meter.add(500_000, 1.7)
    assert meter.bytes_per_second(2.0) == pytest.approx(500_000)    # since the start, not over 60 s
    for second in range(2, 120):
        meter.add(100_000, second + 0.5)
    assert meter.bytes_per_second(120.0) == pytest.approx(100_000, rel=0.02)  # only the last minute counts
    assert meter.bytes_per_second(500.0) == 0


def test_drain_estimate() -> None:
    assert drain_seconds(0, 0, 0) == 0
    assert drain_seconds(1_000_000, 250_000, 8000) == 4           # the measured rate when there is one
    assert drain_seconds(1_000_000, 0, 2000) == 4                 # else the cap
    assert drain_seconds(1_000_000, 0, 0) is None                 # neither: unknown
    assert timedelta(seconds=drain_seconds(3_600_000_000, 1_000_000, 0) or 0) == timedelta(hours=1)

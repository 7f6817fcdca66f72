"""The collector's admission rules, pure: limits, plausibility, clock suspicion, throttled notes."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from collector.admission import (AgentLoad, IngestLimits, NoteThrottle, Refusal, check_agent_load, check_init_shape,
                                 check_plausible, clock_suspicion)
from exam_contract import protocol as P
from exam_contract.manifest import ClockInfo
from exam_contract.protocol import InitMessage
from tests.contract.factories import gap, segment

LIMITS = IngestLimits()


def _init(manifest, chunk_size=256 * 1024, chunks=None) -> InitMessage:
    from exam_contract.chunks import chunk_count

    return InitMessage(manifest.to_dict(), "sig", chunk_size,
                       chunks if chunks is not None else chunk_count(manifest.size, chunk_size))


def _code(call) -> str:
    with pytest.raises(Refusal) as refused:
        call()
    return refused.value.code


def test_shape_limits() -> None:
    ok = segment()
    check_init_shape(_init(ok), ok, LIMITS)
    big = replace(ok, size=LIMITS.max_segment_bytes + 1)
    assert _code(lambda: check_init_shape(_init(big), big, LIMITS)) == P.REJECT_TOO_LARGE
    assert _code(lambda: check_init_shape(_init(ok, chunk_size=1), ok, LIMITS)) == P.REJECT_BAD_CHUNK_SIZE
    assert _code(lambda: check_init_shape(_init(ok, chunk_size=2 * 1024 * 1024), ok, LIMITS)) == P.REJECT_BAD_CHUNK_SIZE
    check_init_shape(_init(gap(), chunk_size=1), gap(), LIMITS)  # a gap carries no chunks: any size is moot


@pytest.mark.parametrize("changes, code", [
    ({"size": 0}, P.REJECT_EMPTY_SEGMENT),
    ({"duration": 0.0}, P.REJECT_IMPLAUSIBLE),
    ({"duration": 3601.0}, P.REJECT_IMPLAUSIBLE),
    ({"duration": 4.0}, P.REJECT_IMPLAUSIBLE),            # start-to-end span is 10 s
])
def test_implausible_segments(changes, code) -> None:
    manifest = replace(segment(), **changes)
    assert _code(lambda: check_plausible(manifest, LIMITS)) == code


def test_plausible_records_pass() -> None:
    check_plausible(segment(), LIMITS)
    check_plausible(replace(segment(), duration=9.2), LIMITS)   # a keyframe-cut segment, a little short
    check_plausible(gap(), LIMITS)


def test_gap_records_carry_no_bytes_and_end_within_400_days() -> None:
    assert _code(lambda: check_plausible(replace(gap(), size=10), LIMITS)) == P.REJECT_IMPLAUSIBLE
    long_gap = replace(gap(), end=gap().start + timedelta(days=401))
    assert _code(lambda: check_plausible(long_gap, LIMITS)) == P.REJECT_IMPLAUSIBLE


def test_agent_quotas() -> None:
    message = _init(segment())
    check_agent_load(message, AgentLoad(LIMITS.max_open_transfers - 1, 0), LIMITS)
    assert _code(lambda: check_agent_load(message, AgentLoad(LIMITS.max_open_transfers, 0), LIMITS)) == \
        P.REJECT_TOO_MANY_TRANSFERS
    assert _code(lambda: check_agent_load(message, AgentLoad(0, LIMITS.max_staging_bytes), LIMITS)) == \
        P.REJECT_STAGING_FULL


def test_clock_suspicion() -> None:
    m = segment()
    assert clock_suspicion(m, m.end + timedelta(seconds=3), LIMITS) is None
    assert clock_suspicion(m, m.end + timedelta(days=29), LIMITS) is None           # a long backlog is normal
    assert "behind" in clock_suspicion(m, m.end + timedelta(days=31), LIMITS)
    assert "ahead" in clock_suspicion(m, m.end - timedelta(minutes=11), LIMITS)
    off = replace(m, clock=ClockInfo(offset_ms=-90_000.0, synced=False))
    assert "-90 s" in clock_suspicion(off, m.end + timedelta(seconds=3), LIMITS)


def test_throttle_counts_what_it_holds_back() -> None:
    now = [0.0]
    throttle = NoteThrottle(per_minute=2, clock=lambda: now[0])
    assert [throttle.admit("a") for _ in range(5)] == [(True, 0), (True, 0), (False, 0), (False, 0), (False, 0)]
    assert throttle.admit("b") == (True, 0)     # per key
    now[0] = 61.0
    assert throttle.admit("a") == (True, 3)      # the next note reports the three held back
    assert throttle.admit("a") == (True, 0)

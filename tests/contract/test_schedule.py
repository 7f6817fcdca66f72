"""The schedule message: canonical encoding, strict bounded decoding, and its topic."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from exam_contract.schedule import (MAX_SCHEDULE_WINDOWS, MAX_WINDOW_ROOMS, Schedule, ScheduleError,
                                    ScheduleWindow)
from exam_contract.topics import schedule_topic

T0 = datetime(2026, 11, 26, 0, 45, tzinfo=timezone.utc)
ACL = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "acl"


def window(batch: str = "B-1", start: datetime = T0, hours: float = 2, rooms=("T101",)) -> ScheduleWindow:
    return ScheduleWindow.make(batch, start, start + timedelta(hours=hours), list(rooms))


def schedule(*windows: ScheduleWindow) -> Schedule:
    return Schedule.make("jl2201001-01-a", T0 - timedelta(hours=1), list(windows))


def test_topic_and_the_deploy_acl_lets_only_collectors_write_it() -> None:
    assert schedule_topic("jl2201001-01-a") == "exam/v1/jl2201001-01-a/schedule"
    acl = ACL.read_text()
    assert "pattern read exam/v1/%u/schedule" in acl
    assert "pattern write exam/v1/%u/schedule" not in acl and "readwrite exam/v1/%u/schedule" not in acl
    assert acl.count("topic write exam/v1/+/schedule") == 2   # collector-1 and collector-2


def test_round_trip_is_canonical_and_sorted() -> None:
    late = window("B-2", T0 + timedelta(days=1), rooms=("P201", "T101", "P201"))
    early = window("批次-1", T0, rooms=("T102",))
    sent = schedule(late, early)
    assert sent.windows == (early, late)               # oldest window first
    assert late.rooms == ("P201", "T101")              # sorted, unique
    payload = sent.encode()
    raw = json.loads(payload)
    assert payload == json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert raw == {"v": 1, "agent": "jl2201001-01-a", "generated_at": "2026-11-25T23:45:00.000Z",
                   "windows": [{"batch": "批次-1", "start": "2026-11-26T00:45:00.000Z",
                                "end": "2026-11-26T02:45:00.000Z", "rooms": ["T102"]},
                               {"batch": "B-2", "start": "2026-11-27T00:45:00.000Z",
                                "end": "2026-11-27T02:45:00.000Z", "rooms": ["P201", "T101"]}]}
    assert Schedule.decode(payload) == sent
    assert Schedule.decode(schedule().encode()).windows == ()
    # generated_at changes, the windows do not: what a collector compares
    assert Schedule.make(sent.agent, T0, list(sent.windows)).windows_bytes() == sent.windows_bytes()


def _payload(drop: str | None = None, in_window: dict | None = None, **changes) -> bytes:
    """A valid payload with `changes` at the top, `in_window` in its window, and the key `drop` removed."""
    raw = json.loads(schedule(window()).encode())
    raw["windows"][0].update(in_window or {})
    raw.update(changes)
    if drop:
        raw.pop(drop)
    return json.dumps(raw).encode()


@pytest.mark.parametrize("payload, names", [
    (b"not json", "malformed"),
    (b"[]", "exactly"),
    (b"\xff", "malformed"),
    (_payload(v=2), "schedule.v"),
    (_payload(v=True), "schedule.v"),
    (_payload(agent="../x"), "schedule.agent"),
    (_payload(agent="a" * 65), "schedule.agent"),
    (_payload(generated_at="2026-11-26 00:00"), "generated_at"),
    (_payload(extra=1), "exactly"),
    (_payload(drop="windows"), "exactly"),
    (_payload(windows={}), "schedule.windows"),
    (_payload(in_window={"start": "2026-11-26T02:45:00.000Z"}), "start must be before end"),
    (_payload(in_window={"end": "2026-11-30T02:45:00.000Z"}), "longer than"),
    (_payload(in_window={"rooms": []}), "rooms"),
    (_payload(in_window={"rooms": ["T101/#"]}), "not a valid id"),
    (_payload(in_window={"rooms": ["T102", "T101"]}), "sorted"),
    (_payload(in_window={"rooms": "T101"}), "rooms"),
    (_payload(in_window={"rooms": [1]}), "rooms"),
    (_payload(in_window={"rooms": [f"R{i}" for i in range(MAX_WINDOW_ROOMS + 1)]}), "rooms"),
    (_payload(in_window={"batch": ""}), "batch"),
    (_payload(in_window={"batch": "B\n1"}), "batch"),
    (_payload(in_window={"batch": "B" * 129}), "batch"),
    (_payload(in_window={"batch": 7}), "batch"),
    (_payload(in_window={"start": 0}), "start"),
    (_payload(in_window={"end": "yesterday"}), "end"),
    (_payload(in_window={"other": 1}), "exactly"),
])
def test_decode_refuses_what_is_not_protocol(payload: bytes, names: str) -> None:
    with pytest.raises(ScheduleError, match=names):
        Schedule.decode(payload)


def test_bounds_on_count_order_and_size() -> None:
    many = [window(f"B-{i}", T0 + timedelta(minutes=i)) for i in range(MAX_SCHEDULE_WINDOWS + 1)]
    with pytest.raises(ScheduleError, match="more than 2000"):
        schedule(*many)
    raw = json.loads(schedule(*many[:2]).encode())
    raw["windows"].reverse()
    with pytest.raises(ScheduleError, match="sorted by start"):
        Schedule.decode(json.dumps(raw).encode())
    raw["windows"] = [raw["windows"][0]] * 2
    with pytest.raises(ScheduleError, match="unique"):
        Schedule.decode(json.dumps(raw).encode())
    with pytest.raises(ScheduleError, match="larger than"):
        Schedule.decode(b" " * (512 * 1024))
    # the largest schedule a collector may send still fits
    big = schedule(*many[:MAX_SCHEDULE_WINDOWS])
    assert Schedule.decode(big.encode()) == big
    with pytest.raises(ScheduleError, match="naive"):
        ScheduleWindow.make("B", datetime(2026, 1, 1), datetime(2026, 1, 2), ["T101"])

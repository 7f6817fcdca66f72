"""The batch-first upload order (edge_agent/upload_order.py): pure, with an injected clock."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edge_agent.config import parse_config
from edge_agent.upload_order import Candidate, UploadOrder, batch_first, window_index
from exam_contract.schedule import ScheduleWindow
from exam_contract.tomlconfig import ConfigError

T0 = datetime(2026, 11, 26, 0, 0, tzinfo=timezone.utc)
MINUTE = timedelta(minutes=1)


def rec(rowid: int, room: str, start_min: float, length_min: float = 1) -> Candidate:
    start = T0 + start_min * MINUTE
    return Candidate(rowid, room, start, start + length_min * MINUTE)


def win(batch: str, start_min: float, end_min: float, *rooms: str) -> ScheduleWindow:
    return ScheduleWindow.make(batch, T0 + start_min * MINUTE, T0 + end_min * MINUTE, list(rooms))


class Clock:
    def __init__(self) -> None:
        self.now = T0 + timedelta(days=1)

    def __call__(self) -> datetime:
        return self.now


def test_window_footage_needs_the_room_and_the_time_and_goes_oldest_window_first() -> None:
    early, late = win("B-1", 10, 20, "T101"), win("B-2", 100, 200, "T101", "P201")
    pending = [
        rec(1, "T101", 0),      # T101 before any window
        rec(2, "P201", 15),     # in B-1's time, but not in its rooms
        rec(3, "T101", 150),    # B-2
        rec(4, "P201", 120),    # B-2, older than 3 although journaled later
        rec(5, "T101", 19.5),   # B-1: overlaps its last half minute
        rec(6, "T101", 9.5),    # B-1: ends inside it
        rec(9, "T101", 9),      # ends at B-1's start: not in it
        rec(7, "T101", 20),     # starts at B-1's end: not in it
        rec(8, "T102", 150),    # another room
    ]
    first, rest = batch_first(pending, (early, late))
    assert [c.id for c in first] == [6, 5, 4, 3]
    assert [c.id for c in rest] == [1, 2, 7, 8, 9]
    order = UploadOrder(timedelta(minutes=30), Clock())
    assert order.set_windows((early, late)) and not order.set_windows((early, late))
    assert order.pick(pending, 9) == [6, 5, 4, 3, 1, 2, 7, 8, 9]
    assert order.pick(pending, 2) == [6, 5]


def test_a_record_in_two_windows_goes_with_the_older_and_without_windows_the_order_is_the_journals() -> None:
    pending = [rec(1, "T101", 50), rec(2, "T101", 15), rec(3, "T101", 5)]
    first, rest = batch_first(pending, (win("A", 0, 20, "T101"), win("B", 10, 60, "T101")))
    assert [c.id for c in first] == [3, 2, 1] and rest == []
    order = UploadOrder(timedelta(minutes=30), Clock())
    assert not order.active                      # no schedule: the uploader keeps the journal's order
    assert order.pick(pending, 3) == [1, 2, 3]
    order.set_windows((win("A", 0, 20, "T101"),))
    assert order.active
    assert not order.set_windows((win("A", 0, 20, "T101"),))
    assert order.set_windows(())                 # a cleared schedule: the journal's order again
    assert not order.active


def test_the_rest_waits_at_most_max_batch_first_then_its_oldest_takes_the_next_slot() -> None:
    clock = Clock()
    order = UploadOrder(timedelta(minutes=30), clock)
    order.set_windows((win("B-1", 0, 600, "T101"),))
    rest = [rec(1, "P201", 0), rec(2, "P201", 1)]
    window = [rec(10 + i, "T101", i) for i in range(100)]
    pending = rest + window
    started: list[int] = []

    def one_slot() -> int:
        [picked] = order.pick([c for c in pending if c.id not in started], 1)
        started.append(picked)
        return picked

    assert one_slot() == 10                      # window footage first; the rest starts waiting now
    clock.now += timedelta(minutes=29)
    assert one_slot() == 11                      # 29 min: still batch first
    clock.now += timedelta(minutes=1)
    assert one_slot() == 1                       # 30 min passed over: the oldest other record goes
    assert one_slot() == 12                      # and the wait starts again for the next one
    clock.now += timedelta(minutes=20)
    assert one_slot() == 13
    clock.now += timedelta(minutes=10)
    assert one_slot() == 2
    # nothing else waits: window footage only, no timer left running
    assert [one_slot() for _ in range(3)] == [14, 15, 16]
    clock.now += timedelta(hours=5)
    assert one_slot() == 17
    # With several free slots at once, the starved record takes the first of them only.
    clock2 = Clock()
    order2 = UploadOrder(timedelta(minutes=5), clock2)
    order2.set_windows((win("B-1", 0, 600, "T101"),))
    assert order2.pick(pending, 2) == [10, 11]
    clock2.now += timedelta(minutes=5)
    assert order2.pick([c for c in pending if c.id not in (10, 11)], 3) == [1, 12, 13]


def test_the_rest_has_no_wait_when_there_is_no_window_footage() -> None:
    clock = Clock()
    order = UploadOrder(timedelta(minutes=30), clock)
    order.set_windows((win("B-1", 0, 60, "T101"),))
    assert order.pick([rec(1, "P201", 0), rec(2, "P201", 1)], 4) == [1, 2]


BASE_RAW = {"agent": {"id": "a1", "institution": "I1", "venue": "V1", "data_dir": "data", "key_file": "agent.key"},
            "mqtt": {"url": "mqtt://127.0.0.1:1883"}}


def test_max_batch_first_minutes_config(tmp_path: Path) -> None:
    def load(upload: dict | None):  # noqa: ANN202
        raw = dict(BASE_RAW, upload=upload) if upload is not None else BASE_RAW
        return parse_config(raw, base_dir=tmp_path, path=tmp_path / "edge.toml")

    assert load(None).upload.max_batch_first_minutes == 30
    assert load({"max_batch_first_minutes": 5}).upload.max_batch_first_minutes == 5
    for bad in (0, 1441, "30", True, 2.5):
        with pytest.raises(ConfigError, match=r"\[upload\] max_batch_first_minutes = .* (range 1\.\.1440|integer)"):
            load({"max_batch_first_minutes": bad})


def test_the_journal_offers_what_the_order_would_pick_from_the_whole_backlog(tmp_path: Path) -> None:
    """A backlog of 1200 records (6 cameras in 3 rooms, 200 segments each): the journal's indexed candidates give
    the same picks as the whole backlog, for window footage old and new, with records excluded, and a window
    whose footage is the oldest; and the window lookup goes through the index, not through every manifest."""
    import random

    from edge_agent.journal import Journal
    from exam_contract.signing import generate_private_key
    from tests.support.footage import Camera, Site

    journal = Journal(tmp_path / "journal.sqlite")
    key = generate_private_key(tmp_path / "k")
    rooms = ("T101", "T102", "P201")
    cameras = [Camera(Site("agent-1", "JL2201001", "JL2201001-01", f"cam-{n}", rooms[n % 3],
                           "practical" if rooms[n % 3] == "P201" else "theory"), key) for n in range(6)]
    for index in range(200):
        for camera in cameras:
            journal.append(camera.manifest("segment", T0 + index * 10 * timedelta(seconds=1), 10, b"x"), "sig",
                           None, None)
    everything = [Candidate(r.id, *_room_span(r.manifest_raw)) for r in journal.records()]
    schedules = [
        (win("B-late", 1500 / 60, 1800 / 60, "T101"),),
        (win("B-first", 0, 200 / 60, "P201"), win("B-late", 1500 / 60, 1800 / 60, "T101", "T102")),
        (win("B-none", 5000, 5100, "T101"),),
    ]
    rng = random.Random(7)
    for windows in schedules:
        for free in (1, 4):
            exclude = set(rng.sample([c.id for c in everything], 30))
            expected = UploadOrder(timedelta(minutes=30), Clock()).pick(
                [c for c in everything if c.id not in exclude], free)
            offered = journal.pending_candidates(windows, free, exclude=exclude)
            assert len(offered) < len(everything) // 4
            assert UploadOrder(timedelta(minutes=30), Clock()).pick(offered, free) == expected, (windows, free)
        in_windows = [c for c in everything if window_index(c, windows) is not None]
        assert journal.window_backlog(windows, timedelta(hours=1)) == (len(in_windows), len(in_windows))  # 1 B each
    plan = journal._db.execute(
        "explain query plan select id from records where state = 'pending' and moved = 1 "
        "and json_extract(manifest, '$.room') = ? and json_extract(manifest, '$.start') >= ? "
        "and json_extract(manifest, '$.start') < ? and json_extract(manifest, '$.end') > ? "
        "order by json_extract(manifest, '$.start'), id", ("T101", "a", "b", "c")).fetchall()
    assert "records_pending_room_start" in " ".join(str(row) for row in plan)
    journal.close()


def _room_span(raw: dict) -> tuple[str, datetime, datetime]:
    return raw["room"], datetime.fromisoformat(raw["start"]), datetime.fromisoformat(raw["end"])

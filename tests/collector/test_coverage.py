"""The coverage engine against a brute-force reference that looks at every millisecond of the window."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings, strategies as st

from collector.coverage import (CAUSE_CLOCK_SUSPECT, CAUSE_CLOCK_UNSYNCED, CAUSE_MISSING_SEQ, CAUSE_UNKNOWN, DISQUALIFYING_HEALTH,
                                HEALTH_PREFIX, STATUS_COMPLETE, STATUS_GAPS, STATUS_NO_FOOTAGE, STATUS_PENDING,
                                CameraInput, GapRecord, SegmentSpan, SeqHole, Window, camera_coverage,
                                part_coverage)

T0 = datetime(2026, 11, 26, 1, 0, tzinfo=timezone.utc)
SPAN = 40_000  # ms of timeline the random inputs live in
LATE = T0 + timedelta(days=1)


def at(ms: int) -> datetime:
    return T0 + timedelta(milliseconds=ms)


def ms_of(t: datetime) -> int:
    return round((t - T0) / timedelta(milliseconds=1))


interval = st.tuples(st.integers(0, SPAN), st.integers(1, 15_000)).map(lambda p: (p[0], p[0] + p[1]))
segments_st = st.lists(st.tuples(interval,
                                 st.lists(st.sampled_from(["black", "frozen", "obstructed", "dim"]), max_size=2),
                                 st.booleans(), st.booleans()), max_size=12)
gaps_st = st.lists(st.tuples(interval, st.sampled_from(["camera_unreachable", "recorder_crashed", "disk_full"])),
                   max_size=4)
holes_st = st.lists(st.tuples(st.one_of(st.none(), st.integers(0, SPAN)), st.integers(0, 10_000),
                              st.booleans()), max_size=3)
window_st = st.tuples(st.integers(0, SPAN), st.integers(1, 30_000)).map(lambda p: (p[0], p[0] + p[1]))
tolerance_st = st.integers(0, 3_000)


def build_camera(segments, gaps, holes) -> CameraInput:
    segs = tuple(SegmentSpan(at(s), at(e), tuple(health), synced, suspect)
                 for (s, e), health, synced, suspect in segments)
    recs = tuple(GapRecord(at(s), at(e), cause) for (s, e), cause in gaps)
    hole_objs = []
    for i, (after, length, open_end) in enumerate(holes):
        before = None if open_end or after is None else at(after + length)
        hole_objs.append(SeqHole(10 * i + 1, 10 * i + 2, at(after) if after is not None else None, before))
    return CameraInput("V", "cam", segs, recs, tuple(hole_objs))


def reference(window: tuple[int, int], camera: CameraInput, tol: int):
    """(covered ms, [(gap start ms, gap end ms, causes)]) by looking at each millisecond."""
    w0, w1 = window
    covered = bytearray(w1 - w0)
    for seg in camera.segments:
        if DISQUALIFYING_HEALTH.intersection(seg.health):
            continue
        for t in range(max(ms_of(seg.start), w0), min(ms_of(seg.end), w1)):
            covered[t - w0] = 1
    runs, t = [], w0
    while t < w1:
        if covered[t - w0]:
            t += 1
            continue
        start = t
        while t < w1 and not covered[t - w0]:
            t += 1
        if t - start >= tol:
            runs.append((start, t))
    out = []
    for start, end in runs:
        causes = set()
        for ms in range(start, end):
            for rec in camera.gap_records:
                if ms_of(rec.start) <= ms < ms_of(rec.end):
                    causes.add(rec.cause)
            for hole in camera.holes:
                lo = ms_of(hole.after) if hole.after is not None else -10**12
                hi = ms_of(hole.before) if hole.before is not None else 10**12
                if lo <= ms < hi:
                    causes.add(CAUSE_MISSING_SEQ)
            for seg in camera.segments:
                s, e = ms_of(seg.start), ms_of(seg.end)
                flags = DISQUALIFYING_HEALTH.intersection(seg.health)
                if flags and s <= ms < e:
                    causes.update(HEALTH_PREFIX + f for f in flags)
                if not seg.clock_synced and s - tol <= ms < e + tol:
                    causes.add(CAUSE_CLOCK_UNSYNCED)
                if seg.clock_suspect and s - tol <= ms < e + tol:
                    causes.add(CAUSE_CLOCK_SUSPECT)
        out.append((start, end, tuple(sorted(causes)) or (CAUSE_UNKNOWN,)))
    return sum(covered), out


@settings(max_examples=300, deadline=None)
@given(window=window_st, segments=segments_st, gaps=gaps_st, holes=holes_st, tol=tolerance_st)
def test_engine_equals_millisecond_reference(window, segments, gaps, holes, tol) -> None:
    camera = build_camera(segments, gaps, holes)
    result = camera_coverage(Window(at(window[0]), at(window[1])), camera, timedelta(milliseconds=tol), now=LATE)
    covered_ms, ref_gaps = reference(window, camera, tol)
    assert round(result.covered_seconds * 1000) == covered_ms
    assert [(ms_of(g.start), ms_of(g.end), g.causes) for g in result.gaps] == ref_gaps
    assert result.percent == pytest.approx(100.0 * covered_ms / (window[1] - window[0]))
    if covered_ms == 0:
        assert result.status == STATUS_NO_FOOTAGE
    elif ref_gaps:
        assert result.status == STATUS_GAPS
    else:
        assert result.status == STATUS_COMPLETE


@settings(max_examples=200, deadline=None)
@given(window=window_st, segments=segments_st, tol=tolerance_st)
def test_covered_plus_uncovered_is_the_window(window, segments, tol) -> None:
    camera = build_camera(segments, [], [])
    w = Window(at(window[0]), at(window[1]))
    result = camera_coverage(w, camera, timedelta(milliseconds=tol), now=LATE)
    assert 0 <= result.covered_seconds <= w.seconds
    # Every reported gap lies inside the window, they are ordered and disjoint, each at least the tolerance.
    previous = w.start
    for gap in result.gaps:
        assert previous <= gap.start < gap.end <= w.end
        assert gap.end - gap.start >= timedelta(milliseconds=tol)
        previous = gap.end
    assert result.covered_seconds + sum(g.seconds for g in result.gaps) <= w.seconds + 1e-9


def _seg(a: int, b: int, **kw) -> SegmentSpan:
    return SegmentSpan(at(a * 1000), at(b * 1000), **kw)


WINDOW = Window(at(0), at(100_000))
TOL = timedelta(seconds=2)


def test_killed_recorder_gap_named_by_its_record() -> None:
    camera = CameraInput("V", "cam", (_seg(0, 40), _seg(40, 45), _seg(75, 100)),
                         (GapRecord(at(45_000), at(75_000), "recorder_crashed"),))
    result = camera_coverage(WINDOW, camera, TOL, now=LATE)
    assert result.status == STATUS_GAPS
    assert [(g.start, g.end, g.causes) for g in result.gaps] == [(at(45_000), at(75_000), ("recorder_crashed",))]
    assert result.percent == pytest.approx(70.0)


def test_small_seams_below_tolerance_are_not_gaps() -> None:
    camera = CameraInput("V", "cam", (_seg(0, 50), SegmentSpan(at(51_500), at(100_000))))
    result = camera_coverage(WINDOW, camera, TOL, now=LATE)
    assert result.gaps == () and result.status == STATUS_COMPLETE
    assert result.covered_seconds == pytest.approx(98.5)


def test_health_flag_makes_a_gap_with_its_cause_and_unsynced_clock_is_named() -> None:
    camera = CameraInput("V", "cam", (_seg(0, 30), _seg(30, 60, health=("black",)), _seg(60, 100, clock_synced=False)))
    result = camera_coverage(WINDOW, camera, TOL, now=LATE)
    assert [(g.start, g.end) for g in result.gaps] == [(at(30_000), at(60_000))]
    assert result.gaps[0].causes == (CAUSE_CLOCK_UNSYNCED, "health_black")
    assert result.unsynced_segments == 1


def test_suspect_clock_segment_covers_but_names_the_gaps_it_touches() -> None:
    """A segment whose agent clock the collector does not believe still covers what it claims; a gap next to it
    (within the tolerance) names `clock_suspect`, a gap far from it does not."""
    camera = CameraInput("V", "cam", (_seg(0, 30), _seg(40, 60, clock_suspect=True), _seg(60, 70), _seg(90, 100)))
    result = camera_coverage(WINDOW, camera, TOL, now=LATE)
    assert [(g.start, g.end, g.causes) for g in result.gaps] == [
        (at(30_000), at(40_000), (CAUSE_CLOCK_SUSPECT,)),
        (at(70_000), at(90_000), (CAUSE_UNKNOWN,)),
    ]
    assert result.covered_seconds == pytest.approx(70) and result.suspect_segments == 1
    assert result.unsynced_segments == 0


def test_missing_seq_hole_names_the_gap() -> None:
    camera = CameraInput("V", "cam", (_seg(0, 30), _seg(40, 100)),
                         holes=(SeqHole(4, 4, at(30_000), at(40_000), (CAUSE_MISSING_SEQ, "rejected_upload")),))
    result = camera_coverage(WINDOW, camera, TOL, now=LATE)
    assert result.gaps[0].causes == (CAUSE_MISSING_SEQ, "rejected_upload")


def test_pending_while_window_runs_or_uploads_arrive() -> None:
    camera = CameraInput("V", "cam", (_seg(0, 50),), last_record_end=at(50_000))
    assert camera_coverage(WINDOW, camera, TOL, now=at(60_000)).status == STATUS_PENDING
    # Window over a moment ago, newest record short of the end: the rest is presumably on its way.
    assert camera_coverage(WINDOW, camera, TOL, now=at(110_000)).status == STATUS_PENDING
    # Settled: the missing tail is a gap.
    assert camera_coverage(WINDOW, camera, TOL, now=at(400_000)).status == STATUS_GAPS
    busy = CameraInput("V", "cam", (_seg(0, 100),), in_flight=True, last_record_end=at(100_000))
    assert camera_coverage(WINDOW, busy, TOL, now=LATE).status == STATUS_PENDING


def test_part_status() -> None:
    full = CameraInput("V", "a", (_seg(0, 100),), last_record_end=at(100_000))
    holey = CameraInput("V", "b", (_seg(0, 40), _seg(50, 100)), last_record_end=at(100_000))
    empty = CameraInput("V", "c")
    assert part_coverage(WINDOW, [], TOL, LATE).status == STATUS_NO_FOOTAGE
    assert part_coverage(WINDOW, [empty], TOL, LATE).status == STATUS_NO_FOOTAGE
    assert part_coverage(WINDOW, [full], TOL, LATE).status == STATUS_COMPLETE
    result = part_coverage(WINDOW, [holey, full], TOL, LATE)
    assert result.status == STATUS_GAPS
    assert [c.camera for c in result.cameras] == ["a", "b"]
    assert part_coverage(WINDOW, [full, empty], TOL, LATE).status == STATUS_GAPS
    assert part_coverage(WINDOW, [full], TOL, at(50_000)).status == STATUS_PENDING

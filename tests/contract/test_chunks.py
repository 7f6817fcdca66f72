"""Chunk bookkeeping, with hypothesis properties."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exam_contract.chunks import chunk_count, chunk_span, expand_ranges, missing_ranges, ranges_from_sorted


@pytest.mark.parametrize("size, chunk_size, count", [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (8, 4, 2),
                                                     (10 * 2**20, 256 * 1024, 40)])
def test_chunk_count(size, chunk_size, count):
    assert chunk_count(size, chunk_size) == count


@pytest.mark.parametrize("chunk_size", [0, -1])
def test_chunk_count_needs_positive_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_count(10, chunk_size)


def test_chunk_span_last_chunk_is_short():
    assert chunk_span(0, 10, 4) == (0, 4)
    assert chunk_span(2, 10, 4) == (8, 2)


@pytest.mark.parametrize("index", [-1, 3, 100])
def test_chunk_span_outside_the_file(index):
    with pytest.raises(ValueError, match=f"chunk {index} is outside a 10-byte file"):
        chunk_span(index, 10, 4)


def test_missing_ranges_examples():
    assert missing_ranges([], 0) == []
    assert missing_ranges([], 3) == [[0, 2]]
    assert missing_ranges([0, 1, 2], 3) == []
    assert missing_ranges([1, 3], 6) == [[0, 0], [2, 2], [4, 5]]
    assert missing_ranges([0, 5, 99], 6) == [[1, 4]]   # out-of-range indexes are ignored


def test_expand_ranges_examples():
    assert expand_ranges([]) == []
    assert expand_ranges([[0, 0], [2, 4]]) == [0, 2, 3, 4]
    assert expand_ranges([(1, 2)]) == [1, 2]


@settings(deadline=None)  # no timing thresholds in tests
@given(total=st.integers(min_value=0, max_value=300), data=st.data())
def test_missing_then_expand_is_the_complement(total, data):
    received = data.draw(st.sets(st.integers(min_value=0, max_value=max(total - 1, 0))) if total else st.just(set()))
    ranges = missing_ranges(received, total)
    assert expand_ranges(ranges) == sorted(set(range(total)) - set(received))
    # ranges are inclusive, ordered, disjoint and not adjacent (maximal)
    for low, high in ranges:
        assert 0 <= low <= high < total
    for (_, high), (low, _) in zip(ranges, ranges[1:]):
        assert low > high + 1


@settings(deadline=None)  # no timing thresholds in tests
@given(received=st.sets(st.integers(min_value=-5, max_value=400)), total=st.integers(min_value=0, max_value=300))
def test_missing_ranges_ignores_indexes_outside_the_file(received, total):
    assert expand_ranges(missing_ranges(received, total)) == sorted(set(range(total)) - received)


@settings(deadline=None)  # no timing thresholds in tests
@given(chunk_size=st.integers(min_value=1, max_value=2**20), data=st.data())
def test_chunk_span_covers_the_file_exactly(chunk_size, data):
    size = data.draw(st.integers(min_value=1, max_value=chunk_size * 2000), label="size")
    count = chunk_count(size, chunk_size)
    position = 0
    for index in range(count):
        offset, length = chunk_span(index, size, chunk_size)
        assert offset == position
        assert 1 <= length <= chunk_size
        position += length
    assert position == size
    with pytest.raises(ValueError):
        chunk_span(count, size, chunk_size)


@settings(deadline=None)  # no timing thresholds in tests
@given(chunk_size=st.integers(min_value=1, max_value=1024))
def test_empty_file_has_no_chunks(chunk_size):
    assert chunk_count(0, chunk_size) == 0
    with pytest.raises(ValueError):
        chunk_span(0, 0, chunk_size)


@given(st.integers(min_value=0, max_value=300), st.data())
def test_ranges_from_sorted_agrees_with_the_set_version(total, data):
    received = sorted(set(data.draw(st.lists(st.integers(min_value=-5, max_value=total + 5), max_size=80))))
    assert ranges_from_sorted(received, total) == _reference_missing(received, total)


def test_ranges_from_sorted_needs_no_work_proportional_to_the_claimed_total():
    # An init may claim billions of chunks: the ranges come from what was received, not from range(total).
    assert ranges_from_sorted([0, 1, 5], 10**12) == [[2, 4], [6, 10**12 - 1]]
    assert ranges_from_sorted(iter(range(0, 10_000, 2)), 10**12, limit=3) == [[1, 1], [3, 3], [5, 5]]


def _reference_missing(received, total):
    """The obvious index-by-index definition, for the property above."""
    have, ranges, start = set(received), [], None
    for index in range(total):
        if index in have:
            if start is not None:
                ranges.append([start, index - 1])
                start = None
        elif start is None:
            start = index
    if start is not None:
        ranges.append([start, total - 1])
    return ranges

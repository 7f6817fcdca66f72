"""Chunk bookkeeping, free of I/O."""

from __future__ import annotations

from collections.abc import Iterable


def chunk_count(size: int, chunk_size: int) -> int:
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    return (size + chunk_size - 1) // chunk_size


def chunk_span(index: int, size: int, chunk_size: int) -> tuple[int, int]:
    """(offset, length) of chunk `index` in a file of `size` bytes."""
    offset = index * chunk_size
    if index < 0 or offset >= size:
        raise ValueError(f"chunk {index} is outside a {size}-byte file")
    return offset, min(chunk_size, size - offset)


def missing_ranges(received: Iterable[int], total: int) -> list[list[int]]:
    """Inclusive [from, to] ranges of chunk indexes in 0..total-1 not in `received` (any order)."""
    return ranges_from_sorted(sorted(set(received)), total)


def ranges_from_sorted(received: Iterable[int], total: int, limit: int | None = None) -> list[list[int]]:
    """Inclusive [from, to] ranges of indexes in 0..total-1 missing from `received`, which must be sorted
    ascending (duplicates and out-of-range values are ignored). Work and memory grow with the received
    indexes and the ranges returned, never with `total`, which an init claims and so cannot be trusted;
    `limit` caps the ranges returned (the rest are found next time)."""
    ranges: list[list[int]] = []
    expected = 0
    for index in received:
        if index < expected or index >= total:
            continue
        if index > expected:
            ranges.append([expected, index - 1])
            if limit is not None and len(ranges) >= limit:
                return ranges
        expected = index + 1
    if expected < total and (limit is None or len(ranges) < limit):
        ranges.append([expected, total - 1])
    return ranges


def expand_ranges(ranges: Iterable[Iterable[int]]) -> list[int]:
    out: list[int] = []
    for pair in ranges:
        low, high = list(pair)
        out.extend(range(int(low), int(high) + 1))
    return out

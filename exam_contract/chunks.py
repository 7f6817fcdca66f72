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
    """Inclusive [from, to] ranges of chunk indexes in 0..total-1 not in `received`."""
    have = set(received)
    ranges: list[list[int]] = []
    start: int | None = None
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


def expand_ranges(ranges: Iterable[Iterable[int]]) -> list[int]:
    out: list[int] = []
    for pair in ranges:
        low, high = list(pair)
        out.extend(range(int(low), int(high) + 1))
    return out

"""Per-camera hash chain: each record carries the SHA-256 of the previous record's canonical manifest."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class LinkVerdict(str, Enum):
    LINKED = "linked"            # predecessor known and its hash matches `prev`
    FIRST = "first"              # seq 1, prev null
    HOLE = "hole"                # predecessor not (yet) known: store, record the hole
    BROKEN = "broken"            # predecessor known and its hash differs from `prev`


@dataclass(frozen=True)
class ChainPosition:
    seq: int
    prev: str | None


def judge_link(record: ChainPosition, predecessor_hash: str | None) -> LinkVerdict:
    """Decide how `record` joins its camera's chain given the stored hash of record seq-1 (None if absent)."""
    if record.seq == 1:
        return LinkVerdict.FIRST if record.prev is None else LinkVerdict.BROKEN
    if predecessor_hash is None:
        return LinkVerdict.HOLE
    return LinkVerdict.LINKED if predecessor_hash == record.prev else LinkVerdict.BROKEN

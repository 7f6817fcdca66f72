"""RunningHashes: the digest fed chunk by chunk is offered only for chunks 0..n-1, in order, each once."""

from __future__ import annotations

import hashlib

from collector.running_hash import RunningHashes

KEY = ("agent-1", "cam-1")


def feed(hashes: RunningHashes, chunks: list[bytes], order: list[int], key=KEY, chunk_size: int = 4) -> None:
    for index in order:
        hashes.chunk(key, chunk_size, len(chunks), index, chunks[index])


def test_in_order_chunks_give_the_digest_of_the_whole() -> None:
    chunks = [b"abcd", b"efgh", b"ij"]
    hashes = RunningHashes()
    feed(hashes, chunks, [0, 1, 2])
    taken = hashes.take(KEY, 4, 3)
    assert taken is not None
    assert taken.sha256 == hashlib.sha256(b"abcdefghij").hexdigest() and taken.size == 10
    assert hashes.take(KEY, 4, 3) is None and len(hashes) == 0  # taken once, then gone


def test_out_of_order_repeated_or_incomplete_give_none() -> None:
    chunks = [b"abcd", b"efgh", b"ij"]
    for order in ([1, 0, 2], [0, 2, 1], [0, 1, 1, 2], [0, 1, 2, 1], [0, 1], [0, 0, 1, 2]):
        hashes = RunningHashes()
        feed(hashes, chunks, order)
        assert hashes.take(KEY, 4, 3) is None, order


def test_a_rewrite_after_the_last_chunk_drops_the_digest() -> None:
    # the rewrite may carry other bytes than the first write: the file no longer holds what was hashed
    hashes = RunningHashes()
    feed(hashes, [b"abcd", b"efgh"], [0, 1])
    hashes.chunk(KEY, 4, 2, 1, b"XXXX")
    assert hashes.take(KEY, 4, 2) is None


def test_another_init_shape_gives_none() -> None:
    hashes = RunningHashes()
    feed(hashes, [b"abcd", b"efgh"], [0, 1])
    assert hashes.take(KEY, 8, 1) is None
    feed(hashes, [b"abcd", b"efgh"], [0])
    hashes.chunk(KEY, 4, 3, 1, b"efgh")  # same file, a chunk under another chunk count
    assert hashes.take(KEY, 4, 2) is None


def test_forget_and_the_cap() -> None:
    hashes = RunningHashes(max_states=2)
    for n in range(3):
        hashes.chunk(("a", f"f{n}"), 4, 1, 0, b"abcd")
    assert len(hashes) == 2 and hashes.take(("a", "f2"), 4, 1) is None  # beyond the cap: no state, no digest
    hashes.forget(("a", "f0"))
    assert hashes.take(("a", "f0"), 4, 1) is None and hashes.take(("a", "f1"), 4, 1) is not None

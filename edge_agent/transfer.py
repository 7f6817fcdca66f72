"""The uploader's per-record state (`Transfer`) and its estimate of the collector's clock (`ClockEstimator`)."""

from __future__ import annotations

import os
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

from exam_contract.canonical import canonical_bytes
from exam_contract.chunks import chunk_count
from exam_contract.manifest import ClockInfo, Manifest, ManifestError
from exam_contract.protocol import InitMessage

from .journal import Record

SYNC_LIMIT_MS = 2000.0


class ClockEstimator:
    """NTP-style offset of the collector's clock to ours from replies' `collector_time`:
    offset = collector_time - midpoint(request sent, reply received); the sample with the shortest
    round trip among the recent ones wins."""

    def __init__(self, window: int = 16):
        self._samples: deque[tuple[float, float]] = deque(maxlen=window)
        self._lock = threading.Lock()

    def add(self, sent: datetime, received: datetime, collector_time: datetime) -> None:
        rtt = (received - sent).total_seconds()
        if rtt < 0:
            return
        midpoint = sent + (received - sent) / 2
        offset_ms = (collector_time - midpoint).total_seconds() * 1000
        with self._lock:
            self._samples.append((rtt, offset_ms))

    def current(self) -> ClockInfo:
        with self._lock:
            if not self._samples:
                return ClockInfo(offset_ms=None, synced=False)
            _, offset = min(self._samples)
        offset = round(offset, 1)
        return ClockInfo(offset_ms=offset, synced=abs(offset) <= SYNC_LIMIT_MS)


@dataclass
class Transfer:
    """One record on its way to the collector: `init`, then its chunks, then `fin`, repeated in part as the
    collector's `missing` replies ask, until a `stored` or `rejected` reply ends it. Only the uploader's thread
    (Uploader._advance, _handle_reply, _ask_again) reads and changes it. Times named `*_at` and `deadline`
    are time.monotonic() values."""

    record: Record
    init_payload: bytes      # the encoded `init` (signed manifest, chunk size and count), built once
    chunk_size: int
    chunks: int              # chunks of the file; 0 for a gap record, which has no file
    # The spool file, open while the transfer is active (segments only); closed by close() when a final reply
    # ends the transfer or the uploader stops.
    fd: int | None = None
    # Chunk indexes still to publish, in order, each at most once: all of them at the start and when the
    # collector has no init (queue_all), plus those a `missing` reply names. The fin waits until it is empty.
    to_send: deque[int] = field(default_factory=deque)
    # `init` goes out before the next chunk. True at the start and when a `missing` reply says the collector
    # has no init for the file (no ranges, or reason init_missing); cleared once it is published.
    init_needed: bool = True
    # `fin` goes out as soon as to_send is empty. True at the start, after a `missing` reply that is not a
    # repeat, when fin_at passes and after a reconnect; cleared when the fin is published, or by a repeated
    # `missing`, which defers the fin to fin_at instead.
    fin_needed: bool = True
    # With no reply by then, the fin is published again. Set with each fin published, to its time plus the
    # reply timeout doubled per ask (capped); cleared by a `missing` reply and by a reconnect.
    deadline: float | None = None
    # Fins published since the collector last answered with `missing` (or since a reconnect): the exponent
    # of the deadline's backoff. One more with each fin; back to 0 on a `missing` reply and on a reconnect.
    asks: int = 0
    # A deferred fin: when it passes, fin_needed is set again. Set by a `missing` reply identical to the
    # one before (the resent chunks may still be on their way), later with each repeat; cleared when it
    # passes, by a `missing` reply that is not a repeat and by a reconnect.
    fin_at: float | None = None
    # The last `missing` answer, (ranges, reason), to recognise a repeat; None until the first one.
    last_missing: tuple | None = None
    # `missing` replies in a row identical to the one before; 0 after any other `missing` answer.
    repeats: int = 0
    # Wall time of the earliest fin published since the last reply about this record: a reply may answer
    # any fin outstanding, so its clock sample is measured from this one. Set by a fin when None; cleared
    # when a reply about this record is taken as a clock sample.
    first_unanswered_fin: datetime | None = None

    @classmethod
    def for_record(cls, record: Record, chunk_size: int) -> Transfer:
        """A transfer of `record` with every chunk queued (its file not opened yet)."""
        payload, chunks = _init_payload(record, chunk_size)
        transfer = cls(record=record, init_payload=payload, chunk_size=chunk_size, chunks=chunks)
        transfer.queue_all()
        return transfer

    @property
    def file_id(self) -> str:
        return self.record.file_id

    def queue_all(self) -> None:
        self.to_send = deque(range(self.chunks))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _init_payload(record: Record, chunk_size: int) -> tuple[bytes, int]:
    """The record's encoded `init` and its chunk count. A manifest that does not come back byte for byte
    through Manifest is sent exactly as journaled: the signature is over those bytes."""
    raw = record.manifest_raw
    try:
        message = InitMessage.build(Manifest.from_dict(raw), record.signature, chunk_size)
        if canonical_bytes(message.manifest_raw) != record.manifest_json.encode("utf-8"):
            raise ManifestError("re-serialised manifest differs")
    except ManifestError:
        chunks = chunk_count(record.size, chunk_size) if record.kind == "segment" else 0
        message = InitMessage(raw, record.signature, chunk_size, chunks)
    return message.encode(), message.chunks

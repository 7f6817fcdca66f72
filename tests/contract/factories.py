"""Small builders of valid manifests for the contract tests."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

from exam_contract.manifest import ClockInfo, Manifest, VideoInfo

START = datetime(2026, 11, 26, 1, 30, 0, 120000, tzinfo=timezone.utc)


def segment(seq: int = 1, prev: str | None = None, **changes: Any) -> Manifest:
    base = Manifest(
        kind="segment", agent="demo-venue-a", institution="JL2201001", venue="JL2201001-01",
        room="T101", room_kind="theory", camera="t101-cam1", seq=seq,
        start=START + timedelta(seconds=10 * (seq - 1)), end=START + timedelta(seconds=10 * seq),
        duration=10.0, size=1_234_567, sha256="0" * 63 + "1", prev=prev,
        video=VideoInfo(codec="h264", width=640, height=360, fps=25.0),
        clock=ClockInfo(offset_ms=-3.5, synced=True), health=("ok",),
    )
    return replace(base, **changes)


def gap(seq: int = 2, prev: str | None = "f" * 64, cause: str = "camera_unreachable") -> Manifest:
    return segment(seq=seq, prev=prev, kind="gap", size=0, sha256=None, video=None,
                   clock=ClockInfo(), health=(), cause=cause, detail="连接超时 (timeout)")

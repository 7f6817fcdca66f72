"""The files a segment passes through: ffmpeg's recording names and CSV segment lists in recording/{camera}/,
final names in spool/{camera}/, and checks on a file itself (still open by some process? MPEG-TS?)."""

from __future__ import annotations

import csv
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from exam_contract.manifest import segment_file_name

UTC = timezone.utc
SEGMENT_SUFFIX = ".ts"
MPEG_TS_SYNC = 0x47
ORPHAN_WAIT_SECONDS = 20.0


# --- recording file names and segment lists (recording/{camera}/) -------------------------------

def recording_name(run_id: str) -> str:
    """ffmpeg's output pattern inside recording/{camera}/ (index filled in by the segment muxer)."""
    return f"{run_id}-%06d{SEGMENT_SUFFIX}"


def segment_list_name(run_id: str) -> str:
    return f"{run_id}.csv"


def parse_recording_name(name: str) -> tuple[str, int] | None:
    if not name.endswith(SEGMENT_SUFFIX):
        return None
    stem = name[: -len(SEGMENT_SUFFIX)]
    run_id, sep, index = stem.rpartition("-")
    if not sep or not run_id or not index.isdigit():
        return None
    return run_id, int(index)


def recording_sort_key(path: Path) -> tuple[str, int]:
    """Recording files in the order ffmpeg wrote them: by run, then by segment index."""
    parsed = parse_recording_name(path.name)
    return parsed if parsed else (path.name, 0)


def read_segment_list(path: Path) -> dict[str, tuple[float, float]]:
    """name -> (start, end) seconds on the run's output timeline, from ffmpeg's CSV segment list."""
    entries: dict[str, tuple[float, float]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.reader(handle):
                if len(row) >= 3:
                    try:
                        entries[os.path.basename(row[0])] = (float(row[1]), float(row[2]))
                    except ValueError:
                        continue  # a half-written last line
    except FileNotFoundError:
        pass
    return entries


# --- final names (spool/{camera}/) ---------------------------------------------------------------

def final_path(spool: Path, camera: str, start: datetime, seq: int, source: Path) -> Path:
    """Where a sealed segment is kept in spool/{camera}/: named by its start, with `-{seq}` added when another
    file already has that name."""
    final = spool / segment_file_name(camera, start)
    if final.exists() and final != source:
        final = spool / segment_file_name(camera, start).replace(SEGMENT_SUFFIX, f"-{seq}{SEGMENT_SUFFIX}")
    return final


def parse_final_name(camera: str, name: str) -> datetime | None:
    prefix = f"{camera}@"
    if not name.startswith(prefix) or not name.endswith(SEGMENT_SUFFIX):
        return None
    stamp = name[len(prefix): -len(SEGMENT_SUFFIX)]
    try:
        return datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None


# --- the file itself ------------------------------------------------------------------------------

def open_by_any_process(path: Path) -> bool:
    """True when some process (e.g. an ffmpeg still running) holds `path` open."""
    target = str(path.resolve())
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    return True
            except OSError:
                continue
    return False


def _open_by_self(path: Path) -> bool:
    target = str(path.resolve())
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


def wait_closed(path: Path, timeout: float) -> bool:
    """After a SIGKILLed agent its ffmpeg gets SIGTERM (PDEATHSIG) and closes its last segment a moment
    later: wait for that (bounded) so the segment is sealed before the new run's, in time order."""
    if _open_by_self(path):  # our own writer, not an orphan: nothing to wait for
        return False
    deadline = time.monotonic() + timeout
    while open_by_any_process(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def starts_like_mpegts(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(189)
    except OSError:
        return False
    return len(head) == 189 and head[0] == MPEG_TS_SYNC and head[188] == MPEG_TS_SYNC

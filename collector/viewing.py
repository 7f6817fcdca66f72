"""Viewing MP4s stream-copied from stored MPEG-TS segments (no re-encode): an export's per-camera clips, split
at every gap, and the portal's playable MP4 of one segment."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import tempfile
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from .footage_store import FootageStore, RelPath, StoredFileMissing, UnsafePath
from .models import SegmentRecord
from .package_text import local_text, viewing_readme

log = logging.getLogger(__name__)


class RemuxError(Exception):
    """ffmpeg could not make a viewing MP4; the message names the file and what ffmpeg said."""


@dataclass(frozen=True)
class Clip:
    path: str
    start: datetime
    end: datetime
    first_seq: int
    last_seq: int


@dataclass
class CameraRecords:
    """One camera's exported records, in seq order."""

    venue: str
    camera: str
    records: list[SegmentRecord]


def gapless_runs(records: list[SegmentRecord], tolerance: timedelta) -> list[list[SegmentRecord]]:
    """Segments in runs without any gap: a new run starts at a seq hole, a gap record, or a time jump."""
    runs: list[list[SegmentRecord]] = []
    previous: SegmentRecord | None = None
    for record in records:
        if record.kind != "segment" or record.storage_path is None:
            previous = None
            continue
        joined = (previous is not None and record.seq == previous.seq + 1
                  and abs((record.start_at - previous.end_at).total_seconds()) < tolerance.total_seconds())
        if joined:
            runs[-1].append(record)
        else:
            runs.append([record])
        previous = record
    return runs


@dataclass(frozen=True)
class ClipSources:
    """A clip's stored files, in groups whose bytes are one continuous MPEG-TS stream (consecutive segments
    of one ffmpeg run: each starts at the very millisecond the previous one ends), and their total length."""

    groups: tuple[tuple[Path, ...], ...]
    seconds: float

    @property
    def files(self) -> int:
        return sum(len(group) for group in self.groups)

    def one_per_file(self) -> "ClipSources":
        return ClipSources(tuple((path,) for group in self.groups for path in group), self.seconds)


MAX_GROUP_URL = 3000  # characters of one `concat:a|b|…` URL (libavformat keeps some URLs in 4 KiB buffers)


def clip_sources(run: list[SegmentRecord], files: list[Path]) -> ClipSources:
    """The run's files (`files[i]` is a local path of `run[i]`'s stored file) grouped by ffmpeg run: a
    segment that starts at the very millisecond the previous one ended joins its group (`|` separates files
    in a concat URL, so a path holding one stays alone)."""
    groups: list[list[Path]] = []
    previous: SegmentRecord | None = None
    for record, file in zip(run, files, strict=True):
        path = file.resolve()
        same_run = previous is not None and record.start_at == previous.end_at
        if (same_run and "|" not in str(path) and "|" not in str(groups[-1][-1])
                and sum(len(str(p)) + 1 for p in groups[-1]) + len(str(path)) < MAX_GROUP_URL):
            groups[-1].append(path)
        else:
            groups.append([path])
        previous = record
    return ClipSources(tuple(tuple(group) for group in groups), sum(r.duration for r in run))


def plan_clips(cameras: list[CameraRecords], tolerance: timedelta, store: FootageStore,
               held: ExitStack) -> tuple[list[tuple[Clip, ClipSources]], list[tuple[str, datetime, datetime]]]:
    """One viewing clip per gap-free run of stored segments, and the gaps between runs. A run with a
    missing or unsafe stored file gets no clip: the clip would hide the hole (the export reports the file).
    The local paths of the sources stay valid until `held` closes."""
    planned: list[tuple[Clip, ClipSources]] = []
    gaps_between: list[tuple[str, datetime, datetime]] = []
    for cam in cameras:
        runs = gapless_runs(cam.records, tolerance)
        for a, b in zip(runs, runs[1:], strict=False):
            gaps_between.append((f"{cam.venue}/{cam.camera}", a[-1].end_at, b[0].start_at))
        for run in runs:
            stored = [(r.storage_path, r.storage_version) for r in run if r.storage_path and r.deleted_at is None]
            try:
                if len(stored) != len(run) or not all(store.exists(relpath, version) for relpath, version in stored):
                    continue
                sources = [held.enter_context(store.local_path(relpath, version)) for relpath, version in stored]
            except (UnsafePath, StoredFileMissing):
                continue
            name = (f"viewing/{cam.venue}_{cam.camera}_{local_text(run[0].start_at, '%Y%m%d-%H%M%S')}"
                    f"_{local_text(run[-1].end_at, '%H%M%S')}.mp4")
            planned.append((Clip(name, run[0].start_at, run[-1].end_at, run[0].seq, run[-1].seq),
                            clip_sources(run, sources)))
    return planned, gaps_between


def make_clip(sources: ClipSources, out: Path) -> None:
    """Stream-copy the sources, in order, into one MP4 (ffmpeg concat demuxer, no re-encode).

    The demuxer probes every file it opens, and for H.264 that means decoding frames: most of its CPU time.
    So each group of one run's segments is opened as one byte stream (the concat protocol, which cannot
    rebase timestamps but needs not within a run), the demuxer joins the groups and rebases them, and every
    entry after the first gets the smallest probe. The MP4 is the same, byte for byte. If the grouped MP4's
    length is not the segments' total (two runs taken for one), it is made again file by file."""
    if sources.files > len(sources.groups):
        try:
            _remux(sources, out)
            made = mp4_seconds(out)
            if made is not None and abs(made - sources.seconds) <= CLIP_LENGTH_TOLERANCE:
                return
            log.warning("viewing clip %s: %s s instead of %.3f s from grouped segments; remuxing file by file",
                        out.name, made, sources.seconds)
        except RemuxError as exc:
            log.warning("viewing clip %s: grouped remux failed (%s); remuxing file by file", out.name, exc)
    _remux(sources.one_per_file(), out)


CLIP_LENGTH_TOLERANCE = 1.0  # seconds; a wrongly joined run loses at least a segment


def _remux(sources: ClipSources, out: Path) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".ffconcat", delete=False, encoding="utf-8") as listing:
        listing.write("ffconcat version 1.0\n")
        for index, group in enumerate(sources.groups):
            url = ("concat:" + "|".join(str(p) for p in group)) if len(group) > 1 else str(group[0].resolve())
            escaped = url.replace("'", "'\\''")
            listing.write(f"file '{escaped}'\n")
            if index:
                listing.write("option analyzeduration 0\noption probesize 32\n")
    try:
        subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
                        "-protocol_whitelist", "file,concat", "-f", "concat", "-safe", "0", "-i", listing.name,
                        "-map", "0", "-c", "copy", str(out)], check=True, capture_output=True, timeout=3600)
    except subprocess.CalledProcessError as exc:
        raise RemuxError(f"ffmpeg could not remux {out.name}: "
                         f"{exc.stderr.decode(errors='replace').strip()[-300:]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise RemuxError(f"ffmpeg did not finish {out.name} within {exc.timeout:.0f} s") from exc
    finally:
        os.unlink(listing.name)


def mp4_seconds(path: Path) -> float | None:
    """The movie length in an MP4's `moov/mvhd` box; None if there is none."""
    def boxes(handle, end: int):  # noqa: ANN001, ANN202
        while handle.tell() + 8 <= end:
            start = handle.tell()
            size, kind = struct.unpack(">I4s", handle.read(8))
            if size == 1:
                size = struct.unpack(">Q", handle.read(8))[0]
            elif size == 0:
                size = end - start
            if size < 8:
                return
            yield kind, start, handle.tell(), start + size
            handle.seek(start + size)

    try:
        with open(path, "rb") as handle:
            total = os.fstat(handle.fileno()).st_size
            for kind, _, body, moov_end in boxes(handle, total):
                if kind != b"moov":
                    continue
                handle.seek(body)
                for inner, _, inner_body, _ in boxes(handle, moov_end):
                    if inner == b"mvhd":
                        handle.seek(inner_body)
                        version = handle.read(4)[0]
                        if version == 1:
                            _, _, timescale, duration = struct.unpack(">QQIQ", handle.read(28))
                        else:
                            _, _, timescale, duration = struct.unpack(">IIII", handle.read(16))
                        return duration / timescale if timescale else None
    except (OSError, struct.error, IndexError):
        return None
    return None


class ViewingCopies:
    """An export's viewing MP4s, remuxed on a thread pool (ffmpeg is CPU-bound, the segment copy is not: one
    ffmpeg per core, alongside the copy). Start it, copy the segments, then `finish` (or `cancel` on failure)."""

    def __init__(self, cameras: list[CameraRecords], tolerance: timedelta, store: FootageStore, folder: Path,
                 wanted: bool) -> None:
        self.folder = folder
        self.notes: list[str] = []
        self.gaps_between: list[tuple[str, datetime, datetime]] = []
        self._held = ExitStack()
        planned: list[tuple[Clip, ClipSources]] = []
        if wanted:
            if shutil.which("ffmpeg") is None:
                self.notes.append("ffmpeg is not installed: no viewing MP4s were made (the evidence in segments/ "
                                  "is complete)")
            else:
                (folder / "viewing").mkdir(exist_ok=True)
                planned, self.gaps_between = plan_clips(cameras, tolerance, store, self._held)
        pool = ThreadPoolExecutor(max_workers=max(1, min(len(planned), os.cpu_count() or 1)))
        self._pool = pool
        self._remuxing: list[tuple[Clip, Future[None]]] = [
            (clip, pool.submit(make_clip, sources, folder / clip.path)) for clip, sources in planned]
        pool.shutdown(wait=False)

    def cancel(self) -> None:
        """No ffmpeg left writing into a failed export."""
        for _, future in self._remuxing:
            future.cancel()
        self._pool.shutdown(wait=True)
        self._held.close()

    def finish(self) -> list[Clip]:
        """Wait for the remuxes; the clips made (a failed one becomes a note), and viewing/README.txt."""
        clips: list[Clip] = []
        try:
            for clip, future in self._remuxing:
                try:
                    future.result()
                except RemuxError as exc:
                    self.notes.append(str(exc))
                    continue
                clips.append(clip)
        finally:
            self._held.close()
        if (self.folder / "viewing").is_dir():
            (self.folder / "viewing" / "README.txt").write_text(viewing_readme(clips, self.gaps_between),
                                                                encoding="utf-8")
        return clips


_remux_locks: dict[str, threading.Lock] = {}
_remux_guard = threading.Lock()


def playable_mp4(store: FootageStore, relpath: RelPath, sha256: str, cache_dir: Path,
                 version: str | None = None) -> Path:
    """The MP4 remux (stream copy) of a stored segment (that object version), made once and cached by its hash;
    raises subprocess.CalledProcessError when ffmpeg cannot remux it. Object storage is read once, into a
    temporary file (`local_path`), only when the cache does not hold the MP4 yet."""
    target = cache_dir / f"{sha256}.mp4"
    if target.is_file():
        return target
    with _remux_guard:
        lock = _remux_locks.setdefault(sha256, threading.Lock())
    with lock:
        if target.is_file():
            return target
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".{sha256}.{uuid.uuid4().hex[:8]}.mp4"
        try:
            with store.local_path(relpath, version) as source:
                subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i",
                                str(source), "-map", "0", "-c", "copy", "-movflags", "+faststart", str(tmp)],
                               check=True, capture_output=True, timeout=600)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target

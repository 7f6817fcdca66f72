"""The sealer: turns finished recording files and stated outages into signed, chained journal records, one at a
time, in the order the recorders and the watcher report them. See docs/design/durability.md (sealing order)."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exam_contract.canonical import format_time, truncate_to_millis
from exam_contract.files import fsync_dir, hash_file
from exam_contract.manifest import ClockInfo, GapCause, Manifest, VideoInfo
from exam_contract.signing import sign

from .config import CameraConfig, EdgeConfig
from .journal import Journal, Record
from .probe import ProbeError, ProbeResult, probe_segment
from .segment_files import (ORPHAN_WAIT_SECONDS, SEGMENT_SUFFIX, final_path, parse_final_name,
                            parse_recording_name, read_segment_list, recording_sort_key, segment_list_name,
                            starts_like_mpegts, wait_closed)

log = logging.getLogger(__name__)
UTC = timezone.utc


class RunInfo(Protocol):
    """What the recorders tell the sealer about an ffmpeg run."""

    def anchor(self, camera: str, run_id: str) -> datetime | None: ...

    def is_live(self, camera: str, run_id: str) -> bool: ...

    def video(self, camera: str, run_id: str) -> VideoInfo | None:
        """The stream the run writes, as ffmpeg reported it (None when unknown)."""
        ...

    def live_since(self, camera: str) -> datetime | None:
        """When the camera's running ffmpeg was launched (its footage, if any comes, starts no earlier); None when
        none runs."""
        ...


class JournalRuns:
    """RunInfo from the journal only (no live recorders, e.g. at startup)."""

    def __init__(self, journal: Journal):
        self._journal = journal

    def anchor(self, camera: str, run_id: str) -> datetime | None:
        return self._journal.run_anchor(camera, run_id)

    def is_live(self, camera: str, run_id: str) -> bool:
        return False

    def video(self, camera: str, run_id: str) -> VideoInfo | None:
        return None

    def live_since(self, camera: str) -> datetime | None:
        return None


# --- the commands on the sealer's queue ------------------------------------------------------------

@dataclass(frozen=True)
class SealSegment:
    """A recording file was closed (the watcher saw it): seal it."""

    camera: str
    path: Path


@dataclass(frozen=True)
class SealRun:
    """A run's ffmpeg exited: seal the files of the run still in recording/."""

    camera: str
    run_id: str


@dataclass(frozen=True)
class NoteOutage:
    """The camera stopped recording, for `cause`; `since`: when it was last tried, the start of the gap for a
    camera that has no record yet."""

    camera: str
    cause: GapCause
    detail: str | None
    since: datetime | None = None


SealerCommand = SealSegment | SealRun | NoteOutage


class Sealer:
    """Seals finished segment files and stated gaps into signed journal records, one at a time.

    Work arrives on a queue (from the watcher and the recorders) and is done by one thread in order, so
    the records of a camera follow the order in which its files were finished.
    """

    def __init__(self, config: EdgeConfig, journal: Journal, key: Ed25519PrivateKey,
                 clock: Callable[[], ClockInfo] = ClockInfo, runs: RunInfo | None = None,
                 on_sealed: Callable[[Record], None] | None = None, list_wait: float = 3.0,
                 outage_interval: float | None = None):
        self.config = config
        self.journal = journal
        self._key = key
        self._clock = clock
        self.runs: RunInfo = runs or JournalRuns(journal)
        self._on_sealed = on_sealed
        self._list_wait = list_wait
        # Frame health flags for a segment's manifest (edge_agent.health); must not raise.
        self.health_check: Callable[[CameraConfig, Path, datetime, VideoInfo], tuple[str, ...]] | None = None
        self._queue: queue.Queue[SealerCommand | None] = queue.Queue()  # None stops the thread
        # camera -> its open outage, named by its first cause; the gap record that closes it is written before
        # the camera's next record (or at shutdown by close_outages)
        self._outages: dict[str, NoteOutage] = {}
        # (camera, run_id) -> the stream as ffprobe read it from the run's first listed segment
        self._run_video: dict[tuple[str, str], VideoInfo] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # how often open outages are stated as gap records while they last (each at least a segment long)
        self.outage_interval = outage_interval or config.recording.segment_seconds / 2
        self._outages_stated_at = time.monotonic()
        for cam in config.cameras:
            (config.agent.spool_dir / cam.id).mkdir(parents=True, exist_ok=True)
            (config.agent.recording_dir / cam.id).mkdir(parents=True, exist_ok=True)

    # --- queue interface (thread-safe) ---
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sealer", daemon=True)
        self._thread.start()

    def submit_segment(self, camera: str, path: Path) -> None:
        self._queue.put(SealSegment(camera, Path(path)))

    def submit_run_finished(self, camera: str, run_id: str) -> None:
        """ffmpeg of this run has exited: seal whatever of it is left (its partial last segment)."""
        self._queue.put(SealRun(camera, run_id))

    def submit_outage(self, camera: str, cause: GapCause, detail: str | None, since: datetime | None = None) -> None:
        """The camera stopped recording; gap records follow while it lasts and up to its next segment's start."""
        self._queue.put(NoteOutage(camera, cause, detail, since))

    def stop(self, timeout: float = 60) -> None:
        """Finish the queued work, then stop the thread."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            try:
                command = self._queue.get(timeout=self.outage_interval)
            except queue.Empty:
                command = None
            else:
                if command is None:
                    return
                try:
                    self._do(command)
                except Exception:  # the sealer thread must survive one bad file
                    log.exception("sealer: %r failed", command)
            if time.monotonic() - self._outages_stated_at >= self.outage_interval:
                self._outages_stated_at = time.monotonic()
                try:
                    self.state_open_outages()
                except Exception:
                    log.exception("sealer: stating open outages failed")

    def _do(self, command: SealerCommand) -> None:
        match command:
            case SealSegment(camera, path):
                self.seal_file(camera, path)
            case SealRun(camera, run_id):
                self.seal_run(camera, run_id)
            case NoteOutage(camera, cause, detail, since):
                self.note_outage(camera, cause, detail, since)
            case _:
                log.error("sealer: unknown command %r (a bug)", command)

    # --- synchronous work (sealer thread, or startup before the thread runs) ---
    def note_outage(self, camera: str, cause: GapCause, detail: str | None, since: datetime | None = None) -> None:
        with self._lock:
            if camera not in self._outages:  # the first cause of an outage names it
                self._outages[camera] = NoteOutage(camera, cause, detail,
                                                   truncate_to_millis(since or datetime.now(UTC)))
                log.warning("camera %s: recording interrupted (%s): %s", camera, cause, detail or "")

    def pending_outage(self, camera: str) -> GapCause | None:
        with self._lock:
            outage = self._outages.get(camera)
        return outage.cause if outage else None

    def close_outages(self, end: datetime | None = None) -> None:
        """At shutdown: state the still open outages as gaps up to `end` (now)."""
        end = truncate_to_millis(end or datetime.now(UTC))
        with self._lock:
            outages, self._outages = dict(self._outages), {}
        for camera, outage in outages.items():
            start = self.journal.camera_state(camera).last_end or outage.since
            if start is not None and end > start:
                self._append_gap(self._camera(camera), start, end, outage.cause, outage.detail)

    def state_open_outages(self, now: datetime | None = None) -> int:
        """While a camera cannot record, state its outage so far as a gap record (continuing its chain), once
        it is at least a segment long: coverage at the collector then follows an outage as it goes, instead of
        learning of it when the camera comes back. While an ffmpeg of the camera runs (trying to connect, or
        recording again) the gap is stated only up to that ffmpeg's launch, so it never overlaps footage; the
        next segment closes the outage exactly. Returns the gap records written."""
        now = truncate_to_millis(now or datetime.now(UTC))
        least = timedelta(seconds=self.config.recording.segment_seconds)
        with self._lock:
            outages = dict(self._outages)
        written = 0
        for camera, outage in outages.items():
            live = self.runs.live_since(camera)
            end = now if live is None else min(now, truncate_to_millis(live))
            start = self.journal.camera_state(camera).last_end or outage.since
            if start is not None and end - start >= least:
                self._append_gap(self._camera(camera), start, end, outage.cause, outage.detail)
                written += 1
        return written

    def recover(self) -> None:
        """At startup: finish interrupted moves, seal leftovers in recording/ and unjournaled files in spool/.
        The agent was not running since its last record's end: an outage is noted first, so that a leftover
        of a run that started after an earlier restart (and was killed before its first segment was sealed)
        is preceded by the agent_stopped gap the dead process never got to write."""
        for cam in self.config.cameras:
            if self.journal.camera_state(cam.id).last_end is not None:
                self.note_outage(cam.id, GapCause.AGENT_STOPPED, "the edge agent was not recording")
        for rowid, src, dst in self.journal.unmoved():
            if dst.exists():
                self.journal.set_moved(rowid)
            elif src.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
                fsync_dir(dst.parent)
                self.journal.set_moved(rowid)
                log.info("recovered interrupted move of %s", dst.name)
            else:
                log.error("journal record %s: file %s is lost (neither in recording nor spool)", rowid, dst)
        for cam in self.config.cameras:
            spool = self.config.agent.spool_dir / cam.id
            for path in sorted(spool.glob(f"*{SEGMENT_SUFFIX}")):
                if not self.journal.is_journaled(path):
                    start = parse_final_name(cam.id, path.name)
                    if start is not None:
                        log.warning("camera %s: sealing unjournaled spool file %s", cam.id, path.name)
                        self._seal_at(cam, path, start, None)
            rec_dir = self.config.agent.recording_dir / cam.id
            runs: set[str] = set()
            for path in sorted(rec_dir.glob(f"*{SEGMENT_SUFFIX}"), key=recording_sort_key):
                parsed = parse_recording_name(path.name)
                if parsed is None:
                    continue
                runs.add(parsed[0])
                if not wait_closed(path, ORPHAN_WAIT_SECONDS):
                    log.warning("camera %s: %s is still open by another process; not sealing it", cam.id, path.name)
                    continue
                self.seal_file(cam.id, path)
            for run_id in runs:
                self._drop_finished_list(cam.id, run_id)

    def seal_run(self, camera: str, run_id: str) -> None:
        rec_dir = self.config.agent.recording_dir / camera
        for path in sorted(rec_dir.glob(f"{run_id}-*{SEGMENT_SUFFIX}"), key=recording_sort_key):
            self.seal_file(camera, path)
        self._drop_finished_list(camera, run_id)

    def seal_file(self, camera: str, path: Path) -> Record | None:
        """Seal one finished recording file (idempotent: a missing or journaled file is skipped)."""
        path = Path(path)
        if not path.exists() or self.journal.is_journaled(path):
            return None
        try:
            cam = self._camera(camera)
        except KeyError:
            log.warning("file %s belongs to camera %s which is not configured; leaving it", path, camera)
            return None
        parsed = parse_recording_name(path.name)
        if parsed is None:
            log.warning("camera %s: %s is not a recording file name; leaving it", camera, path.name)
            return None
        run_id, index = parsed
        entries = self._segment_list(camera, path, run_id)
        try:
            probe: ProbeResult | None = self._probe(camera, run_id, path, entries.get(path.name))
        except ProbeError as exc:
            probe = None
            problem = str(exc)
        start, end = self._segment_times(camera, path, run_id, index, entries, probe)
        if probe is None:
            return self._seal_corrupt(cam, path, start, end, problem)
        return self._seal_at(cam, path, start, probe, end)

    # --- internals ---
    def _camera(self, camera: str) -> CameraConfig:
        return self.config.camera(camera)

    def _segment_list(self, camera: str, path: Path, run_id: str) -> dict[str, tuple[float, float]]:
        """The run's segment list; for a live run, wait briefly for ffmpeg to list the file it just closed."""
        list_path = path.parent / segment_list_name(run_id)
        entries = read_segment_list(list_path)
        if path.name not in entries and self.runs.is_live(camera, run_id):
            deadline = time.monotonic() + self._list_wait
            while path.name not in entries and time.monotonic() < deadline and self.runs.is_live(camera, run_id):
                time.sleep(0.05)
                entries = read_segment_list(list_path)
        return entries

    def _probe(self, camera: str, run_id: str, path: Path, listed: tuple[float, float] | None) -> ProbeResult:
        """The segment's duration and stream. ffmpeg lists a segment only once it has closed it, with its
        start and end on the run's timeline, and every segment of a run carries the stream ffmpeg reported
        when it opened its output. So a listed segment needs no ffprobe (a process costs about 0.1 CPU-s,
        as much as the agent's own work on a segment); ffprobe reads unlisted (partial) segments, and listed
        ones when ffmpeg's report is unknown (after a restart of the agent), once per run."""
        key = (camera, run_id)
        video = self._run_video.get(key)
        if video is None and (video := self.runs.video(camera, run_id)) is not None:
            self._run_video[key] = video
        if listed is not None and video is not None and listed[1] > listed[0] and starts_like_mpegts(path):
            return ProbeResult(duration=round(listed[1] - listed[0], 6), start_time=listed[0], video=video)
        probe = probe_segment(path)
        if listed is not None:
            self._run_video[key] = probe.video
        return probe

    def _segment_times(self, camera: str, path: Path, run_id: str, index: int,
                       entries: dict[str, tuple[float, float]], probe: ProbeResult | None) -> tuple[datetime, datetime]:
        """Wall-clock [start, end) of a recording file: the run's anchor (wall time of its output timeline's
        zero) plus the segment's start and end on that timeline from ffmpeg's segment list. Consecutive
        segments of one run share the boundary value, so they are contiguous by construction."""
        anchor = self.runs.anchor(camera, run_id)
        duration = probe.duration if probe else 0.0
        mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        if anchor is None:
            # The run died before its clock was anchored: the file's last write is its end.
            end = truncate_to_millis(mtime)
            return truncate_to_millis(end - timedelta(seconds=duration)), end
        if path.name in entries:
            s, e = entries[path.name]
            return (truncate_to_millis(anchor + timedelta(seconds=s)),
                    truncate_to_millis(anchor + timedelta(seconds=e)))
        # Partial segment (ffmpeg died while writing it): it starts where the run's previous one ended.
        earlier = [e for name, (_, e) in entries.items()
                   if (p := parse_recording_name(name)) is not None and p[1] < index]
        start = truncate_to_millis(anchor + timedelta(seconds=max(earlier) if earlier else 0.0))
        if probe is None:
            return start, max(start, truncate_to_millis(mtime))
        return start, truncate_to_millis(start + timedelta(seconds=duration))

    def _resolve_outage(self, cam: CameraConfig, start: datetime) -> None:
        with self._lock:
            outage = self._outages.pop(cam.id, None)
        if outage is None:
            return
        since = self.journal.camera_state(cam.id).last_end or outage.since
        if since is not None and start > since:
            self._append_gap(cam, since, start, outage.cause, outage.detail)

    def _base(self, cam: CameraConfig) -> dict[str, Any]:
        agent = self.config.agent
        return {"agent": agent.id, "institution": agent.institution, "venue": agent.venue, "room": cam.room,
                "room_kind": cam.room_kind, "camera": cam.id}

    def _append_gap(self, cam: CameraConfig, start: datetime, end: datetime, cause: GapCause,
                    detail: str | None) -> Record:
        state = self.journal.camera_state(cam.id)
        manifest = Manifest(kind="gap", **self._base(cam), seq=state.last_seq + 1, start=start, end=end,
                            duration=round((end - start).total_seconds(), 3), size=0, sha256=None,
                            prev=state.last_hash, clock=self._clock(), cause=cause, detail=detail)
        record = self.journal.append(manifest, sign(self._key, manifest.canonical()), None, None)
        log.warning("camera %s seq %s gap %s..%s (%s)", cam.id, manifest.seq, format_time(start),
                    format_time(end), cause)
        self._sealed(record)
        return record

    def _seal_corrupt(self, cam: CameraConfig, path: Path, start: datetime, end: datetime,
                      problem: str) -> Record | None:
        self._resolve_outage(cam, start)
        keep_dir = self.config.agent.corrupt_dir / cam.id
        keep_dir.mkdir(parents=True, exist_ok=True)
        target = keep_dir / path.name
        record = None
        if end > start:
            record = self._append_gap(cam, start, end, GapCause.CORRUPT_SEGMENT, f"{path.name}: {problem}")
        os.replace(path, target)
        fsync_dir(keep_dir)
        log.error("camera %s: unreadable segment %s kept in %s (%s)", cam.id, path.name, keep_dir, problem)
        return record

    def _seal_at(self, cam: CameraConfig, path: Path, start: datetime, probe: ProbeResult | None,
                 end: datetime | None = None) -> Record | None:
        if probe is None:
            try:
                probe = probe_segment(path)
            except ProbeError as exc:
                log.error("camera %s: %s", cam.id, exc)
                return None
        end = end or truncate_to_millis(start + timedelta(seconds=probe.duration))
        self._resolve_outage(cam, start)
        digest, size = hash_file(path, fsync=True)
        state = self.journal.camera_state(cam.id)
        manifest = Manifest(kind="segment", **self._base(cam), seq=state.last_seq + 1, start=start,
                            end=max(end, start), duration=probe.duration, size=size, sha256=digest,
                            prev=state.last_hash, video=probe.video, clock=self._clock(),
                            health=self.health_check(cam, path, start, probe.video) if self.health_check else ())
        spool = self.config.agent.spool_dir / cam.id
        spool.mkdir(parents=True, exist_ok=True)
        final = final_path(spool, cam.id, start, manifest.seq, path)
        record = self.journal.append(manifest, sign(self._key, manifest.canonical()), final, path)
        if final != path:
            os.replace(path, final)
            fsync_dir(spool)
            self.journal.set_moved(record.id)
        log.info("camera %s seq %s sealed %s (%.3f s, %d bytes)", cam.id, manifest.seq, final.name,
                 probe.duration, size)
        self._sealed(record)
        return record

    def _sealed(self, record: Record) -> None:
        if self._on_sealed is not None:
            try:
                self._on_sealed(record)
            except Exception:
                log.exception("on_sealed callback failed")

    def _drop_finished_list(self, camera: str, run_id: str) -> None:
        if self.runs.is_live(camera, run_id):
            return
        self._run_video.pop((camera, run_id), None)
        rec_dir = self.config.agent.recording_dir / camera
        if not any(rec_dir.glob(f"{run_id}-*{SEGMENT_SUFFIX}")):
            try:
                (rec_dir / segment_list_name(run_id)).unlink()
            except FileNotFoundError:
                pass


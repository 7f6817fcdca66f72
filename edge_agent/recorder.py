"""One ffmpeg per camera, writing MPEG-TS segments into recording/{camera}/, and its supervisor.

Segment times. Each ffmpeg run gets a run id (its UTC launch time). ffmpeg reports its progress
(`-progress pipe:1`): `out_time_us`, the position on the run's output timeline. The run's *anchor* is the
wall-clock time of that timeline's zero, estimated as min(wall time at report - out_time) over the first
reports, then frozen and journaled. A segment's start/end are anchor + its start/end on the timeline
from ffmpeg's CSV segment list, so consecutive segments of one run are contiguous and do not drift.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import ffmpeg

from exam_contract.manifest import VideoInfo
from exam_contract.redact import redact_credentials, redact_source

from .config import CameraConfig, source_kind
from .spool import Journal, Sealer, recording_name, segment_list_name

log = logging.getLogger(__name__)
UTC = timezone.utc

BACKOFF_START = 1.0
BACKOFF_CAP = 30.0
ANCHOR_SAMPLES = 4
STOP_TIMEOUT = 15.0


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# How ffmpeg reports a live source that went away (a killed GStreamer RTSP server: exit 0 after EOF).
_SOURCE_LOST = ("connection reset", "connection refused", "connection timed out", "operation timed out",
                "broken pipe", "end of file", "no route to host", "network is unreachable",
                "input/output error", "no such device")


def run_end_cause(camera: CameraConfig, run: "FfmpegRun") -> str:
    """Why a run ended by itself: `disk_full` when ffmpeg could not write (ENOSPC, before the disk keeper's
    next check holds the camera); `camera_unreachable` when the camera never delivered, or when a live
    camera stopped delivering (the stream ended or the network failed); otherwise `recorder_crashed`."""
    said = " ".join(run.stderr_tail).lower()
    if "no space left on device" in said:
        return "disk_full"
    if not run.produced:
        return "camera_unreachable"
    if source_kind(camera.source) in ("rtsp", "v4l2"):
        if run.proc.returncode == 0 or any(words in said for words in _SOURCE_LOST):
            return "camera_unreachable"
    return "recorder_crashed"


QUIET_LEVELS = frozenset({"info", "verbose", "debug", "trace"})
_LOG_LINE = re.compile(r"^(?P<context>\[[^\]]* @ 0x[0-9a-f]+\] )?\[(?P<level>[a-z]+)\] (?P<text>.*)$")
_STREAM_CODEC = re.compile(r"\bVideo: (?P<codec>[A-Za-z0-9_]+)")
_STREAM_SIZE = re.compile(r", (?P<width>\d{2,5})x(?P<height>\d{2,5})\b")
_STREAM_RATE = re.compile(r", (?P<rate>\d+(?:\.\d+)?)(?P<k>k?) (?P<unit>fps|tbr)\b")


def split_log_level(line: str) -> tuple[str | None, str]:
    """('error', '[segment @ 0x..] message') from ffmpeg's `-loglevel level+...` line; (None, line) if untagged."""
    match = _LOG_LINE.match(line)
    if match is None:
        return None, line
    return match["level"], (match["context"] or "") + match["text"].strip()


def parse_video_stream(text: str) -> VideoInfo | None:
    """VideoInfo from ffmpeg's stream line (`Stream #0:0: Video: h264 (High), yuv420p, 1920x1080 [SAR 1:1
    DAR 16:9], 25 fps, 25 tbr, 90k tbn`); fps from `fps`, else `tbr`. None if the line is not that."""
    codec = _STREAM_CODEC.search(text)
    size = _STREAM_SIZE.search(text)
    if not text.startswith("Stream #") or codec is None or size is None:
        return None
    rates = {m["unit"]: float(m["rate"]) * (1000 if m["k"] else 1) for m in _STREAM_RATE.finditer(text)}
    fps = rates.get("fps") or rates.get("tbr") or 0.0
    return VideoInfo(codec=codec["codec"], width=int(size["width"]), height=int(size["height"]), fps=round(fps, 3))


def new_run_id(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%f")


def build_command(camera: CameraConfig, segment_seconds: int, out_dir: Path, run_id: str,
                  binary: str = "ffmpeg") -> list[str]:
    """The ffmpeg command line of one run (built with ffmpeg-python)."""
    kind = source_kind(camera.source)
    source = camera.source
    in_opts: dict[str, object] = {}
    if kind == "rtsp":
        in_opts = {"rtsp_transport": "tcp", "timeout": "10000000"}
    elif kind == "v4l2":
        in_opts = {"f": "v4l2"}
    elif kind == "lavfi":
        source = camera.source[len("lavfi:"):]
        in_opts = {"f": "lavfi", "re": None}  # lavfi is not live-paced by itself
    elif kind == "file":
        in_opts = {"re": None, "stream_loop": "-1"}
    out_opts: dict[str, object]
    if kind in ("rtsp", "file"):
        out_opts = {"c": "copy"}
    else:
        out_opts = {"c:v": "libx264", "preset": "ultrafast" if kind == "lavfi" else "veryfast",
                    "tune": "zerolatency", "pix_fmt": "yuv420p",
                    "force_key_frames": f"expr:gte(t,n_forced*{segment_seconds})"}
    escaped_dir = str(out_dir).replace("%", "%%")
    out_opts.update({"f": "segment", "segment_time": str(segment_seconds), "segment_format": "mpegts",
                     # flush every packet so a killed ffmpeg leaves everything it had on disk
                     "segment_format_options": "flush_packets=1",
                     "segment_list": str(out_dir / segment_list_name(run_id)), "segment_list_type": "csv"})
    cmd = (ffmpeg.input(source, **in_opts)
           .output(f"{escaped_dir}/{recording_name(run_id)}", **out_opts)
           .compile(cmd=binary))
    # level+info: each line carries its level; warnings and errors are kept for the gap's detail, and the
    # info lines give the output stream (codec, size, fps) so segments need no ffprobe.
    cmd[1:1] = ["-hide_banner", "-nostdin", "-nostats", "-loglevel", "level+info",
                "-progress", "pipe:1", "-stats_period", "0.5"]
    return cmd


@dataclass
class FfmpegRun:
    """One ffmpeg process and what it reported."""

    camera: str
    run_id: str
    proc: subprocess.Popen
    journal: Journal
    started: float = field(default_factory=time.monotonic)
    stderr_tail: deque = field(default_factory=lambda: deque(maxlen=20))
    _samples: int = 0
    _best: datetime | None = None
    _anchor: datetime | None = None
    _max_out_us: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list = field(default_factory=list)
    video: VideoInfo | None = None  # the output stream, from ffmpeg's own report
    source: str = ""  # the camera source, whose credentials are redacted from ffmpeg's messages
    # set when something the supervisor waits for happens: first output, or ffmpeg's exit (stdout EOF)
    changed: threading.Event = field(default_factory=threading.Event)

    def start_readers(self) -> None:
        for target in (self._read_progress, self._read_stderr):
            thread = threading.Thread(target=target, name=f"ffmpeg-{self.camera}-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _read_progress(self) -> None:
        # One read per progress block (about a dozen key=value lines every stats_period), not per line.
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        pending = b""
        while chunk := os.read(fd, 65536):
            wall = datetime.now(UTC)
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if line.startswith(b"out_time_us="):
                    self._progress(wall, line[len(b"out_time_us="):].strip())
        try:  # stdout closes as ffmpeg exits: reap it so the supervisor sees it dead when woken
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.changed.set()

    def _progress(self, wall: datetime, value: bytes) -> None:
        try:
            out_us = int(value)
        except ValueError:
            return  # N/A before the first packet
        if out_us < 0:
            return
        with self._lock:
            if self._max_out_us == 0 and out_us > 0:
                self.changed.set()
            self._max_out_us = max(self._max_out_us, out_us)
            if self._anchor is not None:
                return
            candidate = wall - timedelta(microseconds=out_us)
            self._best = candidate if self._best is None else min(self._best, candidate)
            self._samples += 1
            ready = self._samples >= ANCHOR_SAMPLES
        if ready:
            self.freeze_anchor()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        in_output = False
        for raw in self.proc.stderr:
            # ffmpeg names its input URL, password included, in its messages: redacted before anything keeps it
            line = redact_credentials(raw.decode(errors="replace").strip(), self.source)
            if not line:
                continue
            log.debug("ffmpeg %s: %s", self.camera, line)
            level, text = split_log_level(line)
            if level not in QUIET_LEVELS:
                self.stderr_tail.append(text)
            elif text.startswith("Output #0"):
                in_output = True
            elif in_output and self.video is None and (video := parse_video_stream(text)) is not None:
                self.video = video

    def freeze_anchor(self) -> datetime | None:
        """Fix the run's anchor (once) and journal it; None if ffmpeg never reported a position."""
        with self._lock:
            if self._anchor is None and self._best is not None:
                self._anchor = self._best
                self.journal.set_run_anchor(self.camera, self.run_id, self._anchor)
                log.info("camera %s run %s anchored at %s", self.camera, self.run_id, self._anchor.isoformat())
            return self._anchor

    @property
    def produced(self) -> bool:
        with self._lock:
            return self._max_out_us > 0

    @property
    def last_error(self) -> str | None:
        return self.stderr_tail[-1] if self.stderr_tail else None

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def join_readers(self, timeout: float = 5) -> None:
        for thread in self._threads:
            thread.join(timeout)


class CameraRecorder:
    """Supervises the ffmpeg of one camera: starts it, restarts it with exponential backoff when it dies,
    reports the lost interval to the sealer, and stops it gracefully."""

    def __init__(self, camera: CameraConfig, segment_seconds: int, recording_dir: Path, journal: Journal,
                 sealer: Sealer, binary: str = "ffmpeg", poll_interval: float = 5.0,
                 on_state: Callable[[str, str], None] | None = None):
        self.camera = camera
        self.segment_seconds = segment_seconds
        self.out_dir = recording_dir / camera.id
        self.journal = journal
        self.sealer = sealer
        self.binary = binary
        self.poll_interval = poll_interval
        self._on_state = on_state
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._run: FfmpegRun | None = None
        self._run_lock = threading.Lock()
        self.state = "stopped"
        self.restarts = 0
        self._hold: tuple[str, str] | None = None  # (cause, detail) while the camera must not record

    def hold(self, cause: str, detail: str) -> None:
        """Stop recording (gracefully) and stay stopped until `release()`; the sealer states the outage."""
        self._hold = (cause, detail)
        self._wake()

    def release(self) -> None:
        self._hold = None

    # --- what the sealer asks ---
    def current_run(self) -> FfmpegRun | None:
        with self._run_lock:
            return self._run

    def pid(self) -> int | None:
        run = self.current_run()
        return run.proc.pid if run and run.is_alive() else None

    # --- lifecycle ---
    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"recorder-{self.camera.id}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        self._stop.set()
        self._wake()

    def stop(self, timeout: float = STOP_TIMEOUT + 10) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _wake(self) -> None:
        run = self.current_run()
        if run is not None:
            run.changed.set()

    def _set_state(self, state: str) -> None:
        self.state = state
        if self._on_state:
            self._on_state(self.camera.id, state)

    def _launch(self) -> FfmpegRun | None:
        run_id = new_run_id()
        cmd = build_command(self.camera, self.segment_seconds, self.out_dir, run_id, self.binary)
        log.info("camera %s starting ffmpeg run %s", self.camera.id, run_id)
        log.debug("camera %s: %s", self.camera.id, " ".join(map(redact_source, cmd)))
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env={**os.environ, "TZ": "UTC"}, start_new_session=True,
                                    preexec_fn=_pdeathsig)
        except OSError as exc:
            log.error("camera %s: cannot start %s: %s", self.camera.id, self.binary, exc)
            return None
        run = FfmpegRun(self.camera.id, run_id, proc, self.journal, source=self.camera.source)
        run.start_readers()
        with self._run_lock:
            self._run = run
        return run

    def _loop(self) -> None:
        delay = BACKOFF_START
        while not self._stop.is_set():
            held = self._hold
            if held is not None:
                self.sealer.submit_outage(self.camera.id, held[0], held[1])
                log.warning("camera %s: not recording (%s): %s", self.camera.id, held[0], held[1])
                self._set_state(held[0])
                while self._hold is not None and not self._stop.wait(0.5):
                    pass
                if self._stop.is_set():
                    break
                log.info("camera %s: resuming after %s", self.camera.id, held[0])
                delay = BACKOFF_START
                continue
            self._set_state("starting")
            run = self._launch()
            if run is None:
                self.sealer.submit_outage(self.camera.id, "camera_unreachable", f"cannot start {self.binary}")
            else:
                # Sleeps until ffmpeg's first output or exit, a hold or a stop wakes it (poll_interval is
                # only a safety net): eight cameras polling five times a second cost more CPU than hashing.
                while not self._stop.is_set():
                    if not run.is_alive() or self._hold is not None:
                        break
                    if self.state != "recording" and run.produced:
                        self._set_state("recording")
                    run.changed.wait(self.poll_interval)
                    run.changed.clear()
                if (self._stop.is_set() or self._hold is not None) and run.is_alive():
                    self._graceful_stop(run)
                run.proc.wait()
                run.join_readers()
                run.freeze_anchor()
                self.sealer.submit_run_finished(self.camera.id, run.run_id)
                if self._stop.is_set():
                    break
                if self._hold is not None:
                    continue
                cause = run_end_cause(self.camera, run)
                code = run.proc.returncode
                detail = run.last_error or (f"ffmpeg killed by signal {signal.Signals(-code).name}" if code < 0
                                            else f"ffmpeg exited with code {code}")
                if cause == "camera_unreachable" and code == 0:
                    detail = f"the camera ended the stream (ffmpeg's last message: {detail})"
                log.error("camera %s: ffmpeg run %s exited with code %s (%s): %s", self.camera.id, run.run_id,
                          run.proc.returncode, cause, detail)
                self.sealer.submit_outage(self.camera.id, cause, detail)
                if run.produced and time.monotonic() - run.started > BACKOFF_CAP:
                    delay = BACKOFF_START
            self.restarts += 1
            self._set_state("restarting")
            log.info("camera %s: restarting ffmpeg in %.0f s", self.camera.id, delay)
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, BACKOFF_CAP)
        self._set_state("stopped")

    def _graceful_stop(self, run: FfmpegRun) -> None:
        """SIGINT makes ffmpeg close its current segment properly (same as pressing q)."""
        log.info("camera %s: stopping ffmpeg run %s", self.camera.id, run.run_id)
        try:
            run.proc.send_signal(signal.SIGINT)
            run.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("camera %s: ffmpeg did not stop in %.0f s; killing it", self.camera.id, STOP_TIMEOUT)
            run.proc.kill()
        except ProcessLookupError:
            pass


class Recorders:
    """All camera recorders; answers the sealer's questions about runs (implements spool.RunInfo)."""

    def __init__(self, journal: Journal):
        self.journal = journal
        self.by_camera: dict[str, CameraRecorder] = {}

    def add(self, recorder: CameraRecorder) -> None:
        self.by_camera[recorder.camera.id] = recorder

    def _current(self, camera: str, run_id: str) -> FfmpegRun | None:
        """The camera's current ffmpeg run if it is `run_id`."""
        recorder = self.by_camera.get(camera)
        run = recorder.current_run() if recorder else None
        return run if run is not None and run.run_id == run_id else None

    def anchor(self, camera: str, run_id: str) -> datetime | None:
        run = self._current(camera, run_id)
        if run is not None and (anchor := run.freeze_anchor()) is not None:
            return anchor
        return self.journal.run_anchor(camera, run_id)

    def is_live(self, camera: str, run_id: str) -> bool:
        run = self._current(camera, run_id)
        return run is not None and run.is_alive()

    def video(self, camera: str, run_id: str) -> VideoInfo | None:
        run = self._current(camera, run_id)
        return run.video if run is not None else None

    def start(self) -> None:
        for recorder in self.by_camera.values():
            recorder.start()

    def stop(self) -> None:
        for recorder in self.by_camera.values():
            recorder.request_stop()
        for recorder in self.by_camera.values():
            recorder.stop()

    def hold_all(self, cause: str, detail: str) -> None:
        for recorder in self.by_camera.values():
            recorder.hold(cause, detail)

    def release_all(self) -> None:
        for recorder in self.by_camera.values():
            recorder.release()

    def states(self) -> dict[str, str]:
        return {cam: rec.state for cam, rec in self.by_camera.items()}

"""One ffmpeg run of a camera: its command line, and what it reports (progress, stream, messages, exit cause).
See docs/design/time.md (the run anchor and segment times)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import ffmpeg

from exam_contract.manifest import GapCause, VideoInfo
from exam_contract.redact import redact_credentials

from .config import CameraConfig, source_kind
from .journal import Journal
from .segment_files import recording_name, segment_list_name

log = logging.getLogger(__name__)
UTC = timezone.utc

ANCHOR_SAMPLES = 4


# How ffmpeg reports a live source that went away (a killed GStreamer RTSP server: exit 0 after EOF).
_SOURCE_LOST = ("connection reset", "connection refused", "connection timed out", "operation timed out",
                "broken pipe", "end of file", "no route to host", "network is unreachable",
                "input/output error", "no such device")


def run_end_cause(camera: CameraConfig, run: "FfmpegRun") -> GapCause:
    """Why a run ended by itself: `disk_full` when ffmpeg could not write (ENOSPC, before the disk keeper's
    next check holds the camera); `camera_unreachable` when the camera never delivered, or when a live
    camera stopped delivering (the stream ended or the network failed); otherwise `recorder_crashed`."""
    said = " ".join(run.stderr_tail).lower()
    if "no space left on device" in said:
        return GapCause.DISK_FULL
    if not run.produced:
        return GapCause.CAMERA_UNREACHABLE
    if source_kind(camera.source) in ("rtsp", "v4l2"):
        if run.proc.returncode == 0 or any(words in said for words in _SOURCE_LOST):
            return GapCause.CAMERA_UNREACHABLE
    return GapCause.RECORDER_CRASHED


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
    launched_at: datetime = field(default_factory=lambda: datetime.now(UTC))   # its footage cannot start earlier
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


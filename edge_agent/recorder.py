"""The recorders: a supervisor per camera that runs its ffmpeg (edge_agent.ffmpeg_run), restarts it with backoff,
holds it on request and reports the camera's state and lost intervals; `Recorders` answers the sealer about runs."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path

from exam_contract.manifest import GapCause, VideoInfo
from exam_contract.redact import redact_source

from .config import CameraConfig
from .ffmpeg_run import FfmpegRun, build_command, new_run_id, run_end_cause
from .ffmpeg_run import parse_video_stream, split_log_level  # noqa: F401 - importers of edge_agent.recorder
from .journal import Journal
from .sealer import Sealer

log = logging.getLogger(__name__)

BACKOFF_START = 1.0
# A camera back on the venue LAN is recorded within this: a failed attempt costs ffmpeg about 0.07 CPU-s
# (connection refused), so even eight dark cameras retried every 5 s take about a tenth of a core.
BACKOFF_CAP = 5.0
BACKOFF_RESET_AFTER = 30.0   # a run that recorded this long starts the backoff again from BACKOFF_START
STOP_TIMEOUT = 15.0


class RecorderState(StrEnum):
    """A camera's state as its recorder reports it (the `cameras` of the agent's status): a str, so JSON and
    the status output carry the plain value."""

    STARTING = "starting"        # ffmpeg launched, no output yet
    RECORDING = "recording"      # ffmpeg delivers
    RESTARTING = "restarting"    # ffmpeg ended or could not start; waiting out the backoff
    DISK_FULL = "disk_full"      # held: a held camera's state is its hold's cause (the disk keeper's, the only one)
    STOPPED = "stopped"          # not started, or stopped for good


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class CameraRecorder:
    """Supervises the ffmpeg of one camera: starts it, restarts it with exponential backoff when it dies,
    reports the lost interval to the sealer, and stops it gracefully."""

    def __init__(self, camera: CameraConfig, segment_seconds: int, recording_dir: Path, journal: Journal,
                 sealer: Sealer, binary: str = "ffmpeg", poll_interval: float = 5.0,
                 on_state: Callable[[str, RecorderState], None] | None = None):
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
        self.state = RecorderState.STOPPED
        self.restarts = 0
        self._hold: tuple[RecorderState, str] | None = None  # (cause, detail) while the camera must not record

    def hold(self, cause: GapCause, detail: str) -> None:
        """Stop recording (gracefully) and stay stopped until `release()`; the sealer states the outage. The
        camera's state meanwhile is `cause` (a RecorderState: ValueError for another)."""
        self._hold = (RecorderState(cause), detail)
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

    def _set_state(self, state: RecorderState) -> None:
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
                self.sealer.submit_outage(self.camera.id, GapCause(held[0]), held[1])
                log.warning("camera %s: not recording (%s): %s", self.camera.id, held[0], held[1])
                self._set_state(held[0])
                while self._hold is not None and not self._stop.wait(0.5):
                    pass
                if self._stop.is_set():
                    break
                log.info("camera %s: resuming after %s", self.camera.id, held[0])
                delay = BACKOFF_START
                continue
            self._set_state(RecorderState.STARTING)
            tried_at = datetime.now(timezone.utc)   # a camera with no record yet has been dark since then
            run = self._launch()
            if run is None:
                self.sealer.submit_outage(self.camera.id, GapCause.CAMERA_UNREACHABLE, f"cannot start {self.binary}",
                                          since=tried_at)
            else:
                # Sleeps until ffmpeg's first output or exit, a hold or a stop wakes it (poll_interval is
                # only a safety net): eight cameras polling five times a second cost more CPU than hashing.
                while not self._stop.is_set():
                    if not run.is_alive() or self._hold is not None:
                        break
                    if self.state != RecorderState.RECORDING and run.produced:
                        self._set_state(RecorderState.RECORDING)
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
                if cause == GapCause.CAMERA_UNREACHABLE and code == 0:
                    detail = f"the camera ended the stream (ffmpeg's last message: {detail})"
                log.error("camera %s: ffmpeg run %s exited with code %s (%s): %s", self.camera.id, run.run_id,
                          run.proc.returncode, cause, detail)
                self.sealer.submit_outage(self.camera.id, cause, detail, since=tried_at)
                if run.produced and time.monotonic() - run.started > BACKOFF_RESET_AFTER:
                    delay = BACKOFF_START
            self.restarts += 1
            self._set_state(RecorderState.RESTARTING)
            log.info("camera %s: restarting ffmpeg in %.0f s", self.camera.id, delay)
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, BACKOFF_CAP)
        self._set_state(RecorderState.STOPPED)

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

    def live_since(self, camera: str) -> datetime | None:
        recorder = self.by_camera.get(camera)
        run = recorder.current_run() if recorder else None
        return run.launched_at if run is not None and run.is_alive() else None

    def start(self) -> None:
        for recorder in self.by_camera.values():
            recorder.start()

    def stop(self) -> None:
        for recorder in self.by_camera.values():
            recorder.request_stop()
        for recorder in self.by_camera.values():
            recorder.stop()

    def hold_all(self, cause: GapCause, detail: str) -> None:
        for recorder in self.by_camera.values():
            recorder.hold(cause, detail)

    def release_all(self) -> None:
        for recorder in self.by_camera.values():
            recorder.release()

    def states(self) -> dict[str, RecorderState]:
        return {cam: rec.state for cam, rec in self.by_camera.items()}

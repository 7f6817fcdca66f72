"""Wires recorders, watcher, sealer and uploader together; starts and stops them in order."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exam_contract.alarms import AlarmCode
from exam_contract.manifest import GapCause

from .config import EdgeConfig
from .diskkeeper import DiskKeeper
from .journal import Journal
from .recorder import CameraRecorder, Recorders, RecorderState
from .sealer import Sealer
from .status import StatusReporter
from .uploader import Uploader
from .watcher import SegmentWatcher

log = logging.getLogger(__name__)


class AlreadyRunning(Exception):
    """Another exam-edge process holds this data_dir; the message names it."""


def lock_data_dir(data_dir: Path) -> int:
    """An exclusive flock on {data_dir}/agent.lock for the life of the process (the kernel drops it when the
    process dies, even by SIGKILL), so two agents never share one spool and journal."""
    path = data_dir / "agent.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"another exam-edge is already running on data_dir {data_dir} (lock {path}): "
                             "stop it first, or give this agent its own [agent] data_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class ChainUnknown(Exception):
    """The collector did not say where the cameras' chains end; the message names the cameras and the fix."""


class Agent:
    def __init__(self, config: EdgeConfig, key: Ed25519PrivateKey, drain_seconds: float = 30.0,
                 ffmpeg_binary: str = "ffmpeg"):
        self.config = config
        self.drain_seconds = drain_seconds
        for directory in (config.agent.data_dir, config.agent.recording_dir, config.agent.spool_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = lock_data_dir(config.agent.data_dir)
        self.journal = Journal(config.agent.journal_path)
        self.alarms: dict[AlarmCode, str] = {}
        self._state_lock = threading.Lock()
        self._adopted: dict[str, int] = {}   # camera -> the collector's seq this journal continues from
        resigned = self.journal.resign(key)
        if resigned:
            log.warning("%d record(s) not yet stored were signed by another key; signed again with the key in %s "
                        "(the records and their chain are unchanged)", resigned, config.agent.key_file)
        self.uploader = Uploader(config, self.journal, on_alarm=self._alarm)
        self.recorders = Recorders(self.journal)
        self.sealer = Sealer(config, self.journal, key, clock=self.uploader.clock.current, runs=self.recorders,
                             on_sealed=self.uploader.wake)
        health = None
        if config.health.enabled:
            from .health import HealthAnalyzer  # OpenCV is loaded only when the analysis is on

            health = HealthAnalyzer(config, binary=ffmpeg_binary)
            self.sealer.health_check = health.flags_for
        for cam in config.cameras:
            self.recorders.add(CameraRecorder(cam, config.recording.segment_seconds, config.agent.recording_dir,
                                              self.journal, self.sealer, binary=ffmpeg_binary,
                                              on_state=self._camera_state))
        self.watcher = SegmentWatcher(config.agent.recording_dir, self.sealer)
        self.disk = DiskKeeper(config, self.journal, self.recorders, on_alarm=self._alarm)
        self.status = StatusReporter(config, self.journal, self.recorders.states, self.uploader.set_status,
                                     alarms=lambda: dict(self.alarms),
                                     health=(lambda: dict(health.last_flags)) if health else dict,
                                     upload=self.uploader.upload_rate, batch_backlog=self.uploader.batch_backlog)
        self._started = False

    def _alarm(self, code: AlarmCode, detail: str | None) -> None:
        """Raised (detail) or cleared (None); the retained status topic carries the active ones."""
        with self._state_lock:
            if detail is None:
                self.alarms.pop(code, None)
            else:
                self.alarms[code] = detail
            self.uploader.set_status(alarms=dict(self.alarms))

    def _camera_state(self, camera: str, state: RecorderState) -> None:
        with self._state_lock:
            self.uploader.set_status(cameras=self.recorders.states())

    def has_history(self) -> bool:
        """True once this data_dir has journaled a record (the agent reached its broker before)."""
        return bool(self.journal.cameras())

    def cameras_without_chain(self) -> list[str]:
        """Configured cameras this journal has never recorded, adopted or started a chain for."""
        return [cam.id for cam in self.config.cameras if not self.journal.chain_known(cam.id)]

    def adopt_chain_heads(self, timeout: float, new_chains: bool = False) -> list[str]:
        """Before recording, learn where the collector's chain of each camera without one here ends, and
        continue it: a re-imaged or replaced venue machine (new journal) must not restart a camera at seq 1,
        which the collector would reject as replayed. Cameras the collector has no record of start at seq 1.
        With `new_chains`, cameras are started at seq 1 without asking. Raises ChainUnknown when the collector
        does not answer in time; returns the cameras whose chain was continued."""
        cameras = self.cameras_without_chain()
        if not cameras:
            return []
        if new_chains:
            for camera in cameras:
                self.journal.start_chain(camera)
            log.warning("camera(s) %s start new chains at seq 1 without asking the collector (--new-chains)",
                        ", ".join(cameras))
            return []
        answer = self.uploader.request_chain_heads(cameras, timeout)
        if answer is None:
            raise ChainUnknown(
                f"the collector did not answer within {timeout:.0f} s where the chains of camera(s) "
                f"{', '.join(cameras)} end: start `exam-collector serve` (and check the broker ACL allows "
                f"exam/v1/{self.config.agent.id}/chain); only for cameras that have never uploaded, "
                "`exam-edge run --new-chains` starts them at seq 1")
        continued = []
        for camera in cameras:
            head = answer.heads.get(camera)
            if head is None:
                self.journal.start_chain(camera)
            elif self.journal.adopt_head(camera, head.seq, head.record, head.end):
                self._adopted[camera] = head.seq
                continued.append(camera)
                log.warning("camera %s: this journal is new; continuing the collector's chain after seq %s "
                            "(record %s)", camera, head.seq, head.record[:12])
        return continued

    def connect_later(self) -> None:
        self.uploader.connect_later()

    def connect(self) -> None:
        """Reach the broker first (raises BrokerUnreachable / BrokerRefused) so a bad broker stops us early."""
        self.uploader.connect()

    def start(self) -> None:
        self.uploader.start()
        for camera, seq in self._adopted.items():
            # The first cause of an outage names it: the gap from the collector's last record to this
            # journal's first one is a machine replaced or a journal lost, not a plain stop.
            self.sealer.note_outage(camera, GapCause.AGENT_STOPPED,
                                    f"journal started anew (venue machine replaced or its journal lost): chain "
                                    f"continued after the collector's seq {seq}")
        self.sealer.recover()
        for cam in self.config.cameras:
            if self.journal.camera_state(cam.id).last_end is not None:
                self.sealer.note_outage(cam.id, GapCause.AGENT_STOPPED, "the edge agent was not recording")
        self.sealer.start()
        self.watcher.start()
        self.disk.check()  # a full disk holds the cameras before their first ffmpeg
        self.recorders.start()
        self.disk.start()
        self.status.start()
        self._started = True
        log.info("agent %s running with %d camera(s)", self.config.agent.id, len(self.config.cameras))

    def stop(self) -> bool:
        """Stop ffmpegs gracefully, seal their last segments, drain uploads for a bounded time.
        Returns True when everything sealed was acknowledged."""
        if self._started:
            log.info("stopping: closing the cameras' last segments")
            self.disk.stop()
            self.recorders.stop()
            self.watcher.stop()
            self.sealer.stop()
            self.sealer.close_outages()
            self.uploader.wake()
            if self.drain_seconds > 0:
                log.info("draining uploads for up to %.0f s (%d pending)", self.drain_seconds,
                         self.uploader.backlog())
            drained = self.uploader.drain(self.drain_seconds)
            if not drained:
                log.warning("%d record(s) still pending; they are kept in the spool and sent on the next run",
                            self.uploader.backlog())
        else:
            drained = self.uploader.backlog() == 0
        self.status.stop()
        self.uploader.stop()
        self.journal.close()
        os.close(self._lock_fd)
        return drained

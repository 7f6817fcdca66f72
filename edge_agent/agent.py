"""Wires recorders, watcher, sealer and uploader together; starts and stops them in order."""

from __future__ import annotations

import logging
import threading

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .config import EdgeConfig
from .recorder import CameraRecorder, Recorders
from .spool import Journal, Sealer
from .uploader import Uploader
from .watcher import SegmentWatcher

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, config: EdgeConfig, key: Ed25519PrivateKey, drain_seconds: float = 30.0,
                 ffmpeg_binary: str = "ffmpeg"):
        self.config = config
        self.drain_seconds = drain_seconds
        for directory in (config.agent.data_dir, config.agent.recording_dir, config.agent.spool_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(config.agent.journal_path)
        self.uploader = Uploader(config, self.journal)
        self.recorders = Recorders(self.journal)
        self.sealer = Sealer(config, self.journal, key, clock=self.uploader.clock.current, runs=self.recorders,
                             on_sealed=self.uploader.wake)
        for cam in config.cameras:
            self.recorders.add(CameraRecorder(cam, config.recording.segment_seconds, config.agent.recording_dir,
                                              self.journal, self.sealer, binary=ffmpeg_binary,
                                              on_state=self._camera_state))
        self.watcher = SegmentWatcher(config.agent.recording_dir, self.sealer)
        self._started = False
        self._state_lock = threading.Lock()

    def _camera_state(self, camera: str, state: str) -> None:
        with self._state_lock:
            self.uploader.set_status(cameras=self.recorders.states())

    def connect(self) -> None:
        """Reach the broker first (raises BrokerUnreachable / BrokerRefused) so a bad broker stops us early."""
        self.uploader.connect()

    def start(self) -> None:
        self.uploader.start()
        self.sealer.recover()
        for cam in self.config.cameras:
            if self.journal.camera_state(cam.id).last_end is not None:
                self.sealer.note_outage(cam.id, "agent_stopped", "the edge agent was not recording")
        self.sealer.start()
        self.watcher.start()
        self.recorders.start()
        self._started = True
        log.info("agent %s running with %d camera(s)", self.config.agent.id, len(self.config.cameras))

    def stop(self) -> bool:
        """Stop ffmpegs gracefully, seal their last segments, drain uploads for a bounded time.
        Returns True when everything sealed was acknowledged."""
        if self._started:
            log.info("stopping: closing the cameras' last segments")
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
        self.uploader.stop()
        self.journal.close()
        return drained

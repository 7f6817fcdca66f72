"""Watches recording/ and hands finished segments to the sealer.

A segment is finished when inotify reports it closed after writing (watchdog's FileClosedEvent, i.e.
IN_CLOSE_WRITE): ffmpeg closes a segment when it starts the next one, on a clean exit, and the kernel closes
it when ffmpeg is killed. Reads (our own ffprobe and hashing) produce no FileClosedEvent.
"""

from __future__ import annotations

import logging
from pathlib import Path

from watchdog.events import FileClosedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .sealer import Sealer
from .segment_files import parse_recording_name

log = logging.getLogger(__name__)


class _Handler(FileSystemEventHandler):
    def __init__(self, root: Path, sealer: Sealer):
        self.root = root
        self.sealer = sealer

    def on_closed(self, event: FileSystemEvent) -> None:
        if not isinstance(event, FileClosedEvent) or event.is_directory:
            return
        path = Path(event.src_path if isinstance(event.src_path, str) else event.src_path.decode())
        if path.parent.parent != self.root or parse_recording_name(path.name) is None:
            return
        camera = path.parent.name
        log.debug("camera %s: %s closed", camera, path.name)
        self.sealer.submit_segment(camera, path)


class SegmentWatcher:
    def __init__(self, recording_dir: Path, sealer: Sealer):
        self.root = Path(recording_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self._observer = Observer()
        # Ask the kernel for IN_CLOSE_WRITE only: ffmpeg flushes every packet, and waking watchdog for each
        # write cost about two thirds of the agent's CPU with 8 cameras (bench/agent_cpu.py).
        self._observer.schedule(_Handler(self.root, sealer), str(self.root), recursive=True,
                                event_filter=[FileClosedEvent])

    def start(self) -> None:
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(10)

"""Frame health of finished segments: black, obstructed, defocused, frozen or moved camera views.

Only keyframes are decoded (`-skip_frame nokey`), scaled down to ANALYSIS_WIDTH, about 1 CPU-s per 1080p
minute instead of about 7 for a full decode. `judge` is the decision: a pure function of per-frame
statistics. `HealthAnalyzer` does the I/O (ffmpeg, thumbnails, the camera's reference view) for the sealer.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np

from exam_contract.manifest import VideoInfo, segment_file_name

from .config import CameraConfig, EdgeConfig

log = logging.getLogger(__name__)

ANALYSIS_WIDTH = 320
ANALYSIS_TIMEOUT = 120.0
THUMBNAIL_QUALITY = 80
PRUNE_INTERVAL = 3600.0

# The manifest's `health` flags. The collector's coverage treats black, frozen and obstructed footage as
# a gap; defocused, moved and analysis_failed are reported but still cover.
BLACK = "black"
OBSTRUCTED = "obstructed"
DEFOCUSED = "defocused"
FROZEN = "frozen"
MOVED = "moved"
ANALYSIS_FAILED = "analysis_failed"
FLAGS: tuple[str, ...] = (BLACK, OBSTRUCTED, DEFOCUSED, FROZEN, MOVED, ANALYSIS_FAILED)


class HealthError(Exception):
    """A segment could not be analysed (ffmpeg failed, timed out or produced no frame)."""


class ReferenceViewError(Exception):
    """A reference view cannot be read or written; the message names the file."""


@dataclass(frozen=True)
class FrameStats:
    """What one keyframe (gray, ANALYSIS_WIDTH wide) looks like."""

    mean: float  # brightness 0..255
    std: float  # contrast: standard deviation of brightness
    sharpness: float  # variance of the Laplacian
    change: float | None = None  # share of pixels that changed vs the previous keyframe; None for the first
    similarity: float | None = None  # correlation with the reference view, unaligned (-1..1); None: no reference
    shift: float | None = None  # displacement vs the reference view as a share of the width; None: no alignment
    rotation: float | None = None  # rotation vs the reference view, degrees; None: no alignment


@dataclass(frozen=True)
class HealthThresholds:
    black_mean: float = 24.0
    black_std: float = 12.0
    obstructed_std: float = 8.0
    defocused_sharpness: float = 40.0
    frozen_change: float = 0.0005
    changed_pixel: int = 10  # a pixel "changed" when its brightness moved by more than this
    moved_shift: float = 0.04
    moved_rotation: float = 3.0
    moved_similarity: float = 0.5  # used only when the view cannot be aligned to the reference
    min_inliers: int = 15  # feature matches needed to trust an alignment
    share: float = 0.5  # a flag needs at least this share of the keyframes (or of the keyframe pairs)


class ReferenceView:
    """A camera's reference view at analysis size, with its ORB features (computed once)."""

    def __init__(self, gray: np.ndarray):
        self.gray = gray
        self.keypoints, self.descriptors = _orb().detectAndCompute(gray, None)

    def resized(self, shape: tuple[int, ...]) -> "ReferenceView":
        if self.gray.shape[:2] == shape[:2]:
            return self
        return ReferenceView(cv2.resize(self.gray, (shape[1], shape[0]), interpolation=cv2.INTER_AREA))


def _orb() -> cv2.ORB:
    return cv2.ORB.create(nfeatures=500, fastThreshold=10, edgeThreshold=15, patchSize=15)


def _similarity(a: np.ndarray, b: np.ndarray) -> float:
    x = a.astype(np.float32) - float(a.mean())
    y = b.astype(np.float32) - float(b.mean())
    norm = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / norm if norm else 0.0


def _alignment(reference: ReferenceView, gray: np.ndarray, min_inliers: int) -> tuple[float, float] | None:
    """(shift in pixels, rotation in degrees) of `gray` against the reference by ORB features and RANSAC;
    None when too few features agree. Moving people are outliers; a moved camera moves every static one."""
    if reference.descriptors is None:
        return None
    keypoints, descriptors = _orb().detectAndCompute(gray, None)
    if descriptors is None:
        return None
    matches = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True).match(reference.descriptors, descriptors)
    if len(matches) < min_inliers:
        return None
    src = np.array([reference.keypoints[m.queryIdx].pt for m in matches], dtype=np.float32)
    dst = np.array([keypoints[m.trainIdx].pt for m in matches], dtype=np.float32)
    matrix, inliers = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=3.0)
    if matrix is None or inliers is None or int(inliers.sum()) < min_inliers:
        return None
    # Displacement of the picture centre, so a rotation about a corner counts as a shift too.
    cx, cy = gray.shape[1] / 2, gray.shape[0] / 2
    moved_x = matrix[0, 0] * cx + matrix[0, 1] * cy + matrix[0, 2] - cx
    moved_y = matrix[1, 0] * cx + matrix[1, 1] * cy + matrix[1, 2] - cy
    return math.hypot(moved_x, moved_y), math.degrees(math.atan2(matrix[1, 0], matrix[0, 0]))


def frame_stats(gray: np.ndarray, previous: np.ndarray | None = None, reference: ReferenceView | None = None,
                thresholds: HealthThresholds = HealthThresholds()) -> FrameStats:
    """Statistics of one gray frame; `previous` and `reference` must have its shape."""
    mean, std = cv2.meanStdDev(gray)
    sharpness = float(cv2.Laplacian(gray, cv2.CV_64F).var())
    change = None
    if previous is not None:
        diff = cv2.absdiff(gray, previous)
        change = float(np.count_nonzero(diff > thresholds.changed_pixel)) / diff.size
    similarity = shift = rotation = None
    if reference is not None:
        similarity = _similarity(reference.gray, gray)
        aligned = _alignment(reference, gray, thresholds.min_inliers)
        if aligned is not None:
            shift, rotation = aligned[0] / gray.shape[1], aligned[1]
    return FrameStats(mean=float(mean[0][0]), std=float(std[0][0]), sharpness=sharpness, change=change,
                      similarity=similarity, shift=shift, rotation=rotation)


def _moved(f: FrameStats, t: HealthThresholds) -> bool:
    if f.shift is not None and f.rotation is not None:
        return f.shift > t.moved_shift or abs(f.rotation) > t.moved_rotation
    # No alignment (e.g. the camera now faces a wall): only a picture unlike the reference counts.
    return f.similarity is not None and f.similarity < t.moved_similarity


def judge(frames: Sequence[FrameStats], thresholds: HealthThresholds = HealthThresholds()) -> tuple[str, ...]:
    """The health flags of a segment from its keyframes' statistics (no I/O)."""
    if not frames:
        return ()
    t = thresholds

    def most(items: Sequence[bool]) -> bool:
        return bool(items) and sum(items) >= t.share * len(items)

    black = [f.mean < t.black_mean and f.std < t.black_std for f in frames]
    # A lens covered by a hand or paper: an almost uniform picture that is not dark.
    obstructed = [not b and f.std < t.obstructed_std for f, b in zip(frames, black, strict=True)]
    # Out of focus or smeared: contrast is there, edges are not.
    defocused = [not b and not o and f.sharpness < t.defocused_sharpness
                 for f, b, o in zip(frames, black, obstructed, strict=True)]
    flags = []
    if most(black):
        flags.append(BLACK)
    elif most(obstructed):
        flags.append(OBSTRUCTED)
    elif most(defocused):
        flags.append(DEFOCUSED)
    # A uniform picture never changes; only a picture with content can be "frozen".
    seen = [(f, b or o) for f, b, o in zip(frames, black, obstructed, strict=True)]
    if most([f.change < t.frozen_change for f, blank in seen if f.change is not None and not blank]):
        flags.append(FROZEN)
    if most([_moved(f, t) for f, blank in seen if f.similarity is not None and not blank]):
        flags.append(MOVED)
    return tuple(flags)


def analysis_size(width: int, height: int) -> tuple[int, int]:
    """ANALYSIS_WIDTH wide, even height, same aspect ratio."""
    if width <= 0 or height <= 0:
        raise HealthError(f"video size {width}x{height} is not usable")
    out_h = max(2, int(round(ANALYSIS_WIDTH * height / width / 2)) * 2)
    return ANALYSIS_WIDTH, out_h


def keyframes_command(path: Path | str, size: tuple[int, int], binary: str = "ffmpeg") -> list[str]:
    """ffmpeg decoding only keyframes, scaled, as raw BGR frames on stdout. Without `-fps_mode passthrough`
    ffmpeg would duplicate each keyframe to fill the frame rate."""
    return [binary, "-hide_banner", "-nostdin", "-loglevel", "error", "-skip_frame", "nokey", "-i", str(path),
            "-map", "0:v:0", "-an", "-sn", "-dn", "-fps_mode", "passthrough",
            "-vf", f"scale={size[0]}:{size[1]}:flags=area", "-pix_fmt", "bgr24", "-f", "rawvideo", "pipe:1"]


def read_keyframes(path: Path, size: tuple[int, int], timeout: float = ANALYSIS_TIMEOUT,
                   binary: str = "ffmpeg") -> Iterator[np.ndarray]:
    """Yields the segment's keyframes as BGR arrays of `size`; raises HealthError on failure or timeout."""
    width, height = size
    frame_bytes = width * height * 3
    # stderr goes to a file: a corrupt segment can make ffmpeg write more than a pipe holds.
    errors = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(keyframes_command(path, size, binary), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=errors)
    except OSError as exc:
        errors.close()
        raise HealthError(f"cannot start {binary}: {exc}") from exc
    timer = threading.Timer(timeout, proc.kill)  # a stalled ffmpeg must not stall the sealer
    timer.start()
    count = 0
    try:
        assert proc.stdout is not None
        while True:
            data = proc.stdout.read(frame_bytes)
            if len(data) < frame_bytes:
                break
            count += 1
            yield np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
        proc.wait()
        if not timer.is_alive() and proc.returncode != 0:
            raise HealthError(f"keyframe decoding of {path.name} did not finish in {timeout:.0f} s")
        if proc.returncode != 0:
            errors.seek(0)
            err = errors.read().decode(errors="replace").strip().splitlines()
            raise HealthError(f"ffmpeg could not decode {path.name}: {err[-1] if err else proc.returncode}")
        if count == 0:
            raise HealthError(f"{path.name} has no decodable keyframe")
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        errors.close()


def to_gray(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame


def analyse_frames(frames: Iterator[np.ndarray], reference: ReferenceView | None,
                   thresholds: HealthThresholds = HealthThresholds()) -> tuple[list[FrameStats], np.ndarray | None]:
    """Statistics of every frame, and the last frame (for the thumbnail)."""
    stats: list[FrameStats] = []
    previous = last = None
    for frame in frames:
        gray = to_gray(frame)
        if reference is not None:
            reference = reference.resized(gray.shape)  # the camera's resolution may have changed
        stats.append(frame_stats(gray, previous, reference, thresholds))
        previous, last = gray, frame
    return stats, last


@dataclass(frozen=True)
class HealthReport:
    flags: tuple[str, ...]
    frames: int
    thumbnail: Path | None


class HealthAnalyzer:
    """Analyses a finished segment for the sealer; writes its thumbnail; reads the camera's reference view."""

    def __init__(self, config: EdgeConfig, thresholds: HealthThresholds = HealthThresholds(),
                 binary: str = "ffmpeg", timeout: float = ANALYSIS_TIMEOUT):
        self.config = config
        self.thresholds = thresholds
        self.binary = binary
        self.timeout = timeout
        self._references: dict[str, tuple[float, ReferenceView | None]] = {}
        self._last_prune = -PRUNE_INTERVAL
        self.last_flags: dict[str, tuple[str, ...]] = {}  # camera -> flags of its latest segment (for status)

    def thumbnail_path(self, camera: str, start: datetime) -> Path:
        return self.config.agent.thumbnail_dir / camera / segment_file_name(camera, start, "jpg")

    def reference(self, camera: str) -> ReferenceView | None:
        """The camera's reference view (re-read when `probe --set-reference` replaced it)."""
        path = reference_path(self.config, camera)
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        cached = self._references.get(camera)
        if cached is None or cached[0] != mtime:
            image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if image is None:
                log.warning("camera %s: reference view %s is unreadable; not checking for a moved view",
                            camera, path)
            self._references[camera] = cached = (mtime, None if image is None else ReferenceView(image))
        return cached[1]

    def analyse(self, camera: CameraConfig, path: Path, start: datetime, video: VideoInfo) -> HealthReport:
        """Flags of one segment; raises HealthError when it cannot be analysed."""
        size = analysis_size(video.width, video.height)
        frames = read_keyframes(path, size, self.timeout, self.binary)
        stats, last = analyse_frames(frames, self.reference(camera.id), self.thresholds)
        flags = judge(stats, self.thresholds)
        thumb = None
        if last is not None:
            thumb = self.thumbnail_path(camera.id, start)
            try:
                thumb.parent.mkdir(parents=True, exist_ok=True)
                if not cv2.imwrite(str(thumb), last, [cv2.IMWRITE_JPEG_QUALITY, THUMBNAIL_QUALITY]):
                    raise OSError("cv2.imwrite failed")
            except OSError as exc:
                log.warning("camera %s: cannot write thumbnail %s (%s)", camera.id, thumb, exc)
                thumb = None
        if flags:
            log.warning("camera %s segment %s: health %s", camera.id, path.name, ",".join(flags))
        else:
            log.debug("camera %s segment %s: %d keyframes healthy", camera.id, path.name, len(stats))
        return HealthReport(flags=flags, frames=len(stats), thumbnail=thumb)

    def flags_for(self, camera: CameraConfig, path: Path, start: datetime, video: VideoInfo) -> tuple[str, ...]:
        """The sealer's hook: never raises; a failed analysis is logged and flagged, and the segment is sealed."""
        try:
            if time.monotonic() - self._last_prune > PRUNE_INTERVAL:
                self._last_prune = time.monotonic()
                self.prune_thumbnails()
            flags = self.analyse(camera, path, start, video).flags
        except Exception as exc:  # noqa: BLE001 - whatever goes wrong here must not stop sealing
            log.error("camera %s segment %s: health analysis failed: %s", camera.id, path.name, exc)
            flags = (ANALYSIS_FAILED,)
        self.last_flags[camera.id] = flags
        return flags

    def prune_thumbnails(self, keep_days: int | None = None, now: float | None = None) -> int:
        """Deletes thumbnails older than `[agent] local_keep_days`; returns how many."""
        keep = self.config.agent.local_keep_days if keep_days is None else keep_days
        cutoff = (now or time.time()) - keep * 86400
        removed = 0
        root = self.config.agent.thumbnail_dir
        if not root.is_dir():
            return 0
        for thumb in root.glob("*/*.jpg"):
            try:
                if thumb.stat().st_mtime < cutoff:
                    thumb.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


def reference_path(config: EdgeConfig, camera: str) -> Path:
    return config.agent.reference_dir / f"{camera}.png"


def save_reference(config: EdgeConfig, camera: str, image: np.ndarray) -> Path:
    """Stores a camera's reference view (ANALYSIS_WIDTH wide, gray PNG), atomically."""
    gray = to_gray(image)
    width, height = analysis_size(gray.shape[1], gray.shape[0])
    gray = cv2.resize(gray, (width, height), interpolation=cv2.INTER_AREA)
    path = reference_path(config, camera)
    tmp = path.with_suffix(".tmp.png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(tmp), gray):
            raise OSError(f"cannot encode {tmp}")
        os.replace(tmp, path)
    except OSError as exc:
        raise ReferenceViewError(f"cannot write the reference view {path} ({exc}): check [agent] data_dir "
                             "permissions") from exc
    return path

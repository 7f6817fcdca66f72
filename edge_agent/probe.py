"""What a camera delivers (`exam-edge probe`) and what a recorded segment holds (`probe_segment`, for the sealer).

`exam-edge probe` opens each camera like the recorder will, reports what it delivers and saves a snapshot.
A failure is reported as a short reason a technician can act on (unreachable host:port, 401, no video
stream, timeout...). `classify_failure` is the pure part that reads ffmpeg's messages.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from exam_contract.manifest import VideoInfo
from exam_contract.redact import redact_credentials, redact_source

from .config import CameraConfig, EdgeConfig, source_kind

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 15.0
CONNECT_TIMEOUT = 5.0
BITRATE_SECONDS = 2
RTSP_PORTS = {"rtsp": 554, "rtsps": 322}


class CameraFailure(Exception):
    """The camera cannot be used; the message is the reason shown in the probe table."""


@dataclass(frozen=True)
class CameraProbe:
    camera: str
    room: str
    ok: bool
    reason: str = ""
    codec: str | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    bitrate: int | None = None  # bits per second, measured over the first packets
    snapshot: Path | None = None

    @property
    def resolution(self) -> str:
        return f"{self.width}x{self.height}" if self.width and self.height else "-"


def input_args(camera: CameraConfig, timeout: float) -> list[str]:
    """ffmpeg/ffprobe input options and URL for a camera source, as the recorder opens it."""
    kind = source_kind(camera.source)
    if kind == "rtsp":
        return ["-rtsp_transport", "tcp", "-timeout", str(int(timeout * 1_000_000)), "-i", camera.source]
    if kind == "v4l2":
        return ["-f", "v4l2", "-i", camera.source]
    if kind == "lavfi":
        return ["-f", "lavfi", "-i", camera.source[len("lavfi:"):]]
    return ["-i", camera.source]


def classify_failure(stderr: str, source: str, waited_out: bool = False) -> str:
    """A technician's reason from ffmpeg/ffprobe error output. `waited_out`: the tool gave up only after
    its whole I/O timeout (an RTSP server that accepts the connection but never answers)."""
    stderr = redact_credentials(stderr, source)  # ffmpeg quotes the URL with its password
    text = stderr.lower()
    target = _host_port(source) or redact_source(source)
    if waited_out and _host_port(source) and ("invalid data" in text or "timed out" in text):
        return (f"timeout: {target} accepted the connection but sent no answer (camera hung or busy, "
                "or not an RTSP server on this port)")
    if "401 unauthorized" in text or "401 authorization" in text:
        return "auth failure (401): fix the user name and password in the camera's source URL"
    if "403 forbidden" in text:
        return "access denied (403): allow this user to stream in the camera's settings"
    if "404 not found" in text or "454 session not found" in text:
        return "stream path not found (404): fix the path after host:port in source (see the camera's manual)"
    if "connection refused" in text:
        return f"unreachable: {target} refused the connection (camera off, wrong port, or RTSP disabled)"
    if "connection timed out" in text or "operation timed out" in text:
        return f"timeout: no answer from {target} (wrong IP address, network or firewall)"
    if "no route to host" in text or "network is unreachable" in text:
        return f"unreachable: no route to {target} (check cabling, IP address and VLAN)"
    if "name or service not known" in text or "failed to resolve" in text:
        return f"unknown host in {target}: fix the host name or use the camera's IP address"
    if "no such file or directory" in text:
        return "source not found: fix the device or file path in source"
    if "permission denied" in text:
        return "permission denied: add the agent's user to the 'video' group or fix file permissions"
    if "device or resource busy" in text:
        return "device busy: another program uses this camera; stop it"
    if "invalid data found" in text:
        return "not a video stream: the source answers but sends no readable video"
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return f"cannot open source: {lines[-1] if lines else 'ffprobe failed without a message'}"


def _host_port(source: str) -> str | None:
    # Parsed without credentials: an unencoded `#`, `?` or `/` in a password would make urlsplit take part
    # of the password for the host or port.
    parts = urlsplit(redact_source(source))
    if parts.scheme not in RTSP_PORTS or not parts.hostname:
        return None
    try:
        port = parts.port or RTSP_PORTS[parts.scheme]
    except ValueError:
        return None
    return f"{parts.hostname}:{port}"


def check_reachable(source: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """For rtsp:// sources: a TCP connection to host:port, so an unreachable camera fails fast and clearly."""
    target = _host_port(source)
    if target is None:
        return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except socket.gaierror as exc:
        raise CameraFailure(f"unknown host in {target}: fix the host name or use the camera's IP address") from exc
    except ConnectionRefusedError as exc:
        raise CameraFailure(f"unreachable: {target} refused the connection (camera off, wrong port, "
                            "or RTSP disabled)") from exc
    except TimeoutError as exc:
        raise CameraFailure(f"timeout: no answer from {target} in {timeout:.0f} s (wrong IP address, "
                            "network or firewall)") from exc
    except OSError as exc:
        raise CameraFailure(f"unreachable: {target} ({exc.strerror or exc})") from exc


def _run(cmd: list[str], timeout: float, what: str) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise CameraFailure(f"timeout: {what} got no answer in {timeout:.0f} s (camera overloaded, "
                            "or too many clients on it)") from exc
    except OSError as exc:
        raise CameraFailure(f"cannot run {cmd[0]} ({exc}): install ffmpeg") from exc


def _fps(stream: dict) -> float | None:
    for key in ("avg_frame_rate", "r_frame_rate"):
        try:
            value = Fraction(stream.get(key, "0/0"))
        except (ValueError, ZeroDivisionError):
            continue
        if value > 0:
            return round(float(value), 3)
    return None


def _bitrate(stream: dict, packets: list[dict]) -> int | None:
    times, total = [], 0
    for packet in packets:
        stamp = packet.get("pts_time", packet.get("dts_time"))
        if stamp in (None, "N/A") or not str(packet.get("size", "")).isdigit():
            continue
        times.append(float(stamp))
        total += int(packet["size"])
    if len(times) > 1 and max(times) > min(times):
        # n packets span n - 1 frame intervals: leave out one packet's bytes.
        return int(total * 8 * (len(times) - 1) / len(times) / (max(times) - min(times)))
    try:
        return int(stream["bit_rate"])
    except (KeyError, TypeError, ValueError):
        return None


def probe_camera(camera: CameraConfig, snapshot_dir: Path, timeout: float = PROBE_TIMEOUT,
                 ffmpeg: str = "ffmpeg", ffprobe: str = "ffprobe") -> tuple[CameraProbe, np.ndarray | None]:
    """What the camera delivers, and a snapshot (saved as {snapshot_dir}/{camera}.jpg). Never raises for
    camera problems: they come back as a failed CameraProbe."""
    try:
        return _probe(camera, snapshot_dir, timeout, ffmpeg, ffprobe)
    except CameraFailure as exc:
        reason = redact_credentials(str(exc), camera.source)
        log.warning("camera %s: probe failed: %s", camera.id, reason)
        return CameraProbe(camera=camera.id, room=camera.room, ok=False, reason=reason), None


def _probe(camera: CameraConfig, snapshot_dir: Path, timeout: float, ffmpeg: str,
           ffprobe: str) -> tuple[CameraProbe, np.ndarray]:
    # Imported here, not at the top: the sealer imports this module for probe_segment, and an agent without
    # the health analysis does not load OpenCV.
    import cv2
    import numpy as np

    check_reachable(camera.source, min(CONNECT_TIMEOUT, timeout))
    cmd = [ffprobe, "-hide_banner", "-v", "error", *input_args(camera, timeout), "-select_streams", "v:0",
           "-read_intervals", f"%+{BITRATE_SECONDS}", "-show_streams", "-show_entries",
           "packet=size,pts_time,dts_time", "-of", "json"]
    began = time.monotonic()
    # The subprocess gets longer than ffmpeg's own I/O timeout, so ffmpeg reports what it saw.
    result = _run(cmd, timeout + 10, "ffprobe")
    stderr = result.stderr.decode(errors="replace")
    if result.returncode != 0:
        raise CameraFailure(classify_failure(stderr, camera.source, time.monotonic() - began >= timeout))
    try:
        info = json.loads(result.stdout or b"{}")
    except json.JSONDecodeError as exc:
        raise CameraFailure(f"ffprobe gave unreadable output ({exc})") from exc
    streams = [s for s in info.get("streams", []) if s.get("codec_type") == "video"]
    if not streams:
        raise CameraFailure("no video stream: the source has no video (only audio or data); pick the "
                            "camera's video channel")
    stream = streams[0]
    snap_cmd = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", *input_args(camera, timeout),
                "-map", "0:v:0", "-frames:v", "1", "-f", "image2pipe", "-c:v", "png", "pipe:1"]
    snap = _run(snap_cmd, timeout + 10, "the snapshot")
    image = cv2.imdecode(np.frombuffer(snap.stdout, np.uint8), cv2.IMREAD_COLOR) if snap.stdout else None
    if snap.returncode != 0 or image is None:
        raise CameraFailure(classify_failure(snap.stderr.decode(errors="replace"), camera.source)
                            if snap.returncode != 0 else "no picture: the stream opened but no frame decoded")
    snapshot_dir.mkdir(parents=True, exist_ok=True)
    path = snapshot_dir / f"{camera.id}.jpg"
    tmp = snapshot_dir / f".{camera.id}.tmp.jpg"
    if not cv2.imwrite(str(tmp), image):
        raise CameraFailure(f"cannot write the snapshot {path}: check [agent] data_dir permissions")
    os.replace(tmp, path)
    probe = CameraProbe(camera=camera.id, room=camera.room, ok=True, codec=stream.get("codec_name"),
                        width=int(stream.get("width") or image.shape[1]),
                        height=int(stream.get("height") or image.shape[0]), fps=_fps(stream),
                        bitrate=_bitrate(stream, info.get("packets", [])), snapshot=path)
    log.info("camera %s: %s %s %s fps", camera.id, probe.codec, probe.resolution, probe.fps)
    return probe, image


def probe_all(config: EdgeConfig, cameras: list[CameraConfig] | None = None,
              timeout: float = PROBE_TIMEOUT) -> list[tuple[CameraProbe, np.ndarray | None]]:
    return [probe_camera(cam, config.agent.snapshot_dir, timeout) for cam in (cameras or list(config.cameras))]


def format_bitrate(bits: int | None) -> str:
    if bits is None:
        return "-"
    return f"{bits / 1e6:.2f} Mbit/s" if bits >= 1_000_000 else f"{bits / 1e3:.0f} kbit/s"


def format_table(probes: list[CameraProbe]) -> str:
    header = ("camera", "room", "codec", "resolution", "fps", "bitrate", "result")
    rows = [header]
    for p in probes:
        rows.append((p.camera, p.room, p.codec or "-", p.resolution,
                     f"{p.fps:g}" if p.fps else "-", format_bitrate(p.bitrate),
                     "OK" if p.ok else f"FAIL {p.reason}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    table = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
                      for r in rows)
    return redact_credentials(table)


# --- recorded segments (the sealer) ---------------------------------------------------------------

class ProbeError(Exception):
    """ffprobe cannot read a segment."""


@dataclass(frozen=True)
class ProbeResult:
    duration: float
    start_time: float | None
    video: VideoInfo


def probe_segment(path: Path, timeout: float = 60) -> ProbeResult:
    try:
        result = subprocess.run(["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", str(path)],
                                capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProbeError(f"ffprobe failed on {path.name}: {exc}") from exc
    if result.returncode != 0:
        last = (result.stderr.decode(errors="replace").strip().splitlines() or ["exit %d" % result.returncode])[-1]
        raise ProbeError(f"ffprobe cannot read {path.name}: {last}")
    try:
        info = json.loads(result.stdout)
        fmt = info.get("format") or {}
        video = next(s for s in info.get("streams", []) if s.get("codec_type") == "video")
        duration = float(fmt["duration"])
    except (ValueError, KeyError, StopIteration, TypeError) as exc:
        raise ProbeError(f"ffprobe found no video duration in {path.name}") from exc
    if not duration > 0 or not video.get("width"):
        raise ProbeError(f"ffprobe found no video frames in {path.name}")
    start = fmt.get("start_time")
    return ProbeResult(duration=round(duration, 6), start_time=float(start) if start is not None else None,
                       video=VideoInfo(codec=str(video.get("codec_name", "unknown")), width=int(video["width"]),
                                       height=int(video["height"]), fps=_fps(video) or 0.0))

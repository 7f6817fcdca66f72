"""Runs tests/support/rtsp_server.py (GStreamer's RTSP server, Debian's python3) as a camera stand-in that can
vanish and come back on the same port."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.services import free_port, wait_for_port

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER = Path(__file__).with_name("rtsp_server.py")
APT_PACKAGES = ("gir1.2-gst-rtsp-server-1.0", "python3-gst-1.0", "gstreamer1.0-plugins-ugly",
                "gstreamer1.0-plugins-good", "gstreamer1.0-plugins-base")


def rtsp_server_problem() -> str | None:
    """None when the stand-in can run; otherwise what is missing and how to get it."""
    check = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
             "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
             "missing = [e for e in ('videotestsrc', 'x264enc', 'rtph264pay') if not Gst.ElementFactory.find(e)]; "
             "print(' '.join(missing))")
    try:
        result = subprocess.run([SYSTEM_PYTHON, "-c", check], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{SYSTEM_PYTHON} cannot run ({exc})"
    if result.returncode != 0 or result.stdout.strip():
        what = result.stdout.strip() or (result.stderr.strip().splitlines() or ["?"])[-1]
        return f"GStreamer RTSP server ({what}); run `make deps` (apt-get install {' '.join(APT_PACKAGES)})"
    return None


@dataclass
class RtspCamera:
    path: str = "/cam"
    user: str | None = None  # NAME:PASSWORD
    gop: int = 25
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}{self.path}"

    def url_with(self, credentials: str) -> str:
        return f"rtsp://{credentials}@127.0.0.1:{self.port}{self.path}"

    def start(self) -> None:
        args = [SYSTEM_PYTHON, str(SERVER), "--port", str(self.port), "--path", self.path, "--gop", str(self.gop)]
        if self.user:
            args += ["--user", self.user]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line.startswith("ready"):
            self.process.kill()
            _, err = self.process.communicate()
            raise RuntimeError(f"RTSP stand-in did not start: {line} {err}")
        wait_for_port("127.0.0.1", self.port)

    def stop(self) -> None:
        """The camera vanishes (killed, as by a power cut)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            for stream in (self.process.stdout, self.process.stderr):
                if stream is not None:
                    stream.close()
            self.process = None

"""A real RTSP camera stand-in: GStreamer's RTSP server serving live H.264 test video.

Run with Debian's /usr/bin/python3 (python3-gst-1.0, gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-ugly
for x264enc): `python3 rtsp_server.py --port 8554 [--path /cam] [--user NAME:PASSWORD]`.
Prints `ready rtsp://127.0.0.1:PORT/PATH` on stdout once it listens; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402


def launch_line(width: int, height: int, fps: int, gop: int) -> str:
    return (f"( videotestsrc is-live=true pattern=smpte ! video/x-raw,width={width},height={height},"
            f"framerate={fps}/1 ! x264enc tune=zerolatency speed-preset=ultrafast "
            f"key-int-max={gop} ! rtph264pay name=pay0 pt=96 config-interval=1 )")


class BasicAuth(GstRtspServer.RTSPAuth):
    """Camera-like basic authentication for every stream. (The stock token/role setup cannot be built from
    Python: PyGObject copies the token's structure, so the role never sticks.)"""

    def __init__(self, credentials: str):
        super().__init__()
        self.expected = f"Basic {credentials}"

    def do_check(self, ctx, check):  # noqa: ANN001 - GObject virtual method
        if not check.startswith("auth.check.media.factory"):
            return True
        found, value = ctx.request.get_header(GstRtsp.RTSPHeaderField.AUTHORIZATION, 0)
        if found == GstRtsp.RTSPResult.OK and value == self.expected:
            return True
        # What the stock check does on failure: answer 401 with a Basic challenge.
        code = GstRtsp.RTSPStatusCode.UNAUTHORIZED
        _, response = GstRtsp.rtsp_message_new_response(code, GstRtsp.rtsp_status_as_text(code), ctx.request)
        response.add_header(GstRtsp.RTSPHeaderField.WWW_AUTHENTICATE, 'Basic realm="camera"')
        ctx.client.send_message(ctx.session, response)
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/cam")
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--gop", type=int, default=25, help="frames between keyframes")
    parser.add_argument("--user", help="NAME:PASSWORD; clients must authenticate (basic)")
    args = parser.parse_args()
    Gst.init(None)
    width, height = (int(v) for v in args.size.split("x"))
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch_line(width, height, args.fps, args.gop))
    factory.set_shared(True)  # one encoder for every client, like a camera
    if args.user:
        name, _, password = args.user.partition(":")
        server.set_auth(BasicAuth(GstRtspServer.RTSPAuth.make_basic(name, password)))
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 1
    loop = GLib.MainLoop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signum, loop.quit)
    print(f"ready rtsp://127.0.0.1:{args.port}{args.path}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

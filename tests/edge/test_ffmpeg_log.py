"""Reading ffmpeg's `-loglevel level+info` output: levels, and the output stream instead of an ffprobe."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from edge_agent.recorder import parse_video_stream, split_log_level
from edge_agent.spool import probe_segment
from exam_contract.manifest import VideoInfo


def test_split_log_level_keeps_context_and_message() -> None:
    assert split_log_level("[segment @ 0x5636d9dc1980] [info] Opening 'x-000.ts' for writing") == (
        "info", "[segment @ 0x5636d9dc1980] Opening 'x-000.ts' for writing")
    assert split_log_level("[error] /nonexistent.ts: No such file or directory") == (
        "error", "/nonexistent.ts: No such file or directory")
    assert split_log_level("[info]   Stream #0:0 -> #0:0 (copy)") == ("info", "Stream #0:0 -> #0:0 (copy)")
    assert split_log_level("frame=  196 fps= 25") == (None, "frame=  196 fps= 25")


@pytest.mark.parametrize(("line", "expected"), [
    ("Stream #0:0: Video: h264 (Constrained Baseline) ([27][0][0][0] / 0x001B), yuv420p(progressive), "
     "1920x1080 [SAR 1:1 DAR 16:9], q=2-31, 25 fps, 25 tbr, 90k tbn", VideoInfo("h264", 1920, 1080, 25.0)),
    ("Stream #0:0: Video: h264, yuv420p(progressive), 320x240 [SAR 1:1 DAR 4:3], q=2-31, 25 fps, 90k tbn",
     VideoInfo("h264", 320, 240, 25.0)),
    ("Stream #0:0: Video: hevc (Main), yuv420p(tv), 2560x1440, 29.97 tbr, 90k tbn",
     VideoInfo("hevc", 2560, 1440, 29.97)),
    ("Stream #0:0 -> #0:0 (copy)", None),
    ("Stream #0:1: Audio: aac (LC), 48000 Hz, mono, fltp", None),
    ("Metadata:", None),
])
def test_parse_video_stream(line: str, expected: VideoInfo | None) -> None:
    assert parse_video_stream(line) == expected


@pytest.mark.ffmpeg
def test_ffmpeg_reports_what_ffprobe_reads(tmp_path: Path) -> None:
    """The stream line of a real recording command equals ffprobe's reading of the file it wrote."""
    out = tmp_path / "x-%03d.ts"
    result = subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-nostats", "-loglevel", "level+info", "-f", "lavfi",
                             "-i", "testsrc2=size=640x360:rate=15", "-t", "2", "-c:v", "libx264", "-preset",
                             "ultrafast", "-pix_fmt", "yuv420p", "-f", "segment", "-segment_time", "5",
                             "-segment_format", "mpegts", str(out)], capture_output=True, text=True, check=True)
    lines = [split_log_level(line) for line in result.stderr.splitlines()]
    output_at = next(i for i, (_, text) in enumerate(lines) if text.startswith("Output #0"))
    reported = next(v for _, text in lines[output_at:] if (v := parse_video_stream(text)) is not None)
    assert reported == probe_segment(tmp_path / "x-000.ts").video == VideoInfo("h264", 640, 360, 15.0)


@pytest.mark.ffmpeg
def test_ffmpeg_stopped_by_a_full_disk_is_a_disk_full_gap(tmp_path: Path) -> None:
    """ENOSPC between two disk checks: the run's end is stated as `disk_full`, not `recorder_crashed`."""
    from edge_agent.config import CameraConfig
    from edge_agent.recorder import FfmpegRun, build_command, new_run_id, run_end_cause
    from edge_agent.spool import Journal
    from tests.support.services import lavfi_source, small_filesystem

    camera = CameraConfig(id="t101-front", room="T101", room_kind="theory", source=lavfi_source(size="640x480"))
    journal = Journal(tmp_path / "journal.sqlite")
    with small_filesystem(tmp_path / "tiny", size_kib=256) as out:
        run_id = new_run_id()
        proc = subprocess.Popen(build_command(camera, 10, out, run_id), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        run = FfmpegRun(camera.id, run_id, proc, journal)
        run.start_readers()
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        run.join_readers()
    journal.close()
    assert proc.returncode != 0 and run.produced
    assert "no space left on device" in " ".join(run.stderr_tail).lower()
    assert run_end_cause(camera, run) == "disk_full"

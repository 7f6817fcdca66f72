"""Frame health: the pure decision over keyframe statistics, and real ffmpeg footage through the analyzer."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import cv2
import pytest

from edge_agent.config import ConfigError, load_config
from edge_agent.health import (ANALYSIS_FAILED, BLACK, DEFOCUSED, FROZEN, MOVED, OBSTRUCTED, FrameStats,
                               HealthAnalyzer, HealthError, analysis_size, judge, read_keyframes,
                               reference_path, save_reference)
from edge_agent.spool import Journal, Sealer
from exam_contract.manifest import VideoInfo
from exam_contract.signing import load_private_key
from tests.edge.conftest import write_config

START = datetime(2026, 11, 26, 8, 0, 0, tzinfo=timezone.utc)
SHARP = dict(mean=120.0, std=60.0, sharpness=800.0)


# --- the decision (pure) --------------------------------------------------------------------------

def frames(n: int = 6, **fields) -> list[FrameStats]:
    values = {**SHARP, **fields}
    return [FrameStats(**{**values, "change": None if i == 0 else values.get("change")}) for i in range(n)]


def test_normal_statistics_raise_no_flag() -> None:
    assert judge(frames(change=0.08, similarity=0.95, shift=0.002, rotation=0.1)) == ()


def test_no_keyframe_means_no_flag() -> None:
    assert judge([]) == ()


@pytest.mark.parametrize("fields, flag", [
    (dict(mean=3.0, std=1.0, sharpness=0.0, change=0.0), BLACK),
    (dict(mean=140.0, std=2.0, sharpness=0.1, change=0.0), OBSTRUCTED),
    (dict(sharpness=5.0, change=0.1), DEFOCUSED),
    (dict(change=0.0), FROZEN),
    (dict(change=0.1, similarity=0.2, shift=0.19, rotation=0.0), MOVED),
    (dict(change=0.1, similarity=0.9, shift=0.0, rotation=8.0), MOVED),
    (dict(change=0.1, similarity=0.1), MOVED),  # no alignment possible and unlike the reference
])
def test_each_condition_raises_its_flag(fields, flag) -> None:
    assert judge(frames(**fields)) == (flag,)


def test_a_black_picture_is_neither_obstructed_defocused_frozen_nor_moved() -> None:
    assert judge(frames(mean=2.0, std=0.5, sharpness=0.0, change=0.0, similarity=0.0)) == (BLACK,)


def test_a_flag_needs_half_of_the_keyframes() -> None:
    mixed = frames(4, change=0.1) + frames(2, mean=2.0, std=0.5, sharpness=0.0, change=0.1)
    assert judge(mixed) == ()
    assert judge(frames(3, change=0.1) + frames(3, mean=2.0, std=0.5, sharpness=0.0, change=0.1)) == (BLACK,)


def test_people_moving_in_front_of_a_still_camera_is_not_moved() -> None:
    # Alignment found the static scene in place although the picture correlates poorly.
    assert judge(frames(change=0.3, similarity=0.3, shift=0.01, rotation=0.5)) == ()


def test_a_single_keyframe_cannot_be_frozen() -> None:
    assert judge(frames(1)) == ()


# --- real footage -----------------------------------------------------------------------------------

CLIPS = {
    # name: (lavfi input args, video filter); 640x360, 25 fps, a keyframe each second, 6 s
    "normal": (["-f", "lavfi", "-i", "testsrc2=size=760x360:rate=25"], "crop=640:360:0:0"),
    "shifted": (["-f", "lavfi", "-i", "testsrc2=size=760x360:rate=25"], "crop=640:360:120:0"),
    "blurred": (["-f", "lavfi", "-i", "testsrc2=size=760x360:rate=25"], "crop=640:360:0:0,boxblur=8"),
    "black": (["-f", "lavfi", "-i", "color=black:size=640x360:rate=25"], "null"),
    "covered": (["-f", "lavfi", "-i", "color=0x8a7f70:size=640x360:rate=25"], "noise=alls=3:allf=t"),
}


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory, ffmpeg_available: None) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("health-clips")
    encode = ["-t", "6", "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-pix_fmt", "yuv420p",
              "-f", "mpegts"]
    out = {}
    for name, (source, vf) in CLIPS.items():
        out[name] = root / f"{name}.ts"
        subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", *source, "-vf", vf, *encode,
                        str(out[name])], check=True)
    # A frozen stream: one picture of the normal view, repeated.
    still = root / "still.png"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-ss", "2", "-i", str(out["normal"]),
                    "-frames:v", "1", str(still)], check=True)
    out["frozen"] = root / "frozen.ts"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-loop", "1", "-framerate", "25", "-i",
                    str(still), *encode, str(out["frozen"])], check=True)
    return out


@pytest.fixture
def analyzer(tmp_path: Path, clips: dict[str, Path]) -> HealthAnalyzer:
    """An analyzer whose camera's reference view is the first keyframe of the normal clip."""
    config = load_config(write_config(tmp_path))
    first = next(read_keyframes(clips["normal"], analysis_size(640, 360)))
    save_reference(config, "t101-front", first)
    return HealthAnalyzer(config)


VIDEO = VideoInfo(codec="h264", width=640, height=360, fps=25.0)


@pytest.mark.parametrize("clip, expected", [
    ("normal", ()),
    ("black", (BLACK,)),
    ("frozen", (FROZEN,)),
    ("blurred", (DEFOCUSED,)),
    ("shifted", (MOVED,)),
    ("covered", (OBSTRUCTED,)),
])
def test_footage_is_flagged_as_expected(analyzer: HealthAnalyzer, clips: dict[str, Path], clip: str,
                                        expected: tuple[str, ...]) -> None:
    camera = analyzer.config.cameras[0]
    report = analyzer.analyse(camera, clips[clip], START, VIDEO)
    assert report.flags == expected
    assert report.frames == 6  # keyframes only: one per second of the 6 s clip
    image = cv2.imread(str(report.thumbnail))
    assert report.thumbnail == analyzer.thumbnail_path(camera.id, START) and image.shape == (180, 320, 3)


def test_without_a_reference_view_a_shifted_view_is_not_judged(tmp_path: Path, clips: dict[str, Path]) -> None:
    config = load_config(write_config(tmp_path))
    assert not reference_path(config, "t101-front").exists()
    report = HealthAnalyzer(config).analyse(config.cameras[0], clips["shifted"], START, VIDEO)
    assert report.flags == ()


def test_unreadable_segment_is_sealed_with_analysis_failed(analyzer: HealthAnalyzer, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    junk = tmp_path / "junk.ts"
    junk.write_bytes(b"\x00not video" * 1000)
    camera = analyzer.config.cameras[0]
    with pytest.raises(HealthError):
        analyzer.analyse(camera, junk, START, VIDEO)
    with caplog.at_level(logging.ERROR, logger="edge_agent.health"):
        assert analyzer.flags_for(camera, junk, START, VIDEO) == (ANALYSIS_FAILED,)
    assert "camera t101-front segment junk.ts: health analysis failed" in caplog.text


def test_sealer_puts_the_flags_into_the_signed_manifest(analyzer: HealthAnalyzer, clips: dict[str, Path]) -> None:
    config = analyzer.config
    journal = Journal(config.agent.journal_path)
    try:
        sealer = Sealer(config, journal, load_private_key(config.agent.key_file))
        sealer.health_check = analyzer.flags_for
        target = config.agent.recording_dir / "t101-front" / "20261126T080000000000-000000.ts"
        shutil.copyfile(clips["black"], target)
        record = sealer.seal_file("t101-front", target)
        assert record is not None and record.manifest_raw["health"] == [BLACK]
    finally:
        journal.close()


def test_health_switch_is_validated_with_the_key_named(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    assert load_config(path).health.enabled is True
    path.write_text(path.read_text() + "\n[health]\nenabled = false\n")
    assert load_config(path).health.enabled is False
    path.write_text(path.read_text().replace("enabled = false", 'enabled = "no"'))
    with pytest.raises(ConfigError, match=r"\[health\] enabled = 'no' is not a boolean"):
        load_config(path)
    path.write_text(path.read_text().replace('enabled = "no"', "threshold = 3"))
    with pytest.raises(ConfigError, match=r"\[health\] threshold is not a known key"):
        load_config(path)


def test_thumbnails_older_than_local_keep_days_are_pruned(analyzer: HealthAnalyzer, clips: dict[str, Path]) -> None:
    camera = analyzer.config.cameras[0]
    old = analyzer.analyse(camera, clips["normal"], START, VIDEO).thumbnail
    new = analyzer.analyse(camera, clips["normal"], START.replace(hour=9), VIDEO).thumbnail
    keep_days = analyzer.config.agent.local_keep_days
    stamp = old.stat().st_mtime - (keep_days + 1) * 86400
    os.utime(old, (stamp, stamp))
    assert analyzer.prune_thumbnails() == 1
    assert not old.exists() and new.exists()

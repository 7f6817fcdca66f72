"""A camera that is down from the agent's start (an RTSP camera left unplugged at install time): while it is still
down, within two segment lengths of a batch window's start, the batch report lists that camera with a gap whose
cause is camera_unreachable. Real agent, collector, mosquitto and ffmpeg; the dead camera is an RTSP address
nothing listens on (connection refused, as from a venue LAN with the camera unplugged)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from exam_contract.canonical import parse_time
from tests.support.pipeline import CameraSpec, Pipeline, wait_until
from tests.support.services import free_port, lavfi_source

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto, pytest.mark.ffmpeg]
SEGMENT_SECONDS = 10
SHANGHAI = timezone(timedelta(hours=8))
DARK = "p201-dark"


def test_a_camera_down_from_the_start_shows_its_gap_while_the_exam_runs(tmp_path: Path, mosquitto,
                                                                        ffmpeg_available: None) -> None:
    cameras = [CameraSpec("t101-live", "T101", "theory", lavfi_source(rate=10)),
               CameraSpec(DARK, "P201", "practical", f"rtsp://127.0.0.1:{free_port()}/stream")]
    pipeline = Pipeline(root=tmp_path, broker_url=mosquitto.url, segment_seconds=SEGMENT_SECONDS, cameras=cameras)
    pipeline.set_up()
    try:
        pipeline.start_collector()
        agent_started = datetime.now(timezone.utc)
        pipeline.start_agent()
        # The batch's window starts now and runs past the end of the test: the exam is still running.
        start = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=1)
        end = start + timedelta(minutes=30)
        local = [t.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M:%S") for t in (start, end)]
        batch_file = tmp_path / "batch.csv"
        batch_file.write_text("batch_id,institution,venue,occupation,level,part,room,start,end\n"
                              f"B-LIVE,{pipeline.institution},{pipeline.venue},电工,四级,practical,P201,{local[0]},"
                              f"{local[1]}\n", encoding="utf-8")
        pipeline.collector("batches", "import", str(batch_file))

        def dark_gap() -> dict | None:
            result = pipeline.collector("batches", "show", "B-LIVE", "--json", check=False)
            if result.returncode not in (0, 3):
                return None
            (part,) = json.loads(result.stdout)["parts"]
            cams = {c["camera"]: c for c in part["cameras"]}
            gaps = cams.get(DARK, {}).get("gaps") or []
            return next((g for g in gaps if "camera_unreachable" in g["causes"]), None)

        # Two segment lengths after the window's start (plus the upload's round trip), the report already knows.
        deadline = start + timedelta(seconds=2 * SEGMENT_SECONDS)
        wait_until(lambda: dark_gap() is not None, (deadline - datetime.now(timezone.utc)).total_seconds() + 10, 1,
                   f"the dark camera's gap in the batch report\n{pipeline.logs()}")
        seen_at = datetime.now(timezone.utc)
        gap = dark_gap()
        assert gap is not None
        assert pipeline.agent_proc is not None and pipeline.agent_proc.poll() is None   # the camera is still down
    finally:
        pipeline.close()
    assert seen_at - start <= timedelta(seconds=2 * SEGMENT_SECONDS + 10), (start, seen_at)
    # stated from the agent's start (before the window's), so the window is a gap from its very start
    assert parse_time(gap["start"]) == start, (agent_started, start, gap)

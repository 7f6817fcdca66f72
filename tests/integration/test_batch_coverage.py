"""Issue 4, acceptance 2: a batch over a real recording (real CLIs, mosquitto, ffmpeg). One camera's ffmpeg is
killed again and again for about 30 s; the batch report shows exactly that gap with its cause, the other room
is complete, and the live alert was raised and cleared on the broker."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from exam_contract.canonical import parse_time
from tests.support.pipeline import CameraSpec, Pipeline, wait_until
from tests.support.services import lavfi_source

SEGMENT_SECONDS = 10
WINDOW_SECONDS = 110
KILL_AFTER = 30        # seconds into the window
KILL_FOR = 30
KILLED = "p201-side"
SHANGHAI = timezone(timedelta(hours=8))
CAMERAS = [
    CameraSpec("t101-front", "T101", "theory", lavfi_source(rate=10)),
    CameraSpec(KILLED, "P201", "practical", lavfi_source(rate=10)),
]


def ffmpeg_pids(agent_pid: int, camera: str) -> list[int]:
    """The agent's ffmpeg children writing this camera's recording folder (children are listed per thread)."""
    marker = f"/recording/{camera}/".encode()
    out = []
    for task in Path(f"/proc/{agent_pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in children:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"ffmpeg" in cmdline.split(b"\0", 1)[0] and marker in cmdline:
                out.append(int(pid))
    return out


def last_ends(pipeline: Pipeline) -> dict[str, datetime]:
    result = pipeline.collector("summary", "--json")
    return {c["camera"]: parse_time(c["last_end"]) for c in json.loads(result.stdout)["cameras"] if c["last_end"]}


def test_batch_report_and_live_alert_on_real_pipeline(tmp_path: Path, mosquitto, ffmpeg_available) -> None:
    pipeline = Pipeline(root=tmp_path, broker_url=mosquitto.url, segment_seconds=SEGMENT_SECONDS, cameras=CAMERAS)
    pipeline.set_up()
    config = pipeline.collector_config
    text, count = re.subn(r"(?m)^# interval_seconds = \d+", "interval_seconds = 2", config.read_text())
    assert count == 1
    config.write_text(text)

    alerts: list[tuple[float, str, bytes]] = []
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    watcher.on_message = lambda c, u, m: alerts.append((time.time(), m.topic, bytes(m.payload)))
    watcher.connect("127.0.0.1", mosquitto.port)
    watcher.subscribe("exam/v1/alerts/#", qos=1)
    watcher.loop_start()
    try:
        pipeline.start_collector()
        pipeline.start_agent()
        wait_until(lambda: set(last_ends(pipeline)) == {c.id for c in CAMERAS}, 90, 2,
                   "a stored segment of both cameras")
        # The window starts now; naive local times in the file, as the exam-affairs system writes them.
        start = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=1)
        end = start + timedelta(seconds=WINDOW_SECONDS)
        local = [t.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M:%S") for t in (start, end)]
        batch_file = tmp_path / "batch.csv"
        batch_file.write_text("batch_id,institution,venue,occupation,level,part,room,start,end\n"
                              f"B-IT,{pipeline.institution},{pipeline.venue},电工,四级,theory,T101,{local[0]},{local[1]}\n"
                              f"B-IT,{pipeline.institution},{pipeline.venue},电工,四级,practical,P201,{local[0]},{local[1]}\n",
                              encoding="utf-8")
        pipeline.collector("batches", "import", str(batch_file))

        time.sleep(max(0.0, (start + timedelta(seconds=KILL_AFTER) - datetime.now(timezone.utc)).total_seconds()))
        kill_start = datetime.now(timezone.utc)
        assert pipeline.agent_proc is not None
        agent_pid = pipeline.agent_proc.pid
        killed = 0
        while datetime.now(timezone.utc) < kill_start + timedelta(seconds=KILL_FOR):
            for pid in ffmpeg_pids(agent_pid, KILLED):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        assert killed >= 1
        wait_until(lambda: bool(ffmpeg_pids(agent_pid, KILLED)), 40, 0.2, "the killed camera's ffmpeg to come back")
        back = datetime.now(timezone.utc)

        wait_until(lambda: all(t >= end for t in last_ends(pipeline).values()), 120, 2,
                   "footage past the window end from both cameras")
        assert pipeline.stop_agent() == 0, pipeline.logs()
        # The cleared alert follows the first segment after the outage.
        wait_until(lambda: any(p == b"" for _, _, p in alerts), 30, 0.5, "the alert to be cleared")
        result = pipeline.collector("batches", "show", "B-IT", "--json", check=False)
        text_result = pipeline.collector("batches", "show", "B-IT", check=False)
    finally:
        watcher.loop_stop()
        pipeline.close()

    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout)
    parts = {p["room"]: p for p in report["parts"]}
    assert report["status"] == "gaps"
    theory, practical = parts["T101"], parts["P201"]
    assert theory["status"] == "complete", json.dumps(theory, indent=1)
    (front,) = theory["cameras"]
    assert front["camera"] == "t101-front" and front["gaps"] == [] and front["covered_percent"] > 98
    assert practical["status"] == "gaps"
    (side,) = practical["cameras"]
    assert side["camera"] == KILLED
    assert len(side["gaps"]) == 1, json.dumps(side, indent=1)  # exactly one gap: the outage
    (gap,) = side["gaps"]
    gap_start, gap_end = parse_time(gap["start"]), parse_time(gap["end"])
    one_segment = timedelta(seconds=SEGMENT_SECONDS)
    assert kill_start - one_segment <= gap_start <= kill_start + one_segment, (gap, kill_start)
    assert back - one_segment <= gap_end <= back + one_segment, (gap, back)
    assert {"recorder_crashed", "camera_unreachable"} & set(gap["causes"]), gap
    assert "理论知识考场 T101" in text_result.stdout and "覆盖缺口 1" in text_result.stdout

    topic = f"exam/v1/alerts/{pipeline.venue}/{KILLED}"
    states = [(t, json.loads(p)["state"] if p else "") for t, tp, p in alerts if tp == topic]
    assert [s for _, s in states][:1] == ["alert"] and states[-1][1] == ""
    assert "cleared" in [s for _, s in states]
    first_alert = datetime.fromtimestamp(states[0][0], timezone.utc)
    assert kill_start <= first_alert <= back + timedelta(seconds=5)
    assert not any(tp.endswith("/t101-front") for _, tp, _ in alerts)

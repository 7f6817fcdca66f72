"""Batch-first upload over real network plumbing (issue: the uplink test). The agent runs in a network namespace of
its own, joined to the broker's (root) namespace by a veth pair on a random private 10.x.y.z/30; the collector
stays in the root namespace on 127.0.0.1, the broker listens on both. The scenario, scaled down from "a day's
backlog, then an exam, then within 10 minutes of its end":

1. The agent records and uploads over the unshaped link (a first start must reach its broker), then stops.
2. Outage: the agent's end of the veth is down (no route to the broker) and the agent, restarted, records three
   cameras into its spool for about a minute: the backlog, footage of no batch.
3. The batch window (room T101, W seconds, imported before the collector starts so its retained schedule is on
   the broker long before the window): the link comes up shaped with `tc tbf` to half the cameras' recording
   rate, measured from the sealed segments of the outage (bytes / seconds of footage, all cameras). The link
   can never catch up with recording.
4. Every T101 segment overlapping the window must be stored at the collector (its `stored_at`) within K times
   the batch footage's transfer time at the shaped rate (K below; the scaled "10 minutes"), while outage footage
   recorded before the window is still not stored at that moment.
5. The shaping is lifted; the agent stops and drains: every record stored exactly once, byte-identical, seq
   contiguous, every hole in time covered by a gap record.

Without batch-first (the uploader ignoring the schedule) the backlog, about two minutes of transfer at that rate,
goes first and step 4 fails: most batch segments are still missing at K x the transfer time.
[coverage] margins are 0 here: 15-minute margins would swallow a one-minute test.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from collector.models import SegmentRecord
from exam_contract.canonical import parse_time
from exam_contract.schedule import Schedule
from exam_contract.topics import schedule_topic
from tests.integration.test_store_forward import assert_all_stored_once, make_pipeline
from tests.support import netns
from tests.support.pipeline import BIN, CameraSpec, Pipeline, read_journal, wait_until
from tests.support.services import lavfi_source
from tests.support.stored import StoredFootage

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto, pytest.mark.ffmpeg]

SEGMENT_SECONDS = 10
BATCH_ROOM = "T101"
CAMERAS = [
    # ids of their own: other tests look for their ffmpeg processes by camera id
    CameraSpec("ul-t101-front", BATCH_ROOM, "theory", lavfi_source(rate=10)),
    CameraSpec("ul-t102-front", "T102", "theory", lavfi_source(rate=10)),
    CameraSpec("ul-p201-side", "P201", "practical", lavfi_source(rate=10)),
]
WINDOW_LEAD = 80      # s from the batch import to the window's start: the first run, then the outage
MIN_OUTAGE = 40       # s of backlog at least, or the test proves nothing
WINDOW_SECONDS = 50
K = 3                 # the batch's footage is stored within K x its transfer time at the shaped rate, after its end
TBF_LATENCY_MS = 100
GAP_TOLERANCE = 2.0   # s, as [coverage] gap_tolerance_seconds
SHANGHAI = timezone(timedelta(hours=8))
UTC = timezone.utc


def journal(pipeline: Pipeline) -> list[dict]:
    rows = read_journal(pipeline.edge_data / "journal.sqlite",
                        "select camera, seq, kind, manifest, state from records order by id")
    out = []
    for camera, seq, kind, manifest, state in rows:
        m = json.loads(manifest)
        out.append({"camera": camera, "seq": seq, "kind": kind, "room": m["room"], "size": m.get("size") or 0,
                    "start": parse_time(m["start"]), "end": parse_time(m["end"]), "state": state})
    return out


def collector_rows(pipeline: Pipeline) -> dict[tuple[str, int], SegmentRecord]:
    engine = create_engine(pipeline.database_url)
    try:
        with Session(engine) as session:
            rows = list(session.scalars(select(SegmentRecord)))
            session.expunge_all()
    finally:
        engine.dispose()
    return {(r.camera, r.seq): r for r in rows}


def utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def start_agent_in(uplink: netns.Uplink, pipeline: Pipeline) -> None:
    log = open(pipeline.root / "agent.log", "ab")
    pipeline.agent_proc = subprocess.Popen(
        [*uplink.exec_prefix(), str(BIN / "exam-edge"), "--config", str(pipeline.edge_config), "run",
         "--drain-seconds", "150"], stdout=log, stderr=subprocess.STDOUT)


def in_batch(row: dict, start: datetime, end: datetime) -> bool:
    return row["kind"] == "segment" and row["room"] == BATCH_ROOM and row["start"] < end and row["end"] > start


def test_batch_footage_first_over_a_shaped_uplink(tmp_path: Path, mosquitto, ffmpeg_available: None) -> None:
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"uplink test needs a network namespace: {reason}")
    began = time.monotonic()
    uplink = netns.Uplink()
    pipeline: Pipeline | None = None
    watcher: mqtt.Client | None = None
    schedules: list[tuple[datetime, Schedule]] = []
    try:
        uplink.open()
        print(f"\nnetns {uplink.ns}: agent {uplink.ns_if} {uplink.ns_ip}/30, broker side {uplink.host_if} "
              f"{uplink.host_ip}/30")
        # The broker also listens on the veth's root-side address (same port), for the agent in the namespace.
        mosquitto.stop()
        mosquitto.extra_config = f"listener {mosquitto.port} {uplink.host_ip}"
        mosquitto.start()
        pipeline = make_pipeline(tmp_path, mosquitto, CAMERAS)
        text, count = re.subn(r'(?m)^url = "mqtt://127\.0\.0\.1:(\d+)"', rf'url = "mqtt://{uplink.host_ip}:\1"',
                              pipeline.edge_config.read_text())
        assert count == 1
        pipeline.edge_config.write_text(text)
        text, count = re.subn(r"(?m)^(pre|post)_margin_minutes = \d+", r"\1_margin_minutes = 0",
                              pipeline.collector_config.read_text())
        assert count == 2
        pipeline.collector_config.write_text(text)

        # The batch, imported before the collector starts: its first schedule check publishes it.
        window_start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=WINDOW_LEAD)
        window_end = window_start + timedelta(seconds=WINDOW_SECONDS)
        local = [t.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M:%S") for t in (window_start, window_end)]
        batch_file = tmp_path / "batch.csv"
        batch_file.write_text("batch_id,institution,venue,occupation,level,part,room,start,end\n"
                              f"B-UPLINK,{pipeline.institution},{pipeline.venue},电工,四级,theory,{BATCH_ROOM},"
                              f"{local[0]},{local[1]}\n", encoding="utf-8")
        pipeline.collector("batches", "import", str(batch_file))
        watcher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        watcher.on_message = lambda c, u, m: schedules.append((datetime.now(UTC), Schedule.decode(m.payload))) \
            if m.payload else None
        watcher.connect("127.0.0.1", mosquitto.port)
        watcher.subscribe(schedule_topic(pipeline.agent), qos=1)
        watcher.loop_start()
        pipeline.start_collector()

        # 1. A first start over the unshaped link: each camera's first segment stored through the veth.
        start_agent_in(uplink, pipeline)
        wait_until(lambda: {r["camera"] for r in journal(pipeline) if r["kind"] == "segment"
                            and r["state"] == "stored"} == {c.id for c in CAMERAS}, 60, 0.5,
                   "a segment of every camera stored over the veth")
        assert pipeline.stop_agent(timeout=60) == 0, pipeline.logs()

        # 2. The outage: no route to the broker; the restarted agent records anyway.
        uplink.set_link(False)
        outage_start = datetime.now(UTC)
        start_agent_in(uplink, pipeline)
        outage = (window_start - outage_start).total_seconds()
        assert outage >= MIN_OUTAGE, f"the first run took too long: only {outage:.0f} s of outage before the window"
        wait_until(lambda: any(s.windows and s.windows[0].rooms == (BATCH_ROOM,) for _, s in schedules), 60, 0.5,
                   "the collector's retained schedule naming the batch window")
        (window,) = next(s for _, s in schedules if s.windows).windows
        assert (window.start, window.end) == (window_start, window_end), window
        time.sleep(max(0.0, (window_start - datetime.now(UTC)).total_seconds()))
        assert pipeline.agent_proc.poll() is None, "the agent died during the outage:\n" + pipeline.logs()
        assert "recording anyway" in (tmp_path / "agent.log").read_text(errors="replace")

        # 3. The recording rate, from the segments sealed so far (the outage's and the first run's): per camera
        # bytes / seconds of footage, summed over the cameras. The link gets half.
        rows = journal(pipeline)
        per_camera = {}
        for cam in CAMERAS:
            segs = [r for r in rows if r["camera"] == cam.id and r["kind"] == "segment"]
            per_camera[cam.id] = sum(r["size"] for r in segs) / sum((r["end"] - r["start"]).total_seconds()
                                                                    for r in segs)
        record_bps = 8 * sum(per_camera.values())
        shaped_kbit = int(record_bps / 2 / 1000)
        burst = max(3200, shaped_kbit * 1000 // 8 // 50)   # 20 ms of the rate, at least two full frames
        backlog = [r for r in rows if r["state"] != "stored"]
        print(f"recording rate {record_bps / 1000:.0f} kbit/s (" + ", ".join(
            f"{cam} {bps * 8 / 1000:.0f}" for cam, bps in per_camera.items()) + f"); outage {outage:.0f} s, "
            f"backlog {len(backlog)} records, {sum(r['size'] for r in backlog) / 1e6:.2f} MB; "
            f"link shaped to {shaped_kbit} kbit/s (burst {burst} B, latency {TBF_LATENCY_MS} ms)")
        uplink.shape(shaped_kbit, burst, TBF_LATENCY_MS)
        uplink.set_link(True)
        print(f"window {window_start:%H:%M:%S}..{window_end:%H:%M:%S} UTC; {uplink.qdisc().splitlines()[0]}")

        # 4. After the window: wait for the segment that crosses its end, and for every batch segment's `stored`.
        rate_bytes = shaped_kbit * 1000 / 8
        while True:
            rows = journal(pipeline)
            batch = [r for r in rows if in_batch(r, window_start, window_end)]
            batch_bytes = sum(r["size"] for r in batch)
            complete = any(r["end"] >= window_end for r in batch)
            now = datetime.now(UTC)
            limit = window_end + timedelta(seconds=K * batch_bytes / rate_bytes)
            if complete and all(r["state"] == "stored" for r in batch):
                break
            assert pipeline.agent_proc.poll() is None, "the agent died:\n" + pipeline.logs()
            if complete and now > limit + timedelta(seconds=5):
                break   # too late: the assertions below say by how much
            assert now < window_end + timedelta(seconds=300), "no segment crossing the window's end:\n" + pipeline.logs()
            time.sleep(0.5)
        seen_at = datetime.now(UTC)
        earlier_pending = [r for r in rows if r["kind"] == "segment" and r["end"] <= window_start
                           and r["state"] != "stored"]
        stored = collector_rows(pipeline)
        transfer = batch_bytes / rate_bytes
        batch_stored = [utc(stored[(r["camera"], r["seq"])].stored_at) for r in batch if (r["camera"], r["seq"]) in stored]
        missing = [r["seq"] for r in batch if (r["camera"], r["seq"]) not in stored]
        last = max(batch_stored) if batch_stored else None
        # Outage footage (before the window) the collector had not stored when the last batch segment was stored.
        not_yet = [r for r in rows if r["kind"] == "segment" and r["end"] <= window_start
                   and ((r["camera"], r["seq"]) not in stored
                        or (last is not None and utc(stored[(r["camera"], r["seq"])].stored_at) > last))]
        print(f"batch {BATCH_ROOM}: {len(batch)} segments, {batch_bytes / 1e6:.2f} MB, transfer time at "
              f"{shaped_kbit} kbit/s {transfer:.1f} s, allowed K={K} x {transfer:.1f} = {K * transfer:.1f} s "
              f"after the window's end; last batch segment stored "
              + (f"{(last - window_end).total_seconds():.1f} s after the end" if last and not missing
                 else f"NOT YET ({len(missing)} missing, seq {missing}) {(seen_at - window_end).total_seconds():.1f} s after the end")
              + f"; then {len(not_yet)} earlier outage segments ({sum(r['size'] for r in not_yet) / 1e6:.2f} MB) "
              f"not stored yet (agent journal at {(seen_at - window_end).total_seconds():.1f} s: "
              f"{len(earlier_pending)} pending)")
        assert not missing and last is not None and (last - window_end).total_seconds() <= K * transfer, (
            f"batch footage not stored within K={K} x its transfer time ({K * transfer:.1f} s) of the batch's end: "
            + (f"the last of it {(last - window_end).total_seconds():.1f} s after" if not missing else
               f"{len(missing)} of {len(batch)} segments still missing {(seen_at - window_end).total_seconds():.1f} s "
               "after")
            + f"; {len(earlier_pending)} older segments pending at the edge (was the schedule ignored?)")
        assert not_yet, "no earlier footage was pending when the batch was complete: the backlog proves nothing"

        # 5. The shaping lifted, everything arrives.
        left = [r for r in journal(pipeline) if r["state"] != "stored"]
        uplink.unshape()
        drain_began = time.monotonic()
        assert pipeline.stop_agent(timeout=300) == 0, pipeline.logs()
        drained = time.monotonic() - drain_began
    finally:
        if watcher is not None:
            watcher.loop_stop()
            watcher.disconnect()
        if pipeline is not None:
            pipeline.close()
        problems = uplink.close()
    assert not problems, f"cleanup left: {problems}"

    rows_all = assert_all_stored_once(pipeline)
    stored = collector_rows(pipeline)
    StoredFootage(pipeline.root / "collector" / "storage").check_rows(list(stored.values()), "uplink")
    causes: dict[str, int] = {}
    for cam in CAMERAS:
        previous_end = None
        for camera, seq, kind, manifest_json, *_ in (r for r in rows_all if r[0] == cam.id):
            manifest = json.loads(manifest_json)
            if kind != "segment":
                causes[manifest["cause"]] = causes.get(manifest["cause"], 0) + 1
            start, end = parse_time(manifest["start"]), parse_time(manifest["end"])
            if previous_end is not None:
                hole = (start - previous_end).total_seconds()
                assert abs(hole) <= GAP_TOLERANCE, f"camera {camera}: {hole:.3f} s before seq {seq} without a gap record"
            previous_end = end
    segments = sum(1 for r in rows_all if r[2] == "segment")
    print(f"after lifting the shaping ({len(left)} records, {sum(r['size'] for r in left) / 1e6:.2f} MB pending): "
          f"drained and stopped in {drained:.1f} s; {len(rows_all)} records "
          f"({segments} segments) stored exactly once, byte-identical, chains contiguous; gaps {causes}; "
          f"test {time.monotonic() - began:.0f} s")

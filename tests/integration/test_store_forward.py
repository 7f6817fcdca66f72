"""Issue 3 on real parts (the CLIs as subprocesses, mosquitto, ffmpeg, SQLite): a slow collector behind an
overflowing broker queue, a full collector storage volume, the edge disk budget, and the agent's memory
while a large backlog drains (a broker outage while recording is part of test_chaos.py). Each ends with: every record the agent journaled is stored
exactly once by the collector, byte-identical."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from collector.config import load_config
from collector.models import IngestEvent, SegmentRecord
from exam_contract.topics import ROOT
from tests.support.pipeline import CameraSpec, Pipeline, read_journal, sha256_file, wait_until
from tests.support.services import Mosquitto, free_port, lavfi_source, small_filesystem

pytestmark = [pytest.mark.mosquitto, pytest.mark.ffmpeg]
SEGMENT_SECONDS = 10


def journal_rows(pipeline: Pipeline) -> list[tuple]:
    return read_journal(pipeline.edge_data / "journal.sqlite", "select camera, seq, kind, manifest, record_hash, "
                        "path, state, created_at from records order by camera, seq")


def pending(pipeline: Pipeline) -> int:
    return sum(1 for r in journal_rows(pipeline) if r[6] != "stored")


def assert_all_stored_once(pipeline: Pipeline, storage: Path | None = None, pruned_ok: bool = False) -> list[tuple]:
    rows = journal_rows(pipeline)
    assert rows and all(r[6] == "stored" for r in rows), pipeline.logs()
    engine = create_engine(pipeline.database_url)
    try:
        with Session(engine) as session:
            stored = {(r.camera, r.seq): r for r in session.scalars(select(SegmentRecord))}
            count = len(list(session.scalars(select(SegmentRecord))))
            rejected = list(session.scalars(select(IngestEvent).where(IngestEvent.event == "rejected")))
    finally:
        engine.dispose()
    assert count == len(stored) == len(rows) and rejected == []
    storage = storage or pipeline.root / "collector" / "storage"
    files = [p for p in storage.rglob("*.ts") if "staging" not in p.relative_to(storage).parts]
    assert len(files) == sum(1 for r in rows if r[2] == "segment")  # no stray or second copy on disk
    for camera, seq, kind, manifest, record_hash, path, _, _ in rows:
        row = stored[(camera, seq)]
        assert row.record_hash == record_hash
        if kind == "segment":
            assert sha256_file(storage / row.storage_path) == json.loads(manifest)["sha256"]
            if Path(path).exists() or not pruned_ok:
                assert sha256_file(Path(path)) == json.loads(manifest)["sha256"]
    for cam in {r[0] for r in rows}:
        seqs = [r[1] for r in rows if r[0] == cam]
        assert seqs == list(range(1, len(seqs) + 1))
    return rows


def disable_health(edge_config: Path) -> None:
    """Frame analysis is not under test here: spare the 2 cores."""
    text = edge_config.read_text()
    text, count = re.subn(r"(?ms)^(\[health\]\s*\n(?:#.*\n)*)enabled\s*=\s*true", r"\1enabled = false", text)
    if count == 0 and not re.search(r"(?m)^\[health\]", text):
        text += "\n[health]\nenabled = false\n"
    edge_config.write_text(text)


def make_pipeline(root: Path, broker: Mosquitto, cameras: list[CameraSpec]) -> Pipeline:
    pipeline = Pipeline(root, broker.url, database_url=f"sqlite:///{root / 'collector' / 'collector.db'}",
                        segment_seconds=SEGMENT_SECONDS, cameras=cameras)
    pipeline.set_up()
    disable_health(pipeline.edge_config)
    text = re.sub(r"(?m)^listen = .*$", f'listen = "127.0.0.1:{free_port()}"', pipeline.collector_config.read_text())
    pipeline.collector_config.write_text(text)
    return pipeline


def set_collector_option(pipeline: Pipeline, section: str, line: str) -> None:
    text, count = re.subn(rf"(?m)^\[{section}\]\n", f"[{section}]\n{line}\n", pipeline.collector_config.read_text())
    assert count == 1
    pipeline.collector_config.write_text(text)


# With `log_type all` mosquitto logs, in order, each PUBLISH it receives ("Received PUBLISH from <client> (d0,
# q1, r0, m7, '<topic>', ...") and each one it hands to a subscriber ("Sending PUBLISH to <client> (...").
PUBLISH_LINE = re.compile(r"(Received|Sending) PUBLISH (?:from|to) (\S+) \(d\d, q\d, r\d, m\d+, '([^']*)'")
DROP_NOTICE = "Outgoing messages are being dropped for client {}."
MAX_QUEUED = 10
FREEZE_LIMIT = 35.0  # per freeze; below 1.5 x the collector's 30 s keepalive, so the broker keeps it connected
MAX_FREEZES = 3


@dataclass
class Freeze:
    """What the broker logged while the collector was frozen (SIGSTOP): the segment messages it took from the
    agent, and how many messages it handed to the collector. A frozen collector acknowledges nothing, so
    what the broker could not hand over waits in the collector's queue (at most MAX_QUEUED) or is dropped:
    more than MAX_QUEUED not handed over means some were dropped for certain, and, its in-flight window and
    queue staying full from then on, the last ones taken were. (Messages handed over count whatever they
    are, and those taken only on seg/ topics: the count errs on the side of fewer drops.)"""

    received: list[str] = field(default_factory=list)  # topics, in order
    sent: int = 0

    @property
    def certainly_dropped(self) -> list[str]:
        count = len(self.received) - self.sent - MAX_QUEUED
        return self.received[-count:] if count > 0 else []

    @property
    def dropped_chunks(self) -> list[str]:
        return [t for t in self.certainly_dropped if "/chunk/" in t]

    def summary(self) -> str:
        return (f"{len(self.received)} segment message(s) from the agent, {self.sent} handed to the collector, "
                f"{len(self.certainly_dropped)} certainly dropped ({len(self.dropped_chunks)} chunk(s))")


def read_freeze(log: Path, offset: int, agent: str, collector: str) -> Freeze:
    freeze = Freeze()
    with open(log, "rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    for line in text.splitlines(keepends=True):
        match = PUBLISH_LINE.search(line)
        if not line.endswith("\n") or not match:
            continue
        direction, client, topic = match.groups()
        if direction == "Received" and client == agent and topic.startswith(f"{ROOT}/{agent}/seg/"):
            freeze.received.append(topic)
        elif direction == "Sending" and client == collector:
            freeze.sent += 1
    return freeze


def test_slow_collector_behind_an_overflowing_broker_queue(tmp_path: Path) -> None:
    """Acceptance 5: mosquitto keeps at most 10 messages per subscriber; the collector is frozen (SIGSTOP)
    until the broker has certainly dropped chunks meant for it (read from the broker's own log), then thawed.
    Nothing is lost: the agent's repeated fin learns what is missing and resends it."""
    broker = Mosquitto(workdir=tmp_path / "mosquitto", max_queued_messages=MAX_QUEUED, extra_config="log_type all")
    broker_log = broker.workdir / "mosquitto.log"
    agent_log, collector_log = tmp_path / "agent.log", tmp_path / "collector.log"
    freezes: list[Freeze] = []
    pipeline: Pipeline | None = None

    def evidence() -> str:
        notices = [line for line in broker_log.read_text(errors="replace").splitlines() if "being dropped" in line]
        return ("\n".join(f"freeze {i + 1}: {f.summary()}; certainly dropped: {f.certainly_dropped}"
                           for i, f in enumerate(freezes)) + f"\nbroker drop notices: {notices}\n"
                + (pipeline.logs() if pipeline else ""))

    broker.start()
    try:
        pipeline = make_pipeline(tmp_path, broker, [
            CameraSpec("slow-t601", "T601", "theory", "lavfi:testsrc2=size=640x480:rate=10,noise=alls=40:allf=t")])
        set_collector_option(pipeline, "collector", "workers = 1\nqueue_size = 10")
        collector_id = load_config(pipeline.collector_config).mqtt.client_id
        pipeline.start_collector()
        wait_until(lambda: "subscribed to" in collector_log.read_text(errors="replace"), 60,
                   what="the collector's subscription")
        pipeline.start_agent("--drain-seconds", "240")
        wait_until(lambda: "anchored at" in agent_log.read_text(errors="replace"), 90,
                   what="the agent's camera to start recording")
        for _ in range(MAX_FREEZES):
            offset = broker_log.stat().st_size
            pipeline.collector_proc.send_signal(signal.SIGSTOP)
            deadline = time.monotonic() + FREEZE_LIMIT
            try:
                while True:
                    freeze = read_freeze(broker_log, offset, pipeline.agent, collector_id)
                    if freeze.dropped_chunks or time.monotonic() >= deadline:
                        break
                    time.sleep(0.2)
            finally:
                pipeline.collector_proc.send_signal(signal.SIGCONT)
            freezes.append(freeze)
            if freeze.dropped_chunks:
                break
            time.sleep(2)  # let the collector catch up before the next freeze
        print(f"\nfreeze {len(freezes)}: {freezes[-1].summary()}")  # shown with any failure below
        # The precondition: the broker really dropped chunks meant for the collector.
        assert freezes[-1].dropped_chunks, f"no chunk certainly dropped in {len(freezes)} freeze(s) of up to " \
            f"{FREEZE_LIMIT:.0f} s\n{evidence()}"
        assert pipeline.stop_agent(timeout=300) == 0, pipeline.logs()
    finally:
        if pipeline is not None:
            pipeline.close()
        broker.stop(kill=True)
    assert DROP_NOTICE.format(collector_id) in broker_log.read_text(errors="replace"), evidence()
    rows = assert_all_stored_once(pipeline)
    resent = agent_log.read_text().count("collector misses")
    assert resent > 0, evidence()
    print(f"{len(rows)} records stored once; {resent} missing-replies answered by resending")


def test_full_collector_storage_keeps_footage_then_everything_arrives(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Acceptance 4: the collector's storage_dir is a real 16 MiB tmpfs, filled up by a file; the
    collector raises a storage_full alarm and stores nothing, the agent keeps its footage; once the filler
    is deleted everything arrives."""
    with small_filesystem(tmp_path / "volume", size_kib=16 * 1024) as volume:
        filler = volume / "filler"
        with open(filler, "wb") as handle:
            handle.write(b"\0" * (16 * 1024 * 1024 - 200 * 1024))
        pipeline = make_pipeline(tmp_path, mosquitto, [
            CameraSpec("full-t701", "T701", "theory", lavfi_source(rate=10))])
        text = re.sub(r'(?m)^storage_dir = .*$', f'storage_dir = "{volume}"', pipeline.collector_config.read_text())
        pipeline.collector_config.write_text(text)
        try:
            pipeline.start_collector()
            pipeline.start_agent("--drain-seconds", "180")
            collector_log = tmp_path / "collector.log"
            wait_until(lambda: "ALARM storage_full" in collector_log.read_text(errors="replace"), 90,
                       what="the collector's storage_full alarm")
            time.sleep(SEGMENT_SECONDS)
            rows = journal_rows(pipeline)
            kept = [r for r in rows if r[2] == "segment" and r[6] != "stored"]
            assert kept and all(Path(r[5]).exists() for r in kept)  # the agent keeps what is not stored
            filler.unlink()  # the operator frees space
            wait_until(lambda: pending(pipeline) == 0, 150, what="the backlog to arrive after space was freed")
            assert "ALARM storage_full cleared" in collector_log.read_text(errors="replace")
            assert pipeline.stop_agent(timeout=180) == 0, pipeline.logs()
        finally:
            pipeline.close()
        assert_all_stored_once(pipeline, storage=volume)
        print(f"\n{len(kept)} segment(s) kept at the edge during the alarm, all stored after space returned")


def _vm_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def test_agent_memory_stays_bounded_while_a_2gb_backlog_drains(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Acceptance 3: 2 GB of real (noise, high-bitrate) MPEG-TS segments wait in the agent's spool; the
    agent seals and uploads them all while its VmRSS is sampled from /proc."""
    cam = CameraSpec("rss-t801", "T801", "theory", lavfi_source(rate=5))
    pipeline = make_pipeline(tmp_path, mosquitto, [cam])
    sample = tmp_path / "sample.ts"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=640x480:rate=25,noise=alls=60:allf=t", "-t", "8", "-c:v", "libx264",
                    "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-f", "mpegts", str(sample)], check=True)
    size = sample.stat().st_size
    copies = -(-2_000_000_000 // size)
    spool = pipeline.edge_data / "spool" / cam.id
    spool.mkdir(parents=True, exist_ok=True)
    from datetime import datetime, timedelta, timezone
    from exam_contract.manifest import segment_file_name
    base = datetime.now(timezone.utc) - timedelta(days=1)
    for i in range(copies):  # spooled segments the agent finds unjournaled at start: it seals and sends them
        os.link(sample, spool / segment_file_name(cam.id, base + timedelta(seconds=8 * i)))
    backlog = size * copies
    samples: list[int] = []
    try:
        pipeline.start_collector()
        pipeline.start_agent("--drain-seconds", "300")
        pid = pipeline.agent_proc.pid
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            rss = _vm_rss_kib(pid)
            if rss:  # None or 0 while the process is still being exec'ed
                samples.append(rss)
            rows = journal_rows(pipeline) if (pipeline.edge_data / "journal.sqlite").exists() else []
            if sum(1 for r in rows if r[2] == "segment") >= copies and pending(pipeline) == 0:
                break
            time.sleep(0.5)
        assert pipeline.stop_agent(timeout=120) == 0, pipeline.logs()
    finally:
        pipeline.close()
    rows = assert_all_stored_once(pipeline)
    assert sum(1 for r in rows if r[2] == "segment") >= copies
    peak_mib = max(samples) / 1024
    print(f"\nbacklog {backlog / 1e9:.2f} GB in {copies} segments; agent VmRSS first {samples[0] / 1024:.0f} MiB, "
          f"peak {peak_mib:.0f} MiB over {len(samples)} samples")
    # Bounded: far below the backlog, and independent of it (paho holds at most the in-flight window).
    assert backlog >= 2_000_000_000
    assert peak_mib < 200


def test_edge_disk_budget_stops_cameras_then_resumes(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Edge disk budget: data_dir is a real 32 MiB tmpfs and min_free_mb = 12. With no collector nothing is
    acknowledged, so nothing may be deleted: the disk fills, the camera stops with the disk_full alarm (log
    and retained status topic). Once a collector acknowledges the backlog, acknowledged footage is deleted,
    the camera resumes by itself and the outage is stated as a disk_full gap record."""
    import paho.mqtt.client as mqtt
    from exam_contract.topics import status_topic

    pipeline = make_pipeline(tmp_path, mosquitto, [
        CameraSpec("disk-t901", "T901", "theory", "lavfi:testsrc2=size=320x240:rate=25,noise=alls=40:allf=t")])
    text, count = re.subn(r"(?m)^min_free_mb = \d+", "min_free_mb = 12", pipeline.edge_config.read_text())
    assert count == 1
    pipeline.edge_config.write_text(text)
    statuses: list[dict] = []
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="status-watcher", protocol=mqtt.MQTTv5)
    watcher.on_message = lambda c, u, m: statuses.append(json.loads(m.payload))
    watcher.connect("127.0.0.1", mosquitto.port)
    watcher.subscribe(status_topic(pipeline.agent), qos=1)
    watcher.loop_start()
    with small_filesystem(pipeline.edge_data, size_kib=32 * 1024):
        try:
            # the collector starts only later, and this new venue's cameras have never uploaded
            pipeline.start_agent("--drain-seconds", "120", "--new-chains")
            agent_log = tmp_path / "agent.log"
            wait_until(lambda: "ALARM disk_full" in agent_log.read_text(errors="replace"), 120,
                       what="the agent's disk_full alarm")
            wait_until(lambda: any("disk_full" in (s.get("alarms") or {}) for s in statuses), 30,
                       what="disk_full on the status topic")
            held = journal_rows(pipeline)
            assert held and all(r[6] == "pending" and Path(r[5]).exists() for r in held if r[2] == "segment")
            pipeline.start_collector()
            wait_until(lambda: "ALARM disk_full cleared" in agent_log.read_text(errors="replace"), 120,
                       what="space to return and the cameras to resume")
            wait_until(lambda: any(r[2] == "gap" and json.loads(r[3])["cause"] == "disk_full"
                                   for r in journal_rows(pipeline)), 60, what="the disk_full gap record")
            assert pipeline.stop_agent(timeout=180) == 0, pipeline.logs()
            rows = assert_all_stored_once(pipeline, pruned_ok=True)
        finally:
            pipeline.close()
            watcher.disconnect()
            watcher.loop_stop()
    gaps = [json.loads(r[3]) for r in rows if r[2] == "gap"]
    print(f"\n{len(rows)} records; gaps: {[(g['cause'], g['duration']) for g in gaps]}")

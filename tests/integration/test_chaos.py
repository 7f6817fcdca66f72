"""Issue 3, acceptance 1: chaos on real parts. Three cameras record for five minutes through the real
`exam-edge run`, one mosquitto, two `exam-collector serve` instances on one PostgreSQL and one storage
volume. At random moments (seeded; the seed is printed, set EXAM_CHAOS_SEED to replay) the agent is
SIGKILLed, the broker restarted and a collector SIGKILLed, at least three times each; one broker outage
lasts 25 s, so recording goes on into the spool and the backlog drains afterwards (the short form of
acceptance 2; the 10-minute outage is bench/backlog.py). Afterwards every
recorded segment is stored exactly once and byte-identical, seq is contiguous per camera, and every hole
in time between consecutive records is covered by a gap record. Run twice: footage on the filesystem, and in
an S3 bucket with Object Lock shared by both collectors (real SeaweedFS; issue 15; the same nine failures in three
minutes of recording), where every segment row must also name one object version, locked at least until the row's
lock_until, and nothing else may be stored."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from collector.models import IngestEvent, SegmentRecord
from exam_contract.canonical import parse_time, sha256_hex
from tests.support.pipeline import BIN, CameraSpec, Pipeline, read_journal, sha256_file
from tests.integration.test_store_forward import disable_health
from tests.support.services import free_port, lavfi_source
from tests.support.stored import StoredFootage

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto, pytest.mark.postgres, pytest.mark.ffmpeg]

# Five minutes on the filesystem (issue 3's run). The S3 run exercises the same schedule of nine failures over
# three minutes: what it adds is the object store under the same faults, and the suite stays short.
RECORD_SECONDS = {"filesystem": 300, "s3": 180}
SEGMENT_SECONDS = 10
GAP_TOLERANCE = 2.0  # seconds, as [coverage] gap_tolerance_seconds
CAMERAS = [
    # ids of their own: other tests look for their ffmpeg processes by camera id
    CameraSpec("chaos-t301-front", "T301", "theory", lavfi_source(rate=10)),
    CameraSpec("chaos-t301-back", "T301", "theory", lavfi_source(rate=10)),
    CameraSpec("chaos-p401-side", "P401", "practical", lavfi_source(rate=10)),
]
KINDS = ("agent", "broker", "collector")
LONG_OUTAGE = 25.0  # seconds, the first broker outage


@dataclass(frozen=True)
class Event:
    at: float
    kind: str
    down: float  # seconds before the victim comes back


def schedule(rng: random.Random, record_seconds: int) -> list[Event]:
    """Three of each kind, at random moments at least 12 s apart, inside the recording."""
    kinds = [k for k in KINDS for _ in range(3)]
    rng.shuffle(kinds)
    while True:
        moments = sorted(rng.uniform(20, record_seconds - 25) for _ in kinds)
        if all(b - a >= 12 for a, b in zip(moments, moments[1:])):
            break
    events = [Event(at, kind, rng.uniform(1, 8)) for at, kind in zip(moments, kinds)]
    first = next(i for i, e in enumerate(events) if e.kind == "broker")
    events[first] = Event(events[first].at, "broker", LONG_OUTAGE)
    return events


class Collectors:
    """Two `exam-collector serve` processes, each with its own MQTT client id, same database and storage."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        base = pipeline.collector_config.read_text()
        self.configs: list[Path] = []
        for name in ("a", "b"):
            text, count = re.subn(r"(?m)^\[mqtt\]\n", f'[mqtt]\nclient_id = "collector-{name}"\n', base)
            assert count == 1
            text = re.sub(r"(?m)^listen = .*$", f'listen = "127.0.0.1:{free_port()}"', text)
            path = pipeline.collector_config.with_name(f"collector-{name}.toml")
            path.write_text(text)
            self.configs.append(path)
        self.procs: list[subprocess.Popen | None] = [None, None]

    def start(self, index: int) -> None:
        log = open(self.pipeline.root / f"collector-{'ab'[index]}.log", "ab")
        self.procs[index] = subprocess.Popen(
            [str(BIN / "exam-collector"), "--config", str(self.configs[index]), "serve"],
            stdout=log, stderr=subprocess.STDOUT)

    def kill(self, index: int) -> None:
        proc = self.procs[index]
        assert proc is not None and proc.poll() is None, f"collector {index} died by itself"
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def journal(pipeline: Pipeline) -> list[tuple]:
    return read_journal(pipeline.edge_data / "journal.sqlite", "select camera, seq, kind, manifest, record_hash, "
                        "path, state from records order by camera, seq")


def wait_until_every_camera_sealed(pipeline: Pipeline, limit: float = 180.0) -> None:
    """The schedule starts once every camera has sealed a segment: on a loaded machine the agent and its ffmpeg
    can take longer than the first event's 20 s to start, and an outage before any recording proves nothing."""
    deadline = time.monotonic() + limit
    while {row[0] for row in journal(pipeline) if row[2] == "segment"} != {cam.id for cam in CAMERAS}:
        assert pipeline.agent_proc.poll() is None, "the agent died by itself:\n" + pipeline.logs()
        assert time.monotonic() < deadline, f"not every camera sealed a segment in {limit:.0f} s:\n" + pipeline.logs()
        time.sleep(0.5)


@pytest.mark.parametrize("backend", ["filesystem", "s3"])
def test_chaos(tmp_path: Path, mosquitto, pg_url: str, ffmpeg_available: None, backend: str,
               request: pytest.FixtureRequest) -> None:
    bucket = request.getfixturevalue("s3_bucket") if backend == "s3" else None
    seed = int(os.environ.get("EXAM_CHAOS_SEED", random.SystemRandom().randrange(1 << 32)))
    print(f"\nchaos seed {seed} (replay with EXAM_CHAOS_SEED={seed})")
    rng = random.Random(seed)
    record_seconds = RECORD_SECONDS[backend]
    events = schedule(rng, record_seconds)
    for event in events:
        print(f"  t={event.at:6.1f}s  {event.kind:<9} down {event.down:.1f}s")

    pipeline = Pipeline(tmp_path, mosquitto.url, database_url=pg_url, segment_seconds=SEGMENT_SECONDS,
                        cameras=CAMERAS, s3=bucket)
    pipeline.set_up()
    disable_health(pipeline.edge_config)  # spare the 2 cores: frame analysis is not under test
    collectors = Collectors(pipeline)
    collectors.start(0)
    collectors.start(1)
    done: list[str] = []
    try:
        pipeline.start_agent("--drain-seconds", "240")
        wait_until_every_camera_sealed(pipeline)
        began = time.monotonic()
        for event in events:
            time.sleep(max(0.0, began + event.at - time.monotonic()))
            if event.kind == "agent":
                assert pipeline.agent_proc.poll() is None, "the agent died by itself:\n" + pipeline.logs()
                pipeline.agent_proc.send_signal(signal.SIGKILL)
                pipeline.agent_proc.wait()
                time.sleep(event.down)
                pipeline.start_agent("--drain-seconds", "240")
            elif event.kind == "broker":
                mosquitto.stop(kill=rng.random() < 0.5)
                time.sleep(event.down)
                if event.down == LONG_OUTAGE:
                    rows = journal(pipeline)
                    spooled = sum(1 for r in rows if r[6] != "stored")
                    assert spooled >= len(CAMERAS), "recording did not go on during the broker outage"
                    print(f"  {spooled} records spooled during the {LONG_OUTAGE:.0f} s broker outage")
                mosquitto.start()
            else:
                victim = rng.randrange(2)
                collectors.kill(victim)
                time.sleep(event.down)
                collectors.start(victim)
            done.append(event.kind)
        time.sleep(max(0.0, began + record_seconds - time.monotonic()))
        assert pipeline.agent_proc.poll() is None, "the agent died by itself:\n" + pipeline.logs()
        code = pipeline.stop_agent(timeout=300)  # SIGTERM: last segments sealed, backlog drained
        assert code == 0, pipeline.logs()
        rows = journal(pipeline)
        assert all(r[6] == "stored" for r in rows), \
            f"{sum(r[6] != 'stored' for r in rows)} record(s) not stored after the drain\n{pipeline.logs()}"
    finally:
        pipeline.close()
        collectors.stop_all()
    assert sorted(done) == sorted(k for k in KINDS for _ in range(3))

    engine = create_engine(pg_url)
    try:
        with Session(engine) as session:
            stored = list(session.scalars(select(SegmentRecord).order_by(SegmentRecord.camera, SegmentRecord.seq)))
            rejected = list(session.scalars(select(IngestEvent).where(IngestEvent.event == "rejected")))
            session.expunge_all()
    finally:
        engine.dispose()
    assert rejected == []
    footage = StoredFootage(pipeline.root / "collector" / "storage", bucket)
    by_key = {(r.camera, r.seq): r for r in stored}
    assert len(by_key) == len(stored)  # exactly once
    # no stray or second copy in the store; on S3 every segment row names a version locked as the row says
    footage.check_rows(stored, backend)

    causes: dict[str, int] = {}
    for cam in CAMERAS:
        mine = [r for r in rows if r[0] == cam.id]
        seqs = [r[1] for r in mine]
        assert seqs == list(range(1, len(seqs) + 1)), f"camera {cam.id}: seq not contiguous at the edge"
        assert sorted(s for c, s in by_key if c == cam.id) == seqs, f"camera {cam.id}: stored seqs differ"
        previous_end = None
        segments = 0
        for camera, seq, kind, manifest_json, record_hash, path, _ in mine:
            row = by_key[(camera, seq)]
            assert row.record_hash == record_hash and row.kind == kind
            manifest = json.loads(manifest_json)
            if kind == "segment":
                segments += 1
                data = footage.read(row.storage_path, row.storage_version)
                assert sha256_hex(data) == manifest["sha256"] == sha256_file(Path(path)), \
                    f"camera {camera} seq {seq}: stored bytes differ from the recorded segment"
            else:
                causes[manifest["cause"]] = causes.get(manifest["cause"], 0) + 1
            start, end = parse_time(manifest["start"]), parse_time(manifest["end"])
            if previous_end is not None:
                hole = (start - previous_end).total_seconds()
                assert abs(hole) <= GAP_TOLERANCE, (
                    f"camera {camera}: {hole:.3f} s between seq {seq - 1} and seq {seq} not covered by a gap "
                    "record")
            previous_end = end
        assert segments >= record_seconds // SEGMENT_SECONDS // 2
        print(f"  camera {cam.id}: {len(mine)} records, {segments} segments stored once, byte-identical")
    print(f"  gap records by cause: {causes}")
    assert causes.get("agent_stopped", 0) >= len(CAMERAS)  # every camera states the agent's downtime
    verify = pipeline.collector("summary", "--verify", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr

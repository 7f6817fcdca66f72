"""Issue 2, acceptance 2 and 3: two cameras for over three minutes through the real CLIs, real
mosquitto and real ffmpeg, on SQLite, on PostgreSQL, and on SQLite with the footage in an S3 bucket with
Object Lock (real SeaweedFS; issue 15): the three pipelines run side by side, each with its own broker, so the
suite pays the three minutes once. One camera's ffmpeg is SIGKILLed mid-segment in each pipeline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from collector.models import SegmentRecord
from exam_contract.canonical import canonical_bytes, parse_time, sha256_hex
from tests.support.pipeline import CameraSpec, Pipeline, read_journal, sha256_file, wait_until
from tests.support.seaweed import Bucket
from tests.support.services import Mosquitto, lavfi_source
from tests.support.stored import StoredFootage

RECORD_SECONDS = 185
SEGMENT_SECONDS = 10
KILLED_CAMERA = "p201-side"
CAMERAS = [
    CameraSpec("t101-front", "T101", "theory", lavfi_source(rate=10)),
    CameraSpec(KILLED_CAMERA, "P201", "practical", lavfi_source(rate=10)),
]


@dataclass(frozen=True)
class EdgeRecord:
    camera: str
    seq: int
    kind: str
    manifest: dict
    path: Path | None
    state: str


def edge_records(pipeline: Pipeline) -> list[EdgeRecord]:
    rows = read_journal(pipeline.edge_data / "journal.sqlite",
                        "select camera, seq, kind, manifest, path, state from records order by camera, seq")
    return [EdgeRecord(camera, seq, kind, json.loads(manifest), Path(path) if path else None, state)
            for camera, seq, kind, manifest, path, state in rows]


def collector_records(pipeline: Pipeline) -> list[SegmentRecord]:
    engine = create_engine(pipeline.database_url)
    try:
        with Session(engine) as session:
            rows = list(session.scalars(select(SegmentRecord).order_by(SegmentRecord.camera, SegmentRecord.seq)))
            session.expunge_all()
        return rows
    finally:
        engine.dispose()


def ffmpeg_pid_of(pipeline: Pipeline, camera: str) -> int | None:
    """The ffmpeg child of the agent process that writes this camera's recording folder."""
    assert pipeline.agent_proc is not None
    marker = f"/recording/{camera}/"
    # each recorder thread spawns its own ffmpeg, and /proc lists children per spawning thread
    pids = [pid for task in Path(f"/proc/{pipeline.agent_proc.pid}/task").iterdir()
            for pid in (task / "children").read_text().split()]
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except FileNotFoundError:
            continue
        if "ffmpeg" in cmdline and marker in cmdline:
            return int(pid)
    return None


def kill_mid_segment(pipeline: Pipeline, camera: str) -> int:
    """SIGKILL the camera's ffmpeg once a second segment is half written; returns the killed pid."""
    recording = pipeline.edge_data / "recording" / camera

    def half_written() -> bool:
        sealed = [r for r in edge_records(pipeline) if r.camera == camera]
        growing = sorted(recording.glob("*.ts"))
        return len(sealed) >= 2 and bool(growing) and growing[-1].stat().st_size > 60_000

    wait_until(half_written, 90, what=f"{camera} half way through a segment")
    pid = ffmpeg_pid_of(pipeline, camera)
    assert pid is not None, f"no ffmpeg process for {camera} under agent pid {pipeline.agent_proc.pid}"
    os.kill(pid, signal.SIGKILL)
    return pid


def ffprobe_duration(path: Path) -> float:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_packets",
                          "-show_entries", "format=duration:stream=nb_read_packets", "-of", "json", str(path)],
                         capture_output=True, text=True, check=True, timeout=60)
    data = json.loads(out.stdout)
    assert int(data["streams"][0]["nb_read_packets"]) > 0, f"ffprobe read no video packets from {path}"
    return float(data["format"]["duration"])


def stored_footage(pipeline: Pipeline) -> StoredFootage:
    return StoredFootage(pipeline.root / "collector" / "storage", pipeline.s3)


def test_two_cameras_three_minutes_sqlite_postgres_and_s3(tmp_path: Path, mosquitto: Mosquitto, pg_url: str,
                                                          s3_bucket: Bucket, ffmpeg_available: None) -> None:
    second_broker = Mosquitto(workdir=tmp_path / "mosquitto-pg")
    second_broker.start()
    third_broker = Mosquitto(workdir=tmp_path / "mosquitto-s3")
    third_broker.start()
    pipelines = {
        "sqlite": Pipeline(root=tmp_path / "sqlite", broker_url=mosquitto.url,
                           database_url=f"sqlite:///{tmp_path / 'sqlite' / 'collector.db'}",
                           cameras=CAMERAS, segment_seconds=SEGMENT_SECONDS),
        "postgres": Pipeline(root=tmp_path / "postgres", broker_url=second_broker.url, database_url=pg_url,
                             cameras=CAMERAS, segment_seconds=SEGMENT_SECONDS),
        "sqlite+s3": Pipeline(root=tmp_path / "s3", broker_url=third_broker.url,
                              database_url=f"sqlite:///{tmp_path / 's3' / 'collector.db'}", cameras=CAMERAS,
                              segment_seconds=SEGMENT_SECONDS, s3=s3_bucket),
    }
    try:
        for pipeline in pipelines.values():
            pipeline.root.mkdir(parents=True)
            pipeline.set_up()
            pipeline.start_collector()
            pipeline.start_agent()
        started = time.monotonic()
        for pipeline in pipelines.values():
            kill_mid_segment(pipeline, KILLED_CAMERA)
        time.sleep(max(0.0, RECORD_SECONDS - (time.monotonic() - started)))
        for name, pipeline in pipelines.items():
            assert pipeline.stop_agent() == 0, f"{name}: agent exit\n{pipeline.logs()}"
        for name, pipeline in pipelines.items():
            check_everything_arrived(name, pipeline)
            check_killed_camera(name, pipeline)
            stored_footage(pipeline).check_rows(collector_records(pipeline), name)
            verify = pipeline.collector("summary", "--verify", "--lang", "en", check=False)
            assert verify.returncode == 0, f"{name}: summary --verify\n{verify.stdout}\n{verify.stderr}"
            assert "verified" in verify.stdout
    finally:
        for pipeline in pipelines.values():
            pipeline.close()
        second_broker.stop(kill=True)
        third_broker.stop(kill=True)


def check_everything_arrived(name: str, pipeline: Pipeline) -> None:
    edge = edge_records(pipeline)
    stored = collector_records(pipeline)
    footage = stored_footage(pipeline)
    for camera in (c.id for c in CAMERAS):
        edge_cam = [r for r in edge if r.camera == camera]
        stored_cam = [r for r in stored if r.camera == camera]
        seconds = sum(r.manifest["duration"] for r in edge_cam if r.kind == "segment")
        assert seconds >= RECORD_SECONDS - 3 * SEGMENT_SECONDS, f"{name}/{camera}: only {seconds:.0f}s recorded"
        # seq is contiguous at the edge and every record reached the collector exactly once
        assert [r.seq for r in edge_cam] == list(range(1, len(edge_cam) + 1)), f"{name}/{camera}: edge seq"
        assert [r.seq for r in stored_cam] == [r.seq for r in edge_cam], f"{name}/{camera}: stored seqs"
        assert all(r.state == "stored" for r in edge_cam), \
            f"{name}/{camera}: unacknowledged at the edge: {[r.seq for r in edge_cam if r.state != 'stored']}"
        prev = None
        for e, s in zip(edge_cam, stored_cam):
            record_hash = sha256_hex(canonical_bytes(e.manifest))
            assert s.record_hash == record_hash and s.manifest == canonical_bytes(e.manifest).decode()
            assert s.prev_hash == prev and e.manifest["prev"] == prev, f"{name}/{camera} seq {e.seq}: chain"
            assert s.chain_status in ("first", "linked"), f"{name}/{camera} seq {e.seq}: {s.chain_status}"
            prev = record_hash
            if e.kind == "segment":
                assert e.path is not None and s.storage_path is not None
                data = footage.read(s.storage_path, s.storage_version)
                assert sha256_hex(data) == sha256_file(e.path) == e.manifest["sha256"] == s.sha256
                assert len(data) == e.manifest["size"]
            else:
                assert s.storage_path is None and s.kind == "gap"
        # nothing else stored for this camera: one file (or object version) per stored segment
        mine = [key for key, _ in footage.objects() if f"/{camera}@" in key]
        assert len(mine) == sum(1 for r in stored_cam if r.kind == "segment"), f"{name}/{camera}: stray files"


def check_killed_camera(name: str, pipeline: Pipeline) -> None:
    stored = [r for r in collector_records(pipeline) if r.camera == KILLED_CAMERA]
    gaps = [i for i, r in enumerate(stored) if r.kind == "gap" and r.seq > 1]
    assert gaps, f"{name}: no gap record after the SIGKILL: {[(r.seq, r.kind) for r in stored]}"
    gap_index = gaps[0]
    partial, gap, after = stored[gap_index - 1], stored[gap_index], stored[gap_index + 1]
    gap_manifest = json.loads(gap.manifest)
    assert gap_manifest["cause"] == "recorder_crashed", gap_manifest
    # the partial segment is at the collector and ffprobe reads it
    assert partial.kind == "segment" and 0 < partial.duration < SEGMENT_SECONDS
    with stored_footage(pipeline).local(partial.storage_path, partial.storage_version,
                                        pipeline.root / "probe") as copy:
        assert ffprobe_duration(copy) > 0
    # the gap covers exactly the restart: from the partial's end to the next segment's start
    assert gap.start_at == partial.end_at and gap.end_at == after.start_at
    assert parse_time(gap_manifest["start"]) == partial.end_at
    assert after.kind == "segment"

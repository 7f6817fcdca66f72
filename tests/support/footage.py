"""Real footage for export and portal tests: ffmpeg lavfi segments, signed manifests, ingested through
collector.ingest.Ingest, and batches imported through collector.batches (no MQTT: fast).

Institution A (JL2201001) has camera t101-front in theory room T101:
  seq 1-3 segments (09:00:00-09:00:06 Asia/Shanghai), seq 4 a gap record (camera_unreachable, 06-10 s),
  seq 5-7 segments (10-16 s), seq 6 (12-14 s) flagged `frozen` by the agent's frame analysis.
Institution B (JL2202002) has camera p201-left in practical room P201: seq 1-3 segments.
Batches: B-OK (A, 09:00:00-09:00:06, complete), B-GAP (A, 09:00:00-09:00:16, gaps 06-10 s (camera
unreachable) and 12-14 s (frozen video)),
B-OTHER (B, complete).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from collector.admin import enroll
from collector.batches import import_batches
from collector.db import make_engine, session_factory, upgrade
from collector.ingest import Ingest
from exam_contract.chunks import chunk_count
from exam_contract.manifest import ClockInfo, Manifest, VideoInfo
from exam_contract.protocol import InitMessage, encode_fin
from exam_contract.signing import generate_private_key, public_key_b64, sign
from tests.collector.conftest import TEST_LIMITS
from tests.support.seaweed import Bucket

BASE = datetime(2026, 11, 26, 1, 0, 0, tzinfo=timezone.utc)   # 09:00 Asia/Shanghai
SEGMENT_SECONDS = 2
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Site:
    agent: str
    institution: str
    venue: str
    camera: str
    room: str
    room_kind: str


SITE_A = Site("jl2201001-01-a", "JL2201001", "JL2201001-01", "t101-front", "T101", "theory")
SITE_B = Site("jl2202002-01-a", "JL2202002", "JL2202002-01", "p201-left", "P201", "practical")

BATCH_CSV = f"""batch_id,institution,venue,occupation,level,part,room,start,end
B-OK,{SITE_A.institution},{SITE_A.venue},电工,四级,theory,{SITE_A.room},2026-11-26T09:00:00,2026-11-26T09:00:06
B-GAP,{SITE_A.institution},{SITE_A.venue},电工,四级,theory,{SITE_A.room},2026-11-26T09:00:00,2026-11-26T09:00:16
B-OTHER,{SITE_B.institution},{SITE_B.venue},焊工,三级,practical,{SITE_B.room},2026-11-26T09:00:00,2026-11-26T09:00:06
"""


def make_segments(directory: Path, count: int = 8, size: str = "320x240") -> list[Path]:
    """`count` real H.264 MPEG-TS segments of exactly SEGMENT_SECONDS each (cached in `directory`)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = sorted(directory.glob("seg*.ts"))
    if len(files) >= count:
        return files[:count]
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
         "-i", f"testsrc2=size={size}:rate=25", "-t", str(count * SEGMENT_SECONDS), "-c:v", "libx264",
         "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-force_key_frames",
         f"expr:gte(t,n_forced*{SEGMENT_SECONDS})", "-f", "segment", "-segment_time", str(SEGMENT_SECONDS),
         "-segment_format", "mpegts", "-reset_timestamps", "0", str(directory / "seg%03d.ts")],
        check=True, capture_output=True, timeout=300)
    return sorted(directory.glob("seg*.ts"))[:count]


@dataclass
class Camera:
    site: Site
    key: Ed25519PrivateKey
    seq: int = 0
    prev: str | None = None

    def manifest(self, kind: str, start: datetime, seconds: float, data: bytes | None,
                 cause: str | None = None, health: tuple[str, ...] = ()) -> Manifest:
        self.seq += 1
        s = self.site
        m = Manifest(kind=kind, agent=s.agent, institution=s.institution, venue=s.venue, room=s.room,
                     room_kind=s.room_kind, camera=s.camera, seq=self.seq, start=start,
                     end=start + timedelta(seconds=seconds), duration=float(seconds),
                     size=len(data) if data is not None else 0,
                     sha256=hashlib.sha256(data).hexdigest() if data is not None else None, prev=self.prev,
                     video=VideoInfo("h264", 320, 240, 25.0) if kind == "segment" else None,
                     clock=ClockInfo(offset_ms=1.0, synced=True), health=health, cause=cause)
        self.prev = m.record_hash()
        return m


@dataclass
class Demo:
    root: Path
    database_url: str
    engine: Engine
    sessions: sessionmaker[Session]
    storage: Path
    key_file: Path
    ingest: Ingest
    cameras: dict[str, Camera] = field(default_factory=dict)
    storage_toml: str = ""   # a [storage] table for write_config (footage in an S3 bucket); "": the filesystem

    def send(self, camera: Camera, manifest: Manifest, data: bytes | None) -> None:
        message = InitMessage.build(manifest, sign(camera.key, manifest.canonical()), CHUNK)
        reply = self.ingest.on_init(camera.site.agent, manifest.file_id, message.encode())
        if reply is None:
            if data:
                for i in range(chunk_count(len(data), CHUNK)):
                    self.ingest.on_chunk(camera.site.agent, manifest.file_id, i, data[i * CHUNK:(i + 1) * CHUNK])
            reply = self.ingest.on_fin(camera.site.agent, manifest.file_id, encode_fin(manifest.record_hash()))
        assert reply is not None and reply.state == "stored", reply

    def write_config(self, mqtt_url: str = "mqtt://127.0.0.1:1883", http_listen: str = "127.0.0.1:8080",
                     http_extra: str = "") -> Path:
        """The collector config of this demo; `http_extra` is more TOML lines of the [http] table."""
        path = self.root / "collector.toml"
        path.write_text(f"""[collector]
data_dir = "{self.root / 'data'}"
database_url = "{self.database_url}"
storage_dir = "{self.storage}"
key_file = "{self.key_file}"

[mqtt]
url = "{mqtt_url}"

[http]
listen = "{http_listen}"
{http_extra}
{self.storage_toml}""", encoding="utf-8")
        return path


def build_demo(root: Path, database_url: str, segment_files: list[Path], s3: Bucket | None = None) -> Demo:
    """Enrol two agents, ingest their footage (with one stated gap for A) and import the three batches; with `s3`
    the footage goes to that Object Lock bucket (and write_config says so)."""
    root.mkdir(parents=True, exist_ok=True)
    engine = make_engine(database_url)
    upgrade(engine)
    sessions = session_factory(engine)
    key_file = root / "collector.key"
    if not key_file.exists():
        generate_private_key(key_file)
    storage = root / "storage"
    store = s3.store(storage) if s3 is not None else None
    demo = Demo(root, database_url, engine, sessions, storage, key_file,
                Ingest(engine, storage, limits=TEST_LIMITS, store=store),
                storage_toml=s3.storage_toml(root) if s3 is not None else "")
    for site in (SITE_A, SITE_B):
        camera = Camera(site, Ed25519PrivateKey.generate())
        enroll(sessions, site.agent, site.venue, public_key_b64(camera.key), site.institution)
        demo.cameras[site.institution] = camera
    a, b = demo.cameras[SITE_A.institution], demo.cameras[SITE_B.institution]
    data = [f.read_bytes() for f in segment_files]
    step = timedelta(seconds=SEGMENT_SECONDS)
    for i in range(3):
        demo.send(a, a.manifest("segment", BASE + i * step, SEGMENT_SECONDS, data[i]), data[i])
    demo.send(a, a.manifest("gap", BASE + 3 * step, 2 * SEGMENT_SECONDS, None, cause="camera_unreachable"), None)
    for i in range(5, 8):
        health = ("frozen",) if i == 6 else ()
        demo.send(a, a.manifest("segment", BASE + i * step, SEGMENT_SECONDS, data[i], health=health), data[i])
    for i in range(3):
        demo.send(b, b.manifest("segment", BASE + i * step, SEGMENT_SECONDS, data[i]), data[i])
    with sessions.begin() as session:
        import_batches(session, BATCH_CSV.encode("utf-8"), source="demo.csv", actor="test-setup")
    return demo


def ffmpeg_ok() -> bool:
    return shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None

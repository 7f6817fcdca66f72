"""Stored footage for retention tests: real ffmpeg MPEG-TS clips, signed manifests, ingested through
collector.ingest into a real SQLite or PostgreSQL database, with a collector config and key on disk."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from collector.admin import enroll
from collector.db import make_engine, session_factory, upgrade
from collector.footage_store import FootageStore
from collector.ingest import Ingest
from collector.models import SegmentRecord
from exam_contract.signing import generate_private_key
from retention.cli import main as retention_main
from tests.collector.conftest import AGENT, INSTITUTION, TEST_LIMITS, VENUE, Harness, SigningAgent

REPO = Path(__file__).resolve().parents[2]
EXAM_RETENTION = REPO / ".venv" / "bin" / "exam-retention"
EXAM_COLLECTOR = REPO / ".venv" / "bin" / "exam-collector"


@pytest.fixture(scope="session")
def clips(ffmpeg_available, tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """Three short real H.264 MPEG-TS clips (different content, so different hashes)."""
    out = tmp_path_factory.mktemp("clips")
    data = []
    for i, pattern in enumerate(["testsrc2", "smptebars", "rgbtestsrc"]):
        path = out / f"clip{i}.ts"
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                        f"{pattern}=size=160x120:rate=10:duration=2", "-c:v", "libx264", "-preset", "ultrafast",
                        "-f", "mpegts", str(path)], check=True)
        data.append(path.read_bytes())
    return data


@dataclass
class Env:
    """A collector installation: config file, key, database, storage; stores segments via the ingest core."""

    config: Path
    engine: Engine
    storage: Path
    harness: Harness
    clips: list[bytes]
    prev: dict[str, str | None] = field(default_factory=dict)
    seqs: dict[str, int] = field(default_factory=dict)

    @property
    def sessions(self):  # noqa: ANN201
        return session_factory(self.engine)

    @property
    def footage_store(self) -> FootageStore:
        return self.harness.ingest.store

    def store(self, camera: str, start: datetime, seconds: float = 2.0, clip: int = 0, room: str = "T101",
              seq: int | None = None) -> SegmentRecord:
        seq = seq or self.seqs.get(camera, 0) + 1
        data = self.clips[clip % len(self.clips)]
        m = self.harness.agent.manifest(seq, data, self.prev.get(camera), camera=camera, start=start,
                                        end=start + timedelta(seconds=seconds), duration=seconds, room=room)
        reply = self.harness.send(m, data)
        assert reply is not None and reply.state == "stored", reply
        self.prev[camera], self.seqs[camera] = m.record_hash(), seq
        with self.sessions() as s:
            return s.scalars(select(SegmentRecord).where(SegmentRecord.camera == camera,
                                                         SegmentRecord.seq == seq)).one()

    def run(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
        """`exam-retention --config CONFIG args...` in-process (same entry point as the console script)."""
        capsys.readouterr()
        try:
            retention_main(["--config", str(self.config), *args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    def run_process(self, program: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(program), "--config", str(self.config), *args], capture_output=True, text=True,
                              timeout=300)


def make_env(database_url: str, tmp_path: Path, clips: list[bytes], storage_toml: str = "",
             ingest_options: Callable[[Path], dict[str, Any]] | None = None) -> Env:
    """A collector config, database and enrolled signing agent; `storage_toml` adds a [storage] table and
    `ingest_options(storage_dir)` the matching Ingest arguments (store=, locks=)."""
    data_dir = tmp_path / "collector"
    storage = data_dir / "storage"
    key_file = data_dir / "collector.key"
    generate_private_key(key_file)
    config = tmp_path / "collector.toml"
    config.write_text(f"""
[collector]
data_dir = "{data_dir}"
database_url = "{database_url}"
storage_dir = "{storage}"
key_file = "{key_file}"

[mqtt]
url = "mqtt://127.0.0.1:1"

[retention]
margin_days = 7

{storage_toml}""", encoding="utf-8")
    engine = make_engine(database_url)
    upgrade(engine)
    agent = SigningAgent()
    enroll(session_factory(engine), AGENT, VENUE, agent.pubkey, INSTITUTION)
    extra = ingest_options(storage) if ingest_options else {}
    harness = Harness(Ingest(engine, storage, limits=TEST_LIMITS, **extra), engine, storage, agent)
    return Env(config, engine, storage, harness, clips)


@pytest.fixture
def env(database_url: str, tmp_path: Path, clips: list[bytes]) -> Env:
    env = make_env(database_url, tmp_path, clips)
    yield env
    env.engine.dispose()


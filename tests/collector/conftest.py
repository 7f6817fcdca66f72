"""Helpers for collector tests: a signing test agent and an ingest harness on a real database."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, select

from collector.admission import IngestLimits
from collector.db import make_engine, session_factory, upgrade
from collector.admin import enroll
from collector.ingest import Ingest
from collector.models import IngestEvent, SegmentRecord
from exam_contract.canonical import canonical_bytes, sha256_hex
from exam_contract.chunks import chunk_count
from exam_contract.manifest import Manifest, VideoInfo
from exam_contract.protocol import InitMessage, ProtocolError, Reply, encode_fin
from exam_contract.signing import public_key_b64, sign

AGENT = "jl2201001-01-a"
INSTITUTION = "JL2201001"
VENUE = "JL2201001-01"
CAMERA = "t101-front"
BASE = datetime(2026, 11, 26, 1, 0, 0, tzinfo=timezone.utc)
CHUNK = 1000
# The tests' small files travel in 1000-byte chunks; production allows 64 KiB to 1 MiB. Their footage carries
# fixed dates, which must not turn `clock_suspect` as the calendar moves on.
TEST_LIMITS = IngestLimits(min_chunk_bytes=256, clock_backlog_days=100 * 365)


def fin_for(init: bytes) -> bytes:
    """The fin an agent sends for this init: its record hash (empty when the init cannot be read)."""
    try:
        return encode_fin(sha256_hex(canonical_bytes(InitMessage.decode(init).manifest_raw)))
    except ProtocolError:
        return b""


def payload_bytes(seq: int, size: int = 3500) -> bytes:
    return (f"segment {seq} ".encode() * (size // 8 + 2))[:size]


@dataclass
class SigningAgent:
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    agent: str = AGENT
    camera: str = CAMERA

    @property
    def pubkey(self) -> str:
        return public_key_b64(self.key)

    def manifest(self, seq: int, data: bytes | None, prev: str | None, kind: str = "segment",
                 camera: str | None = None, **changes) -> Manifest:
        start = BASE + timedelta(seconds=10 * (seq - 1))
        m = Manifest(kind=kind, agent=self.agent, institution=INSTITUTION, venue=VENUE, room="T101",
                     room_kind="theory", camera=camera or self.camera, seq=seq, start=start,
                     end=start + timedelta(seconds=10), duration=10.0,
                     size=len(data) if data is not None else 0,
                     sha256=_sha(data) if data is not None else None, prev=prev,
                     video=VideoInfo("h264", 320, 240, 25.0) if kind == "segment" else None,
                     cause="camera_unreachable" if kind == "gap" else None)
        return replace(m, **changes) if changes else m

    def init_payload(self, manifest: Manifest, chunk_size: int = CHUNK, signature: str | None = None,
                     chunks: int | None = None) -> bytes:
        message = InitMessage.build(manifest, signature or sign(self.key, manifest.canonical()), chunk_size)
        if chunks is not None:
            message = replace(message, chunks=chunks)
        return message.encode()


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@dataclass
class Harness:
    ingest: Ingest
    engine: Engine
    storage: Path
    agent: SigningAgent

    def send(self, manifest: Manifest, data: bytes | None, *, topic_agent: str | None = None,
             init: bytes | None = None, skip: set[int] = frozenset(), chunk_size: int = CHUNK) -> Reply | None:
        """init, chunks (except `skip`), fin; returns the init reply if it rejected, else the fin reply."""
        agent = topic_agent or self.agent.agent
        file_id = manifest.file_id
        init = init if init is not None else self.agent.init_payload(manifest, chunk_size)
        reply = self.ingest.on_init(agent, file_id, init)
        if reply is not None:
            fin = self.ingest.on_fin(agent, file_id, fin_for(init))
            assert fin is not None and fin.state == reply.state and fin.reason == reply.reason
            assert fin.record == reply.record
            return reply
        if data:
            for i in range(chunk_count(len(data), chunk_size)):
                if i not in skip:
                    self.ingest.on_chunk(agent, file_id, i, data[i * chunk_size:(i + 1) * chunk_size])
        return self.ingest.on_fin(agent, file_id, fin_for(init))

    def records(self) -> list[SegmentRecord]:
        with session_factory(self.engine)() as s:
            return list(s.scalars(select(SegmentRecord).order_by(SegmentRecord.camera, SegmentRecord.seq)))

    def events(self, event: str | None = None) -> list[IngestEvent]:
        with session_factory(self.engine)() as s:
            q = select(IngestEvent).order_by(IngestEvent.id)
            if event:
                q = q.where(IngestEvent.event == event)
            return list(s.scalars(q))

    def stored_files(self) -> list[Path]:
        return sorted(p for p in self.storage.rglob("*") if p.is_file() and "staging" not in p.parts)

    def staging_entries(self) -> list[Path]:
        staging = self.storage / "staging"
        return [p for p in staging.rglob("*") if p.is_file()] if staging.exists() else []


@pytest.fixture
def test_agent() -> SigningAgent:
    return SigningAgent()


@pytest.fixture
def harness(database_url: str, tmp_path: Path, test_agent: SigningAgent) -> Harness:
    engine = make_engine(database_url)
    upgrade(engine)
    enroll(session_factory(engine), AGENT, VENUE, test_agent.pubkey, INSTITUTION)
    storage = tmp_path / "storage"
    yield Harness(Ingest(engine, storage, limits=TEST_LIMITS), engine, storage, test_agent)
    engine.dispose()

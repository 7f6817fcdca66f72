"""Portal playback with the footage in an S3 bucket (real SeaweedFS): the MP4 is remuxed from the object version
the row names, served by the collector with HTTP Range; the browser never talks to the bucket."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from sqlalchemy import select

from collector.config import load_config
from collector.footage_store import FilesystemStore
from collector.models import SegmentRecord
from collector.viewing import playable_mp4
from collector.web import Portal, create_app
from exam_contract.signing import load_private_key
from tests.support.footage import SITE_A, Demo, build_demo
from tests.support.seaweed import Bucket

from .conftest import add_accounts, token_for


@pytest.fixture
def s3_demo(tmp_path: Path, segment_files: list[Path], s3_bucket: Bucket) -> Demo:
    demo = build_demo(tmp_path / "demo", f"sqlite:///{tmp_path / 'collector.db'}", segment_files, s3=s3_bucket)
    add_accounts(demo)
    yield demo
    demo.engine.dispose()


def test_playback_from_s3_with_range_requests(s3_demo: Demo, s3_bucket: Bucket, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    config = load_config(s3_demo.write_config())
    assert config.storage.backend == "s3"
    portal = Portal(config, s3_demo.sessions, load_private_key(s3_demo.key_file))
    assert portal.store.versioned
    with TestClient(create_app(portal)) as client:
        a = token_for(client, "insp-a")
        cam = client.get("/api/batches/B-GAP", headers=a).json()["parts"][0]["cameras"][0]
        assert cam["camera"] == SITE_A.camera
        seg = cam["segments"][1]
        whole = client.get(f"/api/segments/{seg['id']}/video", headers=a, follow_redirects=False)
        assert whole.status_code == 200 and whole.headers["content-type"] == "video/mp4"
        assert whole.content[4:8] == b"ftyp" and whole.headers["accept-ranges"] == "bytes"
        assert s3_bucket.endpoint not in str(whole.headers) and s3_bucket.name not in str(whole.headers)
        part = client.get(f"/api/segments/{seg['id']}/video", headers={**a, "Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == whole.content[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{len(whole.content)}"
        tail = client.get(f"/api/segments/{seg['id']}/video", headers={**a, "Range": "bytes=-50"})
        assert tail.status_code == 206 and tail.content == whole.content[-50:]

    # the MP4 is the remux of exactly the bytes of the version the row names
    with s3_demo.sessions() as s:
        row = s.scalars(select(SegmentRecord).where(SegmentRecord.id == seg["id"])).one()
    assert row.storage_version is not None
    local = tmp_path / "local"
    (local / row.storage_path).parent.mkdir(parents=True)
    with portal.store.open(row.storage_path, row.storage_version) as source:
        stored = source.read()
    assert hashlib.sha256(stored).hexdigest() == row.sha256
    (local / row.storage_path).write_bytes(stored)
    reference = playable_mp4(FilesystemStore(local), row.storage_path, row.sha256, tmp_path / "cache")
    assert reference.read_bytes() == whole.content
    assert list((s3_demo.storage / "downloads").glob("*")) == []   # the temporary download is gone

"""The requests `S3Store.place` makes on a real SeaweedFS (counted from botocore's own events on the store's client):
a fresh key costs the conditional create alone once `check()` has found Object Lock on the bucket, the create's
reply being the proof of the bytes (the storage's checksum) and of the lock (the create carried it); a retry
lists the versions only after its create is refused, and adopts the stored version."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from collector.s3_store import S3Store, lock_date
from tests.support.seaweed import Bucket

REL = PurePosixPath("JL2201001/JL2201001-01/t101-front/2026/11/26/t101-front@20261126T010000.000Z.ts")
UNTIL = lock_date(datetime.now(timezone.utc) + timedelta(days=400))
PART = 5 * 1024 * 1024   # the smallest part S3 allows (all but the last)


def recorded(store: S3Store) -> list[str]:
    """The S3 operations the store's client sends from now on, in order."""
    calls: list[str] = []

    def before(model: Any, **_: Any) -> None:
        calls.append(model.name)

    store.client.meta.events.register("before-call.s3", before)
    return calls


def claim(tmp_path: Path, data: bytes) -> tuple[Path, str]:
    path = tmp_path / "staging" / "claim"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def stored(s3_bucket: Bucket, version: str) -> dict[str, Any]:
    return dict(s3_bucket.admin.head_object(Bucket=s3_bucket.name, Key=str(REL), VersionId=version,
                                            ChecksumMode="ENABLED"))


@pytest.mark.parametrize("multipart", [False, True], ids=["single", "multipart"])
def test_a_fresh_key_after_check_costs_the_create_alone_and_a_retry_adopts(s3_bucket: Bucket, tmp_path: Path,
                                                                           multipart: bool) -> None:
    store = s3_bucket.store(tmp_path / "storage", part_size=PART)
    store.check()
    data = bytes(range(256)) * ((2 * PART + 777) // 256) if multipart else b"footage " * 1000
    source, sha = claim(tmp_path, data)
    calls = recorded(store)
    placed = store.place(source, REL, sha256=sha, retain_until=UNTIL)
    assert placed.created and placed.lock_until == UNTIL
    assert calls == (["CreateMultipartUpload", "UploadPart", "UploadPart", "UploadPart", "CompleteMultipartUpload"]
                     if multipart else ["PutObject"])
    head = stored(s3_bucket, placed.version or "")
    assert (head["ContentLength"], head["ObjectLockMode"]) == (len(data), "COMPLIANCE")
    assert head["ObjectLockRetainUntilDate"].astimezone(timezone.utc) == UNTIL
    assert store.hash(REL, placed.version) == (sha, len(data))

    calls.clear()
    again = store.place(source, REL, sha256=sha, retain_until=UNTIL)
    assert (again.created, again.version, again.lock_until) == (False, placed.version, UNTIL)
    assert calls[0] == ("CreateMultipartUpload" if multipart else "PutObject")
    assert "ListObjectVersions" in calls and "HeadObject" in calls
    assert [v["VersionId"] for v in s3_bucket.versions()] == [placed.version]


def test_without_check_the_created_version_is_checked_by_a_head(s3_bucket: Bucket, tmp_path: Path) -> None:
    store = s3_bucket.store(tmp_path / "storage")
    source, sha = claim(tmp_path, b"x" * 1000)
    calls = recorded(store)
    placed = store.place(source, REL, sha256=sha, retain_until=UNTIL)
    assert placed.created and placed.lock_until == UNTIL
    assert calls == ["PutObject", "HeadObject"]

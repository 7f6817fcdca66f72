"""The S3 footage store on a real SeaweedFS: the store contract (place verified and never twice, alternate path,
multipart, reads, hashes, listing), the lock ingest asks for, and the proof that the floor is the storage's:
with the collector's own credentials a locked version cannot be deleted, changed or have its lock shortened."""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath

import pytest
from botocore.exceptions import ClientError

from collector.footage_store import ObjectLocked, PathOccupied, StoredFileMissing, StoredObject, UnsafePath
from collector.keep import add_calendar_years
from collector.object_locks import LockSettings
from collector.s3_store import S3Store, lock_date
from tests.support.seaweed import Bucket

REL = PurePosixPath("JL2201001/JL2201001-01/t101-front/2026/11/26/t101-front@20261126T010000.000Z.ts")
ALT = REL.with_name(f"{REL.stem}~seq7{REL.suffix}")
NOW = datetime.now(timezone.utc)
UNTIL = lock_date(NOW + timedelta(days=400))


def claim(tmp_path: Path, data: bytes, name: str = "claim") -> tuple[Path, str]:
    path = tmp_path / "staging" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(s3_bucket: Bucket, tmp_path: Path) -> S3Store:
    return s3_bucket.store(tmp_path / "storage")


def refused(call) -> str:  # noqa: ANN001 - a boto3 call
    with pytest.raises(ClientError) as caught:
        call()
    return str(caught.value.response["Error"]["Code"])


def test_place_uploads_verified_and_locked_and_a_repeat_stores_nothing_twice(
        store: S3Store, s3_bucket: Bucket, tmp_path: Path) -> None:
    data = b"footage " * 1000
    source, sha = claim(tmp_path, data)
    placed = store.place(source, REL, sha256=sha, alternate=ALT, retain_until=UNTIL)
    assert (placed.relpath, placed.created) == (REL, True)
    assert placed.version and placed.lock_until == UNTIL
    head = s3_bucket.admin.head_object(Bucket=s3_bucket.name, Key=str(REL), VersionId=placed.version)
    assert head["ObjectLockMode"] == "COMPLIANCE"
    assert head["ObjectLockRetainUntilDate"].astimezone(timezone.utc) == UNTIL
    assert head["Metadata"]["sha256"] == sha
    again = store.place(source, REL, sha256=sha, alternate=ALT, retain_until=UNTIL)
    assert (again.relpath, again.created, again.version) == (REL, False, placed.version)
    assert [v["VersionId"] for v in s3_bucket.versions()] == [placed.version]


def test_a_repeat_asking_a_later_lock_extends_the_existing_version(store: S3Store, tmp_path: Path) -> None:
    source, sha = claim(tmp_path, b"x" * 100)
    first = store.place(source, REL, sha256=sha, retain_until=UNTIL)
    later = UNTIL + timedelta(days=30)
    again = store.place(source, REL, sha256=sha, retain_until=later)
    assert (again.version, again.lock_until) == (first.version, later)
    assert store.lock_of(REL, first.version) == (later, False)


def test_place_never_overwrites_other_bytes(store: S3Store, s3_bucket: Bucket, tmp_path: Path) -> None:
    first, first_sha = claim(tmp_path, b"first", "a")
    one = store.place(first, REL, sha256=first_sha, retain_until=UNTIL)
    second, second_sha = claim(tmp_path, b"second", "b")
    two = store.place(second, REL, sha256=second_sha, alternate=ALT, retain_until=UNTIL)
    assert (two.relpath, two.created) == (ALT, True)
    third, third_sha = claim(tmp_path, b"third", "c")
    with pytest.raises(PathOccupied, match=f"{REL} and {ALT} in S3 bucket {s3_bucket.name}"):
        store.place(third, REL, sha256=third_sha, alternate=ALT, retain_until=UNTIL)
    assert store.read_range(REL, 0, 100, one.version) == b"first"
    assert store.read_range(ALT, 0, 100, two.version) == b"second"
    assert len(s3_bucket.versions()) == 2


def test_place_refuses_a_claim_that_does_not_hash_to_the_signed_sha(store: S3Store, s3_bucket: Bucket,
                                                                     tmp_path: Path) -> None:
    source, _ = claim(tmp_path, b"the bytes on disk")
    with pytest.raises(OSError, match="changed while it was uploaded"):
        store.place(source, REL, sha256=hashlib.sha256(b"what was signed").hexdigest(), retain_until=UNTIL)
    assert s3_bucket.versions() == []


def test_multipart_upload_is_verified_read_back_and_found_again(s3_bucket: Bucket, tmp_path: Path) -> None:
    part = 5 * 1024 * 1024   # the smallest part S3 allows (all but the last)
    store = s3_bucket.store(tmp_path / "storage", part_size=part)
    data = bytes(range(256)) * ((2 * part + 12345) // 256 + 1)
    source, sha = claim(tmp_path, data)
    placed = store.place(source, REL, sha256=sha, retain_until=UNTIL)
    assert placed.created and placed.lock_until == UNTIL
    assert store.hash(REL, placed.version) == (sha, len(data))
    assert store.read_range(REL, part - 3, 6, placed.version) == data[part - 3:part + 3]
    again = store.place(source, REL, sha256=sha, retain_until=UNTIL)
    assert (again.created, again.version) == (False, placed.version)
    assert len(s3_bucket.versions()) == 1


def test_reads_hash_size_exists_and_listing(store: S3Store, tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    source, sha = claim(tmp_path, data)
    placed = store.place(source, REL, sha256=sha, retain_until=UNTIL)
    version = placed.version
    assert store.read_range(REL, 10, 20, version) == data[10:30]
    assert store.read_range(REL, len(data) - 5, 100, version) == data[-5:]
    assert store.read_range(REL, len(data), 10, version) == b""
    assert store.read_range(REL, 0, 0, version) == b""
    assert store.hash(REL, version) == (sha, len(data))
    assert store.hash(REL) == (sha, len(data))
    assert (store.exists(REL, version), store.size(REL, version)) == (True, len(data))
    assert not store.exists(ALT)
    with store.open(REL, version) as handle:
        assert handle.read() == data
    with store.local_path(REL, version) as path:
        assert path.read_bytes() == data
    assert not path.exists()
    with pytest.raises(StoredFileMissing):
        store.size(ALT)
    with pytest.raises(StoredFileMissing):
        store.hash(ALT)
    with pytest.raises(StoredFileMissing):
        with store.local_path(ALT):
            pass
    other, other_sha = claim(tmp_path, b"other", "b")
    two = store.place(other, ALT, sha256=other_sha, retain_until=UNTIL)
    assert sorted(store.walk()) == sorted([REL, ALT])
    assert sorted(store.objects(), key=str) == sorted([StoredObject(REL, version), StoredObject(ALT, two.version)],
                                                      key=str)


@pytest.mark.parametrize("relpath", ["../outside.ts", "/etc/passwd", "a/../../b.ts", "a/b c.ts", ""])
def test_unsafe_keys_are_refused_before_any_request(store: S3Store, tmp_path: Path, relpath: str) -> None:
    source, sha = claim(tmp_path, b"x")
    for call in (lambda: store.place(source, relpath, sha256=sha, retain_until=UNTIL), lambda: store.open(relpath),
                 lambda: store.exists(relpath), lambda: store.hash(relpath), lambda: store.unlink(relpath, "v"),
                 lambda: store.extend_lock(relpath, "v", UNTIL), lambda: store.set_legal_hold(relpath, "v", True)):
        with pytest.raises(UnsafePath):
            call()


def test_the_upload_lock_reaches_past_the_floor_and_the_longest_exam_day() -> None:
    settings = LockSettings(margin_days=7, longest_exam_day=timedelta(hours=24))
    end = datetime(2027, 2, 28, 15, 30, tzinfo=timezone.utc)           # 2027-02-28 23:30 in Shanghai
    stored_at = end + timedelta(hours=2)                              # arrival is the later moment
    lock = settings.upload_lock(end, stored_at)
    floor = add_calendar_years(max(end, stored_at)) + timedelta(days=7)
    assert lock >= floor + timedelta(hours=24)
    # a batch part ending within the longest exam day after the footage needs no extension
    assert lock >= settings.linked_lock(stored_at + timedelta(hours=24))
    assert lock == add_calendar_years(stored_at + timedelta(hours=24)) + timedelta(days=7)


# ---------------------------------------------------------------------------- the floor is the storage's

def test_the_collectors_own_credentials_cannot_delete_change_or_shorten_a_locked_version(
        s3_bucket: Bucket, store: S3Store, tmp_path: Path) -> None:
    data = b"evidence " * 500
    source, sha = claim(tmp_path, data)
    placed = store.place(source, REL, sha256=sha, retain_until=UNTIL)
    version = placed.version
    assert version is not None
    own = s3_bucket.collector      # boto3 with the collector's credentials, not the store's code paths
    bucket, key = s3_bucket.name, str(REL)

    assert refused(lambda: own.delete_object(Bucket=bucket, Key=key, VersionId=version)) == "AccessDenied"
    with pytest.raises(ObjectLocked, match=f"{REL} version {version} is locked"):
        store.unlink(REL, version)
    shorter = {"Mode": "COMPLIANCE", "RetainUntilDate": UNTIL - timedelta(days=1)}
    assert refused(lambda: own.put_object_retention(Bucket=bucket, Key=key, VersionId=version,
                                                    Retention=shorter)) == "AccessDenied"
    governance = {"Mode": "GOVERNANCE", "RetainUntilDate": UNTIL}
    assert refused(lambda: own.put_object_retention(Bucket=bucket, Key=key, VersionId=version,
                                                    Retention=governance, BypassGovernanceRetention=True)) \
        == "AccessDenied"
    # A put to the same key makes a new version at most; the locked one keeps its bytes.
    try:
        own.put_object(Bucket=bucket, Key=key, Body=b"forged bytes")
    except ClientError:
        pass
    assert store.hash(REL, version) == (sha, len(data))
    with store.open(REL, version) as handle:
        assert handle.read() == data
    assert store.lock_of(REL, version) == (UNTIL, False)

    # extending is allowed, and so are legal holds on and off
    later = UNTIL + timedelta(days=10)
    assert store.extend_lock(REL, version, later) == later
    assert store.extend_lock(REL, version, UNTIL) == later        # never shortens
    store.set_legal_hold(REL, version, True)
    assert own.get_object_legal_hold(Bucket=bucket, Key=key, VersionId=version)["LegalHold"]["Status"] == "ON"
    assert store.lock_of(REL, version) == (later, True)
    store.set_legal_hold(REL, version, False)
    assert own.get_object_legal_hold(Bucket=bucket, Key=key, VersionId=version)["LegalHold"]["Status"] == "OFF"
    assert refused(lambda: own.delete_object(Bucket=bucket, Key=key, VersionId=version)) == "AccessDenied"
    assert any(v["VersionId"] == version for v in s3_bucket.versions(key))


def test_a_legal_hold_alone_refuses_a_delete_until_it_is_released(s3_bucket: Bucket, store: S3Store,
                                                                  tmp_path: Path) -> None:
    source, sha = claim(tmp_path, b"held")
    soon = lock_date(datetime.now(timezone.utc) + timedelta(seconds=2))
    placed = store.place(source, REL, sha256=sha, retain_until=soon, legal_hold=True)
    assert store.lock_of(REL, placed.version)[1] is True
    while datetime.now(timezone.utc) <= soon + timedelta(seconds=1):   # wait out the short retention lock
        time.sleep(0.2)
    with pytest.raises(ObjectLocked, match="legal hold ON"):
        store.unlink(REL, placed.version)
    store.set_legal_hold(REL, placed.version, False)
    store.unlink(REL, placed.version)
    assert not store.exists(REL, placed.version)
    store.unlink(REL, placed.version)   # an absent version is no error


def test_the_storage_refuses_a_conditional_create_of_a_taken_key(s3_bucket: Bucket, store: S3Store,
                                                                  tmp_path: Path) -> None:
    """What `place` relies on when two collectors upload the same key at once: the second create fails."""
    source, sha = claim(tmp_path, b"first")
    placed = store.place(source, REL, sha256=sha, retain_until=UNTIL)
    own = s3_bucket.collector
    assert refused(lambda: own.put_object(Bucket=s3_bucket.name, Key=str(REL), Body=b"second", IfNoneMatch="*",
                                          ObjectLockMode="COMPLIANCE", ObjectLockRetainUntilDate=UNTIL)) \
        == "PreconditionFailed"
    assert [v["VersionId"] for v in s3_bucket.versions()] == [placed.version]

"""Retention on S3 with Object Lock, on a real SeaweedFS: the floor is the storage's. `exam-retention enforce`
with its clock moved past the floor (libfaketime) still cannot delete a version whose lock has not ended; the
refusal is an `object_locked` alarm in the run's audit entry, never forced, and the row stays live. Holds become
S3 legal holds; scrub accounts for every object version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath

import pytest
from sqlalchemy import select, update

from collector.models import AuditEntry, SegmentRecord
from collector.object_locks import LockSettings
from collector.s3_store import S3Store, lock_date
from retention.policy import add_calendar_years
from tests.collector.conftest import INSTITUTION, VENUE
from tests.support.seaweed import Bucket, Seaweed
from tests.support.services import free_port

from .conftest import EXAM_COLLECTOR, EXAM_RETENTION, Env, make_env

CAMERA = "t101-front"
PROG_HOLD_SYNC = "exam-collector hold sync"


def s3_env(database_url: str, tmp_path: Path, clips: list[bytes], bucket: Bucket, longest_exam_day_hours: int = 24) -> Env:
    locks = LockSettings(longest_exam_day=timedelta(hours=longest_exam_day_hours))
    return make_env(database_url, tmp_path, clips, bucket.storage_toml(tmp_path, longest_exam_day_hours=longest_exam_day_hours),
                    lambda storage: {"store": bucket.store(storage), "locks": locks})


@pytest.fixture
def s3env(database_url: str, tmp_path: Path, clips: list[bytes], s3_bucket: Bucket) -> Env:
    env = s3_env(database_url, tmp_path, clips, s3_bucket)
    yield env
    env.engine.dispose()


@pytest.fixture
def open_bucket(seaweed_open: Seaweed) -> Bucket:
    return Bucket(seaweed_open, seaweed_open.new_bucket())


@pytest.fixture
def faked_env(database_url: str, tmp_path: Path, clips: list[bytes], open_bucket: Bucket) -> Env:
    """For runs under libfaketime: a gateway that does not check request times (see `seaweed_open`)."""
    env = s3_env(database_url, tmp_path, clips, open_bucket)
    yield env
    env.engine.dispose()


def faketime(env: Env, at: datetime, program: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`faketime -f '@<at>' program --config CONFIG args...`: this command's clock starts at `at` and runs on."""
    binary = shutil.which("faketime")
    if binary is None:
        pytest.fail("faketime is not installed (apt-get install faketime; `make deps` does it)")
    stamp = at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return subprocess.run([binary, "-f", f"@{stamp}", str(program), "--config", str(env.config), *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TZ": "UTC"})


def row_of(env: Env, segment_id: int) -> SegmentRecord:
    with env.sessions() as s:
        row = s.get(SegmentRecord, segment_id)
        assert row is not None
        return row


def entries(env: Env, action: str) -> list[AuditEntry]:
    with env.sessions() as s:
        return list(s.scalars(select(AuditEntry).where(AuditEntry.action == action).order_by(AuditEntry.seq)))


def test_ingest_locks_each_object_past_its_floor_and_the_longest_exam_day(s3env: Env, s3_bucket: Bucket) -> None:
    start = datetime.now(timezone.utc) - timedelta(hours=1)
    row = s3env.store(CAMERA, start)
    assert row.storage_version is not None and row.lock_until is not None
    floor = add_calendar_years(max(row.end_at, row.stored_at)) + timedelta(days=7)
    assert row.lock_until >= floor + timedelta(hours=24)
    head = s3_bucket.admin.head_object(Bucket=s3_bucket.name, Key=row.storage_path, VersionId=row.storage_version)
    assert head["ObjectLockMode"] == "COMPLIANCE"
    assert head["ObjectLockRetainUntilDate"].astimezone(timezone.utc) == row.lock_until
    assert s3env.harness.stored_files() == []            # nothing on the local volume, staging emptied
    assert s3env.harness.staging_entries() == []


def test_enforce_with_its_clock_past_the_floor_cannot_delete_a_locked_object(faked_env: Env,
                                                                              open_bucket: Bucket) -> None:
    env = faked_env
    row = env.store(CAMERA, datetime.now(timezone.utc) - timedelta(hours=1))
    data = env.clips[0]
    assert row.lock_until is not None and row.storage_version is not None
    past = row.lock_until + timedelta(days=2)   # past the floor and past the lock the row records

    # past the floor, before the row's lock (which adds the longest exam day): due, but not planned
    between = faketime(env, row.lock_until - timedelta(hours=12), EXAM_RETENTION, "enforce", "--dry-run")
    assert between.returncode == 0, between.stderr
    assert "delete 0 files" in between.stdout and "1 due but locked by the storage a little longer" in between.stdout

    dry = faketime(env, past, EXAM_RETENTION, "enforce", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"delete JL2201001-01/{CAMERA}/1 {row.storage_path} {row.size} B: expired" in dry.stdout

    for attempt in (1, 2):   # a second run tries again under the same tombstone, and is refused again
        run = faketime(env, past + timedelta(minutes=attempt), EXAM_RETENTION, "enforce")
        assert run.returncode == 0, run.stderr
        assert "deleted 0 files, 0 bytes; 1 refused by the storage (still locked)" in run.stdout
        [alarm] = [line for line in run.stderr.splitlines() if "ALARM" in line]
        assert f"ALARM: object_locked: the storage refused to delete JL2201001-01/{CAMERA}/1" in alarm
        assert f"version {row.storage_version} is locked (retained until" in alarm
        assert row_of(env, row.id).deleted_at is None
        assert len(entries(env, "segment.delete")) == 1
        summary = json.loads(entries(env, "retention.enforce")[-1].detail)
        assert summary["deleted_files"] == 0 and len(summary["refused"]) == 1
        assert any(a.startswith("object_locked: ") for a in summary["alarms"])
    store: S3Store = env.footage_store   # type: ignore[assignment]
    assert store.hash(row.storage_path, row.storage_version) == (row.sha256, len(data))
    assert [v["VersionId"] for v in open_bucket.versions(row.storage_path)] == [row.storage_version]


def test_enforce_deletes_a_version_whose_lock_has_ended(faked_env: Env, open_bucket: Bucket, tmp_path: Path) -> None:
    """The counterpart: once the storage's lock has ended, enforce deletes exactly the version the row names.
    (A real lock lasts a year; the row is pointed at a copy of its own bytes locked for two seconds.)"""
    env = faked_env
    row = env.store(CAMERA, datetime.now(timezone.utc) - timedelta(hours=1))
    store: S3Store = env.footage_store   # type: ignore[assignment]
    copy = tmp_path / "copy.ts"
    copy.write_bytes(env.clips[0])
    short = lock_date(datetime.now(timezone.utc) + timedelta(seconds=2))
    alt = PurePosixPath(row.storage_path).with_name("short-lock.ts")
    placed = store.place(copy, alt, sha256=row.sha256, retain_until=short)
    with env.engine.begin() as conn:
        conn.execute(update(SegmentRecord).where(SegmentRecord.id == row.id).values(
            storage_path=alt.as_posix(), storage_version=placed.version, lock_until=short))
    while datetime.now(timezone.utc) <= short + timedelta(seconds=1):   # the storage's own clock ends the lock
        time.sleep(0.2)
    run = faketime(env, row.lock_until + timedelta(days=2), EXAM_RETENTION, "enforce")
    assert run.returncode == 0, run.stderr
    assert f"deleted 1 files, {row.size} bytes; tombstones" in run.stdout and "ALARM" not in run.stderr
    assert row_of(env, row.id).deleted_at is not None
    assert open_bucket.versions(alt.as_posix()) == []
    assert [v["VersionId"] for v in open_bucket.versions(row.storage_path)] == [row.storage_version]


def legal_hold(bucket: Bucket, row: SegmentRecord) -> str:
    reply = bucket.collector.get_object_legal_hold(Bucket=bucket.name, Key=row.storage_path,
                                                   VersionId=row.storage_version)
    return str(reply["LegalHold"]["Status"])


def test_hold_add_and_release_turn_the_storages_legal_hold_on_and_off(s3env: Env, s3_bucket: Bucket) -> None:
    start = datetime.now(timezone.utc) - timedelta(hours=2)
    held = s3env.store(CAMERA, start)
    other = s3env.store("t101-back", start)
    shanghai = (start + timedelta(hours=8)).replace(tzinfo=None)
    add = s3env.run_process(EXAM_COLLECTOR, "hold", "add", "--camera", CAMERA, "--venue", VENUE,
                            "--from", (shanghai - timedelta(minutes=5)).isoformat(timespec="seconds"),
                            "--to", (shanghai + timedelta(minutes=5)).isoformat(timespec="seconds"),
                            "--reason", "complaint", "--case", "C-1")
    assert add.returncode == 0, add.stderr
    assert "legal hold ON for hold 1: 1 object(s) changed" in add.stdout
    assert (legal_hold(s3_bucket, held), legal_hold(s3_bucket, other)) == ("ON", "OFF")
    # footage the hold covers that arrives later is held at upload
    later = s3env.store(CAMERA, start + timedelta(seconds=10))
    assert legal_hold(s3_bucket, later) == "ON"

    release = s3env.run_process(EXAM_COLLECTOR, "hold", "release", "1", "--reason", "case closed")
    assert release.returncode == 0, release.stderr
    assert "legal hold OFF for hold 1: 2 object(s) changed" in release.stdout
    assert (legal_hold(s3_bucket, held), legal_hold(s3_bucket, later)) == ("OFF", "OFF")
    assert {e.target for e in entries(s3env, "storage.legal_hold")} == {"hold:1"}


def test_scrub_accounts_for_every_version_and_flags_an_unaccounted_one(s3env: Env, s3_bucket: Bucket) -> None:
    row = s3env.store(CAMERA, datetime.now(timezone.utc) - timedelta(hours=1))
    clean = s3env.run_process(EXAM_RETENTION, "scrub")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 problems" in clean.stdout
    # The only way to "change" a locked object: write a new version of its key (here with admin rights), and
    # plant an object no row names.
    s3_bucket.admin.put_object(Bucket=s3_bucket.name, Key=row.storage_path, Body=b"not the footage")
    s3_bucket.admin.put_object(Bucket=s3_bucket.name, Key="JL2201001/planted.ts", Body=b"planted")
    found = s3env.run_process(EXAM_RETENTION, "scrub", "--json")
    assert found.returncode == 4, found.stderr
    problems = json.loads(found.stdout)["problems"]
    kinds = sorted((p["kind"], p["problem"].split(" (")[0].split(";")[0]) for p in problems)
    assert kinds == [("orphan_file", "another version of a live record's key"),
                     ("orphan_file", "file in storage has no segment row")]
    assert all(row.storage_version not in p["item"] for p in problems)   # the row's own version still verifies


def test_a_batch_part_longer_than_the_longest_exam_day_extends_the_locks_of_its_footage(
        database_url: str, tmp_path: Path, clips: list[bytes], s3_bucket: Bucket) -> None:
    env = s3_env(database_url, tmp_path, clips, s3_bucket, longest_exam_day_hours=1)
    try:
        start = (datetime.now(timezone.utc) - timedelta(hours=2)).replace(microsecond=0)
        row = env.store(CAMERA, start)
        part_end = start + timedelta(hours=6)    # ends 4 hours after the footage arrived: beyond the 1 h covered
        assert row.lock_until is not None and row.lock_until < add_calendar_years(part_end) + timedelta(days=7)
        shanghai = timedelta(hours=8)
        csv = tmp_path / "batches.csv"
        csv.write_text("batch_id,institution,venue,occupation,level,part,room,start,end\n"
                       f"B-LONG,{INSTITUTION},{VENUE},电工,四级,theory,T101,"
                       f"{(start + shanghai).replace(tzinfo=None).isoformat()},"
                       f"{(part_end + shanghai).replace(tzinfo=None).isoformat()}\n", encoding="utf-8")
        done = env.run_process(EXAM_COLLECTOR, "batches", "import", str(csv))
        assert done.returncode == 0, done.stderr
        assert "storage locks extended for batch links: 1 object(s) changed" in done.stdout
        needed = lock_date(add_calendar_years(part_end) + timedelta(days=7))
        assert row_of(env, row.id).lock_until == needed
        store: S3Store = env.footage_store   # type: ignore[assignment]
        assert store.lock_of(row.storage_path, row.storage_version) == (needed, False)
        again = env.run_process(EXAM_COLLECTOR, "batches", "import", str(csv))   # nothing more to extend
        assert again.returncode == 0, again.stderr
        assert "storage locks" not in again.stdout
        assert [e.target for e in entries(env, "storage.lock_extend")] == ["batches:B-LONG"]
    finally:
        env.engine.dispose()


def test_a_hold_the_storage_cannot_take_is_the_object_lock_failed_alarm_then_hold_sync_finishes_it(
        s3env: Env, s3_bucket: Bucket) -> None:
    row = s3env.store(CAMERA, datetime.now(timezone.utc) - timedelta(hours=1))
    good = s3env.config.read_text(encoding="utf-8")
    dead = f"http://127.0.0.1:{free_port()}"
    s3env.config.write_text(good.replace(s3_bucket.endpoint, dead), encoding="utf-8")
    add = s3env.run_process(EXAM_COLLECTOR, "hold", "add", "--camera", CAMERA, "--from", "2020-01-01T00:00:00",
                            "--to", "2099-01-01T00:00:00", "--reason", "complaint", "--case", "C-2")
    assert add.returncode == 2
    assert "hold 1 placed" in add.stdout                    # the database's hold is in force at once
    assert "ALARM object_lock_failed" in add.stderr and f"S3 endpoint {dead} cannot be reached" in add.stderr
    assert f"{PROG_HOLD_SYNC} 1" in add.stderr
    [entry] = entries(s3env, "storage.legal_hold")
    assert json.loads(entry.detail)["failed"] and entry.target == "hold:1"
    assert legal_hold(s3_bucket, row) == "OFF"

    s3env.config.write_text(good, encoding="utf-8")          # the storage answers again
    sync = s3env.run_process(EXAM_COLLECTOR, "hold", "sync", "1")
    assert sync.returncode == 0, sync.stderr
    assert legal_hold(s3_bucket, row) == "ON"

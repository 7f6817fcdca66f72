"""Issue 15: `exam-collector storage migrate --to s3` and `storage prune-migrated` on real parts: a filesystem
archive made by real ingest (ffmpeg footage), a real SeaweedFS bucket with Object Lock, the real CLI. The first
migration is SIGKILLed right after its third upload (before that row is recorded); the rerun adopts that object,
moves the rest, and every row ends in the bucket exactly once, locked at least until its floor. Prune removes an
old file only when its object re-hashes equal and is locked as the row says."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from collector.models import AuditEntry, SegmentRecord
from collector.object_locks import LockSettings
from collector.storage_migrate import ACTION_STORAGE_MIGRATE, ACTION_STORAGE_PRUNE
from tests.support.crash_collector import REACHED
from tests.support.footage import SITE_A, Demo, build_demo, make_segments
from tests.support.seaweed import Bucket
from tests.support.stored import StoredFootage

pytestmark = pytest.mark.ffmpeg
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
KILL_AFTER = 3


@pytest.fixture(scope="module")
def segment_files(tmp_path_factory: pytest.TempPathFactory, ffmpeg_available: None) -> list[Path]:
    return make_segments(tmp_path_factory.mktemp("lavfi"))


def collector(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "exam-collector"), "--config", str(config), *args], capture_output=True,
                          text=True, timeout=300)


def rows_of(demo: Demo) -> list[SegmentRecord]:
    with demo.sessions() as session:
        rows = list(session.scalars(select(SegmentRecord).where(SegmentRecord.kind == "segment")
                                    .order_by(SegmentRecord.id)))
        session.expunge_all()
    return rows


def audit_details(demo: Demo, action: str) -> list[dict]:
    with demo.sessions() as session:
        return [json.loads(e.detail) if isinstance(e.detail, str) else e.detail for e in
                session.scalars(select(AuditEntry).where(AuditEntry.action == action).order_by(AuditEntry.seq))]


def test_migrate_killed_midway_resumes_and_prune_removes_only_verified_files(
        tmp_path: Path, segment_files: list[Path], s3_bucket: Bucket, database_url: str) -> None:
    demo = build_demo(tmp_path / "demo", database_url, segment_files)
    try:
        old = rows_of(demo)
        assert len(old) == 9 and all(r.storage_version is None for r in old)
        originals = {r.id: (demo.storage / r.storage_path).read_bytes() for r in old}
        before = {r.id: r for r in old}
        held = collector(demo.write_config(), "hold", "add", "--batch", "B-OK", "--reason", "complaint",
                         "--case", "2026-17")   # covers institution A's room T101 only
        assert held.returncode == 0, held.stderr
        demo.storage_toml = s3_bucket.storage_toml(tmp_path)   # the operator switches the config to S3
        config = demo.write_config()
        footage = StoredFootage(demo.storage, s3_bucket)

        # 1. killed right after the third upload: two rows moved, a third object uploaded but not recorded
        killed = subprocess.run([sys.executable, "-m", "tests.support.crash_collector", f"after-place={KILL_AFTER}",
                                 "--config", str(config), "storage", "migrate", "--to", "s3"], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert killed.returncode == -signal.SIGKILL and REACHED in killed.stderr, killed.stderr
        assert sum(r.storage_version is not None for r in rows_of(demo)) == KILL_AFTER - 1
        assert len(s3_bucket.versions()) == KILL_AFTER

        # 2. the rerun adopts the unrecorded object and moves the rest
        done = collector(config, "storage", "migrate", "--to", "s3")
        assert done.returncode == 0, done.stdout + done.stderr
        assert (f"migrated {9 - KILL_AFTER + 1} of {9 - KILL_AFTER + 1} segment(s) on the filesystem to S3 "
                f"({9 - KILL_AFTER} uploaded, 1 found already uploaded and adopted") in done.stdout
        assert "100%" in done.stderr   # progress
        rows = rows_of(demo)
        locks = LockSettings()
        assert [r.id for r in rows] == [r.id for r in old]
        for row in rows:
            assert row.storage_version is not None and row.storage_path == before[row.id].storage_path
            assert row.lock_until is not None and row.lock_until >= locks.upload_lock(row.end_at, row.stored_at)
            footage.check_lock(row.storage_path, row.storage_version, row.lock_until, f"seq {row.seq}")
            assert footage.read(row.storage_path, row.storage_version) == originals[row.id]
            hold = s3_bucket.admin.get_object_legal_hold(Bucket=s3_bucket.name, Key=row.storage_path,
                                                         VersionId=row.storage_version)["LegalHold"]["Status"]
            assert hold == ("ON" if row.room == SITE_A.room else "OFF"), f"seq {row.seq} in {row.room}: {hold}"
        assert sorted(footage.objects()) == sorted((r.storage_path, r.storage_version) for r in rows)  # once each
        again = collector(config, "storage", "migrate", "--to", "s3")
        assert again.returncode == 0 and "migrated 0 of 0 segment(s)" in again.stdout and "9 were in S3" in again.stdout
        starts = [d for d in audit_details(demo, ACTION_STORAGE_MIGRATE) if d["phase"] == "start"]
        ends = [d for d in audit_details(demo, ACTION_STORAGE_MIGRATE) if d["phase"] == "end"]
        assert len(starts) == 3 and [(d["uploaded"], d["adopted"]) for d in ends] == [(9 - KILL_AFTER, 1), (0, 0)]
        verify = collector(config, "summary", "--verify", "--lang", "en")
        assert verify.returncode == 0 and "all hashes and signatures verified" in verify.stdout, verify.stdout

        # 3. prune: a dry run removes nothing; then only files whose object verifies go
        dry = collector(config, "storage", "prune-migrated")
        assert dry.returncode == 0 and "would remove 9 old file(s)" in dry.stdout, dry.stdout + dry.stderr
        assert len(footage.files_on_disk()) == 9
        wrong_version, short_lock = rows[0], rows[1]
        with demo.sessions.begin() as session:   # one row names a version that is not there, one a longer lock
            session.get(SegmentRecord, wrong_version.id).storage_version = "no-such-version"
            session.get(SegmentRecord, short_lock.id).lock_until = short_lock.lock_until.replace(
                year=short_lock.lock_until.year + 5)
        pruned = collector(config, "storage", "prune-migrated", "--yes")
        assert pruned.returncode == 4, pruned.stdout + pruned.stderr
        assert "removed 7 old file(s)" in pruned.stdout and "2 kept" in pruned.stdout
        assert sorted(p.relative_to(demo.storage).as_posix() for p in footage.files_on_disk()) == sorted(
            [wrong_version.storage_path, short_lock.storage_path])
        with demo.sessions.begin() as session:
            session.get(SegmentRecord, wrong_version.id).storage_version = wrong_version.storage_version
            session.get(SegmentRecord, short_lock.id).lock_until = short_lock.lock_until
        pruned = collector(config, "storage", "prune-migrated", "--yes")
        assert pruned.returncode == 0 and "removed 2 old file(s)" in pruned.stdout, pruned.stdout + pruned.stderr
        footage.check_rows(rows_of(demo), "after prune")   # every byte in S3 only, each row's version locked
        assert [d["removed"] for d in audit_details(demo, ACTION_STORAGE_PRUNE)] == [7, 2]
    finally:
        demo.engine.dispose()


def test_migrate_refuses_a_filesystem_config_and_a_missing_folder(tmp_path: Path, segment_files: list[Path],
                                                                  s3_bucket: Bucket) -> None:
    demo = build_demo(tmp_path / "demo", f"sqlite:///{tmp_path / 'demo' / 'collector.db'}", segment_files)
    try:
        config = demo.write_config()
        refused = collector(config, "storage", "migrate", "--to", "s3")
        assert refused.returncode == 1 and 'backend is not "s3"' in refused.stderr
        demo.storage_toml = s3_bucket.storage_toml(tmp_path)
        config = demo.write_config()
        missing = collector(config, "storage", "migrate", "--to", "s3", "--from-dir", str(tmp_path / "nowhere"))
        assert missing.returncode == 1 and "pass --from-dir" in missing.stderr
        assert s3_bucket.versions() == []
    finally:
        demo.engine.dispose()

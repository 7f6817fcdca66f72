"""Moving stored footage from the filesystem into the S3 bucket with Object Lock (`exam-collector storage
migrate --to s3`), and removing the old files once each is proven in the bucket (`storage prune-migrated`).

Which backend a row lives on: `segment_record.storage_version` (migration 0008). NULL is a file under the old
filesystem root; set, the object version in the bucket. A row changes backend in one transaction of its own, only
after its object is uploaded (conditional create, the row's floor as COMPLIANCE lock), read back and hashed equal
to the row's SHA-256. So the migration can die anywhere and run again: migrated rows are skipped, and an object an
interrupted run uploaded but did not record is found by `place` (same key, same bytes) and adopted, not stored
twice. The old file stays until `prune-migrated --yes` has re-hashed the object and checked its lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from . import audit
from .footage_store import FilesystemStore, FootageStore, PathOccupied, StoredFileMissing, UnsafePath
from .holds import holds_covering
from .models import SegmentRecord
from .object_locks import LockSettings, extend_linked_locks

log = logging.getLogger(__name__)

ACTION_STORAGE_MIGRATE = "storage.migrate"   # a migration run: counts, and each row that could not be moved
ACTION_STORAGE_PRUNE = "storage.prune"       # old files removed after their objects were verified
PAGE = 500
MIN_LOCK = timedelta(days=1)   # a row whose floor has passed (kept by a hold or a batch link) is still locked a day
MAX_LISTED = 500               # failures named in the audit entry


class MigrationError(Exception):
    """The migration cannot start as configured; the message names the fix."""


class MigrationStopped(Exception):
    """The storage failed during the migration; what was moved stays moved, a rerun goes on from there."""


@dataclass(frozen=True)
class FileRow:
    """A live segment row and the file it names."""

    id: int
    venue: str
    room: str
    camera: str
    seq: int
    relpath: str
    sha256: str
    size: int
    start: datetime
    end: datetime
    stored_at: datetime
    version: str | None
    lock_until: datetime | None

    @property
    def target(self) -> str:
        return f"{self.venue}/{self.camera}/{self.seq}"


@dataclass
class MigrationReport:
    to_move: int = 0          # rows on the filesystem when the run started
    to_move_bytes: int = 0
    already: int = 0          # rows already in the bucket (an earlier run, or ingested there)
    uploaded: int = 0         # objects created by this run
    adopted: int = 0          # objects an interrupted run had uploaded: found with the same bytes, recorded
    moved_bytes: int = 0
    extended: int = 0         # locks lengthened afterwards for batch parts longer than the longest exam day
    failed: list[str] = field(default_factory=list)

    @property
    def moved(self) -> int:
        return self.uploaded + self.adopted

    def line(self) -> str:
        failed = f", {len(self.failed)} FAILED (still on the filesystem)" if self.failed else ""
        return (f"migrated {self.moved} of {self.to_move} segment(s) on the filesystem to S3 "
                f"({self.uploaded} uploaded, {self.adopted} found already uploaded and adopted, "
                f"{self.moved_bytes / 1e6:.1f} MB); {self.already} were in S3 already; {self.extended} lock(s) "
                f"extended for batch links{failed}")


@dataclass
class PruneReport:
    removable: int = 0        # old files whose object is verified (removed unless a dry run)
    removed: int = 0
    removed_bytes: int = 0
    kept: list[str] = field(default_factory=list)   # old files of migrated rows whose object did not verify
    dry_run: bool = True

    def line(self) -> str:
        kept = f"; {len(self.kept)} kept: their object did not verify" if self.kept else ""
        if self.dry_run:
            return (f"would remove {self.removable} old file(s) whose objects are verified in S3 (dry run: nothing "
                    f"removed; add --yes){kept}")
        return f"removed {self.removed} old file(s) ({self.removed_bytes / 1e6:.1f} MB), each verified in S3{kept}"


Progress = Callable[[int, int], None]   # (bytes done, bytes in all)

_COLUMNS = (SegmentRecord.id, SegmentRecord.venue, SegmentRecord.room, SegmentRecord.camera, SegmentRecord.seq,
            SegmentRecord.storage_path, SegmentRecord.sha256, SegmentRecord.size, SegmentRecord.start_at,
            SegmentRecord.end_at, SegmentRecord.stored_at, SegmentRecord.storage_version, SegmentRecord.lock_until)
_LIVE_FILE = (SegmentRecord.kind == "segment", SegmentRecord.storage_path.is_not(None),
              SegmentRecord.sha256.is_not(None), SegmentRecord.deleted_at.is_(None))


def _rows(sessions: sessionmaker[Session], *where: Any) -> Iterator[FileRow]:
    """Live segment rows by id pages (flat memory over millions), each page read in a short session."""
    after = 0
    while True:
        with sessions() as session:
            page = session.execute(select(*_COLUMNS).where(SegmentRecord.id > after, *_LIVE_FILE, *where)
                                   .order_by(SegmentRecord.id).limit(PAGE)).all()
        if not page:
            return
        for r in page:
            yield FileRow(r.id, r.venue, r.room, r.camera, r.seq, r.storage_path, r.sha256, r.size, r.start_at,
                          r.end_at, r.stored_at, r.storage_version, r.lock_until)
        after = page[-1].id


def _counts(sessions: sessionmaker[Session]) -> tuple[int, int, int]:
    """(rows on the filesystem, their bytes, rows in the bucket)."""
    on_fs = in_s3 = size = 0
    for row in _rows(sessions):
        if row.version is None:
            on_fs += 1
            size += row.size
        else:
            in_s3 += 1
    return on_fs, size, in_s3


def check_stores(store: FootageStore, source: FilesystemStore) -> None:
    if not store.versioned:
        raise MigrationError("[storage] backend is not \"s3\": set [storage] backend = \"s3\" with its endpoint and "
                             "bucket in this config, then migrate")
    if not source.root.is_dir():
        raise MigrationError(f"the old storage folder {source.root} does not exist: pass --from-dir with the folder "
                             "that held the footage ([collector] storage_dir before the switch)")


def migration_lock(locks: LockSettings, row: FileRow, now: datetime) -> datetime:
    """The lock an object gets when it is migrated: the one ingest would have given it when it arrived, and never
    less than its row's lock; still a day ahead when that has passed (the footage is kept by a hold or a link)."""
    until = locks.upload_lock(row.end, row.stored_at)
    if row.lock_until is not None:
        until = max(until, row.lock_until)
    return max(until, now + MIN_LOCK)


def migrate_to_s3(sessions: sessionmaker[Session], store: FootageStore, source: FilesystemStore,
                  locks: LockSettings, *, actor: str, progress: Progress | None = None,
                  now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> MigrationReport:
    """Move every live segment row still on the filesystem into `store` (S3 with Object Lock), one row at a time;
    see the module's text for the order that makes it safe to interrupt. Audited as one entry per run."""
    check_stores(store, source)
    report = MigrationReport()
    report.to_move, report.to_move_bytes, report.already = _counts(sessions)
    log.info("migrating %s segment(s), %s bytes, from %s to %s (%s already there)", report.to_move,
             report.to_move_bytes, source, store, report.already)
    _audit(sessions, ACTION_STORAGE_MIGRATE, actor, f"{source.root} -> {store}",
           {"phase": "start", "to_move": report.to_move, "bytes": report.to_move_bytes, "already": report.already},
           None)   # a run killed midway leaves this entry; the next run's entries say what it finished
    done_bytes = 0
    if progress is not None:
        progress(0, report.to_move_bytes)
    try:
        for row in _rows(sessions, SegmentRecord.storage_version.is_(None)):
            try:
                created = _migrate_one(sessions, store, source, locks, row, now())
            except (UnsafePath, PathOccupied, _NotMigrated) as exc:   # this row only: go on with the others
                report.failed.append(f"{row.target} {row.relpath}: {exc}")
                log.error("not migrated: %s %s: %s", row.target, row.relpath, exc)
            except OSError as exc:   # the storage (or the old volume) fails: stop rather than fail every row
                report.failed.append(f"{row.target} {row.relpath}: {exc}")
                raise MigrationStopped(f"migration stopped at {row.target} {row.relpath}: {exc}; nothing is lost: "
                                       f"{report.moved} segment(s) were moved, run the migration again once the "
                                       "storage answers") from exc
            else:
                if created:
                    report.uploaded += 1
                else:
                    report.adopted += 1
                report.moved_bytes += row.size
            done_bytes += row.size
            if progress is not None:
                progress(done_bytes, report.to_move_bytes)
        # footage linked to a batch part longer than the longest exam day needs more than the upload lock
        linked = extend_linked_locks(sessions, store, locks, now())
        report.extended = linked.done
        report.failed += [f"lock for a batch link not extended: {f}" for f in linked.failed]
    finally:   # an interrupted run (Ctrl-C, a dead storage) is audited with what it did
        _audit(sessions, ACTION_STORAGE_MIGRATE, actor, f"{source.root} -> {store}",
               {"phase": "end", "to_move": report.to_move, "uploaded": report.uploaded, "adopted": report.adopted,
                "already": report.already, "bytes": report.moved_bytes, "extended": report.extended,
                "failed": report.failed[:MAX_LISTED]},
               f"{len(report.failed)} row(s) not migrated" if report.failed else None)
    return report


class _NotMigrated(Exception):
    """This row cannot be moved as it is (its file is missing or altered); the message says what to do."""


def _migrate_one(sessions: sessionmaker[Session], store: FootageStore, source: FilesystemStore,
                 locks: LockSettings, row: FileRow, now: datetime) -> bool:
    """Upload, verify, then record one row; True when this call created the object."""
    try:
        digest, size = source.hash(row.relpath)
    except StoredFileMissing as exc:
        raise _NotMigrated(f"the file is missing from {source}: scrub reports it (`exam-retention scrub`); "
                           "restore it from a backup and run the migration again") from exc
    if (digest, size) != (row.sha256, row.size):
        raise _NotMigrated(f"the file on the filesystem ({size} bytes hashing to {digest}) is not what its row "
                           "names: not migrated; see `exam-retention scrub`")
    with sessions() as session:
        held = bool(holds_covering(session, venue=row.venue, room=row.room, camera=row.camera, start=row.start,
                                   end=row.end, pre=locks.pre_margin, post=locks.post_margin))
    with source.local_path(row.relpath) as path:
        placed = store.place(path, row.relpath, sha256=row.sha256, retain_until=migration_lock(locks, row, now),
                             legal_hold=held)
    if placed.relpath.as_posix() != row.relpath or placed.version is None:
        raise _NotMigrated(f"the store put it at {placed.relpath} version {placed.version}: expected the same key "
                           "with a version; nothing recorded")
    stored, stored_size = store.hash(row.relpath, placed.version)   # read back: the bytes, not only the checksum
    if (stored, stored_size) != (row.sha256, row.size):
        raise _NotMigrated(f"the object version {placed.version} reads back as {stored_size} bytes hashing to "
                           f"{stored}, not the row's; the row stays on the filesystem: see the storage's log")
    with sessions.begin() as session:
        current = session.get(SegmentRecord, row.id, with_for_update=True)
        if current is None or current.deleted_at is not None or current.storage_version is not None \
                or current.storage_path != row.relpath:
            raise _NotMigrated("the row changed while it was migrated (deleted by enforce, or migrated by another "
                               f"run); the uploaded version {placed.version} is left for scrub to report")
        current.storage_version = placed.version
        current.lock_until = placed.lock_until
    log.info("migrated %s %s (version %s, locked until %s%s)", row.target, row.relpath, placed.version,
             placed.lock_until, ", legal hold" if held else "")
    return placed.created


def prune_migrated(sessions: sessionmaker[Session], store: FootageStore, source: FilesystemStore, *, actor: str,
                   yes: bool, progress: Progress | None = None) -> PruneReport:
    """For each live row in the bucket whose old file is still under `source`: re-hash its object version and
    check its lock; only then (and only with `yes`) remove the old file. Files of rows still on the filesystem,
    and files no row names, are never touched."""
    check_stores(store, source)
    report = PruneReport(dry_run=not yes)
    def migrated_with_file() -> Iterator[FileRow]:
        return (r for r in _rows(sessions, SegmentRecord.storage_version.is_not(None)) if source.exists(r.relpath))

    total = sum(r.size for r in migrated_with_file())   # a first pass only for the progress total
    done = 0
    try:
        for row in migrated_with_file():
            problem = _object_problem(store, row)
            if problem:
                report.kept.append(f"{row.target} {row.relpath} version {row.version}: {problem}")
                log.error("old file kept: %s %s: %s", row.target, row.relpath, problem)
            else:
                report.removable += 1
                if yes:
                    source.unlink(row.relpath)
                    report.removed += 1
                    report.removed_bytes += row.size
            done += row.size
            if progress is not None:
                progress(done, total)
    finally:
        if yes:
            _audit(sessions, ACTION_STORAGE_PRUNE, actor, str(source.root),
                   {"removed": report.removed, "bytes": report.removed_bytes, "kept": report.kept[:MAX_LISTED]},
                   f"{len(report.kept)} old file(s) kept" if report.kept else None)
    return report


def _object_problem(store: FootageStore, row: FileRow) -> str | None:
    """Why the row's object version cannot yet stand in for the old file (None: it can)."""
    try:
        digest, size = store.hash(row.relpath, row.version)
    except (OSError, UnsafePath) as exc:
        return f"cannot be read: {exc}"
    if (digest, size) != (row.sha256, row.size):
        return f"reads as {size} bytes hashing to {digest}, not the row's {row.size} bytes hashing to {row.sha256}"
    lock_of = getattr(store, "lock_of", None)
    if lock_of is not None and row.lock_until is not None:
        try:
            until, _held = lock_of(row.relpath, row.version)
        except (OSError, UnsafePath) as exc:
            return f"its lock cannot be read: {exc}"
        if until is None or until < row.lock_until:
            return f"locked until {until}, less than the row's {row.lock_until}"
    return None


def _audit(sessions: sessionmaker[Session], action: str, actor: str, target: str, detail: dict[str, object],
           reason: str | None) -> None:
    with sessions.begin() as session:
        audit.record(session, action, actor=actor, target=target, reason=reason, detail=detail)


def default_source(storage_dir: Path) -> FilesystemStore:
    """The old filesystem root as a store (its staging and S3 download folders are not footage)."""
    return FilesystemStore(storage_dir, skip=frozenset({"staging", "downloads"}))

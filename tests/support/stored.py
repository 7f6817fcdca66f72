"""What a collector stored, read back the way a test checks it, on either backend: files under storage_dir, or
object versions in an Object Lock bucket (read with the administrator's credentials, not through the collector).

`StoredFootage.check_rows` is the storage half of "every record stored exactly once, bytes verified": each segment
row's bytes hash to its SHA-256, nothing else is stored, and on S3 each row names a version that exists and is
locked (COMPLIANCE) until at least the row's `lock_until`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from typing import Any

from tests.support.seaweed import Bucket

NOT_FOOTAGE = {"staging", "downloads"}   # ingest's staging and S3 downloads live in storage_dir too


@dataclass(frozen=True)
class StoredFootage:
    storage_dir: Path
    bucket: Bucket | None = None

    @property
    def backend(self) -> str:
        return "s3" if self.bucket is not None else "filesystem"

    def read(self, relpath: str, version: str | None) -> bytes:
        if self.bucket is None:
            return (self.storage_dir / relpath).read_bytes()
        assert version, f"{relpath}: an S3 row without a storage_version"
        return self.bucket.admin.get_object(Bucket=self.bucket.name, Key=relpath, VersionId=version)["Body"].read()

    @contextmanager
    def local(self, relpath: str, version: str | None, scratch: Path) -> Iterator[Path]:
        """A file holding the stored bytes (for ffprobe)."""
        if self.bucket is None:
            yield self.storage_dir / relpath
            return
        scratch.mkdir(parents=True, exist_ok=True)
        path = scratch / Path(relpath).name
        path.write_bytes(self.read(relpath, version))
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def files_on_disk(self) -> list[Path]:
        """Footage files under storage_dir (staging and downloads left out)."""
        return sorted(p for p in self.storage_dir.rglob("*") if p.is_file()
                      and p.relative_to(self.storage_dir).parts[0] not in NOT_FOOTAGE)

    def objects(self) -> list[tuple[str, str | None]]:
        """Everything stored: (relative path, None) per file, or (key, version id) per object version."""
        if self.bucket is None:
            return [(p.relative_to(self.storage_dir).as_posix(), None) for p in self.files_on_disk()]
        return [(v["Key"], v["VersionId"]) for v in self.bucket.versions()]

    def check_rows(self, rows: Sequence[Any], where: str = "") -> None:
        """Every segment row's bytes are stored once, as signed; nothing else is stored; on S3 every row names a
        locked version. `rows`: SegmentRecord rows (live ones), all of this store."""
        segments = [r for r in rows if r.kind == "segment" and r.deleted_at is None]
        for row in segments:
            data = self.read(row.storage_path, row.storage_version)
            assert hashlib.sha256(data).hexdigest() == row.sha256 and len(data) == row.size, \
                f"{where} {row.camera} seq {row.seq}: stored bytes differ from the signed manifest"
        named = sorted((r.storage_path, r.storage_version) for r in segments)
        assert sorted(self.objects()) == named, f"{where}: stored objects are not exactly one per segment row"
        if self.bucket is None:
            assert all(r.storage_version is None and r.lock_until is None for r in segments), where
            return
        assert self.files_on_disk() == [], f"{where}: footage on the filesystem though the backend is S3"
        for row in segments:
            self.check_lock(row.storage_path, row.storage_version, row.lock_until, f"{where} {row.camera} seq {row.seq}")

    def check_lock(self, relpath: str, version: str | None, lock_until: Any, where: str = "") -> None:
        """The version exists and is locked in COMPLIANCE mode until at least `lock_until` (which must be set)."""
        assert self.bucket is not None
        assert version and lock_until is not None, f"{where}: row without storage_version or lock_until"
        head = self.bucket.admin.head_object(Bucket=self.bucket.name, Key=relpath, VersionId=version)
        held = head.get("ObjectLockRetainUntilDate")
        assert head.get("ObjectLockMode") == "COMPLIANCE" and held is not None, f"{where}: not locked: {head}"
        until = lock_until if lock_until.tzinfo else lock_until.replace(tzinfo=timezone.utc)
        assert held >= until, f"{where}: locked until {held}, the row says {until}"

"""The footage store on S3 with Object Lock (docs/design/storage.md, operators: docs/storage.md).

Every stored segment is one object version under the same relative path as on the filesystem, uploaded with
If-None-Match (never over another object), with the SHA-256 the agent signed as its checksum (the storage
refuses other bytes), locked in COMPLIANCE mode until the retain-until date ingest computes from the keep rule,
and checked after the upload (size, checksum, lock) before `place` returns. The row names the version; reads,
deletes, lock extensions and legal holds all name it, so a later write under the same key (which the lock
cannot prevent, it only keeps the locked version) changes nothing that is read.

Only boto3 talks to the storage (no hand-written signing). Storage errors become `OSError` (ENOSPC for quota or
capacity, EIO for the rest, naming the bucket, key and endpoint), a missing object `StoredFileMissing`, and a
deletion the storage refuses because of a lock or legal hold `ObjectLocked`.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import logging
import os
import tempfile
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NoReturn

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from exam_contract.tomlconfig import ConfigError

from .footage_store import (READ_BLOCK, ObjectLocked, PathOccupied, Placed, RelPath, StorageSetupError,
                            StorageUnreachable, StoredFileMissing, StoredObject, check_range, hash_stream)
from .placement import check_relpath

if TYPE_CHECKING:
    from .config import CollectorConfig, StorageConfig

log = logging.getLogger(__name__)

MIB = 1024 * 1024
PART_SIZE = 16 * MIB          # multipart above this; each part carries its own SHA-256, checked by the storage
LOCK_MODE = "COMPLIANCE"      # no credentials, not even the bucket owner's, can shorten or remove it
SHA256_METADATA = "sha256"    # x-amz-meta-sha256: the hex SHA-256 of the whole object (multipart has no such checksum)
DOWNLOADS_FOLDER = "downloads"   # in storage_dir: local copies for `local_path`, removed when their context ends
ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
CREDENTIAL_KEYS = {"access_key_id", "secret_access_key"}

_MISSING = {"NoSuchKey", "NoSuchVersion", "404", "NotFound"}
_FULL = {"QuotaExceeded", "XMinioStorageFull", "InsufficientStorage", "EntityTooLarge", "StorageFull"}
_TAKEN = {"PreconditionFailed", "ConditionalRequestConflict"}


class BucketNotLocked(StorageSetupError):
    """The bucket does not have Object Lock enabled: footage there would not be protected by the storage."""


class _KeyTaken(Exception):
    """A conditional create found the key already holding an object (another writer got there first)."""


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str
    source: str    # where they came from (for messages; never the secret)


def load_credentials(credentials_file: Path | None) -> Credentials:
    """From `[storage] credentials_file` (TOML with access_key_id and secret_access_key, mode 0600), else from
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. Raises ConfigError naming the key and the fix."""
    if credentials_file is None:
        found = [os.environ.get(name, "").strip() for name in ENV_KEYS]
        if not all(found):
            raise ConfigError("[storage] credentials_file is not set and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                              "are not both in the environment: set credentials_file to a file (mode 0600) with "
                              "access_key_id and secret_access_key, or export both variables")
        return Credentials(found[0], found[1], "the environment (AWS_ACCESS_KEY_ID)")
    where = f"[storage] credentials_file = {str(credentials_file)!r}"
    try:
        mode = credentials_file.stat().st_mode
        text = credentials_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read ({exc.strerror or exc}): fix the path or its permissions") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text: write it as TOML with access_key_id and "
                          "secret_access_key") from exc
    if mode & 0o077:
        raise ConfigError(f"{where} is readable by group or others (mode {mode & 0o777:04o}): it holds the "
                          f"storage secret; run chmod 600 {credentials_file}")
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML ({exc}): write access_key_id = \"...\" and "
                          "secret_access_key = \"...\"") from exc
    unknown = sorted(set(table) - CREDENTIAL_KEYS)
    if unknown:
        raise ConfigError(f"{where} has the unknown key {unknown[0]}: it holds only access_key_id and "
                          "secret_access_key")
    key_id, secret = table.get("access_key_id"), table.get("secret_access_key")
    if not (isinstance(key_id, str) and key_id.strip() and isinstance(secret, str) and secret.strip()):
        raise ConfigError(f"{where} must set access_key_id and secret_access_key as non-empty strings")
    return Credentials(key_id.strip(), secret.strip(), str(credentials_file))


def lock_date(moment: datetime) -> datetime:
    """`moment` in UTC rounded up to the whole second: the storage keeps retain-until dates to the second
    (measured: SeaweedFS truncates), and a lock must never end before the date asked for."""
    moment = moment.astimezone(timezone.utc)
    whole = moment.replace(microsecond=0)
    return whole if whole == moment else whole + timedelta(seconds=1)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


class _ObjectReader(io.RawIOBase):
    """A stored version being read (botocore's stream), with its errors as OSError."""

    def __init__(self, body: Any, store: S3Store, key: str, version: str | None) -> None:
        self._body, self._store, self._key, self._version = body, store, key, version

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            return int(self._body.readinto(buffer))
        except (BotoCoreError, ClientError) as exc:
            self._store.raise_os_error(exc, "read", self._key, self._version)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class S3Store:
    """Footage as object versions in one bucket with Object Lock; keys are the relative paths of the layout
    (docs/design/storage.md). Several collectors may share the bucket: creates are conditional, and each row
    names its version."""

    versioned = True

    def __init__(self, *, endpoint: str, bucket: str, credentials: Credentials, scratch_dir: Path,
                 region: str = "us-east-1", addressing: str = "path", ca_file: Path | None = None,
                 part_size: int = PART_SIZE) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.scratch_dir = Path(scratch_dir)
        self.part_size = part_size
        self.lock_checked = False   # check() found Object Lock enabled (it cannot be disabled again, per S3)
        config = Config(s3={"addressing_style": addressing}, retries={"mode": "standard", "max_attempts": 3},
                        connect_timeout=10, read_timeout=120, signature_version="s3v4",
                        # checksums only where this code asks for them (SHA-256 of the signed bytes)
                        request_checksum_calculation="when_required", response_checksum_validation="when_required")
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint, region_name=region, aws_access_key_id=credentials.access_key_id,
            aws_secret_access_key=credentials.secret_access_key, verify=str(ca_file) if ca_file else True,
            config=config)

    @classmethod
    def from_config(cls, config: CollectorConfig) -> S3Store:
        storage: StorageConfig = config.storage
        assert storage.endpoint is not None and storage.bucket is not None  # checked when the config was read
        return cls(endpoint=storage.endpoint, bucket=storage.bucket,
                   credentials=load_credentials(storage.credentials_file),
                   scratch_dir=config.storage_dir / DOWNLOADS_FOLDER, region=storage.region,
                   addressing=storage.addressing, ca_file=storage.ca_file)

    def __str__(self) -> str:
        return f"S3 bucket {self.bucket} at {self.endpoint}"

    def __repr__(self) -> str:
        return f"S3Store(endpoint={self.endpoint!r}, bucket={self.bucket!r})"

    # ------------------------------------------------------------------ errors

    def _where(self, key: str | None, version: str | None) -> str:
        where = f"s3://{self.bucket}/{key}" if key else f"bucket {self.bucket}"
        return f"{where}{f' version {version}' if version else ''} at {self.endpoint}"

    def raise_os_error(self, exc: Exception, operation: str, key: str | None = None,
                       version: str | None = None) -> NoReturn:
        """`exc` from boto3 as the error callers expect: StoredFileMissing, or OSError (ENOSPC / EIO)."""
        where = self._where(key, version)
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if key is not None and (code in _MISSING or status == 404) and code != "NoSuchBucket":
                raise StoredFileMissing(f"{key}{f' version {version}' if version else ''}", self) from exc
            number = errno.ENOSPC if code in _FULL or status == 507 else errno.EIO
            fix = {"NoSuchBucket": "create it with `exam-collector init --storage s3` or fix [storage] bucket",
                   "AccessDenied": "check that [storage] credentials may read, write and lock objects in the bucket",
                   "InvalidAccessKeyId": "check [storage] credentials_file or AWS_ACCESS_KEY_ID",
                   "SignatureDoesNotMatch": "check the secret in [storage] credentials_file or "
                                            "AWS_SECRET_ACCESS_KEY",
                   "RequestTimeTooSkewed": "this host's clock differs from the storage's: fix it (NTP)"}.get(
                code, "see the storage's log" if number == errno.EIO else "add capacity to the storage")
            raise OSError(number, f"S3 {operation} of {where} failed: {code or status} "
                                  f"({error.get('Message', '')}); {fix}") from exc
        reason = "unreachable" if isinstance(exc, EndpointConnectionError) else type(exc).__name__
        raise OSError(errno.EIO, f"S3 {operation} of {where} failed: {reason} ({exc}); check that the storage "
                                 "at [storage] endpoint answers") from exc

    def _call(self, operation: str, key: str | None, version: str | None, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            self.raise_os_error(exc, operation, key, version)

    # ------------------------------------------------------------------ the bucket

    def check(self) -> None:
        """The bucket answers and has Object Lock enabled; raises StorageUnreachable or StorageSetupError."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            lock = self.client.get_object_lock_configuration(Bucket=self.bucket).get("ObjectLockConfiguration", {})
        except (BotoCoreError, ClientError) as exc:
            raise self.setup_error(exc) from exc
        if lock.get("ObjectLockEnabled") != "Enabled":
            raise BucketNotLocked(self._not_locked())
        self.lock_checked = True

    def create_bucket(self) -> bool:
        """Create the bucket with Object Lock (True), or check the existing one (False)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                raise self.setup_error(exc) from exc
        except BotoCoreError as exc:
            raise self.setup_error(exc) from exc
        else:
            self.check()
            return False
        try:
            self.client.create_bucket(Bucket=self.bucket, ObjectLockEnabledForBucket=True)
        except (BotoCoreError, ClientError) as exc:
            raise self.setup_error(exc, creating=True) from exc
        self.check()
        return True

    def _not_locked(self) -> str:
        return (f"bucket {self.bucket} at {self.endpoint} does not have Object Lock enabled: anyone holding its "
                "credentials could delete or overwrite footage there; use a bucket created with Object Lock "
                "(`exam-collector init --storage s3` creates one)")

    def setup_error(self, exc: Exception, creating: bool = False) -> StorageSetupError:
        if not isinstance(exc, ClientError):
            return StorageUnreachable(f"S3 endpoint {self.endpoint} cannot be reached ({exc}): check [storage] "
                                      "endpoint, the network and the storage service")
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "ObjectLockConfigurationNotFoundError":
            return BucketNotLocked(self._not_locked())
        if code in ("404", "NoSuchBucket"):
            return StorageSetupError(f"bucket {self.bucket} does not exist at {self.endpoint}: create it with "
                                     "`exam-collector init --storage s3 ...` or fix [storage] bucket")
        if creating and status == 403:
            return StorageSetupError(f"the credentials may not create bucket {self.bucket} at {self.endpoint} "
                                     f"({code}): have the storage administrator create it with Object Lock "
                                     "enabled, then run this again")
        if status == 403:
            return StorageSetupError(f"S3 endpoint {self.endpoint} refused the credentials for bucket "
                                     f"{self.bucket} ({code}): check [storage] credentials_file or "
                                     "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the account's permissions")
        return StorageSetupError(f"S3 endpoint {self.endpoint} answered {code or status} for bucket "
                                 f"{self.bucket}: {exc}")

    # ------------------------------------------------------------------ placing

    def place(self, claim: Path, relpath: RelPath, *, sha256: str, alternate: RelPath | None = None,
              retain_until: datetime | None = None, legal_hold: bool = False) -> Placed:
        # Crash safety (docs/design/durability.md): a version is created only by a conditional create and only
        # once its bytes hash to `sha256`; a retry finds that version (same bytes) and reuses it, never a second
        # copy. The caller commits the row naming the version only after this returns.
        if retain_until is None:
            raise ValueError(f"{self} locks every object: place needs retain_until")
        until = lock_date(retain_until)
        size = claim.stat().st_size
        tried: list[PurePosixPath] = []
        for candidate in (relpath, alternate):
            if candidate is None:
                break
            checked = check_relpath(candidate)
            key = checked.as_posix()
            tried.append(checked)
            for _attempt in range(2):    # once more when the key's holder went between the refusal and the listing
                # The conditional create comes first: a fresh key (the normal case) needs no listing. Only a refused
                # create (the key holds an object: an earlier attempt's, another collector's, or other bytes) lists
                # the versions, to adopt the one holding these bytes or else try the alternate key. (A key whose
                # newest entry is a delete marker counts as free to the storage, so a create there succeeds; this
                # code never makes one, as every delete names a version.)
                try:
                    version, checksum, reported = self._upload(claim, key, sha256, size, until, legal_hold)
                except _KeyTaken:
                    same, others = self._versions_holding(key, sha256, size)
                    if same is not None:
                        lock = self._adopt(claim, key, same, sha256, size, until, legal_hold)
                        log.info("%s: %s already holds these bytes (version %s); reused", self, key, same)
                        return Placed(checked, created=False, version=same, lock_until=lock)
                    if others:
                        break
                    continue
                lock = self._check_created(key, version, sha256, size, checksum, reported, until)
                return Placed(checked, created=True, version=version, lock_until=lock)
        raise PathOccupied(tried, self)

    def _check_created(self, key: str, version: str, sha256: str, size: int, checksum: str,
                       reported: str | None, until: datetime) -> datetime:
        """The version this create made holds these bytes and a COMPLIANCE lock until `until`; the lock date.

        When the create's reply carries the checksum the storage computed over the bytes it received and it equals
        ours (the SHA-256 of the verified claim, or for multipart the SHA-256 of its parts' SHA-256s), the bytes and
        so their size are proven without another request. The lock is then known too: the create carried
        COMPLIANCE until `until` (whole seconds, as the storage keeps them); the storage refuses lock settings for a
        bucket without Object Lock (measured on SeaweedFS, as S3 documents), and `check()` found Object Lock enabled
        on this bucket, which S3 cannot disable again. Without that check, or without such a reply, the version is
        checked by `_verify` (head_object, read back if the checksum differs)."""
        if self.lock_checked and reported is not None and reported == checksum:
            return until
        return self._verify(key, version, sha256, size, checksum, until)

    def _versions_holding(self, key: str, sha256: str, size: int) -> tuple[str | None, bool]:
        """(a version of `key` holding these bytes by its recorded SHA-256, whether other versions exist)."""
        same: str | None = None
        others = False
        for version in self._versions(key):
            head = self._call("head_object", key, version, Key=key, VersionId=version, ChecksumMode="ENABLED")
            if head.get("ContentLength") == size and (
                    head.get("Metadata", {}).get(SHA256_METADATA) == sha256
                    or head.get("ChecksumSHA256") == _b64(bytes.fromhex(sha256))):
                same = same or version
            else:
                others = True
        return same, others

    def _versions(self, key: str) -> Iterator[str]:
        """The versions (not delete markers) stored under exactly `key`."""
        try:
            for page in self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=key):
                for item in page.get("Versions", []):
                    if item["Key"] == key:
                        yield item["VersionId"]
        except (BotoCoreError, ClientError) as exc:
            self.raise_os_error(exc, "list_object_versions", key)

    def _upload(self, claim: Path, key: str, sha256: str, size: int, until: datetime,
                legal_hold: bool) -> tuple[str, str, str | None]:
        """Create `key` from the claim only if absent (If-None-Match), checksummed and locked; (version, the
        checksum the storage should now report, the checksum its reply reports). Raises _KeyTaken when the key
        exists."""
        lock: dict[str, Any] = {"Metadata": {SHA256_METADATA: sha256}, "ObjectLockMode": LOCK_MODE,
                                "ObjectLockRetainUntilDate": until,
                                "ObjectLockLegalHoldStatus": "ON" if legal_hold else "OFF"}
        with open(claim, "rb") as handle:
            if size <= self.part_size:
                data = handle.read()
                self._check_bytes(key, hashlib.sha256(data).hexdigest(), len(data), sha256, size)
                checksum = _b64(bytes.fromhex(sha256))
                try:
                    reply = self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ChecksumSHA256=checksum,
                                                   IfNoneMatch="*", **lock)
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") in _TAKEN:
                        raise _KeyTaken(key) from exc
                    self.raise_os_error(exc, "put_object", key)
                except BotoCoreError as exc:
                    self.raise_os_error(exc, "put_object", key)
                return reply["VersionId"], checksum, reply.get("ChecksumSHA256")
            return self._upload_parts(handle, key, sha256, size, lock)

    def _upload_parts(self, handle: io.BufferedReader, key: str, sha256: str, size: int,
                      lock: dict[str, Any]) -> tuple[str, str, str | None]:
        """Multipart: each part with its own SHA-256 (the storage checks it), completed only if the key is still
        absent and the bytes sent hash to `sha256`; aborted on any failure (no half upload stays behind)."""
        started = self._call("create_multipart_upload", key, None, Key=key, ChecksumAlgorithm="SHA256", **lock)
        upload = started["UploadId"]
        whole = hashlib.sha256()
        digests: list[bytes] = []
        parts: list[dict[str, Any]] = []
        sent = 0
        try:
            while data := handle.read(self.part_size):
                digest = hashlib.sha256(data).digest()
                whole.update(data)
                sent += len(data)
                reply = self._call("upload_part", key, None, Key=key, UploadId=upload, PartNumber=len(parts) + 1,
                                   Body=data, ChecksumSHA256=_b64(digest))
                digests.append(digest)
                parts.append({"PartNumber": len(parts) + 1, "ETag": reply["ETag"], "ChecksumSHA256": _b64(digest)})
            self._check_bytes(key, whole.hexdigest(), sent, sha256, size)
            try:
                reply = self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload,
                                                              MultipartUpload={"Parts": parts}, IfNoneMatch="*")
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in _TAKEN:
                    raise _KeyTaken(key) from exc
                self.raise_os_error(exc, "complete_multipart_upload", key)
            except BotoCoreError as exc:
                self.raise_os_error(exc, "complete_multipart_upload", key)
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
            except (BotoCoreError, ClientError) as exc:   # the storage expires it; say so and keep the first error
                log.warning("%s: could not abort the upload %s of %s: %s", self, upload, key, exc)
            raise
        return (reply["VersionId"], f"{_b64(hashlib.sha256(b''.join(digests)).digest())}-{len(digests)}",
                reply.get("ChecksumSHA256"))

    def _check_bytes(self, key: str, digest: str, size: int, sha256: str, expected_size: int) -> None:
        if (digest, size) != (sha256, expected_size):
            raise OSError(errno.EIO, f"the claim for {self._where(key, None)} changed while it was uploaded "
                                     f"({size} bytes hashing to {digest}, expected {expected_size} bytes hashing to "
                                     f"{sha256}); nothing was stored, the agent sends it again")

    def _verify(self, key: str, version: str, sha256: str, size: int, checksum: str | None,
                until: datetime) -> datetime:
        """The stored version has `size` bytes, these bytes, and a compliance lock until at least `until`.

        The checksum the storage reports is the one it computed over the bytes it received: SHA-256 for a single
        PUT, the SHA-256 of the parts' SHA-256s for a multipart upload (S3 has no full-object SHA-256 then; each
        part was checked against our digest on arrival, measured on SeaweedFS). Both are compared with what we
        computed from the verified claim, which proves the stored bytes without reading them back. A storage
        that reports no checksum (or a different part layout) gets the version read back and hashed instead.
        Returns the lock date the storage holds."""
        head = self._call("head_object", key, version, Key=key, VersionId=version, ChecksumMode="ENABLED")
        where = self._where(key, version)
        if head.get("ContentLength") != size:
            raise OSError(errno.EIO, f"{where} holds {head.get('ContentLength')} bytes after the upload, not {size}: "
                                     "the storage lost bytes; see its log")
        reported = head.get("ChecksumSHA256")
        if reported is None or checksum is None or reported != checksum:
            digest, read = self.hash(key, version)
            if (digest, read) != (sha256, size):
                raise OSError(errno.EIO, f"{where} reads back as {read} bytes hashing to {digest}, not {sha256}: "
                                         "the storage altered the bytes; see its log")
        return self._check_lock(head, key, version, until)

    def _check_lock(self, head: dict[str, Any], key: str, version: str, until: datetime) -> datetime:
        held = head.get("ObjectLockRetainUntilDate")
        if head.get("ObjectLockMode") != LOCK_MODE or held is None:
            raise OSError(errno.EIO, f"{self._where(key, version)} was stored without a {LOCK_MODE} lock: the "
                                     f"bucket does not lock objects; {self._not_locked()}")
        held = held.astimezone(timezone.utc)
        if held < until:
            return self.extend_lock(key, version, until)
        return held

    def _adopt(self, claim: Path, key: str, version: str, sha256: str, size: int, until: datetime,
               legal_hold: bool) -> datetime:
        """An earlier attempt (or another instance) stored these bytes: check them, lock and hold them as asked."""
        checksum = _b64(bytes.fromhex(sha256)) if size <= self.part_size else self._composite(claim)
        lock = self._verify(key, version, sha256, size, checksum, until)
        if legal_hold:
            self.set_legal_hold(key, version, True)
        return lock

    def _composite(self, claim: Path) -> str:
        digests: list[bytes] = []
        with open(claim, "rb") as handle:
            while data := handle.read(self.part_size):
                digests.append(hashlib.sha256(data).digest())
        return f"{_b64(hashlib.sha256(b''.join(digests)).digest())}-{len(digests)}"

    # ------------------------------------------------------------------ locks and holds

    def extend_lock(self, relpath: RelPath, version: str | None, until: datetime) -> datetime:
        key = check_relpath(relpath).as_posix()
        until = lock_date(until)
        current = self._call("get_object_retention", key, version, Key=key, **self._version(version))
        held = current.get("Retention", {}).get("RetainUntilDate")
        if held is not None and held.astimezone(timezone.utc) >= until:
            return held.astimezone(timezone.utc)
        self._call("put_object_retention", key, version, Key=key, **self._version(version),
                   Retention={"Mode": LOCK_MODE, "RetainUntilDate": until})
        return until

    def lock_of(self, relpath: RelPath, version: str | None) -> tuple[datetime | None, bool]:
        """(the version's retain-until date, whether its legal hold is on), as the storage says now."""
        key = check_relpath(relpath).as_posix()
        head = self._call("head_object", key, version, Key=key, **self._version(version))
        held = head.get("ObjectLockRetainUntilDate")
        return (held.astimezone(timezone.utc) if held else None), head.get("ObjectLockLegalHoldStatus") == "ON"

    def set_legal_hold(self, relpath: RelPath, version: str | None, on: bool) -> None:
        key = check_relpath(relpath).as_posix()
        self._call("put_object_legal_hold", key, version, Key=key, **self._version(version),
                   LegalHold={"Status": "ON" if on else "OFF"})

    @staticmethod
    def _version(version: str | None) -> dict[str, str]:
        return {"VersionId": version} if version else {}

    # ------------------------------------------------------------------ reading

    def open(self, relpath: RelPath, version: str | None = None) -> io.RawIOBase:
        key = check_relpath(relpath).as_posix()
        reply = self._call("get_object", key, version, Key=key, **self._version(version))
        return _ObjectReader(reply["Body"], self, key, version)

    def read_range(self, relpath: RelPath, offset: int, length: int, version: str | None = None) -> bytes:
        check_range(relpath, offset, length)
        key = check_relpath(relpath).as_posix()
        if length == 0:
            return b""
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}",
                                           **self._version(version))
            return bytes(reply["Body"].read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""   # offset at or past the end
            self.raise_os_error(exc, "get_object", key, version)
        except BotoCoreError as exc:
            self.raise_os_error(exc, "get_object", key, version)

    @contextmanager
    def local_path(self, relpath: RelPath, version: str | None = None) -> Iterator[Path]:
        """A temporary download in storage_dir/downloads (the footage volume, not /tmp, which may be RAM)."""
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=self.scratch_dir, suffix=PurePosixPath(str(relpath)).suffix)
        path = Path(name)
        try:
            with os.fdopen(descriptor, "wb") as out, self.open(relpath, version) as source:
                buffer = bytearray(READ_BLOCK)
                view = memoryview(buffer)
                while n := source.readinto(buffer):
                    out.write(view[:n])
            yield path
        finally:
            path.unlink(missing_ok=True)

    def _head(self, relpath: RelPath, version: str | None) -> dict[str, Any]:
        key = check_relpath(relpath).as_posix()
        return self._call("head_object", key, version, Key=key, **self._version(version))

    def exists(self, relpath: RelPath, version: str | None = None) -> bool:
        try:
            self._head(relpath, version)
        except StoredFileMissing:
            return False
        return True

    def size(self, relpath: RelPath, version: str | None = None) -> int:
        return int(self._head(relpath, version)["ContentLength"])

    def hash(self, relpath: RelPath, version: str | None = None) -> tuple[str, int]:
        return hash_stream(self.open(relpath, version))

    def recorded_sha256(self, relpath: RelPath, version: str | None) -> str | None:
        """The SHA-256 the collector recorded with the version when it uploaded it (metadata; not read now)."""
        return self._head(relpath, version).get("Metadata", {}).get(SHA256_METADATA)

    # ------------------------------------------------------------------ deleting, listing

    def unlink(self, relpath: RelPath, version: str | None = None) -> None:
        key = check_relpath(relpath).as_posix()
        if not version:
            raise OSError(errno.EINVAL, f"{self._where(key, None)}: deleting needs the version the row names (a "
                                        "delete without one only hides the object); record it first")
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key, VersionId=version)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "AccessDenied":
                self._refused(key, version, exc)
            self.raise_os_error(exc, "delete_object", key, version)
        except BotoCoreError as exc:
            self.raise_os_error(exc, "delete_object", key, version)

    def _refused(self, key: str, version: str, exc: ClientError) -> None:
        """A refused delete: ObjectLocked when the version is locked or held, else back to the caller."""
        try:
            until, held = self.lock_of(key, version)
        except (OSError, StoredFileMissing):
            return
        if held or until is not None:
            facts = [f"retained until {until.isoformat()} by the storage's clock" if until else "",
                     "legal hold ON" if held else ""]
            raise ObjectLocked(key, version, self, ", ".join(f for f in facts if f)) from exc

    def walk(self) -> Iterator[PurePosixPath]:
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
                for item in page.get("Contents", []):
                    yield PurePosixPath(item["Key"])
        except (BotoCoreError, ClientError) as exc:
            self.raise_os_error(exc, "list_objects_v2")

    def objects(self) -> Iterator[StoredObject]:
        try:
            for page in self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket):
                for item in page.get("Versions", []):
                    yield StoredObject(PurePosixPath(item["Key"]), item["VersionId"])
        except (BotoCoreError, ClientError) as exc:
            self.raise_os_error(exc, "list_object_versions")

    def usage(self) -> None:
        return None   # object storage has no fixed capacity this code could read; its quota errors are ENOSPC

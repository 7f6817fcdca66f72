"""The S3 baseline for `bench.ingest --storage s3`: the best a plain client does against the same storage.

`files` segments of `file_size` bytes (distinct contents) uploaded with boto3 `put_object`, no checksum, lock or
condition, by `threads` threads (as many as the collector has ingest workers) into a fresh plain bucket of the
same SeaweedFS. The clock runs from the first request to the last reply. MB means 10^6 bytes.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bench.mqtt_baseline import BenchError
from tests.support.seaweed import Seaweed


@dataclass(frozen=True)
class S3BaselineResult:
    files: int
    total_bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.total_bytes / 1e6 / self.seconds


def s3_put_baseline(server: Seaweed, files: int, file_size: int, threads: int = 2) -> S3BaselineResult:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = server.new_bucket(lock=False)
    client = server.client(*server.collector_keys)
    block = os.urandom(1 << 20)
    payloads = [(i.to_bytes(8, "big") + block) * (file_size // (len(block) + 8)) + bytes(file_size % (len(block) + 8))
                for i in range(files)]

    def put(number: int) -> None:
        client.put_object(Bucket=bucket, Key=f"baseline/{number:06d}.ts", Body=payloads[number])

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max(1, threads)) as pool:
            list(pool.map(put, range(files)))
    except (BotoCoreError, ClientError) as exc:
        raise BenchError(f"plain put_object to {server.endpoint} failed: {exc}") from exc
    seconds = time.perf_counter() - started
    return S3BaselineResult(files, sum(len(p) for p in payloads), seconds)

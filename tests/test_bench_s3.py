"""The S3 baseline of `bench.ingest --storage s3` uploads every byte it counts, to the real SeaweedFS (no timing
threshold), and the ingest side stores into an Object Lock bucket through the real `exam-collector serve`."""

from pathlib import Path

import pytest

from bench.ingest import run_ingest
from bench.s3_baseline import s3_put_baseline
from tests.support.seaweed import Bucket, Seaweed
from tests.support.services import Mosquitto


def test_s3_baseline_uploads_every_byte_it_counts(seaweed: Seaweed) -> None:
    result = s3_put_baseline(seaweed, files=3, file_size=3 * 2**20 + 5, threads=2)
    assert (result.files, result.total_bytes) == (3, 3 * (3 * 2**20 + 5)) and result.mb_per_s > 0
    buckets = [b["Name"] for b in seaweed.admin.list_buckets()["Buckets"]]
    sizes = sorted(o["Size"] for b in buckets for o in seaweed.admin.list_objects_v2(Bucket=b).get("Contents", [])
                   if o["Key"].startswith("baseline/"))
    assert sizes[-3:] == [3 * 2**20 + 5] * 3


@pytest.mark.mosquitto
def test_ingest_bench_stores_every_file_in_the_bucket(tmp_path: Path, mosquitto: Mosquitto, s3_bucket: Bucket) -> None:
    result = run_ingest(mosquitto, tmp_path, total_mib=4, file_mib=2, database_url=None, s3=s3_bucket)
    assert (result.files, result.total_bytes) == (2, 4 * 2**20)
    stored = [v for v in s3_bucket.versions() if v["Key"].endswith(".ts")]
    assert sorted(v["Size"] for v in stored) == [2 * 2**20, 2 * 2**20]

"""Issue 15, acceptance: the collector SIGKILLed while storing a segment in an S3 bucket with Object Lock (real
SeaweedFS, real mosquitto, real ffmpeg and `exam-edge run`), then restarted. Two kill points
(tests/support/crash_collector.py): right after the upload (`place` returned, no row yet), and right after the row
commit (the `stored` reply not sent). The agent's retry must end with exactly one row per record, one object
version per segment row (the version uploaded before the crash adopted, never a second copy), every version
locked at least until its row says, nothing lost, and scrub finding no orphan."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_store_forward import disable_health
from tests.integration.test_vertical_slice import collector_records, edge_records
from tests.support.crash_collector import KILL_POINTS, REACHED
from tests.support.pipeline import CameraSpec, Pipeline, run_cli, wait_until
from tests.support.seaweed import Bucket
from tests.support.services import Mosquitto, lavfi_source
from tests.support.stored import StoredFootage

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto, pytest.mark.ffmpeg]

REPO = Path(__file__).resolve().parents[2]
CAMERA = CameraSpec("crash-t501-front", "T501", "theory", lavfi_source(rate=10))
RECORDS_AFTER_RESTART = 3   # the record the crash hit, and two more stored by the restarted collector


@pytest.mark.parametrize("point", KILL_POINTS)
def test_collector_killed_while_storing_on_s3_stores_each_record_once(point: str, tmp_path: Path,
                                                                      mosquitto: Mosquitto, s3_bucket: Bucket,
                                                                      ffmpeg_available: None) -> None:
    pipeline = Pipeline(tmp_path, mosquitto.url, database_url=f"sqlite:///{tmp_path / 'collector.db'}",
                        segment_seconds=10, cameras=[CAMERA], s3=s3_bucket)
    pipeline.set_up()
    disable_health(pipeline.edge_config)
    footage = StoredFootage(pipeline.root / "collector" / "storage", s3_bucket)
    crash_log = tmp_path / "collector-crashing.log"
    with open(crash_log, "ab") as log:
        crashing = subprocess.Popen([sys.executable, "-m", "tests.support.crash_collector", point, "--config",
                                     str(pipeline.collector_config), "serve"], cwd=REPO, stdout=log,
                                    stderr=subprocess.STDOUT)
    try:
        pipeline.start_agent("--drain-seconds", "120")
        wait_until(lambda: crashing.poll() is not None, 120, what=f"the collector to reach {point}")
        assert crashing.returncode == -signal.SIGKILL, crash_log.read_text(errors="replace")
        assert REACHED in crash_log.read_text(errors="replace")

        # What the crash left: one version in the bucket; a row only when killed after the commit; the agent
        # was told nothing, so it still owes the record.
        [version] = s3_bucket.versions()
        rows = collector_records(pipeline)
        if point == "after-place":
            assert rows == []
        else:
            [row] = rows
            assert (row.storage_path, row.storage_version) == (version["Key"], version["VersionId"])
        first = edge_records(pipeline)[0]
        assert first.state == "pending" and first.kind == "segment"

        pipeline.start_collector()
        wait_until(lambda: sum(r.state == "stored" for r in edge_records(pipeline)) >= RECORDS_AFTER_RESTART,
                   180, what="the agent's retry and two more records to be stored")
        assert pipeline.stop_agent() == 0, pipeline.logs()
    finally:
        if crashing.poll() is None:
            crashing.kill()
            crashing.wait()
        pipeline.close()

    edge = edge_records(pipeline)
    rows = collector_records(pipeline)
    assert all(r.state == "stored" for r in edge), [(r.seq, r.state) for r in edge]
    assert [(r.camera, r.seq, r.kind) for r in rows] == [(r.camera, r.seq, r.kind) for r in edge]  # exactly once
    for e, r in zip(edge, rows):
        assert r.sha256 == e.manifest["sha256"]
    footage.check_rows(rows, point)          # bytes as signed, one locked version per segment row, nothing else
    first_row = rows[0]
    assert (first_row.storage_path, first_row.storage_version) == (version["Key"], version["VersionId"]), \
        "the version uploaded before the crash was not the one adopted"
    scrub = run_cli("exam-retention", "--config", str(pipeline.collector_config), "scrub", check=False)
    assert scrub.returncode == 0 and "; 0 problems" in scrub.stdout, scrub.stdout + scrub.stderr
    assert "orphan" not in scrub.stdout and "adopted" not in scrub.stdout, scrub.stdout

"""Ingest into an S3 bucket with Object Lock (real SeaweedFS), and `exam-collector init --storage s3`: `stored`
only after the verified upload, each row naming its object version and lock; a repeat stores nothing twice;
init creates a locked bucket, and refuses a bucket without Object Lock (exit 1) or an endpoint that does not
answer (exit 2)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from collector.config import load_config
from collector.db import make_engine, session_factory, upgrade
from collector.admin import enroll
from collector.footage_store import open_store
from collector.ingest import Ingest
from collector.s3_store import Credentials, S3Store
from tests.support.seaweed import ADMIN, Bucket
from tests.support.services import free_port

from .conftest import AGENT, INSTITUTION, TEST_LIMITS, VENUE, Harness, SigningAgent, payload_bytes
from .test_cli import run


@pytest.fixture
def s3_harness(database_url: str, tmp_path: Path, test_agent: SigningAgent, s3_bucket: Bucket) -> Harness:
    engine = make_engine(database_url)
    upgrade(engine)
    enroll(session_factory(engine), AGENT, VENUE, test_agent.pubkey, INSTITUTION)
    storage = tmp_path / "storage"
    yield Harness(Ingest(engine, storage, limits=TEST_LIMITS, store=s3_bucket.store(storage)), engine, storage,
                  test_agent)
    engine.dispose()


def test_stored_only_after_the_verified_upload_and_a_repeat_stores_nothing_twice(
        s3_harness: Harness, s3_bucket: Bucket, tmp_path: Path) -> None:
    h = s3_harness
    data = payload_bytes(1)
    manifest = h.agent.manifest(1, data, None)
    good = h.ingest.store
    # Credentials the storage refuses: the upload fails, so no row, no `stored`, the claim stays in staging.
    h.ingest.store = S3Store(endpoint=s3_bucket.endpoint, bucket=s3_bucket.name,
                             credentials=Credentials(s3_bucket.server.collector_keys[0], "wrong-secret", "test"),
                             scratch_dir=tmp_path / "scratch")
    with pytest.raises(OSError, match="SignatureDoesNotMatch"):
        h.send(manifest, data)
    assert h.records() == [] and s3_bucket.versions() == [] and h.staging_entries() != []

    h.ingest.store = good     # the storage answers again: the agent's next fin finishes from staging
    reply = h.send(manifest, data)
    assert reply is not None and reply.state == "stored"
    [row] = h.records()
    [version] = s3_bucket.versions()
    assert (row.storage_version, row.storage_path) == (version["VersionId"], version["Key"])
    assert row.lock_until is not None and row.lock_until > row.stored_at
    assert good.hash(row.storage_path, row.storage_version) == (row.sha256, len(data))
    assert h.staging_entries() == [] and h.stored_files() == []

    again = h.send(manifest, data)    # the agent did not get the reply and sends the record again
    assert again is not None and again.state == "stored"
    assert len(h.records()) == 1 and len(s3_bucket.versions()) == 1


def test_a_second_record_on_a_taken_key_goes_to_the_alternate_key(s3_harness: Harness, s3_bucket: Bucket) -> None:
    h = s3_harness
    first = payload_bytes(1)
    m1 = h.agent.manifest(1, first, None)
    assert h.send(m1, first).state == "stored"
    # seq 2 claiming the same start millisecond: the key holds other bytes, never overwritten
    second = payload_bytes(2)
    m2 = replace(h.agent.manifest(2, second, m1.record_hash()), start=m1.start, end=m1.end)
    assert h.send(m2, second).state == "stored"
    one, two = h.records()
    assert two.storage_path == one.storage_path.replace(".ts", "~seq2.ts")
    assert {v["Key"] for v in s3_bucket.versions()} == {one.storage_path, two.storage_path}


def _admin_credentials(folder: Path) -> Path:
    path = folder / "admin.credentials"
    path.write_text(f'access_key_id = "{ADMIN[0]}"\nsecret_access_key = "{ADMIN[1]}"\n', encoding="utf-8")
    path.chmod(0o600)
    return path


def test_init_storage_s3_creates_a_locked_bucket_and_writes_a_config_that_opens_it(
        seaweed, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    config = tmp_path / "c.toml"
    bucket = "exam-footage-init"
    code, out, err = run(capsys, "--config", str(config), "init", "--data-dir", str(tmp_path / "d"),
                         "--storage", "s3", "--s3-endpoint", seaweed.endpoint, "--s3-bucket", bucket,
                         "--s3-credentials-file", str(_admin_credentials(tmp_path)))
    assert code == 0, err
    assert f"created bucket {bucket} at {seaweed.endpoint} with Object Lock" in out
    lock = seaweed.admin.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"]
    assert lock["ObjectLockEnabled"] == "Enabled"
    cfg = load_config(config)
    assert (cfg.storage.backend, cfg.storage.bucket, cfg.storage.endpoint) == ("s3", bucket, seaweed.endpoint)
    assert "secret" not in config.read_text(encoding="utf-8").replace("secret_access_key", "")
    store = open_store(cfg)
    assert store.versioned and str(store) == f"S3 bucket {bucket} at {seaweed.endpoint}"
    # an existing bucket with Object Lock is checked and taken
    again = tmp_path / "again.toml"
    code, out, err = run(capsys, "--config", str(again), "init", "--data-dir", str(tmp_path / "d2"),
                         "--storage", "s3", "--s3-endpoint", seaweed.endpoint, "--s3-bucket", bucket,
                         "--s3-credentials-file", str(_admin_credentials(tmp_path)))
    assert code == 0, err
    assert f"bucket {bucket} at {seaweed.endpoint} exists and has Object Lock enabled" in out


def test_init_refuses_a_bucket_without_object_lock_exit_1(seaweed, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    bucket = seaweed.new_bucket(lock=False)
    config = tmp_path / "c.toml"
    code, out, err = run(capsys, "--config", str(config), "init", "--data-dir", str(tmp_path / "d"),
                         "--storage", "s3", "--s3-endpoint", seaweed.endpoint, "--s3-bucket", bucket,
                         "--s3-credentials-file", str(_admin_credentials(tmp_path)))
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"bucket {bucket} at {seaweed.endpoint} does not have Object Lock enabled" in err
    assert not config.exists() and not (tmp_path / "d" / "collector.key").exists()


def test_init_with_an_endpoint_that_does_not_answer_exit_2(tmp_path: Path, capsys) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "c.toml"
    code, out, err = run(capsys, "--config", str(config), "init", "--data-dir", str(tmp_path / "d"),
                         "--storage", "s3", "--s3-endpoint", endpoint, "--s3-bucket", "exam-footage",
                         "--s3-credentials-file", str(_admin_credentials(tmp_path)))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"S3 endpoint {endpoint} cannot be reached" in err and not config.exists()


def test_serve_refuses_to_start_on_a_bucket_without_object_lock(seaweed, tmp_path: Path, capsys,  # noqa: ANN001
                                                                database_url: str) -> None:
    bucket = Bucket(seaweed, seaweed.new_bucket(lock=False))
    config = tmp_path / "c.toml"
    assert run(capsys, "--config", str(config), "init", "--data-dir", str(tmp_path / "d"),
               "--database-url", database_url)[0] == 0
    text = config.read_text(encoding="utf-8")
    start = text.index("\n[storage]\n")
    end = text.index("\n[ingest]\n")
    config.write_text(text[:start] + bucket.storage_toml(tmp_path) + "\n" + text[end:], encoding="utf-8")
    code, out, err = run(capsys, "--config", str(config), "db", "upgrade")
    assert code == 0, err
    code, out, err = run(capsys, "--config", str(config), "serve", "--duration", "1")
    assert code == 1 and "does not have Object Lock enabled" in err and len(err.strip().splitlines()) == 1

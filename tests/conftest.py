"""Fixtures on real parts: mosquitto, PostgreSQL, ffmpeg. In CI (CI=true) a missing one fails."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.services import Mosquitto, mosquitto_binary

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Tests that record real-time footage for minutes. Under pytest-xdist (`make test` runs 4 workers) they go
# out first, so the suite takes about as long as the longest of them plus the rest spread over the others.
LONG_RUNNING_DIRS = ("integration",)
LONG_RUNNING_FILES = ("test_crash.py", "test_recording.py", "test_rtsp.py")
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
    def long_running(item: pytest.Item) -> bool:
        path = Path(str(item.fspath))
        return path.parent.name in LONG_RUNNING_DIRS or path.name in LONG_RUNNING_FILES

    items.sort(key=lambda item: not long_running(item))  # stable: the order within each group is kept

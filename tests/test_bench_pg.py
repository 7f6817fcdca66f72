"""Benchmarks given a PostgreSQL URL work in a schema of their own, created for the run and dropped afterwards:
they leave nothing in `public` (where `test_migration_matches_models[postgres]` and people look), also on error.
No timing thresholds."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy
from sqlalchemy import text

from bench import coverage
from bench.pg_schema import SCHEMA_PREFIX, private_database, with_search_path


def _public_tables(conn: sqlalchemy.Connection) -> set[str]:
    return set(conn.execute(text("select table_name from information_schema.tables "
                                 "where table_schema = 'public'")).scalars())


def _schema_exists(conn: sqlalchemy.Connection, schema: str) -> bool:
    return conn.execute(text("select count(*) from pg_namespace where nspname = :s"), {"s": schema}).scalar_one() == 1


def test_search_path_is_replaced_and_other_options_kept() -> None:
    url = with_search_path("postgresql+psycopg://u:p%40ss@h:5432/db?options=-csearch_path%3Dpublic%20-cwork_mem%3D64MB",
                           "bench_x")
    parsed = sqlalchemy.engine.make_url(url)
    assert parsed.password == "p@ss"
    assert parsed.query["options"].split() == ["-cwork_mem=64MB", "-csearch_path=bench_x"]


def test_sqlite_and_no_url_pass_through(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'bench.db'}"
    with private_database(url) as got:
        assert got == url
    with private_database(None) as got:
        assert got is None


def test_coverage_bench_on_postgres_leaves_public_unchanged(pg_server_url: str, monkeypatch) -> None:
    used: list[str] = []
    real = coverage.private_database

    @contextmanager
    def recording(url: str | None) -> Iterator[str | None]:
        with real(url) as got:
            used.append(str(got))
            yield got

    monkeypatch.setattr(coverage, "private_database", recording)
    admin = sqlalchemy.create_engine(pg_server_url)
    try:
        with admin.connect() as conn:
            before = _public_tables(conn)
        result = coverage.run(pg_server_url, days=1, samples=3, rounds=1)   # the bench's whole PostgreSQL path
        assert result.rows > 0
        [url] = used
        schema = sqlalchemy.engine.make_url(url).query["options"].split("=")[-1]
        assert schema.startswith(SCHEMA_PREFIX)
        with admin.connect() as conn:
            assert _public_tables(conn) == before
            assert not _schema_exists(conn, schema)   # the run's own schema is gone again
    finally:
        admin.dispose()


def test_private_schema_holds_the_tables_and_is_dropped_even_on_error(pg_server_url: str) -> None:
    from collector.db import make_engine, upgrade

    admin = sqlalchemy.create_engine(pg_server_url)
    schema = None
    try:
        with admin.connect() as conn:
            before = _public_tables(conn)
        with pytest.raises(RuntimeError, match="bench failed"):
            with private_database(pg_server_url) as url:
                assert url is not None
                engine = make_engine(url)
                try:
                    upgrade(engine)
                    with engine.connect() as conn:
                        schema = conn.execute(text("select current_schema()")).scalar_one()
                        tables = set(conn.execute(text("select table_name from information_schema.tables "
                                                       "where table_schema = :s"), {"s": schema}).scalars())
                finally:
                    engine.dispose()
                assert schema.startswith(SCHEMA_PREFIX) and {"segment_record", "alembic_version"} <= tables
                raise RuntimeError("bench failed")
        with admin.connect() as conn:
            assert not _schema_exists(conn, schema)
            assert _public_tables(conn) == before
    finally:
        admin.dispose()

"""The Alembic migration builds exactly the models' schema on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from collector.db import current_revision, head_revision, make_engine, session_factory, upgrade
from collector.models import Agent, Base


def test_migration_matches_models(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        upgrade(engine)
        upgrade(engine)  # idempotent
        assert current_revision(engine) == head_revision()
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
            assert diffs == []
            tables = set(inspect(conn).get_table_names())
            assert {"agent", "segment_record", "ingest_event", "alembic_version"} <= tables
            if engine.dialect.name == "postgresql":
                # Only this test's own schema is looked at: what else lives on the server (another test's
                # schema, a benchmark's, tables someone left in public) is none of this test's business.
                schema = conn.execute(text("select current_schema()")).scalar_one()
                assert schema.startswith("t_")  # the fixture's private schema, not public
                # the connection sees no other schema, so no unqualified DDL of the migration can land in public
                assert conn.execute(text("select current_schemas(false)")).scalar_one() == [schema]
                own = conn.execute(text("select table_name from information_schema.tables where table_schema = :s"),
                                   {"s": schema}).scalars().all()
                assert set(own) == set(Base.metadata.tables) | {"alembic_version"}
            else:
                assert conn.execute(text("pragma journal_mode")).scalar_one() == "wal"
                # 2 = FULL: a commit the collector answered `stored` for survives a power cut
                assert conn.execute(text("pragma synchronous")).scalar_one() == 2
                assert conn.execute(text("pragma foreign_keys")).scalar_one() == 1
    finally:
        engine.dispose()


def test_datetimes_come_back_aware_utc(database_url: str) -> None:
    engine = make_engine(database_url)
    upgrade(engine)
    shanghai = timezone(timedelta(hours=8))
    moment = datetime(2026, 11, 26, 9, 30, 0, 123000, tzinfo=shanghai)
    with session_factory(engine).begin() as s:
        s.add(Agent(id="a", venue="v", institution=None, public_key="k", enrolled_at=moment))
    with session_factory(engine)() as s:
        got = s.get(Agent, "a").enrolled_at
    engine.dispose()
    assert got == moment and got.tzinfo == timezone.utc and got.hour == 1


def test_downgrade_to_base_and_back(database_url: str) -> None:
    """Every revision can be undone and redone in order, on SQLite and PostgreSQL."""
    from alembic import command

    from collector.db import alembic_config

    engine = make_engine(database_url)
    try:
        upgrade(engine)
        command.downgrade(alembic_config(engine), "base")
        assert current_revision(engine) is None
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        assert "," not in (head_revision() or ""), "migration branches must be merged into one line"
    finally:
        engine.dispose()

"""A private PostgreSQL schema for one benchmark run, so a bench never leaves tables where the tests look.

`private_database(url)` takes the database URL a bench was given. For PostgreSQL it creates a fresh schema
(`bench_<random>`), yields the same URL with that schema as the connection's only `search_path` (every table
the collector, Alembic or a raw COPY creates lands there, none in `public`), and drops the schema with
everything in it afterwards, also when the run fails. SQLite URLs and None are yielded unchanged (a bench
makes its SQLite files in its own temporary folder, or the user names the file).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

SCHEMA_PREFIX = "bench_"
_SEARCH_PATH = re.compile(r"-c\s*search_path\s*=\s*\S+")


def is_postgres(url: str | None) -> bool:
    return url is not None and make_url(url).get_backend_name() == "postgresql"


def with_search_path(url: str, schema: str) -> str:
    """`url` with `schema` as the connection's search_path (any search_path it named is replaced; other
    `options` are kept)."""
    parsed = make_url(url)
    options = parsed.query.get("options", "")
    if isinstance(options, tuple):
        options = " ".join(options)
    options = " ".join([*_SEARCH_PATH.sub("", options).split(), f"-csearch_path={schema}"])
    return parsed.update_query_dict({"options": options}).render_as_string(hide_password=False)


@contextmanager
def private_database(url: str | None) -> Iterator[str | None]:
    """Yield a URL whose tables live in a schema created for this run and dropped afterwards (PostgreSQL);
    any other URL, or None, unchanged."""
    if url is None or not is_postgres(url):
        yield url
        return
    schema = f"{SCHEMA_PREFIX}{uuid.uuid4().hex[:12]}"
    admin_url = make_url(url)
    if admin_url.drivername == "postgresql":
        admin_url = admin_url.set(drivername="postgresql+psycopg")
    admin = create_engine(admin_url)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'create schema "{schema}"'))
        try:
            yield with_search_path(url, schema)
        finally:
            with admin.begin() as conn:
                conn.execute(text(f'drop schema if exists "{schema}" cascade'))
    finally:
        admin.dispose()

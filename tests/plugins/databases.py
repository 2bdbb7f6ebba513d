"""Fixtures: a migrated outbox database, on SQLite and on a real PostgreSQL.

Every test that takes ``database_url`` (or ``engine``) runs twice, once per backend. PostgreSQL is
the server at ``OUTBOX_TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``);
each test gets a schema of its own, selected through the URL's ``search_path`` so that worker
subprocesses given the same URL see the same tables. An unreachable PostgreSQL fails the tests:
it is never skipped silently.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from outbox import migrate
from outbox.database import create_engine

POSTGRES_URL = os.environ.get(
    "OUTBOX_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
BACKENDS = ("sqlite", "postgresql")


def _postgres_schema_url(schema: str) -> str:
    url = make_url(POSTGRES_URL)
    return url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False
    )


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[sa.Engine]:
    engine = create_engine(POSTGRES_URL)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_URL} (set OUTBOX_TEST_POSTGRES_URL): "
            f"{str(exc.orig).strip().splitlines()[0]}"
        )
    yield engine
    engine.dispose()


def make_database(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh, empty database URL for ``backend``, dropped at the end of the test."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'outbox.db'}"
    admin = request.getfixturevalue("postgres_admin")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))

    def drop() -> None:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))

    request.addfinalizer(drop)
    return _postgres_schema_url(schema)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def empty_database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A database with no outbox schema yet."""
    return make_database(backend, tmp_path, request)


@pytest.fixture
def database_url(empty_database_url: str) -> str:
    """A database migrated to the latest outbox schema."""
    engine = create_engine(empty_database_url)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    return empty_database_url


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_url(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A migrated PostgreSQL database only (for tests of several worker processes)."""
    url = make_database("postgresql", tmp_path, request)
    engine = create_engine(url)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    return url

"""Fixtures: a migrated outbox database, on SQLite, a real PostgreSQL and a real MariaDB.

Every test that takes ``database_url`` (or ``engine``) runs three times, once per backend.
PostgreSQL is the server at ``OUTBOX_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``); each test gets a schema of its own, selected
through the URL's ``search_path`` so that worker subprocesses given the same URL see the same
tables. MariaDB is the server at ``OUTBOX_TEST_MARIADB_URL`` (default
``mariadb://root@127.0.0.1:3306/test``, a MySQL URL works too); each test gets a database of its
own (MySQL's schemas are databases), named in the URL. An unreachable server fails the tests:
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
from tests.plugins.tiers import BACKEND_MARKERS

POSTGRES_URL = os.environ.get(
    "OUTBOX_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
MARIADB_URL = os.environ.get("OUTBOX_TEST_MARIADB_URL", "mariadb://root@127.0.0.1:3306/test")
BACKENDS = ("sqlite", "postgresql", "mariadb")


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


@pytest.fixture(scope="session")
def mariadb_admin() -> Iterator[sa.Engine]:
    engine = create_engine(MARIADB_URL)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        pytest.fail(
            f"MariaDB is not reachable at {MARIADB_URL} (set OUTBOX_TEST_MARIADB_URL): "
            f"{str(exc.orig).strip().splitlines()[0]}"
        )
    yield engine
    engine.dispose()


def make_database(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh, empty database URL for ``backend``, dropped at the end of the test."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'outbox.db'}"
    marker = BACKEND_MARKERS[backend]
    if request.node.get_closest_marker(marker) is None:
        # The tiers (tests/plugins/tiers.py) go by markers: an unmarked test reaching a server
        # would run in plain `pytest`, where no server is promised.
        pytest.fail(
            f"{request.node.nodeid} reaches {backend} without the {marker!r} marker: mark it "
            "(or take the database through the backend parameter or a database fixture)"
        )
    if backend == "mariadb":
        return _make_mariadb_database(request)
    admin = request.getfixturevalue("postgres_admin")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))

    def drop() -> None:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))

    request.addfinalizer(drop)
    return _postgres_schema_url(schema)


def _make_mariadb_database(request: pytest.FixtureRequest) -> str:
    admin = request.getfixturevalue("mariadb_admin")
    name = f"t_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))

    def drop() -> None:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))

    request.addfinalizer(drop)
    return make_url(MARIADB_URL).set(database=name).render_as_string(hide_password=False)


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


def make_migrated_database(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    url = make_database(backend, tmp_path, request)
    engine = create_engine(url)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    return url


@pytest.fixture
def postgres_url(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A migrated PostgreSQL database only (for tests of several worker processes)."""
    return make_migrated_database("postgresql", tmp_path, request)


@pytest.fixture
def mariadb_url(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A migrated MariaDB database only (for its own locking and fault tests)."""
    return make_migrated_database("mariadb", tmp_path, request)


@pytest.fixture(params=["postgresql", "mariadb"])
def server_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated database on each database server (tests of several worker processes)."""
    return make_migrated_database(str(request.param), tmp_path, request)

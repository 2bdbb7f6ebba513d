"""Fixtures: a migrated outbox database, on SQLite, a real PostgreSQL and a real MariaDB.

Every test that takes ``database_url`` (or ``engine``) runs three times, once per backend.
PostgreSQL is the server at ``OUTBOX_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``); each test gets a schema of its own, selected
through the URL's ``search_path`` so that worker subprocesses given the same URL see the same
tables. MariaDB is the server at ``OUTBOX_TEST_MARIADB_URL`` (default
``mariadb://root@127.0.0.1:3306/test``, a MySQL URL works too); each test gets a database of its
own (MySQL's schemas are databases), named in the URL. An unreachable server fails the tests:
it is never skipped silently.

The scratch databases are made as the benchmark makes its own, by
:func:`outbox.testing.databases.scratch_database`; what is the tests' alone is here: the
servers' URLs from the environment, failing (not skipping) a server that does not answer, and
failing a test that reaches a server without its marker. A test that needs another database
than its fixtures give calls :func:`make_database`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from outbox.database import create_engine
from outbox.testing.databases import (
    BACKENDS,
    DEFAULT_SERVER_URLS,
    DatabaseServer,
    ServerUnreachable,
    scratch_database,
    upgrade_to_latest,
)
from tests.plugins.tiers import BACKEND_MARKERS, DATABASES

#: The variable that points the tests at each database server, by backend.
SERVER_VARIABLES = {backend: DATABASES[marker] for backend, marker in BACKEND_MARKERS.items()}
#: The server each backend's scratch databases are made on, by backend.
SERVER_URLS = {
    backend: os.environ.get(variable, DEFAULT_SERVER_URLS[backend])
    for backend, variable in SERVER_VARIABLES.items()
}
POSTGRES_URL = SERVER_URLS["postgresql"]
#: The session fixture of each backend's server (its name marks a test, tests/plugins/tiers.py).
SERVER_FIXTURES = {"postgresql": "postgres_server", "mariadb": "mariadb_server"}


def _answering_server(backend: str) -> Iterator[DatabaseServer]:
    """The server of ``backend`` for the whole session; one that does not answer fails every
    test that needs it (never skips it)."""
    server = DatabaseServer(backend, SERVER_URLS[backend])
    try:
        server.check()
    except ServerUnreachable as exc:
        server.close()
        pytest.fail(f"{exc} (set {SERVER_VARIABLES[backend]})")
    yield server
    server.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[DatabaseServer]:
    """The PostgreSQL server: its URL, and an engine for statements on the whole server."""
    yield from _answering_server("postgresql")


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[DatabaseServer]:
    """The MariaDB server: its URL, and an engine for statements on the whole server."""
    yield from _answering_server("mariadb")


def make_database(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, *, migrated: bool = False
) -> str:
    """A fresh database URL for ``backend`` (migrated to the latest outbox schema if
    ``migrated``), removed at the end of the test (or of the fixture ``request`` belongs to)."""
    server = None
    if backend != "sqlite":
        marker = BACKEND_MARKERS[backend]
        if request.node.get_closest_marker(marker) is None:
            # The tiers (tests/plugins/tiers.py) go by markers: an unmarked test reaching a server
            # would run in plain `pytest`, where no server is promised.
            pytest.fail(
                f"{request.node.nodeid} reaches {backend} without the {marker!r} marker: mark it "
                "(or take the database through the backend parameter or a database fixture)"
            )
        server = request.getfixturevalue(SERVER_FIXTURES[backend])
    scratch = contextlib.ExitStack()
    request.addfinalizer(scratch.close)
    return scratch.enter_context(
        scratch_database(backend, tmp_path, server, prefix="t", migrated=migrated)
    )


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
    upgrade_to_latest(empty_database_url)
    return empty_database_url


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_url(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A migrated PostgreSQL database only (for tests of several worker processes)."""
    return make_database("postgresql", tmp_path, request, migrated=True)


@pytest.fixture
def mariadb_url(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A migrated MariaDB database only (for its own locking and fault tests)."""
    return make_database("mariadb", tmp_path, request, migrated=True)


@pytest.fixture(params=["postgresql", "mariadb"])
def server_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated database on each database server (tests of several worker processes)."""
    return make_database(str(request.param), tmp_path, request, migrated=True)

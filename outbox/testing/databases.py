"""Scratch databases: a fresh database of its own for one test or one benchmark scenario, removed
afterwards, on SQLite, PostgreSQL or MariaDB / MySQL.

The tests and the benchmark both hand the URL to worker processes, so the scratch database is
chosen by the URL alone:

* PostgreSQL: a schema of its own on the server's database, selected by the URL's
  ``search_path`` option (a worker given the same URL sees the same tables);
* MariaDB / MySQL: a database of its own (MySQL's schemas are databases), named in the URL;
* SQLite: a file of its own.

>>> server = DatabaseServer("postgresql", DEFAULT_SERVER_URLS["postgresql"])
>>> with scratch_database("postgresql", tmp_dir, server, prefix="t", migrated=True) as url:
...     ...  # the outbox tables, in a schema dropped on exit
>>> server.close()
"""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from .. import migrate
from ..database import create_engine

BACKENDS = ("sqlite", "postgresql", "mariadb")
#: The servers ``bash .ci/run`` provisions on the machine it runs on, by backend.
DEFAULT_SERVER_URLS = {
    "postgresql": "postgresql://postgres@127.0.0.1:5432/test",
    "mariadb": "mariadb://root@127.0.0.1:3306/test",
}
SERVER_NAMES = {"postgresql": "PostgreSQL", "mariadb": "MariaDB"}


class ServerUnreachable(ConnectionError):
    """A database server did not answer; the message names it, its URL and the driver's reason."""


class DatabaseServer:
    """A PostgreSQL or MariaDB / MySQL server to make scratch databases on: the URL they are
    made from, and an engine for the statements that create and drop them."""

    def __init__(self, backend: str, url: str) -> None:
        if backend not in SERVER_NAMES:
            raise ValueError(f"no database server for backend {backend!r}")
        self.backend = backend
        self.url = url
        self.engine = create_engine(url)

    @property
    def name(self) -> str:
        return SERVER_NAMES[self.backend]

    def check(self) -> None:
        """Raise :class:`ServerUnreachable` unless the server answers a query."""
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0]
            raise ServerUnreachable(
                f"{self.name} is not reachable at {self.url}: {reason}"
            ) from exc

    def create(self, name: str) -> str:
        """Make the schema (PostgreSQL) or database (MariaDB) ``name``; the URL that selects it."""
        url = make_url(self.url)
        if self.backend == "postgresql":
            statement = f'CREATE SCHEMA "{name}"'
            url = url.update_query_dict({"options": f"-csearch_path={name}"})
        else:
            statement = f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"
            url = url.set(database=name)
        with self.engine.begin() as conn:
            conn.execute(sa.text(statement))
        return url.render_as_string(hide_password=False)

    def drop(self, name: str) -> None:
        """Remove the schema or database ``name`` and everything in it."""
        if self.backend == "postgresql":
            statement = f'DROP SCHEMA IF EXISTS "{name}" CASCADE'
        else:
            statement = f"DROP DATABASE IF EXISTS `{name}`"
        with self.engine.begin() as conn:
            conn.execute(sa.text(statement))

    def close(self) -> None:
        self.engine.dispose()


def upgrade_to_latest(url: str) -> None:
    """Migrate the database at ``url`` to the latest outbox schema."""
    engine = create_engine(url)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()


@contextlib.contextmanager
def scratch_database(
    backend: str,
    directory: Path,
    server: DatabaseServer | None = None,
    *,
    prefix: str,
    migrated: bool = False,
) -> Iterator[str]:
    """The URL of a fresh database of ``backend`` (migrated to the latest outbox schema if
    ``migrated``), removed on exit: a file in ``directory`` on SQLite, a schema or database named
    ``<prefix>_<random>`` on ``server`` otherwise."""
    suffix = uuid.uuid4().hex[:12]
    if backend == "sqlite":
        path = directory / f"{prefix}-{suffix}.db"
        url = f"sqlite:///{path}"
        remove = functools.partial(_remove_sqlite_database, path)
    else:
        if server is None or server.backend != backend:
            raise ValueError(f"a scratch {backend} database needs a {backend} server")
        name = f"{prefix}_{suffix}"
        url = server.create(name)
        remove = functools.partial(server.drop, name)
    try:
        if migrated:
            upgrade_to_latest(url)
        yield url
    finally:
        remove()


def _remove_sqlite_database(path: Path) -> None:
    # In WAL mode (outbox.database sets it) two more files stand beside the database.
    for end in ("", "-wal", "-shm"):
        Path(f"{path}{end}").unlink(missing_ok=True)

"""Create or upgrade the outbox schema with the migrations shipped in the package.

The same scripts (``outbox/_migrations``) run from ``alembic upgrade head`` at the repository root
and from ``outbox migrate`` anywhere the package is installed or checked out.

On an embedded database (SQLite) the worker runs them itself (:func:`ensure_latest`): the
database is a file the worker and its application open directly, with no deploy step of its own.
On a database server (PostgreSQL) the schema is a deploy step: ``outbox migrate``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError as AlembicCommandError

from . import schema
from .schema import DEFAULT_TABLE_NAME

#: Our own version table, so an application's Alembic history in the same database is untouched.
VERSION_TABLE = "outbox_alembic_version"


def migrations_path() -> Path:
    """The directory holding ``env.py`` and ``versions/``."""
    return Path(str(resources.files("outbox._migrations")))


def alembic_config(
    connection: sa.Connection | None = None, table_name: str = DEFAULT_TABLE_NAME
) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(migrations_path()))
    config.attributes["connection"] = connection
    config.attributes["table_name"] = table_name
    return config


def owned_tables(table_name: str = DEFAULT_TABLE_NAME) -> set[str]:
    """The tables ``outbox migrate`` owns for one outbox: an app's autogenerate must skip them."""
    return {
        table_name,
        table_name + schema.DEAD_SUFFIX,
        table_name + schema.PUBLISHED_SUFFIX,
        table_name + schema.PARKED_SUFFIX,
        VERSION_TABLE,
    }


class SchemaError(ValueError):
    """The outbox schema cannot be upgraded here; the message says why and what to do."""


def upgrade(
    engine: sa.Engine, revision: str = "heads", table_name: str = DEFAULT_TABLE_NAME
) -> None:
    """Upgrade the outbox schema to ``revision`` (default: the latest)."""
    with _migrating(engine) as connection:
        command.upgrade(alembic_config(connection, table_name), revision)


def is_embedded(engine: sa.Engine) -> bool:
    """Whether the worker creates and upgrades this database's outbox schema itself: SQLite,
    whatever its path (a file the worker opens directly, not a server others deploy to)."""
    return engine.dialect.name == "sqlite"


def ensure_latest(
    engine: sa.Engine, table_name: str = DEFAULT_TABLE_NAME
) -> tuple[str | None, str | None]:
    """Create or upgrade the outbox schema to the latest revision; returns (before, after).

    Refuses (:class:`SchemaError`) a table that exists without our version table (an
    application's own migrations made it, see docs/alembic.md) and a revision this package does
    not know (a newer release migrated the database): upgrading either would fail half-way.
    """
    before = current_revision(engine)
    if before is None and sa.inspect(engine).has_table(table_name):
        raise SchemaError(
            f"the table {table_name} exists without {VERSION_TABLE}: its schema is managed "
            "elsewhere (see docs/alembic.md), so it is not upgraded here"
        )
    try:
        upgrade(engine, "heads", table_name)
    except AlembicCommandError as exc:
        raise SchemaError(
            f"cannot upgrade the outbox schema from {before} ({exc}); was the database "
            "migrated by a newer sockudo-outbox?"
        ) from None
    return before, current_revision(engine)


@contextlib.contextmanager
def _migrating(engine: sa.Engine) -> Iterator[sa.Connection]:
    """One transaction for a whole upgrade, holding SQLite's write lock from its first statement."""
    with engine.begin() as connection:
        if is_embedded(engine):
            # Python's sqlite3 opens no transaction before DDL, so each CREATE would commit on
            # its own and two processes upgrading at once would both find an empty version table.
            # BEGIN IMMEDIATE takes the write lock first: the second waits (busy timeout), then
            # finds the work done, and a failed migration leaves nothing half-made.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        yield connection


def current_revision(engine: sa.Engine) -> str | None:
    """The schema revision the database is at (None before the first migration)."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()

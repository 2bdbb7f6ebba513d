"""Create or upgrade the outbox schema with the migrations shipped in the package.

The same scripts run from ``alembic upgrade head`` at the repository root (``migrations/``) and from
``outbox migrate`` anywhere the package is installed (they ship as ``outbox._migrations``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

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


def upgrade(
    engine: sa.Engine, revision: str = "heads", table_name: str = DEFAULT_TABLE_NAME
) -> None:
    """Upgrade the outbox schema to ``revision`` (default: the latest)."""
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection, table_name), revision)


def current_revision(engine: sa.Engine) -> str | None:
    """The schema revision the database is at (None before the first migration)."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()

"""Alembic environment for the outbox table.

The outbox keeps its own version table (``outbox_alembic_version``), so it can live in a database
whose application runs its own Alembic history without either touching the other's.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context

from outbox.database import DEFAULT_DATABASE_URL, create_engine, normalize_url
from outbox.migrate import VERSION_TABLE
from outbox.schema import DEFAULT_TABLE_NAME, metadata_for

config = context.config
if config.config_file_name is not None:
    # `alembic upgrade head` from the repository root: alembic.ini's logging (reports each
    # migration it runs). `outbox migrate` has no ini file and configures logging itself.
    fileConfig(config.config_file_name, disable_existing_loggers=False)
table_name = (
    config.attributes.get("table_name") or os.environ.get("OUTBOX_TABLE") or DEFAULT_TABLE_NAME
)
config.attributes["table_name"] = table_name
target_metadata = metadata_for(table_name)


def database_url() -> str:
    return (
        context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
        or os.environ.get("OUTBOX_DATABASE_URL")
        or DEFAULT_DATABASE_URL
    )


def run_offline() -> None:
    context.configure(
        url=normalize_url(database_url()),
        target_metadata=target_metadata,
        literal_binds=True,
        version_table=VERSION_TABLE,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(database_url())
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()

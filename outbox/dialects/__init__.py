"""The database seam: one module per database behind one base class (see :mod:`.base`)."""

from __future__ import annotations

import sqlalchemy as sa

from .base import Ack, ClaimedRow, Dialect, Failure, OnNotify, quoted


def dialect_class(name: str) -> type[Dialect]:
    """The statements for a SQLAlchemy dialect name (``engine.dialect.name``)."""
    if name == "postgresql":
        from .postgresql import PostgresDialect

        return PostgresDialect
    if name == "sqlite":
        from .sqlite import SQLiteDialect

        return SQLiteDialect
    if name in ("mysql", "mariadb"):
        from .mysql import MySQLDialect

        return MySQLDialect
    raise NotImplementedError(
        f"the outbox supports PostgreSQL, MariaDB, MySQL and SQLite; {name!r} is not supported"
    )


def dialect_for(bind: sa.Engine | sa.Connection) -> Dialect:
    """The statements for the database behind ``bind``."""
    return dialect_class(bind.dialect.name)()


__all__ = [
    "Ack",
    "ClaimedRow",
    "Dialect",
    "Failure",
    "OnNotify",
    "dialect_class",
    "dialect_for",
    "quoted",
]

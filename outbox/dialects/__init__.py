"""The database seam: one module per database behind one base class (see :mod:`.base`)."""

from __future__ import annotations

import sqlalchemy as sa

from .base import Ack, ClaimedRow, Dialect, Failure, OnNotify, quoted


def dialect_for(bind: sa.Engine | sa.Connection) -> Dialect:
    """The statements for the database behind ``bind``."""
    name = bind.dialect.name
    if name == "postgresql":
        from .postgresql import PostgresDialect

        return PostgresDialect()
    if name == "sqlite":
        from .sqlite import SQLiteDialect

        return SQLiteDialect()
    raise NotImplementedError(
        f"the outbox supports PostgreSQL and SQLite; {name!r} is not supported yet"
    )


__all__ = ["Ack", "ClaimedRow", "Dialect", "Failure", "OnNotify", "dialect_for", "quoted"]

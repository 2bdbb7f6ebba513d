"""The database seam: one driver per database (see :mod:`.base`)."""

from __future__ import annotations

import sqlalchemy as sa

from .base import Driver
from .values import (
    Ack,
    ClaimedRow,
    Failure,
    FoundSerial,
    OnNotify,
    Recording,
    Target,
    UnknownSerial,
)


def driver_class(name: str) -> type[Driver]:
    """The driver for a SQLAlchemy dialect name (``engine.dialect.name``)."""
    if name == "postgresql":
        from .postgresql import PostgresDriver

        return PostgresDriver
    if name == "sqlite":
        from .sqlite import SQLiteDriver

        return SQLiteDriver
    if name in ("mysql", "mariadb"):
        from .mysql import MySQLDriver

        return MySQLDriver
    raise NotImplementedError(
        f"the outbox supports PostgreSQL, MariaDB, MySQL and SQLite; {name!r} is not supported"
    )


def driver_for(bind: sa.Engine | sa.Connection, table: sa.Table) -> Driver:
    """The driver of ``table`` in the database behind ``bind`` (an engine, or a connection of
    one: a producer's, in its transaction)."""
    engine = bind if isinstance(bind, sa.Engine) else bind.engine
    return driver_class(bind.dialect.name)(engine, table)


__all__ = [
    "Ack",
    "ClaimedRow",
    "Driver",
    "Failure",
    "FoundSerial",
    "OnNotify",
    "Recording",
    "Target",
    "UnknownSerial",
    "driver_class",
    "driver_for",
]

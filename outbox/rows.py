"""Writing outbox rows in the caller's transaction: the one writer of :mod:`.enqueue` (events)
and :mod:`.mutations` (operations on published messages).

Nothing here commits, flushes other objects or opens a transaction: the rows become visible to
the worker exactly when the caller's transaction commits, and vanish with it on rollback. The
database's module writes them its own way (``COPY``, executemany, keyed rows locked first).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from .drivers import driver_for
from .tracing import current_traceparent

SyncTarget = Session | sa.Connection
AsyncTarget = AsyncSession | AsyncConnection
Target = SyncTarget | AsyncTarget


def add_trace_context(rows: list[dict[str, Any]]) -> None:
    """Store the caller's trace context on its rows (OpenTelemetry in use and a span current):
    the worker links the publish to it. Every row of one call gets the same, so executemany
    sees one set of columns."""
    traceparent = current_traceparent()
    if traceparent is not None:
        for row in rows:
            row["traceparent"] = traceparent


#: Run on the caller's connection, in its transaction, just before the rows are inserted: to
#: complete them with what only the database knows.
Prepare = Callable[[sa.Connection], None]


def write_rows(
    target: Target,
    table: sa.Table,
    rows: list[dict[str, Any]],
    result: Any,
    prepare: Prepare | None = None,
) -> Any:
    """Insert built rows in the caller's transaction (a sync ``target``), or return an awaitable
    that does (an async one); either way the value is ``result``. The caller's trace context
    goes on every row."""
    if not isinstance(target, Session | sa.Connection | AsyncSession | AsyncConnection):
        raise TypeError(
            "expected a SQLAlchemy Session, Connection, AsyncSession or AsyncConnection, "
            f"got {type(target).__name__}"
        )
    # The database's own way to write many rows at once (see Driver.events_insert), on the
    # connection of the caller's transaction. On PostgreSQL a trigger on the table (migration
    # 0002) wakes the workers when the caller commits.
    add_trace_context(rows)
    if isinstance(target, AsyncSession | AsyncConnection):
        return _run_async(target, table, rows, result, prepare)
    if rows:
        conn = target if isinstance(target, sa.Connection) else target.connection()
        _prepare_and_insert(conn, table, rows, prepare)
    return result


def _prepare_and_insert(
    conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]], prepare: Prepare | None
) -> None:
    if prepare is not None:
        prepare(conn)
    insert_rows(conn, table, rows)


def insert_rows(conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """Insert built rows on the caller's connection, serializing the producers of their keys."""
    driver = driver_for(conn, table)
    keys = [row["ordering_key"] for row in rows if row.get("ordering_key") is not None]
    if keys:
        driver.events_insert_keyed(conn, rows, driver.keys_lock(conn, keys))
    else:
        driver.events_insert(conn, rows)


async def _run_async(
    target: AsyncTarget,
    table: sa.Table,
    rows: list[dict[str, Any]],
    result: Any,
    prepare: Prepare | None = None,
) -> Any:
    if rows:
        conn = target if isinstance(target, AsyncConnection) else await target.connection()
        await conn.run_sync(lambda sync: _prepare_and_insert(sync, table, rows, prepare))
    return result

"""Driving the worker's driver from a test: the objects the worker runs, one operation at a time."""

from __future__ import annotations

import asyncio
from typing import Any

import sqlalchemy as sa

from outbox.drivers import driver_for
from outbox.drivers.postgresql import PostgresDriver
from outbox.drivers.threaded import ThreadedDriver


def call(engine: sa.Engine, table: sa.Table, operation: str, *args: Any) -> Any:
    """Run one of the driver's operations (``"events_claim"``, ``"events_record"``, ...) to the
    end, from synchronous code, on a driver of its own whose connections are closed after."""

    async def run() -> Any:
        driver = driver_for(engine, table)
        try:
            return await getattr(driver, operation)(*args)
        finally:
            await driver.aclose()

    return asyncio.run(run())


def run_step(conn: sa.Connection, driver: PostgresDriver, name: str, params: dict[str, Any]) -> int:
    """One of PostgreSQL's recording steps (by its name in the driver), with ``params``, on
    ``conn`` in the transaction it has open: a recording held open at the worst moment. Returns
    the rows it changed."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(driver.statements[name], params)
        return int(cursor.rowcount)
    finally:
        cursor.close()


def park_in(conn: sa.Connection, table: sa.Table, ids: list[int]) -> int:
    """Park the keys of the dead rows ``ids`` with the driver's own statement, in ``conn``'s
    transaction (the step a recording that buries a keyed head takes); returns how many."""
    driver = driver_for(conn, table)
    if isinstance(driver, ThreadedDriver):
        return driver.park(conn, ids)
    return run_step(conn, driver, "park", {"ids": list(ids)})  # type: ignore[arg-type]

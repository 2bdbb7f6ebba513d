"""Rows in a given state for tests of what operators see: enqueued normally, then set by hand.

The worker reaches these states through its own statements (tested in test_worker.py); here a
test needs a dead row with a given error, a published row with given serials, a row in flight with
a lease nobody will take back, without running a worker for each.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa

from outbox import enqueue, outbox_table
from outbox.admin import events
from outbox.schema import EVENT_COLUMNS, dead_table, published_table

T = outbox_table()
#: The three tables read as one, with each row's ``status`` (see :func:`outbox.admin.events`).
EV = events(T)
#: Where a row in each state lives.
TABLE_OF = {
    "pending": T,
    "in_flight": T,
    "dead": dead_table(T),
    "published": published_table(T),
}
#: Longer than any test: a row leased until then stays in flight while a worker runs.
FAR_FUTURE = dt.datetime(2999, 1, 1, tzinfo=dt.UTC)


def set_row(engine: sa.Engine, row_id: int, **values: Any) -> None:
    """Give a row column ``values``; a ``status`` moves it to the table of that state."""
    with engine.begin() as conn:
        set_row_in(conn, row_id, **values)


def set_row_in(conn: sa.Connection, row_id: int, **values: Any) -> None:
    status = values.pop("status", None)
    source = table_holding(conn, row_id)
    target = source if status is None else TABLE_OF[status]
    if status == "pending":
        values = {"lease_token": None, "lease_expires_at": None, **values}
    if target is source:
        if values:
            conn.execute(sa.update(source).where(source.c.id == row_id).values(**values))
        return
    moved = {**conn.execute(sa.select(source).where(source.c.id == row_id)).one()._mapping}
    conn.execute(sa.insert(target).values(**{**moved, **values}))
    conn.execute(sa.delete(source).where(source.c.id == row_id))


def move_where(
    conn: sa.Connection, where: sa.ColumnElement[bool], status: str, **values: Any
) -> None:
    """Give the hot rows matching ``where`` the column ``values``, then move them to ``status``."""
    if values:
        conn.execute(sa.update(T).where(where).values(**values))
    target = TABLE_OF[status]
    if target is T:
        return
    rows = sa.select(*(T.c[c] for c in EVENT_COLUMNS)).where(where)
    conn.execute(sa.insert(target).from_select(EVENT_COLUMNS, rows))
    conn.execute(sa.delete(T).where(where))


def table_holding(conn: sa.Connection, row_id: int) -> sa.Table:
    """The table a row is in now."""
    for table in (T, TABLE_OF["dead"], TABLE_OF["published"]):
        if conn.execute(sa.select(table.c.id).where(table.c.id == row_id)).first():
            return table
    raise LookupError(f"no row {row_id}")


def counts(conn: sa.Connection) -> dict[str, int]:
    """Rows per status, over the three tables."""
    query = sa.select(EV.c.status, sa.func.count()).group_by(EV.c.status)
    return {status: int(n) for status, n in conn.execute(query)}


def add(
    engine: sa.Engine,
    channel: str = "orders",
    event: str = "created",
    data: Any = None,
    **values: Any,
) -> int:
    """One event enqueued on ``channel`` (its row id), then given the column ``values``."""
    with engine.begin() as conn:
        event_id = enqueue(conn, channel, event, {"c": channel} if data is None else data)
        row_id = conn.execute(sa.select(T.c.id).where(T.c.event_id == event_id)).scalar_one()
    if values:
        set_row(engine, row_id, **values)
    return row_id


def add_dead(
    engine: sa.Engine, channel: str = "orders", event: str = "created", **values: Any
) -> int:
    """A row the server refused (413 by default), dead now."""
    refused = {
        "status": "dead",
        "attempts": 1,
        "failures": 1,
        "last_error_status": 413,
        "last_error_code": "payload_too_large",
        "last_error_message": "payload too large",
        "last_error_at": dt.datetime.now(dt.UTC),
    }
    return add(engine, channel, event, **{**refused, **values})


def add_published(engine: sa.Engine, channel: str = "orders", **values: Any) -> int:
    """A row the server accepted now, with an acknowledgement id."""
    accepted = {
        "status": "published",
        "attempts": 1,
        "published_at": dt.datetime.now(dt.UTC),
        "acknowledgement_id": "ack-1",
    }
    return add(engine, channel, **{**accepted, **values})


def add_in_flight(engine: sa.Engine, channel: str = "orders", **values: Any) -> int:
    """A row leased by a worker whose lease outlives the test (no worker takes it back)."""
    leased = {"status": "in_flight", "attempts": 1, "lease_expires_at": FAR_FUTURE}
    return add(engine, channel, **{**leased, **values})


def row(engine: sa.Engine, row_id: int) -> Any:
    """A row wherever it is, with its ``status``."""
    with engine.connect() as conn:
        return conn.execute(sa.select(EV).where(EV.c.id == row_id)).one()


def keyed(engine: sa.Engine, key: str, n: int) -> list[int]:
    """``n`` events of one ordering key, each in its own transaction; their row ids in commit
    order."""
    ids = []
    for i in range(n):
        with engine.begin() as conn:
            event_id = enqueue(conn, "orders", "step", {"key": key, "n": i}, ordering_key=key)
            ids.append(conn.execute(sa.select(T.c.id).where(T.c.event_id == event_id)).scalar_one())
    return ids

"""The outbox's three tables (hot, dead, published log) read as one, and what every operator
query shares: a hot row's state, the rows waiting for their message, the database's clock."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa

from ..schema import (
    EVENT_COLUMNS,
    Status,
    dead_table,
    published_table,
    utc_now,
)


def events(table: sa.Table) -> sa.Subquery:
    """Every row of the outbox's three tables as one, with a ``status`` column.

    A hot row is ``in_flight`` while its lease holds and ``pending`` otherwise (an expired lease
    is claimable again). Filters on the result reach each table's own indexes.
    """
    hot, dead, log = table, dead_table(table), published_table(table)
    return sa.union_all(
        sa.select(*(hot.c[c] for c in EVENT_COLUMNS), hot_state(hot).label("status")),
        sa.select(
            *(dead.c[c] for c in EVENT_COLUMNS), sa.literal(Status.DEAD.value).label("status")
        ),
        sa.select(
            *(log.c[c] for c in EVENT_COLUMNS), sa.literal(Status.PUBLISHED.value).label("status")
        ),
    ).subquery("events")


def hot_state(hot: sa.Table) -> sa.ColumnElement[str]:
    leased = hot.c.lease_expires_at > utc_now()
    return sa.case((leased, Status.IN_FLIGHT.value), else_=Status.PENDING.value)


def waits_for_message(hot: sa.Table) -> sa.ColumnElement[bool]:
    """A hot mutation row whose message's event is still in the hot table (not yet published)."""
    target = hot.alias("target")
    return sa.and_(
        hot.c.target_event_id.is_not(None),
        sa.exists().where(
            target.c.event_id == hot.c.target_event_id, target.c.channel == hot.c.channel
        ),
    )


def database_now(conn: sa.Connection) -> dt.datetime:
    """The database's clock, in UTC: what leases and parking times were set by, so ages shown
    against it do not depend on this host's clock."""
    return conn.execute(sa.select(utc_now())).scalar_one()


def jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, dt.datetime):
            out[k] = v.isoformat()
        elif isinstance(v, uuid.UUID):
            out[k] = str(v)
        else:
            out[k] = v
    return out

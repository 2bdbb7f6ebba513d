"""Ordering keys and leases as an operator sees them: keys parked behind a dead head (and
skipping them), and the rows workers hold."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa

from ..drivers import portable
from ..schema import (
    dead_table,
    parked_table,
    utc_now,
)
from .events import jsonable


@dataclass(frozen=True)
class ParkedKey:
    """An ordering key whose head went dead: its later rows wait (``waiting``) until the head is
    replayed or the key is skipped. The head's fields are None if it left the dead table."""

    ordering_key: str
    head_id: int
    parked_at: dt.datetime
    waiting: int
    channel: str | None
    event: str | None
    last_error_code: str | None
    last_error_message: str | None

    def as_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


def parked_keys(
    conn: sa.Connection, table: sa.Table, limit: int = 100
) -> tuple[int, list[ParkedKey]]:
    """(how many keys are parked, the ``limit`` parked longest) with their heads' reasons."""
    parked = parked_table(table)
    total = conn.execute(sa.select(sa.func.count()).select_from(parked)).scalar_one()
    rows = conn.execute(
        _select_parked_keys(table).order_by(parked.c.parked_at, parked.c.ordering_key).limit(limit)
    )
    return int(total), [ParkedKey(**r._mapping) for r in rows]


def _select_parked_keys(table: sa.Table) -> sa.Select[Any]:
    """Parked keys as :class:`ParkedKey` columns: their head's reason (from the dead table, None
    once the head left it) and how many rows wait behind each. One query for the list and for a
    single key, so that both read the same fields the same way."""
    hot, dead, parked = table, dead_table(table), parked_table(table)
    waiting = (
        sa.select(sa.func.count())
        .where(hot.c.ordering_key == parked.c.ordering_key)
        .scalar_subquery()
    )
    return sa.select(
        parked.c.ordering_key,
        parked.c.row_id.label("head_id"),
        parked.c.parked_at,
        waiting.label("waiting"),
        dead.c.channel,
        dead.c.event,
        dead.c.last_error_code,
        dead.c.last_error_message,
    ).select_from(parked.outerjoin(dead, dead.c.id == parked.c.row_id))


def skip_parked(conn: sa.Connection, table: sa.Table, keys: Sequence[str] | None) -> int:
    """Let parked keys go on without their dead heads (None: all); returns how many.

    The heads stay dead (replay them later if wanted: they then go after what is queued).
    """
    parked = parked_table(table)
    if keys is None:
        keys = list(conn.execute(sa.select(parked.c.ordering_key)).scalars())
    skipped = conn.execute(sa.delete(parked).where(parked.c.ordering_key.in_(list(keys)))).rowcount
    portable.keys_promote(conn, table, keys)  # each key's next row is due now
    return skipped


def parked_key(conn: sa.Connection, table: sa.Table, ordering_key: str) -> ParkedKey | None:
    """The parked key ``ordering_key`` with its head's reason, or None if it is not parked."""
    parked = parked_table(table)
    found = conn.execute(
        _select_parked_keys(table).where(parked.c.ordering_key == ordering_key)
    ).first()
    return None if found is None else ParkedKey(**found._mapping)


@dataclass(frozen=True)
class Lease:
    """A row a worker holds: ``expired`` leases belong to a worker that stopped renewing them."""

    id: int
    channel: str
    event: str
    attempts: int
    lease_expires_at: dt.datetime
    expired: bool


def leases(conn: sa.Connection, table: sa.Table, limit: int = 100) -> tuple[int, int, list[Lease]]:
    """(rows leased, of which expired, the oldest ``limit`` leases) by expiry.

    An expired lease stays on its row until a worker claims the row again or clears it.
    """
    t = table
    now = utc_now()
    in_flight = t.c.lease_expires_at.is_not(None)
    total, expired = conn.execute(
        sa.select(
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(sa.case((t.c.lease_expires_at <= now, 1), else_=0)), 0),
        ).where(in_flight)
    ).one()
    rows = conn.execute(
        sa.select(
            t.c.id,
            t.c.channel,
            t.c.event,
            t.c.attempts,
            t.c.lease_expires_at,
            (t.c.lease_expires_at <= now).label("expired"),
        )
        .where(in_flight)
        .order_by(t.c.lease_expires_at, t.c.id)
        .limit(limit)
    )
    return int(total), int(expired), [Lease(**r._mapping) for r in rows]


def release_leases(conn: sa.Connection, table: sa.Table, *, expired_only: bool = True) -> int:
    """Put leased rows back to pending, due now; returns how many.

    They keep their attempt count: a leased row may have been sent, so it goes alone next time
    (a batch could skip its key and lose it). With ``expired_only=False`` live leases are
    released too: only for a worker known to be gone, since a live one would send its rows
    again (the server's idempotency window absorbs that, a late ack of theirs changes nothing).
    """
    where = [table.c.lease_expires_at.is_not(None)]
    if expired_only:
        where.append(table.c.lease_expires_at <= utc_now())
    stmt = (
        sa.update(table)
        .where(*where)
        .values(next_attempt_at=utc_now(), lease_token=None, lease_expires_at=None)
    )
    return conn.execute(stmt).rowcount

"""The statements every database runs as written: SQLAlchemy Core, no database's own SQL.

They are the parts of the flow where no database needed its own form: inserting an enqueued
batch, parking, promoting and waking keyed rows, the upkeep (reclaiming expired leases, trimming
the published log, waking stranded mutations) and finding a mutation's message. A driver uses
them as they are or replaces one with its own (each driver module says which, and why); the
worker never calls them directly, only through its driver.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from ..schema import (
    WAITING_FOR_KEY,
    UTCDateTime,
    dead_table,
    parked_table,
    published_table,
    utc_now,
)
from ..sockudo.errors import EventRefused
from .sql import message_lookup
from .values import ClaimedRow, FoundSerial, Target, UnknownSerial

# -- enqueue (in the caller's transaction) ----------------------------------------------------


def events_insert(conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """Insert enqueued rows (all with the same keys): one INSERT with every row as a parameter
    set, which the database driver sends as one executemany."""
    conn.execute(table.insert(), rows)


def events_insert_keyed(
    conn: sa.Connection,
    table: sa.Table,
    rows: list[dict[str, Any]],
    held: Collection[str] | None,
) -> None:
    """Insert rows some of which have an ordering key, after the driver's ``keys_lock`` (whose
    answer ``held`` is).

    A row that cannot go yet is inserted waiting (``WAITING_FOR_KEY``), not due, out of the
    claim's way: a keyed row behind an earlier row of its key (the first of a key in this call
    waits if its key is ``held``, with None: if the table has a row of the key; the others of
    that key in this call wait anyway), and a mutation whose message's event is still in the
    table (the transaction that takes that event out makes it due: see :func:`mutations_wake`).
    The first ones go in first, so each key's ids follow the order given.
    """
    queued = _queued_targets(conn, table, rows)
    seen: set[str] = set()
    first: list[dict[str, Any]] = []
    waiting: list[dict[str, Any]] = []
    for row in rows:
        key = row.get("ordering_key")
        behind = key is not None and (key in seen or (held is not None and key in held))
        if behind or (row.get("target_event_id"), row.get("channel")) in queued:
            waiting.append({**row, "next_attempt_at": WAITING_FOR_KEY})
        else:
            first.append(row)
        if key is not None:
            seen.add(key)
    if first:
        stmt = table.insert()
        if held is None:
            first = [{**row, "wait_key": row.get("ordering_key")} for row in first]
            earlier = table.alias("earlier")
            behind = sa.exists().where(earlier.c.ordering_key == sa.bindparam("wait_key"))
            wait = sa.literal(WAITING_FOR_KEY, UTCDateTime())
            stmt = stmt.values(next_attempt_at=sa.case((behind, wait), else_=utc_now()))
        conn.execute(stmt, first)
    # After the first of each key: a row waiting here always has its key's head before it (or
    # its message's event, still in the table).
    if waiting:
        conn.execute(table.insert(), waiting)


def _queued_targets(
    conn: sa.Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]]
) -> set[tuple[uuid.UUID, str]]:
    """The (event id, channel) of the messages these mutation rows name that are still in the
    hot table (not published yet), this transaction's own rows included."""
    targets = {r["target_event_id"] for r in rows if r.get("target_event_id") is not None}
    if not targets:
        return set()
    found = conn.execute(
        sa.select(table.c.event_id, table.c.channel).where(table.c.event_id.in_(targets))
    )
    return {(event_id, channel) for event_id, channel in found}


# -- keys and mutations, in the transaction that records a claim ------------------------------


def keys_park(conn: sa.Connection, table: sa.Table, ids: Sequence[int]) -> int:
    """Park the ordering keys of rows ``ids`` just buried (in the same transaction).

    Only rows that reached the dead table park their key (a stale worker's burial moved
    nothing); a key parked already stays parked by its first dead head.
    """
    if not ids:
        return 0
    dead, parked = dead_table(table), parked_table(table)
    taken = sa.select(parked.c.ordering_key)
    heads = sa.select(dead.c.ordering_key, dead.c.id, utc_now()).where(
        dead.c.id.in_(list(ids)),
        dead.c.ordering_key.is_not(None),
        dead.c.ordering_key.not_in(taken.scalar_subquery()),
    )
    stmt = sa.insert(parked).from_select(["ordering_key", "row_id", "parked_at"], heads)
    return conn.execute(stmt).rowcount


def keys_promote(conn: sa.Connection, table: sa.Table, keys: Sequence[str]) -> int:
    """Make the new head of each key due (its head just left the table); parked keys wait.

    Runs in the transaction that took the head out, so it sees the head gone and every row
    committed behind it (a producer of the key commits before, or waits: see the driver's
    ``keys_lock``). Also what ``outbox unpark`` runs, once the key is no longer parked.
    """
    if not keys:
        return 0
    hot, parked = table, parked_table(table)
    heads = (
        sa.select(sa.func.min(hot.c.id))
        .where(hot.c.ordering_key.in_(sorted(set(keys))))
        .group_by(hot.c.ordering_key)
    )
    stmt = (
        sa.update(hot)
        .where(
            hot.c.id.in_(heads.scalar_subquery()),
            hot.c.next_attempt_at == WAITING_FOR_KEY,
            hot.c.ordering_key.not_in(sa.select(parked.c.ordering_key).scalar_subquery()),
        )
        .values(next_attempt_at=utc_now())
    )
    return conn.execute(stmt).rowcount


def mutations_wake(
    conn: sa.Connection, table: sa.Table, messages: Sequence[tuple[uuid.UUID, str]]
) -> int:
    """Make due the mutations waiting for these messages (``(event id, channel)`` of rows this
    transaction just took out of the table, published or buried), each where it is its key's
    head and its key is not parked. Runs after the rows left, in a statement of its own, so it
    sees a mutation committed while the recording waited."""
    if not messages:
        return 0
    hot, parked = table, parked_table(table)
    earlier = hot.alias("earlier")
    stmt = (
        sa.update(hot)
        .where(
            sa.tuple_(hot.c.target_event_id, hot.c.channel).in_(sorted(set(messages))),
            *_waiting_head(hot, earlier, parked),
        )
        .values(next_attempt_at=utc_now())
    )
    return conn.execute(stmt).rowcount


def _waiting_head(
    hot: sa.Table, earlier: sa.Alias, parked: sa.Table
) -> tuple[sa.ColumnElement[bool], ...]:
    """A hot row waiting (out of the due order) that is its key's head, its key not parked."""
    return (
        hot.c.next_attempt_at == WAITING_FOR_KEY,
        ~sa.exists().where(earlier.c.ordering_key == hot.c.ordering_key, earlier.c.id < hot.c.id),
        hot.c.ordering_key.not_in(sa.select(parked.c.ordering_key)),
    )


# -- upkeep -----------------------------------------------------------------------------------


def mutations_wake_stranded(conn: sa.Connection, table: sa.Table) -> int:
    """Make due the waiting mutations whose message left the table without waking them.

    A producer decides that a mutation waits when its message's event is still in the table; if
    that event's ack commits before the producer does, the ack's :func:`mutations_wake` cannot
    see the mutation yet. The worker's upkeep runs this every few seconds (it reads only waiting
    mutation rows, by their own index)."""
    hot, parked = table, parked_table(table)
    earlier, target = hot.alias("earlier"), hot.alias("target")
    message_queued = sa.exists().where(
        target.c.event_id == hot.c.target_event_id, target.c.channel == hot.c.channel
    )
    stmt = (
        sa.update(hot)
        .where(
            hot.c.target_event_id.is_not(None),
            ~message_queued,
            *_waiting_head(hot, earlier, parked),
        )
        .values(next_attempt_at=utc_now())
    )
    return conn.execute(stmt).rowcount


def events_reclaim_expired(conn: sa.Connection, table: sa.Table) -> int:
    """Clear leases that expired (a killed worker's); returns how many.

    The claim already takes rows whose lease expired; this makes them read as pending again for
    operators and counts the takeovers. They keep their attempt count, so they go alone next
    time (they may have been sent).
    """
    stmt = (
        sa.update(table)
        .where(table.c.lease_expires_at <= utc_now())
        .values(lease_token=None, lease_expires_at=None)
    )
    return conn.execute(stmt).rowcount


def published_delete_before(
    conn: sa.Connection, table: sa.Table, cutoff: dt.datetime, limit: int
) -> int:
    """Delete up to ``limit`` rows of the published log published before ``cutoff``.

    Only the log is touched: a row ``replay --published`` put back lives in the hot table, out
    of retention's reach.
    """
    log = published_table(table)
    page = sa.select(log.c.id).where(log.c.published_at < cutoff).limit(limit)
    stmt = sa.delete(log).where(log.c.id.in_(page.scalar_subquery()))
    return conn.execute(stmt).rowcount


# -- a mutation's message ---------------------------------------------------------------------


def targets_resolve(
    conn: sa.Connection, table: sa.Table, rows: Sequence[ClaimedRow]
) -> dict[int, Target]:
    """For each mutation row naming its message by an outbox event: that event's
    ``message_serial`` on the row's channel, from the published log; or where to look for it
    (:class:`UnknownSerial`: it was published, but the answer that said so had no receipt); or
    why it has none (dead). A row absent from the answer has no published event here (its log
    row was trimmed)."""
    log, dead = published_table(table), dead_table(table)
    event_ids = list({r.target_event_id for r in rows})
    answers: dict[tuple[Any, str], Target] = {}
    for found in conn.execute(
        sa.select(
            log.c.event_id,
            log.c.channel,
            log.c.message_serial,
            log.c.idempotency_key,
            log.c.queued_at,
            log.c.published_at,
        ).where(log.c.event_id.in_(event_ids), message_lookup(log))
    ):
        # Without a serial, its answer had no receipt: the repeat of a publish a batch made
        # (Sockudo's cache holds "1" for a batch item, not its answer), or a retry that reached
        # a node of another region. Its serial, if any, is in the channel's history.
        answers[(found.event_id, found.channel)] = found.message_serial or UnknownSerial(
            message_id=found.idempotency_key,
            sent_after=found.queued_at,
            sent_before=found.published_at,
        )
    for found in conn.execute(
        sa.select(dead.c.event_id, dead.c.channel, dead.c.last_error_message).where(
            dead.c.event_id.in_(event_ids)
        )
    ):
        answers.setdefault(
            (found.event_id, found.channel),
            EventRefused(
                f"the event this mutation acts on is dead ({found.last_error_message})",
                code="target_dead",
            ),
        )
    return {
        row.id: answers[(row.target_event_id, row.channel)]
        for row in rows
        if (row.target_event_id, row.channel) in answers
    }


def targets_remember(conn: sa.Connection, table: sa.Table, found: Sequence[FoundSerial]) -> int:
    """Store the serials found in history on the log rows published without a receipt (the next
    mutation of each message finds it there, without a lookup)."""
    log = published_table(table)
    stored = 0
    for item in found:
        stmt = (
            sa.update(log)
            .where(
                log.c.event_id == item.event_id,
                log.c.channel == item.channel,
                message_lookup(log),  # (as the index states it: the row is found by it)
                log.c.message_serial.is_(None),
            )
            .values(
                message_serial=item.message_serial,
                acknowledgement_id=sa.func.coalesce(log.c.acknowledgement_id, item.message_serial),
            )
        )
        stored += conn.execute(stmt).rowcount
    return stored

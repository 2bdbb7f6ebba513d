"""What the dashboard and the CLI look up: one event's record, searches, the queue (pending and
in flight, and what each waits for), the dead list and the throughput chart."""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from dataclasses import dataclass, fields
from typing import Any

import sqlalchemy as sa

from ..schema import (
    WAITING_FOR_KEY,
    Status,
    utc_now,
)
from ..sockudo.crypto import ENCRYPTED_PREFIX
from .events import events, hot_state, waits_for_message
from .selection import EVERY_EVENT, ReplayFilter, select_matching


@dataclass(frozen=True)
class EventRecord:
    """One row as an operator reads it: where the event is in its life, and why.

    ``data`` is the payload as stored, except on encrypted channels: their rows hold the plaintext
    until it is sealed at send time, so it is never read out of the table (``data`` is None and
    ``encrypted`` True).
    """

    id: int
    event_id: uuid.UUID
    idempotency_key: str
    channel: str
    event: str
    status: str
    #: Times the row was claimed to be sent.
    attempts: int
    #: Failed attempts charged to the event (its budget).
    failures: int
    created_at: dt.datetime
    #: When it last entered the queue: enqueue, or a replay.
    queued_at: dt.datetime
    next_attempt_at: dt.datetime
    lease_expires_at: dt.datetime | None
    published_at: dt.datetime | None
    acknowledgement_id: str | None
    message_serial: str | None
    history_serial: str | None
    last_error_status: int | None
    last_error_code: str | None
    last_error_message: str | None
    last_error_at: dt.datetime | None
    socket_id: str | None
    info: str | None
    tags: str | None
    extras: str | None
    encrypted: bool
    data: str | None


_STORED_FIELDS = [f.name for f in fields(EventRecord) if f.name not in ("encrypted", "data")]


def _record_columns(table: sa.Subquery) -> list[sa.ColumnElement[Any]]:
    t = table
    # substr, not LIKE: SQLite's LIKE ignores case, and the prefix is case-sensitive.
    encrypted = sa.func.substr(t.c.channel, 1, len(ENCRYPTED_PREFIX)) == ENCRYPTED_PREFIX
    return [
        *(t.c[name] for name in _STORED_FIELDS),
        encrypted.label("encrypted"),
        sa.case((encrypted, sa.null()), else_=t.c.data).label("data"),
    ]


def _records(conn: sa.Connection, query: sa.Select[Any]) -> list[EventRecord]:
    return [
        EventRecord(**{**r._mapping, "encrypted": bool(r.encrypted)}) for r in conn.execute(query)
    ]


#: Largest row id a search text is compared with (a BIGINT).
MAX_ROW_ID = 2**63 - 1


def find_events(
    conn: sa.Connection, table: sa.Table, text: str, limit: int = 50
) -> list[EventRecord]:
    """The rows whose event id, idempotency key, channel or row id is exactly ``text``, newest
    first, at most ``limit``: an event's whole life (all its channels' rows), or a channel's."""
    # The first page of a search: one reading of ``text`` for both.
    return search_events(conn, table, text, limit)


def search_events(
    conn: sa.Connection,
    table: sa.Table,
    text: str,
    limit: int = 50,
    before_id: int | None = None,
) -> list[EventRecord]:
    """A page of :func:`find_events`: the rows ``text`` names with an id below ``before_id``
    (None: from the newest), newest first, at most ``limit``. The next page starts below the
    last row's id."""
    text = text.strip()
    if not text or "\x00" in text:
        # Nothing stored holds a NUL (enqueue refuses it), and PostgreSQL refuses it in any text.
        return []
    t = events(table)
    matches = [t.c.idempotency_key == text, t.c.channel == text]
    with contextlib.suppress(ValueError):
        matches.append(t.c.event_id == uuid.UUID(text))
    if text.isascii() and text.isdigit() and int(text) <= MAX_ROW_ID:
        matches.append(t.c.id == int(text))
    query = sa.select(*_record_columns(t)).where(sa.or_(*matches))
    if before_id is not None:
        query = query.where(t.c.id < before_id)
    return _records(conn, query.order_by(t.c.id.desc()).limit(limit))


def event_record(conn: sa.Connection, table: sa.Table, row_id: int) -> EventRecord | None:
    """The row ``row_id``, wherever it is in its life (None if there is none)."""
    if not 0 < row_id <= MAX_ROW_ID:
        return None
    t = events(table)
    found = _records(conn, sa.select(*_record_columns(t)).where(t.c.id == row_id))
    return found[0] if found else None


def dead_events(
    conn: sa.Connection,
    table: sa.Table,
    selection: ReplayFilter = EVERY_EVENT,
    limit: int = 50,
    after_id: int = 0,
) -> list[EventRecord]:
    """The rows ``selection`` matches (dead ones unless it names other statuses) with an id above
    ``after_id``, oldest first, at most ``limit``: the page a replay of ``selection`` starts with.
    """
    ev = events(table)
    return _records(conn, select_matching(ev, selection, _record_columns(ev), limit, after_id))


@dataclass(frozen=True)
class ThroughputBucket:
    """What happened to events in ``[start, start + bucket_seconds)``."""

    start: dt.datetime
    published: int
    retried: int
    dead: int


def throughput(
    conn: sa.Connection,
    table: sa.Table,
    since: dt.datetime,
    bucket_seconds: int,
    until: dt.datetime | None = None,
) -> list[ThroughputBucket]:
    """Published, retried and dead events per ``bucket_seconds`` from ``since`` to ``until`` (now).

    ``published`` counts rows by ``published_at``. The table keeps only each row's **last** error
    time, so the other two are approximations read from it: ``dead`` counts dead rows by their
    last error (the failure that made them dead), and ``retried`` counts every other row whose
    last error falls in the bucket, once, however many times it failed before (and a replay
    clears a row's errors). Rows deleted by retention are not counted. The last bucket ends at
    ``until`` and may be shorter than the others.
    """
    if bucket_seconds <= 0:
        raise ValueError(f"bucket_seconds must be positive, got {bucket_seconds}")
    until = dt.datetime.now(dt.UTC) if until is None else until
    step = dt.timedelta(seconds=bucket_seconds)
    count = max(1, -(-(until - since) // step))
    starts = [since + i * step for i in range(count)]
    t = events(table)
    published = _per_bucket(
        conn, t.c.published_at, starts, until, t.c.status == Status.PUBLISHED.value
    )
    dead_rows = t.c.status == Status.DEAD.value
    dead = _per_bucket(conn, t.c.last_error_at, starts, until, dead_rows)
    retried = _per_bucket(conn, t.c.last_error_at, starts, until, sa.not_(dead_rows))
    return [
        ThroughputBucket(start, published[i], retried[i], dead[i]) for i, start in enumerate(starts)
    ]


def _per_bucket(
    conn: sa.Connection,
    column: sa.ColumnElement[dt.datetime],
    starts: list[dt.datetime],
    until: dt.datetime,
    where: sa.ColumnElement[bool],
) -> list[int]:
    """Rows matching ``where`` counted by the bucket ``column`` falls in (one scan, portable)."""
    # The bucket number as a CASE over the bucket edges: no dialect's date arithmetic needed.
    last = len(starts) - 1
    edges = [(column < start, i) for i, start in enumerate(starts[1:])]
    index = sa.case(*edges, else_=last) if edges else sa.literal(last)
    inner = (
        sa.select(index.label("bucket"))
        .where(where, column >= starts[0], column < until)
        .subquery()
    )
    counts = [0] * len(starts)
    for bucket, n in conn.execute(
        sa.select(inner.c.bucket, sa.func.count()).group_by(inner.c.bucket)
    ):
        counts[int(bucket)] = int(n)
    return counts


#: Why a pending row is not due even though its time has come (:attr:`QueuedEvent.waiting_for`).
WAITING_FOR_MESSAGE = "message"


WAITING_FOR_ITS_KEY = "key"


@dataclass(frozen=True)
class QueuedEvent:
    """A row still to be sent, as the queue's list shows it: where it stands and why."""

    id: int
    event_id: uuid.UUID
    channel: str
    event: str
    #: ``pending`` or ``in_flight`` (a lease that has not expired).
    state: str
    attempts: int
    failures: int
    created_at: dt.datetime
    next_attempt_at: dt.datetime
    lease_expires_at: dt.datetime | None
    ordering_key: str | None
    #: None for a publish; else the mutation this row is (``update``, ``append``, ...).
    operation: str | None
    #: ``key``: behind an earlier event of its ordering key; ``message``: a mutation whose
    #: message is not published yet; None: due at ``next_attempt_at``.
    waiting_for: str | None
    last_error_status: int | None
    last_error_code: str | None
    last_error_message: str | None


def queued_events(
    conn: sa.Connection,
    table: sa.Table,
    state: str,
    limit: int = 50,
    after_id: int = 0,
) -> list[QueuedEvent]:
    """The hot table's rows in ``state`` (``pending`` or ``in_flight``) with an id above
    ``after_id``, oldest first, at most ``limit``: a page of the queue. Reads the hot table
    only (its size is the backlog, never the history)."""
    hot = table
    leased = hot.c.lease_expires_at > utc_now()
    if state == Status.IN_FLIGHT.value:
        in_state: sa.ColumnElement[bool] = leased
    elif state == Status.PENDING.value:
        in_state = sa.or_(hot.c.lease_expires_at.is_(None), sa.not_(leased))
    else:
        raise ValueError(f"the queue holds pending and in_flight rows, not {state!r}")
    waiting_for = sa.case(
        (waits_for_message(hot), WAITING_FOR_MESSAGE),
        (hot.c.next_attempt_at == WAITING_FOR_KEY, WAITING_FOR_ITS_KEY),
        else_=sa.null(),
    )
    rows = conn.execute(
        sa.select(
            hot.c.id,
            hot.c.event_id,
            hot.c.channel,
            hot.c.event,
            hot_state(hot).label("state"),
            hot.c.attempts,
            hot.c.failures,
            hot.c.created_at,
            hot.c.next_attempt_at,
            hot.c.lease_expires_at,
            hot.c.ordering_key,
            hot.c.operation,
            waiting_for.label("waiting_for"),
            hot.c.last_error_status,
            hot.c.last_error_code,
            hot.c.last_error_message,
        )
        .where(in_state, hot.c.id > after_id)
        .order_by(hot.c.id)
        .limit(limit)
    )
    return [QueuedEvent(**r._mapping) for r in rows]

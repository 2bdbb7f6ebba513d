"""Operator queries: what is in the outbox (``status``) and putting events back in line (``replay``).

Portable SQLAlchemy Core: nothing here is on the hot path, so no dialect-specific SQL is needed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa

from .dialects import dialect_for
from .schema import Status, utc_now

#: How a replayed event is identified to the server (see :func:`replay`).
KEY_FRESH = "fresh"
KEY_KEEP = "keep"


@dataclass
class StatusReport:
    counts: dict[str, int]
    oldest_pending_age_seconds: float | None
    dead: int
    last_errors: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def status(conn: sa.Connection, table: sa.Table, errors: int = 5) -> StatusReport:
    """Counts per status, age of the oldest pending event, and the most recent errors."""
    t = table
    counts = {s.value: 0 for s in Status}
    for state, count in conn.execute(sa.select(t.c.status, sa.func.count()).group_by(t.c.status)):
        counts[state] = count
    oldest = conn.execute(
        sa.select(sa.func.min(t.c.created_at)).where(
            t.c.status.in_([Status.PENDING.value, Status.IN_FLIGHT.value])
        )
    ).scalar()
    age = None
    if oldest is not None:
        age = max(0.0, (dt.datetime.now(dt.UTC) - oldest).total_seconds())
    rows = conn.execute(
        sa.select(
            t.c.id,
            t.c.event_id,
            t.c.channel,
            t.c.event,
            t.c.status,
            t.c.attempts,
            t.c.last_error_status,
            t.c.last_error_code,
            t.c.last_error_message,
            t.c.last_error_at,
        )
        .where(t.c.last_error_at.is_not(None))
        .order_by(t.c.last_error_at.desc(), t.c.id.desc())
        .limit(errors)
    )
    last_errors = [_jsonable(dict(r._mapping)) for r in rows]
    return StatusReport(counts, age, counts[Status.DEAD.value], last_errors)


@dataclass(frozen=True)
class ReplayFilter:
    """Which events to replay. Empty filters match every row of the chosen statuses."""

    statuses: Sequence[str] = (Status.DEAD.value,)
    ids: Sequence[int] = ()
    event_ids: Sequence[uuid.UUID] = ()
    channel: str | None = None
    event: str | None = None
    error_code: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    limit: int | None = None

    def where(self, t: sa.Table) -> list[sa.ColumnElement[bool]]:
        clauses: list[sa.ColumnElement[bool]] = [t.c.status.in_(list(self.statuses))]
        if self.ids or self.event_ids:
            clauses.append(
                sa.or_(t.c.id.in_(list(self.ids)), t.c.event_id.in_(list(self.event_ids)))
            )
        if self.channel is not None:
            clauses.append(t.c.channel == self.channel)
        if self.event is not None:
            clauses.append(t.c.event == self.event)
        if self.error_code is not None:
            code = self.error_code
            match_status = t.c.last_error_status == int(code) if code.isdigit() else sa.false()
            clauses.append(sa.or_(t.c.last_error_code == code, match_status))
        if self.since is not None:
            clauses.append(t.c.created_at >= self.since)
        if self.until is not None:
            clauses.append(t.c.created_at < self.until)
        return clauses


#: Replay works through its selection in pages of this many rows, one short transaction each.
REPLAY_PAGE = 1_000

_REPLAY_COLUMNS = (
    "id",
    "event_id",
    "idempotency_key",
    "channel",
    "event",
    "status",
    "attempts",
    "last_error_status",
    "last_error_code",
    "last_error_message",
    "created_at",
)


def count_for_replay(conn: sa.Connection, table: sa.Table, selection: ReplayFilter) -> int:
    """How many rows ``selection`` matches (``limit`` included), without loading them."""
    matching = sa.select(table.c.id).where(*selection.where(table))
    if selection.limit is not None:
        matching = matching.limit(selection.limit)
    return conn.execute(sa.select(sa.func.count()).select_from(matching.subquery())).scalar_one()


def select_for_replay(
    conn: sa.Connection,
    table: sa.Table,
    selection: ReplayFilter,
    limit: int | None = None,
    after_id: int = 0,
) -> list[dict[str, Any]]:
    """The selected rows with an id above ``after_id``, oldest first, at most ``limit`` of them."""
    t = table
    query = (
        sa.select(*(t.c[name] for name in _REPLAY_COLUMNS))
        .where(*selection.where(t), t.c.id > after_id)
        .order_by(t.c.id)
    )
    bound = [n for n in (limit, selection.limit) if n is not None]
    if bound:
        query = query.limit(min(bound))
    return [_jsonable(dict(r._mapping)) for r in conn.execute(query)]


def replay(
    conn: sa.Connection,
    table: sa.Table,
    selection: ReplayFilter,
    key: str = KEY_FRESH,
    page: int = REPLAY_PAGE,
) -> int:
    """Move the selected events back to pending with a fresh attempt budget; returns how many.

    With ``key="fresh"`` (the default) each event gets a new idempotency key and message_id, so the
    server publishes it even inside its deduplication window: a published event replayed with its
    old key would be answered from the server's cache and not delivered, and a failed one would get
    ``503 backpressure`` until the window ends. ``key="keep"`` keeps the key, for replays meant to be
    deduplicated against an earlier delivery.

    Rows are read and updated a page at a time, so memory stays flat however many match. All of
    it happens in the caller's transaction; :func:`replay_in_pages` commits page by page.
    """
    return sum(_replay_pages(lambda: contextlib.nullcontext(conn), table, selection, key, page))


def replay_in_pages(
    engine: sa.Engine,
    table: sa.Table,
    selection: ReplayFilter,
    key: str = KEY_FRESH,
    page: int = REPLAY_PAGE,
) -> Iterator[int]:
    """Replay in one short transaction per page; yields the count of each committed page.

    For replays after a long outage (millions of rows): no lock is held for long, memory stays
    flat, and an interrupted replay has committed what it reports (run it again to finish).
    """
    return _replay_pages(engine.begin, table, selection, key, page)


def _replay_pages(
    transaction: Callable[[], contextlib.AbstractContextManager[sa.Connection]],
    table: sa.Table,
    selection: ReplayFilter,
    key: str,
    page: int,
) -> Iterator[int]:
    after_id = 0
    remaining = selection.limit
    while remaining is None or remaining > 0:
        size = page if remaining is None else min(page, remaining)
        with transaction() as conn:
            ids = _page_ids(conn, table, selection, size, after_id)
            if not ids:
                return
            changed = _replay_ids(conn, table, selection, key, ids)
        yield changed
        after_id = ids[-1]
        if remaining is not None:
            remaining -= len(ids)
        if len(ids) < size:
            return


def _page_ids(
    conn: sa.Connection, table: sa.Table, selection: ReplayFilter, size: int, after_id: int
) -> list[int]:
    t = table
    query = (
        sa.select(t.c.id).where(*selection.where(t), t.c.id > after_id).order_by(t.c.id).limit(size)
    )
    return list(conn.execute(query).scalars())


def _replay_ids(
    conn: sa.Connection, table: sa.Table, selection: ReplayFilter, key: str, ids: list[int]
) -> int:
    new_keys = None if key == KEY_KEEP else [str(uuid.uuid4()) for _ in ids]
    return dialect_for(conn).replay(conn, table, ids, selection.statuses, new_keys)


# -- leases -------------------------------------------------------------------------------------


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
    """(rows leased, of which expired, the oldest ``limit`` leases) by expiry."""
    t = table
    now = utc_now()
    in_flight = t.c.status == Status.IN_FLIGHT.value
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
    return dialect_for(conn).release_leases(conn, table, expired_only)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, dt.datetime):
            out[k] = v.isoformat()
        elif isinstance(v, uuid.UUID):
            out[k] = str(v)
        else:
            out[k] = v
    return out

"""Operator queries: what is in the outbox (``status``) and putting events back in line (``replay``).

Portable SQLAlchemy Core: nothing here is on the hot path, so no dialect-specific SQL is needed.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa

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
        sa.select(sa.func.min(t.c.created_at)).where(t.c.status.in_(["pending", "in_flight"]))
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
    return StatusReport(counts, age, counts["dead"], last_errors)


@dataclass(frozen=True)
class ReplayFilter:
    """Which events to replay. Empty filters match every row of the chosen statuses."""

    statuses: Sequence[str] = ("dead",)
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


def select_for_replay(
    conn: sa.Connection, table: sa.Table, selection: ReplayFilter
) -> list[dict[str, Any]]:
    t = table
    query = (
        sa.select(
            t.c.id,
            t.c.event_id,
            t.c.idempotency_key,
            t.c.channel,
            t.c.event,
            t.c.status,
            t.c.attempts,
            t.c.last_error_status,
            t.c.last_error_code,
            t.c.last_error_message,
            t.c.created_at,
        )
        .where(*selection.where(t))
        .order_by(t.c.id)
    )
    if selection.limit is not None:
        query = query.limit(selection.limit)
    return [_jsonable(dict(r._mapping)) for r in conn.execute(query)]


def replay(
    conn: sa.Connection, table: sa.Table, selection: ReplayFilter, key: str = KEY_FRESH
) -> int:
    """Move the selected events back to pending with a fresh attempt budget; returns how many.

    With ``key="fresh"`` (the default) each event gets a new idempotency key and message_id, so the
    server publishes it even inside its deduplication window: a published event replayed with its
    old key would be answered from the server's cache and not delivered, and a failed one would get
    ``503 backpressure`` until the window ends. ``key="keep"`` keeps the key, for replays meant to be
    deduplicated against an earlier delivery.
    """
    t = table
    ids = [row["id"] for row in select_for_replay(conn, table, selection)]
    if not ids:
        return 0
    statuses = list(selection.statuses)
    values: dict[str, Any] = {
        "status": Status.PENDING.value,
        # A kept key may still be known to the server: such a row must go alone through
        # /events (a batch would skip it and answer 200 without delivering it), and a row
        # with one attempt on record is sent alone. A fresh key is new to the server: batchable.
        "attempts": 1 if key == KEY_KEEP else 0,
        "next_attempt_at": utc_now(),
        "lease_token": None,
        "lease_expires_at": None,
        "published_at": None,
        "acknowledgement_id": None,
        "message_serial": None,
        "history_serial": None,
        "last_error_status": None,
        "last_error_code": None,
        "last_error_message": None,
        "last_error_at": None,
    }
    # Plain comparisons, not IN: an IN list is an "expanding" parameter, which executemany
    # refuses (every replay failed with "'expanding' parameters can't be used with executemany").
    guard = sa.and_(
        t.c.id == sa.bindparam("row_id"), sa.or_(*(t.c.status == state for state in statuses))
    )
    if key == KEY_KEEP:
        stmt = sa.update(t).where(guard).values(**values)
        params = [{"row_id": i} for i in ids]
    else:
        stmt = sa.update(t).where(guard).values(**values, idempotency_key=sa.bindparam("new_key"))
        params = [{"row_id": i, "new_key": str(uuid.uuid4())} for i in ids]
    changed = 0
    for start in range(0, len(params), 1000):
        result = conn.execute(stmt, params[start : start + 1000])
        changed += result.rowcount if result.rowcount >= 0 else len(params[start : start + 1000])
    return changed


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

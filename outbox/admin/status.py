"""What is in the outbox: counts and lags per state, and the last errors (``outbox status``,
the dashboard's header and the worker's queue gauges all read :func:`snapshot`)."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa

from ..schema import (
    WAITING_FOR_KEY,
    Status,
    dead_table,
    parked_table,
    published_table,
)
from .events import events, hot_state, jsonable, waits_for_message

#: The states of a row that is not yet (or never will be) published: what the gauges watch.
UNSENT_STATES = (Status.PENDING.value, Status.IN_FLIGHT.value, Status.DEAD.value)


@dataclass
class StatusReport:
    """What is in the outbox now (see :func:`snapshot`).

    ``oldest_age_seconds`` is, per state, how long ago its oldest row was created (None when the
    state is empty): the lag of that state. ``published`` appears in ``counts`` and
    ``oldest_age_seconds`` only for a full report; ``published_last_minute`` is None unless asked,
    and ``waiting_mutations`` and ``waiting_for_key`` are counted only for a full report.
    """

    counts: dict[str, int]
    #: Age of the oldest event not yet published (pending or in flight): the figure to alert on.
    oldest_pending_age_seconds: float | None
    dead: int
    last_errors: list[dict[str, Any]] = field(default_factory=list)
    oldest_age_seconds: dict[str, float | None] = field(default_factory=dict)
    published_last_minute: int | None = None
    #: Ordering keys waiting behind a dead head (``outbox keys`` lists them).
    parked_keys: int = 0
    #: Mutations whose message's own event is not published yet.
    waiting_mutations: int = 0
    #: Keyed events waiting behind an earlier event of their key (pending, not yet due).
    waiting_for_key: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def snapshot(
    conn: sa.Connection,
    table: sa.Table,
    *,
    published: bool = True,
    errors: int = 0,
    now: dt.datetime | None = None,
) -> StatusReport:
    """Counts and lags per state, and (``errors``) the most recent errors of unsent rows.

    The one place that reads the outbox's state: ``outbox status``, the dashboard and the
    worker's gauges all come here. With ``published=False`` (the gauges) it reads only the hot
    table and the dead table: its cost follows the rows waiting or dead, never the published
    history (measured by ``python -m outbox.bench``). A full report (``published=True``) also
    counts the published log and what it gained in the last minute, which scans the log.
    """
    hot, dead, log = table, dead_table(table), published_table(table)
    now = dt.datetime.now(dt.UTC) if now is None else now
    states = [s.value for s in Status] if published else list(UNSENT_STATES)
    counts = dict.fromkeys(states, 0)
    oldest: dict[str, dt.datetime | None] = dict.fromkeys(states)
    state = hot_state(hot).label("state")
    per_state = [
        sa.select(state, sa.func.count(), sa.func.min(hot.c.created_at)).group_by(state),
        sa.select(sa.literal(Status.DEAD.value), sa.func.count(), sa.func.min(dead.c.created_at)),
    ]
    if published:
        per_state.append(
            sa.select(
                sa.literal(Status.PUBLISHED.value), sa.func.count(), sa.func.min(log.c.created_at)
            )
        )
    for query in per_state:
        for name, count, first in conn.execute(query):
            counts[name], oldest[name] = int(count), first
    ages = {name: _age(now, first) for name, first in oldest.items()}
    unsent = [
        a for a in (ages[Status.PENDING.value], ages[Status.IN_FLIGHT.value]) if a is not None
    ]
    report = StatusReport(
        counts=counts,
        oldest_pending_age_seconds=max(unsent) if unsent else None,
        dead=counts[Status.DEAD.value],
        oldest_age_seconds=ages,
        parked_keys=conn.execute(
            sa.select(sa.func.count()).select_from(parked_table(table))
        ).scalar_one(),
    )
    if published:
        # For people, not for the gauges: the mutation count reads every mutation row waiting.
        report.waiting_mutations = conn.execute(
            sa.select(sa.func.count()).where(waits_for_message(hot))
        ).scalar_one()
        # Held out of the claim's way for their key (mutations held for their message only
        # are counted above).
        report.waiting_for_key = conn.execute(
            sa.select(sa.func.count()).where(
                hot.c.next_attempt_at == WAITING_FOR_KEY, sa.not_(waits_for_message(hot))
            )
        ).scalar_one()
        since = now - dt.timedelta(seconds=60)
        report.published_last_minute = conn.execute(
            sa.select(sa.func.count()).where(log.c.published_at >= since)
        ).scalar_one()
    if errors:
        report.last_errors = _last_errors(conn, table, errors)
    return report


def status(conn: sa.Connection, table: sa.Table, errors: int = 5) -> StatusReport:
    """The full report: counts and lag of every state, throughput, the most recent errors."""
    return snapshot(conn, table, published=True, errors=errors)


def _age(now: dt.datetime, then: dt.datetime | None) -> float | None:
    return None if then is None else max(0.0, (now - then).total_seconds())


def _last_errors(conn: sa.Connection, table: sa.Table, limit: int) -> list[dict[str, Any]]:
    """The most recent errors of rows not published: a published row's old error (a retry that
    then succeeded) is history, not a problem to show."""
    ev = events(table)
    rows = conn.execute(
        sa.select(
            ev.c.id,
            ev.c.event_id,
            ev.c.channel,
            ev.c.event,
            ev.c.status,
            ev.c.attempts,
            ev.c.last_error_status,
            ev.c.last_error_code,
            ev.c.last_error_message,
            ev.c.last_error_at,
        )
        .where(ev.c.last_error_at.is_not(None), ev.c.status.in_(UNSENT_STATES))
        .order_by(ev.c.last_error_at.desc(), ev.c.id.desc())
        .limit(limit)
    )
    return [jsonable(dict(r._mapping)) for r in rows]

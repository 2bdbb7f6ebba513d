"""Operator queries: what is in the outbox (``status``), putting events back in line (``replay``),
deleting dead ones (``delete_dead``), and what the dashboard reads (``throughput``,
``find_events``, ``search_events``, ``dead_events``, ``queued_events``).

Portable SQLAlchemy Core: nothing here is on the hot path, so no dialect-specific SQL is needed.
Every read the CLI and the dashboard make goes through these functions and their dataclasses. An
event lives in one of three tables (hot, dead, published log); :func:`events` reads them as one,
with the ``status`` each row has where it is.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import sqlalchemy as sa

from .dialects import dialect_for
from .schema import (
    ERROR_CODE_MAX,
    EVENT_COLUMNS,
    WAITING_FOR_KEY,
    Status,
    dead_table,
    parked_table,
    published_table,
    utc_now,
)
from .sockudo.crypto import ENCRYPTED_PREFIX

#: How a replayed event is identified to the server (see :func:`replay`).
KEY_FRESH = "fresh"
KEY_KEEP = "keep"


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


def events(table: sa.Table) -> sa.Subquery:
    """Every row of the outbox's three tables as one, with a ``status`` column.

    A hot row is ``in_flight`` while its lease holds and ``pending`` otherwise (an expired lease
    is claimable again). Filters on the result reach each table's own indexes.
    """
    hot, dead, log = table, dead_table(table), published_table(table)
    return sa.union_all(
        sa.select(*(hot.c[c] for c in EVENT_COLUMNS), _hot_state(hot).label("status")),
        sa.select(
            *(dead.c[c] for c in EVENT_COLUMNS), sa.literal(Status.DEAD.value).label("status")
        ),
        sa.select(
            *(log.c[c] for c in EVENT_COLUMNS), sa.literal(Status.PUBLISHED.value).label("status")
        ),
    ).subquery("events")


def _hot_state(hot: sa.Table) -> sa.ColumnElement[str]:
    leased = hot.c.lease_expires_at > utc_now()
    return sa.case((leased, Status.IN_FLIGHT.value), else_=Status.PENDING.value)


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
    state = _hot_state(hot).label("state")
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
            sa.select(sa.func.count()).where(_waits_for_target(hot))
        ).scalar_one()
        # Held out of the claim's way for their key (mutations held for their message only
        # are counted above).
        report.waiting_for_key = conn.execute(
            sa.select(sa.func.count()).where(
                hot.c.next_attempt_at == WAITING_FOR_KEY, sa.not_(_waits_for_target(hot))
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
    return [_jsonable(dict(r._mapping)) for r in rows]


#: The times a filter may name, once in UTC: what every supported database can store and compare
#: (MariaDB's DATETIME ends with 9999; nothing was created before 1970).
FILTER_TIMES = (
    dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
    dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
)
#: The HTTP statuses an error filter may name (the statuses a row can keep).
FILTER_STATUSES = range(100, 1000)


class FilterError(ValueError):
    """A filter value that cannot be used; ``field`` is the :class:`ReplayFilter` field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def filter_time(field: str, moment: dt.datetime) -> dt.datetime:
    """``moment`` in UTC (without a zone: taken as UTC), if :data:`FILTER_TIMES` holds it.

    Raises :class:`FilterError`: a year outside the range (or one that leaves the calendar once
    converted, like ``0001-01-01T00:00+01:00``) must not reach the database.
    """
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)
    try:
        utc = aware.astimezone(dt.UTC)
    except OverflowError:
        utc = None
    first, last = FILTER_TIMES
    if utc is None or not first <= utc <= last:
        raise FilterError(
            field, f"a time from 1970 to 9999 (in UTC) is expected, got {moment.isoformat()}"
        )
    return utc


def filter_error_code(text: str) -> str:
    """An error filter, checked: an HTTP status (ASCII digits, 100 to 999) or an error code that
    fits its column (printable, at most ``ERROR_CODE_MAX`` characters). Raises
    :class:`FilterError` otherwise: ``"²"`` or twenty digits must not be compared as a status."""
    if text.isdigit():
        if not (text.isascii() and len(text) <= 3 and int(text) in FILTER_STATUSES):
            raise FilterError(
                "error_code", f"an HTTP status is 100 to 999 in ASCII digits, got {text[:40]!r}"
            )
        return text
    if not text or len(text) > ERROR_CODE_MAX or not text.isprintable():
        raise FilterError(
            "error_code",
            f"an error code is 1 to {ERROR_CODE_MAX} printable characters, got {text[:40]!r}",
        )
    return text


@dataclass(frozen=True)
class ReplayFilter:
    """Which events to replay. Empty filters match every row of the chosen statuses.

    Values are checked when it is made (:class:`FilterError`), so a filter that reaches the
    database holds nothing the database would refuse or overflow on.
    """

    statuses: Sequence[str] = (Status.DEAD.value,)
    #: Rows named by row id, event id or idempotency key (any of them matches).
    ids: Sequence[int] = ()
    event_ids: Sequence[uuid.UUID] = ()
    keys: Sequence[str] = ()
    channel: str | None = None
    event: str | None = None
    error_code: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if any("\x00" in key for key in self.keys):
            raise FilterError("keys", "an idempotency key with a NUL character matches nothing")
        for name in ("channel", "event"):
            value = getattr(self, name)
            if value is not None and "\x00" in value:
                # No channel or event name holds one, and PostgreSQL refuses it in any text.
                raise FilterError(name, "a NUL character matches nothing")
        if self.error_code is not None:
            filter_error_code(self.error_code)
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                filter_time(name, value)

    def where(self, t: sa.Table | sa.Subquery) -> list[sa.ColumnElement[bool]]:
        clauses: list[sa.ColumnElement[bool]] = [t.c.status.in_(list(self.statuses))]
        if self.ids or self.event_ids or self.keys:
            clauses.append(
                sa.or_(
                    t.c.id.in_(list(self.ids)),
                    t.c.event_id.in_(list(self.event_ids)),
                    t.c.idempotency_key.in_(list(self.keys)),
                )
            )
        if self.channel is not None:
            clauses.append(t.c.channel == self.channel)
        if self.event is not None:
            clauses.append(t.c.event == self.event)
        if self.error_code is not None:
            code = self.error_code
            status = code.isascii() and code.isdigit()
            match_status = t.c.last_error_status == int(code) if status else sa.false()
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


def _matching(
    rows: sa.Subquery,
    selection: ReplayFilter,
    columns: Sequence[sa.ColumnElement[Any]],
    limit: int | None = None,
    after_id: int = 0,
) -> sa.Select[Any]:
    """``columns`` of the :func:`events` ``rows`` that ``selection`` matches above ``after_id``,
    oldest first, at most ``limit`` and ``selection.limit`` of them."""
    query = (
        sa.select(*columns).where(*selection.where(rows), rows.c.id > after_id).order_by(rows.c.id)
    )
    bound = [n for n in (limit, selection.limit) if n is not None]
    if bound:
        query = query.limit(min(bound))
    return query


def count_for_replay(conn: sa.Connection, table: sa.Table, selection: ReplayFilter) -> int:
    """How many rows ``selection`` matches (``limit`` included), without loading them."""
    ev = events(table)
    matching = sa.select(ev.c.id).where(*selection.where(ev))
    if selection.limit is not None:
        matching = matching.limit(selection.limit)
    return conn.execute(sa.select(sa.func.count()).select_from(matching.subquery())).scalar_one()


def count_elsewhere(
    conn: sa.Connection, table: sa.Table, selection: ReplayFilter
) -> dict[str, int]:
    """How many rows ``selection`` would match in each of the other states (its ``limit``
    aside): why a replay of dead rows found nothing, when the rows are pending or published."""
    others = [s.value for s in Status if s.value not in selection.statuses]
    if not others:
        return {}
    ev = events(table)
    anywhere = replace(selection, statuses=others, limit=None)
    query = sa.select(ev.c.status, sa.func.count()).where(*anywhere.where(ev)).group_by(ev.c.status)
    found = {status: int(n) for status, n in conn.execute(query)}
    return {status: found[status] for status in others if found.get(status)}


def select_for_replay(
    conn: sa.Connection,
    table: sa.Table,
    selection: ReplayFilter,
    limit: int | None = None,
    after_id: int = 0,
) -> list[dict[str, Any]]:
    """The selected rows with an id above ``after_id``, oldest first, at most ``limit`` of them."""
    ev = events(table)
    columns = [ev.c[name] for name in _REPLAY_COLUMNS]
    query = _matching(ev, selection, columns, limit, after_id)
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
    ev = events(table)
    return list(conn.execute(_matching(ev, selection, [ev.c.id], size, after_id)).scalars())


def _replay_ids(
    conn: sa.Connection, table: sa.Table, selection: ReplayFilter, key: str, ids: list[int]
) -> int:
    new_keys = None if key == KEY_KEEP else [str(uuid.uuid4()) for _ in ids]
    return dialect_for(conn).replay(conn, table, ids, selection.statuses, new_keys)


# -- what the dashboard reads --------------------------------------------------------------------


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
    query = sa.select(*_record_columns(t)).where(sa.or_(*matches)).order_by(t.c.id.desc())
    return _records(conn, query.limit(limit))


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
    selection: ReplayFilter = ReplayFilter(),
    limit: int = 50,
    after_id: int = 0,
) -> list[EventRecord]:
    """The rows ``selection`` matches (dead ones unless it names other statuses) with an id above
    ``after_id``, oldest first, at most ``limit``: the page a replay of ``selection`` starts with.
    """
    ev = events(table)
    return _records(conn, _matching(ev, selection, _record_columns(ev), limit, after_id))


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


# -- ordering keys and mutations -----------------------------------------------------------------


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
        return _jsonable(asdict(self))


def parked_keys(
    conn: sa.Connection, table: sa.Table, limit: int = 100
) -> tuple[int, list[ParkedKey]]:
    """(how many keys are parked, the ``limit`` parked longest) with their heads' reasons."""
    hot, dead, parked = table, dead_table(table), parked_table(table)
    total = conn.execute(sa.select(sa.func.count()).select_from(parked)).scalar_one()
    waiting = (
        sa.select(sa.func.count())
        .where(hot.c.ordering_key == parked.c.ordering_key)
        .scalar_subquery()
    )
    rows = conn.execute(
        sa.select(
            parked.c.ordering_key,
            parked.c.row_id.label("head_id"),
            parked.c.parked_at,
            waiting.label("waiting"),
            dead.c.channel,
            dead.c.event,
            dead.c.last_error_code,
            dead.c.last_error_message,
        )
        .select_from(parked.outerjoin(dead, dead.c.id == parked.c.row_id))
        .order_by(parked.c.parked_at, parked.c.ordering_key)
        .limit(limit)
    )
    return int(total), [ParkedKey(**r._mapping) for r in rows]


def skip_parked(conn: sa.Connection, table: sa.Table, keys: Sequence[str] | None) -> int:
    """Let parked keys go on without their dead heads (None: all); returns how many.

    The heads stay dead (replay them later if wanted: they then go after what is queued).
    """
    return dialect_for(conn).unpark(conn, table, keys)


def _waits_for_target(hot: sa.Table) -> sa.ColumnElement[bool]:
    """A hot mutation row whose message's event is still in the hot table (not yet published)."""
    target = hot.alias("target")
    return sa.and_(
        hot.c.target_event_id.is_not(None),
        sa.exists().where(
            target.c.event_id == hot.c.target_event_id, target.c.channel == hot.c.channel
        ),
    )


def parked_key(conn: sa.Connection, table: sa.Table, ordering_key: str) -> ParkedKey | None:
    """The parked key ``ordering_key`` with its head's reason, or None if it is not parked."""
    hot, dead, parked = table, dead_table(table), parked_table(table)
    waiting = (
        sa.select(sa.func.count())
        .where(hot.c.ordering_key == parked.c.ordering_key)
        .scalar_subquery()
    )
    found = conn.execute(
        sa.select(
            parked.c.ordering_key,
            parked.c.row_id.label("head_id"),
            parked.c.parked_at,
            waiting.label("waiting"),
            dead.c.channel,
            dead.c.event,
            dead.c.last_error_code,
            dead.c.last_error_message,
        )
        .select_from(parked.outerjoin(dead, dead.c.id == parked.c.row_id))
        .where(parked.c.ordering_key == ordering_key)
    ).first()
    return None if found is None else ParkedKey(**found._mapping)


# -- the queue: pending and in-flight rows ------------------------------------------------------

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
        (_waits_for_target(hot), WAITING_FOR_MESSAGE),
        (hot.c.next_attempt_at == WAITING_FOR_KEY, WAITING_FOR_ITS_KEY),
        else_=sa.null(),
    )
    rows = conn.execute(
        sa.select(
            hot.c.id,
            hot.c.event_id,
            hot.c.channel,
            hot.c.event,
            _hot_state(hot).label("state"),
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


# -- deleting dead events -----------------------------------------------------------------------


def parked_heads_among(conn: sa.Connection, table: sa.Table, selection: ReplayFilter) -> int:
    """How many of the dead rows ``selection`` matches (its ``limit`` included) are the heads
    parked keys wait behind: deleting them lets those keys go on (see :func:`delete_dead`)."""
    _only_dead(selection)
    ev, parked = events(table), parked_table(table)
    # A join, not IN: MariaDB refuses a LIMIT inside an IN subquery.
    matching = _matching(ev, selection, [ev.c.id]).subquery("matching")
    return conn.execute(
        sa.select(sa.func.count()).select_from(
            parked.join(matching, matching.c.id == parked.c.row_id)
        )
    ).scalar_one()


def delete_dead(
    conn: sa.Connection, table: sa.Table, selection: ReplayFilter, page: int = REPLAY_PAGE
) -> int:
    """Delete the dead events ``selection`` matches (at most its ``limit``, oldest first), for
    good; returns how many. All of it in the caller's transaction, a page at a time (flat
    memory); :func:`delete_dead_in_pages` commits page by page.

    A deleted row that is the head a parked key waits behind can never be replayed, so its key
    goes on without it, as ``outbox keys --skip`` would let it.
    """
    return sum(_delete_pages(lambda: contextlib.nullcontext(conn), table, selection, page))


def delete_dead_in_pages(
    engine: sa.Engine, table: sa.Table, selection: ReplayFilter, page: int = REPLAY_PAGE
) -> Iterator[int]:
    """:func:`delete_dead` in one short transaction per page; yields the count of each
    committed page (interrupted, it has deleted what it reported: run it again for the rest)."""
    return _delete_pages(engine.begin, table, selection, page)


def _only_dead(selection: ReplayFilter) -> None:
    if list(selection.statuses) != [Status.DEAD.value]:
        raise ValueError(f"only dead events are deleted, not {list(selection.statuses)}")


def _delete_pages(
    transaction: Callable[[], contextlib.AbstractContextManager[sa.Connection]],
    table: sa.Table,
    selection: ReplayFilter,
    page: int,
) -> Iterator[int]:
    _only_dead(selection)
    dead, parked = dead_table(table), parked_table(table)
    after_id = 0
    remaining = selection.limit
    while remaining is None or remaining > 0:
        size = page if remaining is None else min(page, remaining)
        with transaction() as conn:
            ids = _page_ids(conn, table, selection, size, after_id)
            if not ids:
                return
            heads = conn.execute(
                sa.select(parked.c.ordering_key).where(parked.c.row_id.in_(ids))
            ).scalars()
            keys = list(heads)
            if keys:
                dialect_for(conn).unpark(conn, table, keys)
            deleted = conn.execute(sa.delete(dead).where(dead.c.id.in_(ids))).rowcount
        yield deleted
        after_id = ids[-1]
        if remaining is not None:
            remaining -= len(ids)
        if len(ids) < size:
            return


def database_now(conn: sa.Connection) -> dt.datetime:
    """The database's clock, in UTC: what leases and parking times were set by, so ages shown
    against it do not depend on this host's clock."""
    return conn.execute(sa.select(utc_now())).scalar_one()


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

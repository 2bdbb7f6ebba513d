"""Which events an operator means: the filters of ``replay``, ``delete-dead`` and the dashboard's
search, checked (:class:`FilterError` names the bad one), as one :class:`ReplayFilter`."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ..schema import (
    ERROR_CODE_MAX,
    Status,
)

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


#: Every event, in any state: the selection of a search without filters.
EVERY_EVENT = ReplayFilter()


def select_matching(
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

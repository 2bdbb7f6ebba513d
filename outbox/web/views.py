"""What the dashboard shows and what its forms mean: pure functions from admin's data and the
submitted fields, tested without a server or a database."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from .. import admin, status_view
from ..admin import EventRecord, QueuedEvent, ReplayFilter, StatusReport, ThroughputBucket
from ..schema import ORDERING_KEY_MAX

#: Dead events per page of the list.
PAGE_SIZE = 50
#: Rows a replay preview shows.
SAMPLE = 10
#: Matches per page of a search (one line each).
SEARCH_LIMIT = 50
#: Rows per page of the pending and in-flight lists.
QUEUE_PAGE_SIZE = 50
#: The queue's lists: the path's name -> (the state, its title).
QUEUE_LISTS = {"pending": ("pending", "Pending"), "in-flight": ("in_flight", "In flight")}
#: The chart: one bar per minute over the last hour.
BUCKET_SECONDS = 60
BUCKETS = 60
#: Characters of a payload shown in the list (the search shows it whole).
LIST_PAYLOAD_CHARS = 2_000
#: Longest text taken from a filter field (longer than any channel or event name).
FIELD_MAX = 200

Form = Mapping[str, Sequence[str]]


class FormError(ValueError):
    """A field the operator filled in cannot be used; the message names it."""


def first(form: Form, name: str) -> str:
    values = form.get(name) or [""]
    return values[0].strip()[:FIELD_MAX]


def first_secret(form: Form, name: str) -> str:
    """A secret field exactly as typed (not stripped, not cut)."""
    values = form.get(name) or [""]
    return values[0]


def parse_after(text: str) -> int:
    """The row id a page of the list starts after (0: the first page)."""
    return parse_ids([text])[0] if text else 0


def parse_before(text: str) -> int | None:
    """The row id a page of newest-first results starts below (None: the first page)."""
    return parse_ids([text])[0] if text else None


def ordering_key(form: Form) -> str:
    """The ordering key a form names, exactly as stored (not stripped: a key may hold spaces)."""
    key = first_secret(form, "ordering_key")
    if not key or len(key) > ORDERING_KEY_MAX or "\x00" in key:
        raise FormError(f"ordering_key: 1 to {ORDERING_KEY_MAX} characters, without NUL")
    return key


def parse_time(name: str, text: str) -> dt.datetime | None:
    """An ISO 8601 time; one without a zone is UTC (as the page says). A time the database could
    not store (before 1970 or after 9999, in UTC) is the operator's to fix, not a database error."""
    if not text:
        return None
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise FormError(f"{name}: not an ISO 8601 time: {text!r}") from None
    try:
        return admin.filter_time(name, parsed)
    except admin.FilterError as exc:
        raise FormError(f"{name}: {exc}") from None


@dataclass(frozen=True)
class DeadQuery:
    """The dead list's filter, as typed: channel, event, error code or HTTP status, time range."""

    channel: str = ""
    event: str = ""
    error: str = ""
    since: str = ""
    until: str = ""

    FIELDS = ("channel", "event", "error", "since", "until")

    @classmethod
    def from_form(cls, form: Form) -> DeadQuery:
        return cls(**{name: first(form, name) for name in cls.FIELDS})

    def fields(self) -> dict[str, str]:
        """The fields filled in (for links and hidden inputs that carry the filter on)."""
        return {name: getattr(self, name) for name in self.FIELDS if getattr(self, name)}

    def selection(self, limit: int | None = None) -> ReplayFilter:
        """The dead rows this filter matches (raises :class:`FormError` on a value that cannot
        be used: a bad time, an error that is neither an HTTP status nor a code, ...)."""
        since, until = parse_time("since", self.since), parse_time("until", self.until)
        try:
            return ReplayFilter(
                statuses=("dead",),
                channel=self.channel or None,
                event=self.event or None,
                error_code=self.error or None,
                since=since,
                until=until,
                limit=limit,
            )
        except admin.FilterError as exc:
            field = "error" if exc.field == "error_code" else exc.field
            raise FormError(f"{field}: {exc}") from None


def parse_ids(values: Sequence[str]) -> tuple[int, ...]:
    ids = []
    for value in values:
        if not (value.isascii() and value.isdigit()) or len(value) > 18:
            raise FormError(f"not a row id: {value[:40]!r}")
        ids.append(int(value))
    return tuple(dict.fromkeys(ids))


def _picked(form: Form, verb: str) -> tuple[tuple[int, ...], DeadQuery, int | None]:
    """The dead events a form picks (one, the ticked ones, or all that match its filter) and
    the count its preview showed, if it was previewed; ``verb`` names the action in errors."""
    scope = first(form, "scope")
    if first(form, "one"):
        ids = parse_ids([first(form, "one")])
    elif scope == "ids":
        ids = parse_ids([v.strip() for v in form.get("ids", [])])
        if not ids:
            raise FormError(f"tick at least one event to {verb}")
    elif scope == "filter":
        ids = ()
    else:
        raise FormError(f"say what to {verb}: some events, or all that match the filter")
    expected_text = first(form, "expected")
    expected = parse_ids([expected_text])[0] if expected_text else None
    return ids, DeadQuery() if ids else DeadQuery.from_form(form), expected


class _PickedDead:
    """What a replay and a deletion asked for on a page share: which dead rows, and how many
    the operator saw in the preview."""

    ids: tuple[int, ...]
    query: DeadQuery
    expected: int | None

    @property
    def scope(self) -> str:
        return "ids" if self.ids else "filter"

    def selection(self) -> ReplayFilter:
        """Dead rows only; once previewed, at most the count the operator saw (oldest first), so
        rows that died since the preview wait for a preview of their own."""
        if self.ids:
            return ReplayFilter(statuses=("dead",), ids=self.ids, limit=self.expected)
        return self.query.selection(limit=self.expected)


@dataclass(frozen=True)
class ReplayRequest(_PickedDead):
    """A replay asked for on the page: of rows by id (one, or the ticked ones) or of a filter,
    with the key choice, and (once previewed) the count the operator saw."""

    ids: tuple[int, ...]
    query: DeadQuery
    key: str
    expected: int | None

    @classmethod
    def from_form(cls, form: Form) -> ReplayRequest:
        ids, query, expected = _picked(form, "replay")
        key = first(form, "key") or admin.KEY_FRESH
        if key not in (admin.KEY_FRESH, admin.KEY_KEEP):
            raise FormError(f"key: {admin.KEY_FRESH!r} or {admin.KEY_KEEP!r}, not {key!r}")
        return cls(ids, query, key, expected)


@dataclass(frozen=True)
class DeleteRequest(_PickedDead):
    """A deletion of dead events asked for on the page, picked as a replay is, and (once
    previewed) the count the operator saw: no more than that many are deleted."""

    ids: tuple[int, ...]
    query: DeadQuery
    expected: int | None

    @classmethod
    def from_form(cls, form: Form) -> DeleteRequest:
        return cls(*_picked(form, "delete"))


# -- formatting ---------------------------------------------------------------------------------


def database_label(url: sa.URL) -> str:
    """How the page names the database: no password, and no query string (where a driver may
    take one too, ``?password=...``)."""
    return url.set(query={}).render_as_string(hide_password=True)


def when(moment: dt.datetime | None) -> str:
    if moment is None:
        return "—"
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def relative(moment: dt.datetime | None, now: dt.datetime) -> str:
    """``moment`` from ``now``: ``in 42 s``, ``3 min 5 s ago``, ``now`` (``—`` for none)."""
    if moment is None:
        return "—"
    seconds = (moment - now).total_seconds()
    if abs(seconds) < 1:
        return "now"
    return f"in {age(seconds)}" if seconds > 0 else f"{age(-seconds)} ago"


def waits(row: QueuedEvent, now: dt.datetime) -> str:
    """When a pending row goes next, in words: due, due in some time, or what it waits for."""
    if row.waiting_for == admin.WAITING_FOR_ITS_KEY:
        return "behind an earlier event of its key"
    if row.waiting_for == admin.WAITING_FOR_MESSAGE:
        return "for its message to be published"
    if row.next_attempt_at <= now:
        return "due now"
    return f"due {relative(row.next_attempt_at, now)}"


def age(seconds: float | None) -> str:
    """``none``, ``42 s``, ``3 min 5 s``, ``2 h 14 min``, ``3 d 4 h``."""
    if seconds is None:
        return "none"
    return status_view.span_text(int(seconds))


def error_text(record: EventRecord | QueuedEvent) -> str:
    """``413 payload_too_large: payload too large``, from whichever parts the row has."""
    head = " ".join(
        str(part) for part in (record.last_error_status, record.last_error_code) if part
    )
    message = record.last_error_message or ""
    return f"{head}: {message}" if head and message else head or message


def payload(record: EventRecord, limit: int | None = None) -> tuple[str | None, str]:
    """(the payload to show or None, a note about it). Encrypted channels: never shown."""
    if record.encrypted or record.data is None:
        return None, "encrypted channel: the payload is not shown"
    data = record.data
    if limit is not None and len(data) > limit:
        return data[:limit], f"first {limit} of {len(data)} characters"
    return data, f"{len(data)} characters"


def timeline(record: EventRecord) -> list[tuple[dt.datetime, str]]:
    """The row's life as dated steps, oldest first (from the times the row keeps)."""
    steps = [(record.created_at, "enqueued")]
    if record.queued_at > record.created_at:
        steps.append((record.queued_at, "queued again (replayed)"))
    if record.last_error_at is not None:
        verb = "refused, dead" if record.status == "dead" else "failed, retried"
        steps.append((record.last_error_at, f"last failure ({verb}): {error_text(record)}"))
    if record.status == "in_flight" and record.lease_expires_at is not None:
        steps.append((record.lease_expires_at, "held by a worker: its lease ends"))
    if record.status == "pending" and record.next_attempt_at > record.queued_at:
        steps.append((record.next_attempt_at, "next attempt due"))
    if record.published_at is not None:
        ack = record.acknowledgement_id or "none"
        steps.append((record.published_at, f"published (acknowledgement {ack})"))
    return sorted(steps, key=lambda step: step[0])


# -- the live summary ---------------------------------------------------------------------------


def window_start(
    now: dt.datetime, bucket_seconds: int = BUCKET_SECONDS, buckets: int = BUCKETS
) -> dt.datetime:
    """The start of the chart's window: whole buckets, so bars stay put between refreshes and the
    last one is the current, partial, bucket."""
    epoch = now.timestamp()
    current = dt.datetime.fromtimestamp(epoch - epoch % bucket_seconds, dt.UTC)
    return current - dt.timedelta(seconds=bucket_seconds * (buckets - 1))


def summary(report: StatusReport, buckets: Sequence[ThroughputBucket]) -> dict[str, Any]:
    """The JSON the page refreshes itself from: numbers only, nothing an event wrote."""
    return {
        "counts": dict(report.counts),
        "oldest_pending_age_seconds": report.oldest_pending_age_seconds,
        "oldest_pending": age(report.oldest_pending_age_seconds),
        "bucket_seconds": BUCKET_SECONDS,
        "buckets": [
            {
                "start": b.start.isoformat(),
                "published": b.published,
                "retried": b.retried,
                "dead": b.dead,
            }
            for b in buckets
        ],
    }

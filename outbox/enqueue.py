"""``enqueue``: write events into the outbox inside the caller's own transaction.

Nothing here commits, flushes other objects or opens a transaction: the row becomes visible to the
worker exactly when the caller's transaction commits, and vanishes with it on rollback. Every rule
Sockudo would enforce on the event itself is checked before any SQL runs, so a refused event leaves
the caller's transaction as it was.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, overload

import sqlalchemy as sa

from .rows import AsyncTarget, SyncTarget, Target, write_rows
from .schema import ORDERING_KEY_MAX, outbox_table
from .sockudo import crypto
from .sockudo.errors import InvalidEvent
from .sockudo.jsontext import compact_json
from .sockudo.validation import DEFAULT_LIMITS, CheckedEvent, Limits, check_event

#: Namespace of per-channel keys derived from an event's key (uuid5 of key + channel).
_CHANNEL_KEY_NAMESPACE = uuid.UUID("5b0c1a3e-8f7d-4e52-9a61-0f2d7c9b4e10")


class _ByChannel:
    """The type of :data:`BY_CHANNEL`."""

    def __repr__(self) -> str:
        return "outbox.BY_CHANNEL"


#: ``ordering_key=BY_CHANNEL``: each channel is the key of its own row (events of a channel go
#: out in commit order).
BY_CHANNEL = _ByChannel()

OrderingKey = str | _ByChannel


@dataclass(frozen=True)
class OutboxEvent:
    """One event for :func:`enqueue_many` (the same fields as :func:`enqueue`)."""

    channel: str | Sequence[str]
    event: str
    data: Any
    idempotency_key: str | None = None
    socket_id: str | None = None
    info: str | Sequence[str] | None = None
    tags: Mapping[str, str] | None = None
    extras: Mapping[str, Any] | None = None
    ordering_key: OrderingKey | None = None


@overload
def enqueue(
    target: SyncTarget, channel: str | Sequence[str], event: str, data: Any, **options: Any
) -> uuid.UUID: ...
@overload
def enqueue(
    target: AsyncTarget, channel: str | Sequence[str], event: str, data: Any, **options: Any
) -> Awaitable[uuid.UUID]: ...
def enqueue(
    target: Target,
    channel: str | Sequence[str],
    event: str,
    data: Any,
    *,
    idempotency_key: str | None = None,
    socket_id: str | None = None,
    info: str | Sequence[str] | None = None,
    tags: Mapping[str, str] | None = None,
    extras: Mapping[str, Any] | None = None,
    ordering_key: OrderingKey | None = None,
    limits: Limits = DEFAULT_LIMITS,
    table: sa.Table | None = None,
) -> uuid.UUID | Awaitable[uuid.UUID]:
    """Add an event to the caller's transaction and return its event id.

    ``target`` is a ``Session``, ``Connection``, ``AsyncSession`` or ``AsyncConnection``; with an
    async one, await the result. ``data`` that is a ``str`` is sent as is, anything else is
    JSON-encoded once. Several channels become one row per channel, each with its own key derived
    from the event's, so each channel is delivered exactly once. ``idempotency_key`` defaults to the
    event id; it is also sent as ``message_id``.

    ``ordering_key`` (a string, or :data:`BY_CHANNEL`) publishes the events of one key one after
    another in commit order; a second transaction enqueuing on a key waits for the first to end
    (PostgreSQL; SQLite's writers are serialized anyway).

    Raises :class:`~outbox.sockudo.InvalidEvent` (naming the field) for anything Sockudo would refuse.
    """
    one = OutboxEvent(
        channel, event, data, idempotency_key, socket_id, info, tags, extras, ordering_key
    )
    event_id, rows = build_rows(one, limits)
    return write_rows(target, table if table is not None else outbox_table(), rows, event_id)


@overload
def enqueue_many(
    target: SyncTarget, events: Iterable[OutboxEvent], **options: Any
) -> list[uuid.UUID]: ...
@overload
def enqueue_many(
    target: AsyncTarget, events: Iterable[OutboxEvent], **options: Any
) -> Awaitable[list[uuid.UUID]]: ...
def enqueue_many(
    target: Target,
    events: Iterable[OutboxEvent],
    *,
    limits: Limits = DEFAULT_LIMITS,
    table: sa.Table | None = None,
) -> list[uuid.UUID] | Awaitable[list[uuid.UUID]]:
    """Enqueue many events at once; all are validated before any SQL runs.

    Unkeyed events go in one statement: ``COPY`` on PostgreSQL (8 rows or more), else one
    ``INSERT`` executed for every row. Events with ordering keys first lock their keys, then go
    in as two ``INSERT``s: the rows due now, then those waiting behind their key.
    """
    ids: list[uuid.UUID] = []
    rows: list[dict[str, Any]] = []
    for index, item in enumerate(events):
        try:
            event_id, item_rows = build_rows(item, limits)
        except InvalidEvent as exc:
            raise InvalidEvent(f"event #{index}: {exc}", field=exc.field) from exc
        ids.append(event_id)
        rows.extend(item_rows)
    return write_rows(target, table if table is not None else outbox_table(), rows, ids)


def build_rows(
    item: OutboxEvent, limits: Limits = DEFAULT_LIMITS
) -> tuple[uuid.UUID, list[dict[str, Any]]]:
    """Validate one event and return its id and the row values, one row per channel (pure)."""
    # One row per channel: the rules about one request (how many channels it may carry, an
    # encrypted channel alone) do not apply; check_event checks each name on its own.
    checked = check_event(
        [item.channel] if isinstance(item.channel, str) else item.channel,
        item.event,
        item.data,
        idempotency_key=item.idempotency_key,
        socket_id=item.socket_id,
        info=item.info,
        tags=item.tags,
        extras=item.extras,
        limits=limits,
    )
    channels = checked.channels
    if len(set(channels)) != len(channels):
        # Two rows of one event on one channel would share a derived key (a unique violation
        # that aborts the caller's PostgreSQL transaction) and publish the event twice.
        raise InvalidEvent("the same channel is listed twice", field="channel")
    _check_storable(checked)
    ordering_key = check_ordering_key(item.ordering_key)
    event_id = uuid.uuid4()
    base_key = item.idempotency_key if item.idempotency_key is not None else str(event_id)
    tags = None if checked.tags is None else _json_column(checked.tags, "tags")
    extras = None if checked.extras is None else _json_column(checked.extras, "extras")
    rows = []
    for channel in channels:
        # Derived for one channel as for several: the key of (event key, channel) must not
        # depend on the list the channel came in, or the same event could be enqueued twice.
        key = derive_channel_key(base_key, channel)
        nonce = crypto.random_nonce() if crypto.is_encrypted_channel(channel) else None
        rows.append(
            {
                "event_id": event_id,
                "idempotency_key": key,
                "channel": channel,
                "event": checked.name,
                "data": checked.data,
                "socket_id": checked.socket_id,
                "info": checked.info,
                "tags": tags,
                "extras": extras,
                "encryption_nonce": nonce,
                "ordering_key": channel if ordering_key is BY_CHANNEL else ordering_key,
            }
        )
    return event_id, rows


def check_ordering_key(key: OrderingKey | None) -> OrderingKey | None:
    """An ordering key as given, or :class:`InvalidEvent` saying what is wrong with it."""
    if key is None or key is BY_CHANNEL:
        return key
    if not isinstance(key, str):
        raise InvalidEvent(
            "ordering_key must be a string or outbox.BY_CHANNEL", field="ordering_key"
        )
    if not 1 <= len(key) <= ORDERING_KEY_MAX or "\x00" in key:
        raise InvalidEvent(
            f"ordering_key must be 1 to {ORDERING_KEY_MAX} characters, without NUL",
            field="ordering_key",
        )
    return key


def _check_storable(event: CheckedEvent) -> None:
    """What the table itself cannot hold (the server would take it)."""
    if "\x00" in event.data:
        # PostgreSQL text cannot hold NUL; a str is stored as given (JSON-encoded data escapes it).
        raise InvalidEvent("data must not contain NUL characters", field="data")
    for field, value in (
        ("socket_id", event.socket_id),
        ("event", event.name),
        ("info", event.info),
        *(("channel", c) for c in event.channels),
    ):
        width = _column_width(field)
        if value is not None and len(value) > width:
            raise InvalidEvent(f"{field} is longer than {width} characters", field=field)


@cache
def _column_width(name: str) -> int:
    length = outbox_table().c[name].type.length  # type: ignore[attr-defined]
    return int(length)


def derive_channel_key(key: str, channel: str) -> str:
    """The key of one channel's row of a multi-channel event: stable, distinct per channel.

    ``str(uuid.uuid5(namespace, f"{key}\n{channel}"))``, spelled out: every row of a bulk
    enqueue derives one, and the ``UUID`` objects cost three times the hash.
    """
    digest = hashlib.sha1(_NAMESPACE_BYTES + f"{key}\n{channel}".encode()).hexdigest()
    return (
        f"{digest[:8]}-{digest[8:12]}-5{digest[13:16]}-"
        f"{_RFC_4122_VARIANT[digest[16]]}{digest[17:20]}-{digest[20:32]}"
    )


_NAMESPACE_BYTES = _CHANNEL_KEY_NAMESPACE.bytes
#: The first hex digit of a UUID's eighth byte once its variant bits are set to RFC 4122's (10).
_RFC_4122_VARIANT = {digit: "89ab"[int(digit, 16) & 0x3] for digit in "0123456789abcdef"}


def _json_column(value: dict[str, Any], field: str) -> str:
    try:
        text = compact_json(value)
    except (TypeError, ValueError) as exc:
        raise InvalidEvent(f"{field} is not JSON-serializable: {exc}", field=field) from exc
    try:
        # ensure_ascii=False keeps a lone surrogate, which no database driver can encode.
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidEvent(f"{field} is not valid Unicode (lone surrogate)", field=field) from exc
    return text

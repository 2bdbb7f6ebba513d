"""Message mutations and annotations as outbox rows, written in the caller's transaction.

Sockudo's versioned messages (update, delete, append) and annotations act on a message published
earlier, named by the ``message_serial`` the server gave it. Here the message is named either by
that serial or by the outbox event that publishes it (the id :func:`~outbox.enqueue` returned,
even in the same transaction): the worker sends the mutation only after that event's publish was
acknowledged, with the serial from the acknowledgement.

Every operation on one message goes out after the one enqueued before it, never beside it (they
share an ordering key, whichever way they name the message: see :func:`message_ordering_key`),
and each row's request body is fixed here, with ``op_id`` = the row's idempotency key: every
attempt sends the same bytes, and Sockudo answers a repeat as a ``duplicate`` without a second
version or broadcast. Annotations have no such key on the server; see
:func:`publish_annotation` for what a retry does.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Mapping
from typing import Any

import sqlalchemy as sa

from .rows import Target, write_rows
from .schema import ORDERING_KEY_MAX, Operation, outbox_table, published_table
from .sockudo import crypto
from .sockudo.bodies import dump_body
from .sockudo.errors import InvalidEvent
from .sockudo.operations import check_serial
from .sockudo.params import (
    ANNOTATION_KEPT_FIELDS,
    MessageMutation,
    PublishAnnotationRequest,
    annotation_request_body,
    append_body,
    mutation_body,
    mutation_from,
    with_op_id,
)
from .sockudo.validation import DEFAULT_LIMITS, Limits, validate_channels

#: A message: the outbox event that publishes it (its id), or its known ``message_serial``.
MessageRef = uuid.UUID | str

_EVENT_NAMES = {
    Operation.UPDATE: "message.update",
    Operation.DELETE: "message.delete",
    Operation.APPEND: "message.append",
    Operation.ANNOTATE: "annotation.publish",
    Operation.UNANNOTATE: "annotation.delete",
}


def update_message(
    target: Target,
    channel: str,
    message: MessageRef,
    mutation: MessageMutation | Mapping[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    table: sa.Table | None = None,
    **fields: Any,
) -> uuid.UUID | Awaitable[uuid.UUID]:
    """Patch a message (``name``, ``data``, ``extras``, ``clear_fields``...) once this commits.

    Last writer wins on the server, and the outbox sends the operations on one message in the
    order they were enqueued. Returns the mutation's own event id (await it with an async
    ``target``). ``idempotency_key`` is sent as ``op_id`` (at most 64 bytes; a new one if None).
    """
    body = mutation_body(mutation_from(mutation, fields), _op_id(idempotency_key), action="update")
    return _add(target, table, limits, Operation.UPDATE, channel, message, body)


def delete_message(
    target: Target,
    channel: str,
    message: MessageRef,
    mutation: MessageMutation | Mapping[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    table: sa.Table | None = None,
    **fields: Any,
) -> uuid.UUID | Awaitable[uuid.UUID]:
    """Soft-delete a message once this commits: its data stays unless ``clear_fields`` lists
    it, and a later update revives it (Sockudo's semantics)."""
    body = mutation_body(mutation_from(mutation, fields), _op_id(idempotency_key), action="delete")
    return _add(target, table, limits, Operation.DELETE, channel, message, body)


def append_message(
    target: Target,
    channel: str,
    message: MessageRef,
    data: str,
    *,
    extras: Mapping[str, Any] | None = None,
    client_id: str | None = None,
    description: str | None = None,
    metadata: Any = None,
    idempotency_key: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    table: sa.Table | None = None,
) -> uuid.UUID | Awaitable[uuid.UUID]:
    """Append ``data`` to a message's string data once this commits, after every operation on
    that message enqueued before it (appends concatenate in that order)."""
    body = append_body(
        data,
        _op_id(idempotency_key),
        extras=extras,
        client_id=client_id,
        description=description,
        metadata=metadata,
    )
    return _add(target, table, limits, Operation.APPEND, channel, message, body)


def publish_annotation(
    target: Target,
    channel: str,
    message: MessageRef,
    request: PublishAnnotationRequest | Mapping[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    table: sa.Table | None = None,
    **fields: Any,
) -> uuid.UUID | Awaitable[uuid.UUID]:
    """Annotate a message once this commits (``type``, ``name``, ``client_id``, ``count``...).

    Sockudo keeps no idempotency key for annotations, so a retry after an attempt that may have
    reached the server first looks for an identical annotation (same type, name, client id,
    count, data and encoding: all Sockudo keeps of one) created since the row was queued, and
    sends nothing if it finds one. An identical annotation from elsewhere in that window is
    therefore taken for this one. Any other field is refused (:class:`InvalidEvent`): Sockudo
    would drop it without a word.
    """
    body = annotation_request_body(request, fields)
    if "socketId" in body:
        raise InvalidEvent("the outbox publishes as the server: no socket_id", field="socket_id")
    for name in body:
        if name not in ANNOTATION_KEPT_FIELDS:
            # Sockudo would drop it without a word; a retry could then never recognise the
            # annotation it created (see Deliverer._find_annotation).
            raise InvalidEvent(
                f"{name!r} is not an annotation field Sockudo keeps (type, name, client_id, "
                "count, data, encoding)",
                field=name,
            )
    _op_id(idempotency_key)  # the row's key: validated like the others, never sent
    return _add(target, table, limits, Operation.ANNOTATE, channel, message, body, idempotency_key)


def delete_annotation(
    target: Target,
    channel: str,
    message: MessageRef,
    annotation_serial: str,
    *,
    idempotency_key: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    table: sa.Table | None = None,
) -> uuid.UUID | Awaitable[uuid.UUID]:
    """Delete an annotation (by the serial its publish answered) once this commits. A repeat is
    answered 200 by the server and writes nothing."""
    # Sockudo's rule, which the column (SERIAL_MAX characters) always holds.
    check_serial(annotation_serial, "annotation_serial")
    _op_id(idempotency_key)
    return _add(
        target,
        table,
        limits,
        Operation.UNANNOTATE,
        channel,
        message,
        annotation_serial,
        idempotency_key,
    )


def message_ordering_key(channel: str, message: MessageRef) -> str:
    """The ordering key every operation on one message shares, from the name it is keyed by:
    the event that published it, else (no such event known) its serial."""
    key = f"message:{channel}:{message}"
    if len(key) <= ORDERING_KEY_MAX:
        return key
    digest = hashlib.sha256(f"{channel}\x00{message}".encode()).hexdigest()
    return f"message:{digest}"


def publishing_event(
    conn: sa.Connection, table: sa.Table, channel: str, serial: str
) -> uuid.UUID | None:
    """The outbox event whose publish on ``channel`` the server gave ``serial``, while the
    published log holds its row (retention trims it); None for a message the outbox did not
    publish. Reads ``ix_<name>_published_message``; a mutation's own log row carries its
    message's serial too, and is not the publish."""
    log = published_table(table)
    return conn.execute(
        sa.select(log.c.event_id)
        .where(
            log.c.channel == channel,
            log.c.message_serial == serial,
            log.c.operation.is_(None),
        )
        .order_by(log.c.id)
        .limit(1)
    ).scalar_one_or_none()


def _op_id(key: str | None) -> str:
    """The row's idempotency key, also its ``op_id``: the caller's, or a new one (32 bytes)."""
    return with_op_id({}, key if key is not None else uuid.uuid4().hex)["op_id"]


def _add(
    target: Target,
    table: sa.Table | None,
    limits: Limits,
    operation: Operation,
    channel: str,
    message: MessageRef,
    body: Mapping[str, Any] | str,
    key: str | None = None,
) -> uuid.UUID | Awaitable[uuid.UUID]:
    table = table if table is not None else outbox_table()
    (channel,) = validate_channels([channel], limits)
    if crypto.is_encrypted_channel(channel):
        raise InvalidEvent("encrypted channels have no versioned messages", field="channel")
    if isinstance(message, uuid.UUID):
        target_event_id, target_serial = message, None
    elif isinstance(message, str):
        check_serial(message, "message")
        target_event_id, target_serial = None, message
    else:
        raise InvalidEvent(
            "message must be an outbox event id (uuid.UUID) or a message_serial (str)",
            field="message",
        )
    if isinstance(body, str):
        data = body
    else:
        data = dump_body(body).decode()
        key = body.get("op_id", key)
    event_id = uuid.uuid4()
    row = {
        "event_id": event_id,
        "idempotency_key": key if key is not None else uuid.uuid4().hex,
        "channel": channel,
        "event": _EVENT_NAMES[operation],
        "data": data,
        "ordering_key": message_ordering_key(channel, message),
        "operation": operation.value,
        "target_event_id": target_event_id,
        "target_serial": target_serial,
    }
    prepare = None
    if target_serial is not None:
        serial = target_serial

        def key_by_publishing_event(conn: sa.Connection) -> None:
            # One message, one key: named by its serial, a message the outbox published is
            # keyed by its event, as the operations naming it by event id are.
            published_by = publishing_event(conn, table, channel, serial)
            if published_by is not None:
                row["ordering_key"] = message_ordering_key(channel, published_by)

        prepare = key_by_publishing_event
    return write_rows(target, table, [row], event_id, prepare)

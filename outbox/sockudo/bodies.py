"""The exact bytes of request bodies: one event's JSON object, ``/events`` and ``/batch_events``
bodies, and the one serializer of every body.

Pure code shared by the sync and async clients and by the outbox worker. The body of an event is a
function of its fields only (no clock, no randomness once a nonce is fixed), so the same event gives
the same bytes on every attempt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .crypto import seal_for_channel
from .errors import InvalidEvent
from .jsontext import compact_json
from .validation import DEFAULT_LIMITS, Limits, check_event, validate_channels


@dataclass(frozen=True)
class Event:
    """One event for :meth:`Sockudo.trigger_batch` (the seed SDK's ``Event``, plus ``message_id``).

    ``channel`` is one channel name; ``channels`` (when given) wins, as on the server.
    ``encryption_nonce`` fixes the nonce of an encrypted channel's payload (see :mod:`.crypto`).
    """

    channel: str | None
    name: str
    data: Any
    channels: Sequence[str] | None = None
    socket_id: str | None = None
    info: str | Sequence[str] | None = None
    idempotency_key: str | None = None
    message_id: str | None = None
    tags: Mapping[str, str] | None = None
    extras: Mapping[str, Any] | None = None
    encryption_nonce: bytes | None = None

    @property
    def channel_list(self) -> list[str]:
        if self.channels:
            return list(self.channels)
        return [self.channel] if self.channel is not None else []


def event_item(
    channels: Sequence[str],
    name: str,
    data: str,
    *,
    socket_id: str | None = None,
    info: str | Sequence[str] | None = None,
    idempotency_key: str | None = None,
    message_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    extras: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One event as a JSON object, fields in a fixed order so its bytes never vary.

    ``data`` is the final string (already sealed for an encrypted channel). One channel goes as
    ``channel``, several as ``channels``.
    """
    item: dict[str, Any] = {"name": name, "data": data}
    if len(channels) == 1:
        item["channel"] = channels[0]
    else:
        item["channels"] = list(channels)
    if socket_id is not None:
        item["socket_id"] = socket_id
    if info is not None:
        item["info"] = info if isinstance(info, str) else ",".join(info)
    if idempotency_key is not None:
        item["idempotency_key"] = idempotency_key
    if message_id is not None:
        item["message_id"] = message_id
    if tags is not None:
        item["tags"] = dict(tags)
    if extras is not None:
        item["extras"] = dict(extras)
    return item


def prepare_event(
    event: Event, master_key: bytes | None, limits: Limits = DEFAULT_LIMITS
) -> dict[str, Any]:
    """Validate an :class:`Event` and return its JSON object, sealing an encrypted channel's data."""
    checked = check_event(
        validate_channels(event.channel_list, limits),
        event.name,
        event.data,
        idempotency_key=event.idempotency_key,
        message_id=event.message_id,
        socket_id=event.socket_id,
        info=event.info,
        tags=event.tags,
        extras=event.extras,
        limits=limits,
    )
    data = checked.data
    if checked.encrypted:
        # The nonce follows the event's identity: its idempotency key, else its message_id
        # (Sockudo fingerprints a message_id's payload, so a retry must seal to the same bytes).
        identity = event.idempotency_key if event.idempotency_key is not None else event.message_id
        data = seal_for_channel(
            checked.channels[0], data, master_key, identity, event.encryption_nonce
        )
    return event_item(
        checked.channels,
        checked.name,
        data,
        socket_id=checked.socket_id,
        info=checked.info,
        idempotency_key=checked.idempotency_key,
        message_id=checked.message_id,
        tags=checked.tags,
        extras=checked.extras,
    )


def dump_body(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON: the one serializer of request bodies."""
    try:
        return compact_json(payload).encode("utf-8")
    except (TypeError, ValueError) as exc:  # tags/extras not JSON, NaN, lone surrogates
        raise InvalidEvent(f"request body is not valid JSON: {exc}", field="body") from exc


def batch_body(items: Sequence[Mapping[str, Any]], limits: Limits = DEFAULT_LIMITS) -> bytes:
    if not items:
        raise InvalidEvent("a batch needs at least one event", field="batch")
    if len(items) > limits.max_batch_size:
        raise InvalidEvent(
            f"a batch of {len(items)} events is over the limit of {limits.max_batch_size}",
            field="batch",
        )
    return dump_body({"batch": list(items)})

"""What the non-publish operations send: the SDK's parameter types, and the exact bodies.

Pure code. The classes carry the names and fields of ``sockudo-http-python`` 2.2.0 so its call
forms run unchanged; where the SDK sends something the server ignores or mishandles, the body
built here is the one the server reads (see the notes on each). Every body is a function of its
arguments only, serialized by :func:`.bodies.dump_body`, so a retry sends the same bytes.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from .errors import InvalidEvent
from .validation import check_text, encode_data, utf8_len

#: Sockudo's bounds for ``op_id`` (``AI_MESSAGE_ID_MAX_BYTES``).
MAX_OP_ID_BYTES = 64
HISTORY_DIRECTIONS = ("newest_first", "oldest_first")
PURGE_MODES = ("all", "before_serial", "before_time_ms")
CLEARABLE_FIELDS = ("name", "data", "extras")


class _Query:
    """A dataclass whose non-None fields become query parameters (``str()`` of each value)."""

    def to_query(self) -> dict[str, str]:
        return {
            f.name: _query_value(getattr(self, f.name))
            for f in fields(self)  # type: ignore[arg-type]
            if getattr(self, f.name) is not None
        }


def _query_value(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclass
class ChannelsParams(_Query):
    """``list_channels``: ``filter_by_prefix`` and ``info`` (a list is joined with ``,``)."""

    filter_by_prefix: str | None = None
    info: str | Sequence[str] | None = None


@dataclass
class ChannelParams(_Query):
    """``get_channel``: ``info`` tokens (``subscription_count``, ``user_count``, ``cache``)."""

    info: str | Sequence[str] | None = None


@dataclass
class HistoryParams(_Query):
    """One page of channel history. Bounds are inclusive; a cursor must be replayed with the same
    ``direction`` and bounds it was issued for (the server answers 400 otherwise)."""

    limit: int | None = None
    direction: str | None = None
    cursor: str | None = None
    start_serial: int | None = None
    end_serial: int | None = None
    start_time_ms: int | None = None
    end_time_ms: int | None = None


@dataclass
class PresenceHistoryParams(HistoryParams):
    """One page of presence history (the same fields as :class:`HistoryParams`)."""


@dataclass
class PresenceSnapshotParams(_Query):
    """The member set at a serial or a time (inclusive); neither: the latest."""

    at_serial: int | None = None
    at_time_ms: int | None = None


@dataclass
class MessageVersionsParams(_Query):
    """One page of a message's versions; ``cursor`` is the last ``version_serial`` seen."""

    limit: int | None = None
    direction: str | None = None
    cursor: str | None = None


@dataclass
class AnnotationEventsParams(_Query):
    """One page of annotation events; ``from_serial`` is the previous page's ``next_cursor``."""

    type: str | None = None
    from_serial: str | None = None
    limit: int | None = None
    socket_id: str | None = None


@dataclass
class SockudoOptions:
    """The SDK's connection options, accepted as ``Sockudo(..., options=SockudoOptions(...))``.

    ``max_retries`` and ``retry_base_delay`` are accepted and not used: this client never retries
    behind the caller's back (retry by sending the same prepared request again).
    """

    host: str = "127.0.0.1"
    port: int = 6001
    use_tls: bool = False
    timeout: float = 4.0
    max_retries: int = 3
    retry_base_delay: float = 0.1
    auto_idempotency: bool = False
    http2: bool = True
    verify_tls: bool | str = True

    def settings(self) -> dict[str, Any]:
        """The :class:`~outbox.sockudo.Config` fields these options set."""
        return {
            "host": self.host,
            "port": self.port,
            "use_tls": self.use_tls,
            "timeout": self.timeout,
            "http2": self.http2,
            "verify_tls": self.verify_tls,
        }


@dataclass
class MessageMutation:
    """The body of ``update_message`` / ``delete_message`` (the SDK's, plus ``op_id``).

    ``data`` that is not a ``str`` is JSON-encoded once, as for a publish. ``op_id`` is the
    server's durable idempotency key for this mutation; left out, the client makes one per call.
    """

    name: str | None = None
    data: Any = None
    extras: Mapping[str, Any] | None = None
    clear_fields: Sequence[str] | None = None
    client_id: str | None = None
    socket_id: str | None = None
    description: str | None = None
    metadata: Any = None
    op_id: str | None = None

    def to_payload(self) -> dict[str, Any]:
        """The fields that are set, in a fixed order, ``data`` encoded to a string."""
        payload: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "data":
                value = encode_data(value)
            elif f.name in ("extras", "metadata"):
                value = canonical(value)
            elif f.name == "clear_fields":
                value = list(value)
            payload[f.name] = value
        return payload


@dataclass
class PublishAnnotationRequest:
    """One annotation. ``type`` is ``namespace:summarizer.v1`` (total, flag, distinct, unique,
    multiple). Sent camelCase (``clientId``, ``socketId``): Sockudo ignores ``client_id``."""

    type: str
    name: str | None = None
    client_id: str | None = None
    socket_id: str | None = None
    count: int | None = None
    data: Any = None
    encoding: str | None = None

    def to_payload(self) -> dict[str, Any]:
        return annotation_body(
            {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        )


#: Snake-case annotation fields the server would silently drop, and the names it reads.
_ANNOTATION_CAMEL = {"client_id": "clientId", "socket_id": "socketId"}

#: What Sockudo keeps of a published annotation and returns in each item of
#: ``list_annotations``, in its own (camelCase) names: ``PublishAnnotationRequest`` and
#: ``annotation_wire_event`` in ``http_handler/annotations/mod.rs``. ``socketId`` only names the
#: actor; any other field is dropped without a word (serde ignores unknown fields).
ANNOTATION_KEPT_FIELDS = ("type", "name", "clientId", "count", "data", "encoding")


def annotation_body(request: Mapping[str, Any]) -> dict[str, Any]:
    """An annotation body with camelCase keys (``client_id`` becomes ``clientId``), None left out.

    Sockudo's body is ``rename_all = "camelCase"`` with no alias: a snake_case ``client_id`` is
    ignored, and a ``flag``/``distinct``/``unique`` annotation then fails with "client_id is
    required". The docs show the snake_case form; this sends what the code reads.
    """
    body: dict[str, Any] = {}
    for key, value in request.items():
        if value is None:
            continue
        camel = _ANNOTATION_CAMEL.get(key, key)
        if camel in body:
            raise InvalidEvent(f"both {key!r} and {camel!r} given", field=key)
        body[camel] = value
    annotation_type = body.get("type")
    check_text(annotation_type, "type")
    count = body.get("count")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count <= 0):
        raise InvalidEvent("count must be a positive integer", field="count")
    return body


def annotation_request_body(
    request: PublishAnnotationRequest | Mapping[str, Any] | None, fields: Mapping[str, Any]
) -> dict[str, Any]:
    """The body of an annotation from a request object, a mapping, or keywords (not two)."""
    if request is None:
        request = fields
    elif fields:
        raise InvalidEvent("pass either a request or keywords, not both", field="request")
    if isinstance(request, PublishAnnotationRequest):
        return request.to_payload()
    if isinstance(request, Mapping):
        return annotation_body(request)
    raise InvalidEvent("request must be a PublishAnnotationRequest or a mapping")


def append_body(data: str, op_id: str | None, **optional: Any) -> dict[str, Any]:
    """The body of an append: the fragment, the optional fields given (canonical JSON), and
    always an ``op_id`` (without one every retry would append again)."""
    if not isinstance(data, str) or not data:
        raise InvalidEvent("append_message data must be a non-empty string", field="data")
    body: dict[str, Any] = {"data": data}
    for name, value in optional.items():
        if value is not None:
            body[name] = canonical(value)
    return with_op_id(body, op_id)


def mutation_from(
    mutation: MessageMutation | Mapping[str, Any] | None, fields: Mapping[str, Any]
) -> MessageMutation | Mapping[str, Any] | None:
    """The mutation given, or one built from keywords (not both)."""
    if mutation is not None and fields:
        raise InvalidEvent("pass either a mutation or keywords, not both", field=next(iter(fields)))
    if mutation is None and fields:
        try:
            return MessageMutation(**fields)
        except TypeError as exc:
            raise InvalidEvent(str(exc), field="mutation") from exc
    return mutation


def mutation_body(
    mutation: MessageMutation | Mapping[str, Any] | None,
    op_id: str | None,
    *,
    action: str,
) -> dict[str, Any]:
    """The body of an update or delete, always with an ``op_id``.

    A mapping is sent as given (the SDK's escape hatch), plus the ``op_id``. ``op_id`` given both
    in the mutation and as an argument must agree.
    """
    if mutation is None:
        payload: dict[str, Any] = {}
    elif isinstance(mutation, MessageMutation):
        payload = mutation.to_payload()
    elif isinstance(mutation, Mapping):
        payload = dict(mutation)
    else:
        raise InvalidEvent(
            f"mutation must be a MessageMutation or a mapping, not {type(mutation).__name__}",
            field="mutation",
        )
    if action == "delete" and "name" in payload:
        raise InvalidEvent("delete_message takes no 'name'", field="name")
    if action == "update" and not payload:
        raise InvalidEvent("update_message needs at least one field", field="mutation")
    check_clear_fields(payload)
    return with_op_id(payload, op_id)


def check_clear_fields(payload: Mapping[str, Any]) -> None:
    cleared = payload.get("clear_fields")
    if cleared is None:
        return
    if isinstance(cleared, str) or not all(c in CLEARABLE_FIELDS for c in cleared):
        raise InvalidEvent(
            f"clear_fields takes a list of {', '.join(CLEARABLE_FIELDS)}", field="clear_fields"
        )
    if len(set(cleared)) != len(cleared):
        raise InvalidEvent("clear_fields has a duplicate", field="clear_fields")
    both = [c for c in cleared if payload.get(c) is not None]
    if both:
        raise InvalidEvent(f"{both[0]!r} is both replaced and cleared", field="clear_fields")


def with_op_id(payload: dict[str, Any], op_id: str | None) -> dict[str, Any]:
    """``payload`` with its ``op_id``: the caller's, else a new random one for this call."""
    given = payload.get("op_id")
    if given is not None and op_id is not None and given != op_id:
        raise InvalidEvent("two different op_id values given", field="op_id")
    chosen = given if given is not None else op_id
    if chosen is None:
        chosen = new_op_id()
    check_text(chosen, "op_id")
    if utf8_len(chosen) > MAX_OP_ID_BYTES:
        raise InvalidEvent(
            f"op_id is {utf8_len(chosen)} bytes, over Sockudo's limit of {MAX_OP_ID_BYTES}",
            field="op_id",
        )
    payload.pop("op_id", None)
    payload["op_id"] = chosen
    return payload


def new_op_id() -> str:
    """A fresh ``op_id``: one per call, so a retry of that call is recognised as the same."""
    return uuid.uuid4().hex


def operator_body(
    channel: str, operation: str, reason: str, requested_by: str | None
) -> dict[str, Any]:
    """The confirmation fields Sockudo requires of a reset or a purge."""
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidEvent("a reason is required for history reset and purge", field="reason")
    body: dict[str, Any] = {
        "confirm_channel": channel,
        "confirm_operation": operation,
        "reason": reason,
    }
    if requested_by is not None:
        body["requested_by"] = requested_by
    return body


def purge_fields(
    mode: str, before_serial: int | None, before_time_ms: int | None
) -> dict[str, Any]:
    """``mode`` and its one bound, checked as the server checks them."""
    allowed = {
        "all": (),
        "before_serial": ("before_serial",),
        "before_time_ms": ("before_time_ms",),
    }
    if mode not in allowed:
        raise InvalidEvent(f"purge mode must be one of {', '.join(PURGE_MODES)}", field="mode")
    given = {
        name: value
        for name, value in (("before_serial", before_serial), ("before_time_ms", before_time_ms))
        if value is not None
    }
    if tuple(given) != allowed[mode]:
        need = " and ".join(allowed[mode]) or "no bound"
        raise InvalidEvent(f"purge mode {mode!r} takes {need}", field="mode")
    return {"mode": mode, **given}


def canonical(value: Any) -> Any:
    """``value`` with every object's keys sorted: the same content gives the same bytes.

    Sockudo fingerprints an ``op_id``'s payload; a retry rebuilt from a dict in another key order
    must not look like a different payload.
    """
    if isinstance(value, Mapping):
        return {str(k): canonical(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def merge_params(cls: type[Any], params: Any, keywords: Mapping[str, Any]) -> Any:
    """The SDK's params object, or our keywords, as one instance of ``cls`` (not both)."""
    given = {k: v for k, v in keywords.items() if v is not None}
    if params is None:
        return cls(**given)
    if isinstance(params, Mapping):
        params = cls(**params)
    if given:
        raise InvalidEvent(
            f"pass either a {cls.__name__} or keywords, not both ({', '.join(given)})",
            field=next(iter(given)),
        )
    return params

"""Typed answers of the channel, history, message and annotation endpoints.

Each class reads the JSON body leniently (a field the server leaves out is None) and keeps the
whole body in ``body`` (``json()`` returns it, as the SDK's ``Result.json()`` does), so nothing
the server sends is out of reach. Items keep their own JSON object in ``raw``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Self


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


_NOT_FROM_BODY = frozenset({"raw", "body", "status_code", "items"})


def _named(cls: type, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Each field of ``cls`` read from the JSON key of the same name (None when absent)."""
    return {f.name: raw.get(f.name) for f in fields(cls) if f.init and f.name not in _NOT_FROM_BODY}


@dataclass(frozen=True, kw_only=True)
class Answer:
    """What every typed answer has: the parsed body and the status (always a success)."""

    body: Any = field(default=None, repr=False, compare=False)
    status_code: int = field(default=200, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """True: a failure raises instead (see :mod:`outbox.sockudo.errors`)."""
        return True

    def json(self) -> Any:
        """The body as the server sent it."""
        return self.body


# -- channel state -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ChannelInfo(Answer):
    """One channel: ``GET /channels/{name}``, or one entry of ``GET /channels``.

    Sockudo reports only what ``info`` asked for (``occupied`` always on a single channel);
    soketi always sends ``occupied`` and ``subscription_count``.
    """

    name: str | None = None
    occupied: bool | None = None
    subscription_count: int | None = None
    user_count: int | None = None
    cache: Mapping[str, Any] | None = None

    @classmethod
    def from_json(cls, body: Any, name: str | None = None, status_code: int = 200) -> Self:
        values = {**_named(cls, _dict(body)), "name": name}
        return cls(**values, body=body, status_code=status_code)


@dataclass(frozen=True, kw_only=True)
class ChannelList(Answer):
    """``GET /channels``: channel name -> :class:`ChannelInfo`."""

    channels: Mapping[str, ChannelInfo] = field(default_factory=dict)

    @classmethod
    def from_json(cls, body: Any, status_code: int = 200) -> Self:
        channels = _dict(_dict(body).get("channels"))
        return cls(
            channels={n: ChannelInfo.from_json(v, n) for n, v in channels.items()},
            body=body,
            status_code=status_code,
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self.channels)

    def __len__(self) -> int:
        return len(self.channels)


@dataclass(frozen=True, kw_only=True)
class ChannelUsers(Answer):
    """``GET /channels/{presence-channel}/users``: the ids of the members (no ``user_info``)."""

    ids: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, body: Any, status_code: int = 200) -> Self:
        users = _list(_dict(body).get("users"))
        ids = tuple(str(u["id"]) for u in users if isinstance(u, dict) and "id" in u)
        return cls(ids=ids, body=body, status_code=status_code)


# -- history -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HistoryBounds:
    """The inclusive bounds a page was read with; a cursor is only valid with the same ones."""

    start_serial: int | None = None
    end_serial: int | None = None
    start_time_ms: int | None = None
    end_time_ms: int | None = None

    @classmethod
    def from_json(cls, value: Any) -> HistoryBounds:
        raw = _dict(value)
        return cls(
            raw.get("start_serial"),
            raw.get("end_serial"),
            raw.get("start_time_ms"),
            raw.get("end_time_ms"),
        )


@dataclass(frozen=True)
class HistoryItem:
    """One retained message. ``serial`` is the history serial (restarts at 1 after a reset);
    ``message_serial`` (with versioned messages on) is the durable id the mutation calls take."""

    serial: int
    stream_id: str | None
    published_at_ms: int | None
    message_id: str | None
    event_name: str | None
    operation_kind: str | None
    message: Mapping[str, Any]
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, value: Any) -> HistoryItem:
        raw = _dict(value)
        values = {**_named(cls, raw), "serial": raw.get("serial", 0)}
        return cls(**{**values, "message": _dict(raw.get("message"))}, raw=raw)

    @property
    def message_serial(self) -> str | None:
        return self.message.get("message_serial")

    @property
    def data(self) -> Any:
        return self.message.get("data")

    @property
    def action(self) -> str | None:
        """``create``, ``update``, ``delete``... when versioned messages are on, else None."""
        return self.message.get("action")


@dataclass(frozen=True, kw_only=True)
class Page(Answer):
    """A page of a paginated read; ``next_cursor`` is None on the last page."""

    items: tuple[Any, ...] = ()
    has_more: bool = False
    next_cursor: str | None = None
    limit: int | None = None
    direction: str | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @staticmethod
    def page_fields(body: Any, status_code: int, item: Callable[[Any], Any]) -> dict[str, Any]:
        """The fields every snake_case page has, read from ``body``."""
        raw = _dict(body)
        return {
            "items": tuple(item(i) for i in _list(raw.get("items"))),
            "has_more": bool(raw.get("has_more")),
            "next_cursor": raw.get("next_cursor"),
            "limit": raw.get("limit"),
            "direction": raw.get("direction"),
            "body": body,
            "status_code": status_code,
        }


@dataclass(frozen=True, kw_only=True)
class HistoryPage(Page):
    """``GET .../history``: items, the cursor, and the stream's continuity and state."""

    item_type: ClassVar[Callable[[Any], Any]] = HistoryItem.from_json
    items: tuple[HistoryItem, ...] = ()
    bounds: HistoryBounds = field(default_factory=HistoryBounds)
    continuity: Mapping[str, Any] = field(default_factory=dict)
    stream_state: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, body: Any, status_code: int = 200) -> Self:
        raw = _dict(body)
        return cls(
            **cls.page_fields(body, status_code, cls.item_type),
            bounds=HistoryBounds.from_json(raw.get("bounds")),
            continuity=_dict(raw.get("continuity")),
            stream_state=_dict(raw.get("stream_state")),
        )


@dataclass(frozen=True, kw_only=True)
class StreamState(Answer):
    """``GET .../history/state`` and ``.../presence/history/state``."""

    channel: str | None = None
    stream_id: str | None = None
    next_serial: int | None = None
    retained: Mapping[str, Any] = field(default_factory=dict)
    state: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, body: Any, status_code: int = 200) -> Self:
        raw = _dict(body)
        stream = _dict(raw.get("stream"))
        return cls(
            channel=raw.get("channel"),
            stream_id=stream.get("stream_id"),
            next_serial=stream.get("next_serial"),
            retained=_dict(stream.get("retained")),
            state=_dict(stream.get("state")),
            body=body,
            status_code=status_code,
        )

    @property
    def durable_state(self) -> str | None:
        """``healthy``, ``degraded`` or ``reset_required``."""
        return self.state.get("durable_state")


@dataclass(frozen=True, kw_only=True)
class OperatorResult(Answer):
    """The confirmation of a history reset or purge, or a presence-history reset."""

    operation: str | None = None
    channel: str | None = None
    reason: str | None = None
    requested_by: str | None = None
    purged: int | None = None
    purged_bytes: int | None = None
    previous_stream_id: str | None = None
    new_stream_id: str | None = None
    mode: str | None = None

    @classmethod
    def from_json(cls, body: Any, status_code: int = 200) -> Self:
        raw = _dict(body)
        purged = raw.get("purged_messages", raw.get("purged_events"))
        values = {**_named(cls, raw), "purged": purged}
        return cls(**values, body=body, status_code=status_code)


# -- presence history ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PresenceEvent:
    """One member transition: ``member_added`` / ``member_updated`` / ``member_removed``."""

    serial: int
    event: str | None
    cause: str | None
    user_id: str | None
    connection_id: str | None
    published_at_ms: int | None
    presence_event: Mapping[str, Any]
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, value: Any) -> PresenceEvent:
        raw = _dict(value)
        values = {**_named(cls, raw), "serial": raw.get("serial", 0)}
        return cls(**{**values, "presence_event": _dict(raw.get("presence_event"))}, raw=raw)


@dataclass(frozen=True, kw_only=True)
class PresenceHistoryPage(HistoryPage):
    """``GET .../presence/history``: the same envelope as history, with presence events."""

    item_type: ClassVar[Callable[[Any], Any]] = PresenceEvent.from_json
    items: tuple[PresenceEvent, ...] = ()  # type: ignore[assignment]


@dataclass(frozen=True, kw_only=True)
class PresenceSnapshot(Answer):
    """``GET .../presence/history/snapshot``: who was present at a serial or a time."""

    channel: str | None = None
    members: tuple[Mapping[str, Any], ...] = ()
    member_count: int | None = None
    snapshot_serial: int | None = None
    snapshot_time_ms: int | None = None

    @classmethod
    def from_json(cls, body: Any, status_code: int = 200) -> Self:
        raw = _dict(body)
        return cls(
            channel=raw.get("channel"),
            members=tuple(_dict(m) for m in _list(raw.get("members"))),
            member_count=raw.get("member_count"),
            snapshot_serial=raw.get("snapshot_serial"),
            snapshot_time_ms=raw.get("snapshot_time_ms"),
            body=body,
            status_code=status_code,
        )

    @property
    def user_ids(self) -> tuple[str, ...]:
        return tuple(str(m.get("user_id")) for m in self.members)


# -- versioned messages --------------------------------------------------------------------------


@dataclass(frozen=True)
class MessageVersion:
    """A message as one of its versions left it (``action`` create, update, delete, append)."""

    message_serial: str | None
    action: str | None
    version_serial: str | None
    name: str | None
    data: Any
    extras: Mapping[str, Any] | None
    history_serial: int | None
    version: Mapping[str, Any]
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, value: Any) -> MessageVersion:
        raw = _dict(value)
        version = _dict(raw.get("version"))
        return cls(
            message_serial=raw.get("message_serial"),
            action=raw.get("action"),
            version_serial=version.get("serial"),
            name=raw.get("name"),
            data=raw.get("data"),
            extras=raw.get("extras"),
            history_serial=raw.get("history_serial"),
            version=version,
            raw=raw,
        )


@dataclass(frozen=True, kw_only=True)
class Message(Answer):
    """``GET .../messages/{serial}``: the latest version (a deleted message is still returned)."""

    channel: str | None = None
    item: MessageVersion

    @classmethod
    def from_json(cls, body: Any, status_code: int = 200) -> Self:
        raw = _dict(body)
        return cls(
            channel=raw.get("channel"),
            item=MessageVersion.from_json(raw.get("item")),
            body=body,
            status_code=status_code,
        )

    def __getattr__(self, name: str) -> Any:
        # message.data, message.action...: the latest version's fields.
        if name.startswith("_") or name == "item":
            raise AttributeError(name)
        return getattr(self.item, name)


@dataclass(frozen=True, kw_only=True)
class MessageVersionsPage(Page):
    """``GET .../versions``. An append's ``data`` is the appended fragment, not the whole text."""

    channel: str | None = None
    items: tuple[MessageVersion, ...] = ()

    @classmethod
    def from_json(cls, body: Any, status_code: int = 200) -> Self:
        fields = cls.page_fields(body, status_code, MessageVersion.from_json)
        return cls(channel=_dict(body).get("channel"), **fields)


@dataclass(frozen=True, kw_only=True)
class MutationResult(Answer):
    """The answer to update, delete or append. ``duplicate``: an earlier call with the same
    ``op_id`` and payload was applied; nothing changed and nothing was broadcast this time."""

    channel: str | None = None
    message_serial: str | None = None
    action: str | None = None
    status: str | None = None
    version_serial: str | None = None
    history_serial: int | None = None
    delivery_serial: int | None = None

    @classmethod
    def from_json(cls, body: Any, status_code: int = 200) -> Self:
        return cls(**_named(cls, _dict(body)), body=body, status_code=status_code)

    @property
    def duplicate(self) -> bool:
        return self.status == "duplicate"


# -- annotations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnnotationEvent:
    """One annotation event (``annotation.create`` or ``annotation.delete``); ``id`` on creates."""

    action: str | None
    serial: str | None
    type: str | None
    name: str | None
    client_id: str | None
    count: int | None
    id: str | None
    timestamp: int | None
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, value: Any) -> AnnotationEvent:
        raw = _dict(value)
        return cls(
            action=raw.get("action"),
            serial=raw.get("serial"),
            type=raw.get("type"),
            name=raw.get("name"),
            client_id=raw.get("clientId"),
            count=raw.get("count"),
            id=raw.get("id"),
            timestamp=raw.get("timestamp"),
            raw=raw,
        )


@dataclass(frozen=True, kw_only=True)
class AnnotationPage(Page):
    """``GET .../annotations`` (camelCase on the wire); pass ``next_cursor`` as ``from_serial``."""

    message_serial: str | None = None
    items: tuple[AnnotationEvent, ...] = ()

    @classmethod
    def from_json(cls, body: Any, status_code: int = 200) -> Self:
        raw = _dict(body)
        return cls(
            message_serial=raw.get("messageSerial"),
            items=tuple(AnnotationEvent.from_json(i) for i in _list(raw.get("items"))),
            has_more=bool(raw.get("hasMore")),
            next_cursor=raw.get("nextCursor"),
            limit=raw.get("limit"),
            body=body,
            status_code=status_code,
        )


@dataclass(frozen=True, kw_only=True)
class AnnotationPublished(Answer):
    """``POST .../annotations``: the new annotation's serial (needed to delete it later)."""

    annotation_serial: str | None = None

    @classmethod
    def from_json(cls, body: Any, status_code: int = 200) -> Self:
        serial = _dict(body).get("annotationSerial")
        return cls(annotation_serial=serial, body=body, status_code=status_code)


@dataclass(frozen=True, kw_only=True)
class AnnotationDeleted(Answer):
    """``DELETE .../annotations/{serial}``. A repeat of a delete answers with both serials equal
    to the target (``already_deleted``) and writes nothing."""

    annotation_serial: str | None = None
    deleted_annotation_serial: str | None = None

    @classmethod
    def from_json(cls, body: Any, status_code: int = 200) -> Self:
        raw = _dict(body)
        return cls(
            annotation_serial=raw.get("annotationSerial"),
            deleted_annotation_serial=raw.get("deletedAnnotationSerial"),
            body=body,
            status_code=status_code,
        )

    @property
    def already_deleted(self) -> bool:
        return self.annotation_serial == self.deleted_annotation_serial


@dataclass(frozen=True)
class AnnotationSummary:
    """A ``message.summary`` payload (realtime ``sockudo_internal:message``, V2 only): per
    annotation type, the summarizer's result (``{"like": {"total": 2, "clientIds": [...]}}``...).
    Sockudo serves summaries to Protocol V2 subscribers only; no HTTP endpoint returns them."""

    message_serial: str | None
    summary: Mapping[str, Any]

    @classmethod
    def from_json(cls, value: Any) -> AnnotationSummary:
        raw = _dict(value)
        return cls(raw.get("serial"), _dict(_dict(raw.get("annotations")).get("summary")))

"""Everything but publishing: channel state, history, presence history, versioned messages,
annotations, operator controls and user connections, as :mod:`.calls` operations.

Each method checks its arguments, builds the path, query and body, and names the typed answer;
the shells send. Names and argument order are those of ``sockudo-http-python`` 2.2.0; its
parameter objects (``HistoryParams(...)``...) and our keywords (``limit=50``) are both accepted.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from . import crypto
from .bodies import dump_body
from .calls import Call, PreparedRequest, Walk, keep, operation, paginated
from .config import Config
from .errors import InvalidEvent
from .models import (
    AnnotationDeleted,
    AnnotationEvent,
    AnnotationPage,
    AnnotationPublished,
    ChannelInfo,
    ChannelList,
    ChannelUsers,
    HistoryItem,
    HistoryPage,
    Message,
    MessageVersion,
    MessageVersionsPage,
    MutationResult,
    OperatorResult,
    Page,
    PresenceEvent,
    PresenceHistoryPage,
    PresenceSnapshot,
    StreamState,
)
from .params import (
    HISTORY_DIRECTIONS,
    AnnotationEventsParams,
    ChannelParams,
    ChannelsParams,
    HistoryParams,
    MessageMutation,
    MessageVersionsParams,
    PresenceHistoryParams,
    PresenceSnapshotParams,
    PublishAnnotationRequest,
    annotation_request_body,
    append_body,
    merge_params,
    mutation_body,
    mutation_from,
    operator_body,
    purge_fields,
)
from .responses import Result
from .signing import quote_path_segment
from .validation import Limits, check_text, utf8_len, validate_channels

AnswerT = TypeVar("AnswerT")
#: Sockudo's bounds on a message or version serial (1..=128 bytes, no whitespace).
MAX_SERIAL_BYTES = 128


def _typed(cls: Callable[..., AnswerT]) -> Callable[[Result], AnswerT]:
    def parse(result: Result) -> AnswerT:
        return cls(result.body, status_code=result.status_code)  # type: ignore[call-arg]

    return parse


class Operations:
    """The non-publish operations of the core; mixed into :class:`~outbox.sockudo.client._Core`."""

    config: Config
    limits: Limits
    _master_key: bytes | None

    def app_path(self, suffix: str) -> str:
        return f"/apps/{quote_path_segment(self.config.app_id)}{suffix}"

    # -- paths and requests -----------------------------------------------------------------

    def _channel_path(self, channel: str, suffix: str = "") -> str:
        name = validate_channels([channel], self.limits)[0]
        return self.app_path(f"/channels/{quote_path_segment(name)}{suffix}")

    def _message_path(self, channel: str, message_serial: str, suffix: str = "") -> str:
        serial = check_serial(message_serial, "message_serial")
        return self._channel_path(channel, f"/messages/{quote_path_segment(serial)}{suffix}")

    def _annotation_path(self, channel: str, message_serial: str, annotation_serial: str) -> str:
        """One annotation's path: deleting it, from the client or from an outbox row that
        stored the serial, must name it the same way (checked, then quoted)."""
        serial = check_serial(annotation_serial, "annotation_serial")
        return self._message_path(
            channel, message_serial, f"/annotations/{quote_path_segment(serial)}"
        )

    @staticmethod
    def _get(path: str, query: Mapping[str, str] | None = None) -> PreparedRequest:
        return PreparedRequest("GET", path, None, dict(query or {}))

    @staticmethod
    def _post(path: str, body: Mapping[str, Any]) -> PreparedRequest:
        return PreparedRequest("POST", path, dump_body(body))

    # -- channel state ----------------------------------------------------------------------

    @operation
    def list_channels(
        self,
        params: ChannelsParams | None = None,
        *,
        filter_by_prefix: str | None = None,
        info: str | Sequence[str] | None = None,
    ) -> Call[ChannelList]:
        """Occupied channels, optionally by prefix; ``info`` adds ``subscription_count`` /
        ``user_count`` (Sockudo caches this answer for 2 s)."""
        query = params_of(ChannelsParams, params, filter_by_prefix=filter_by_prefix, info=info)
        return Call(self._get(self.app_path("/channels"), query), _typed(ChannelList.from_json))

    @operation
    def get_channel(
        self,
        channel: str,
        params: ChannelParams | None = None,
        *,
        info: str | Sequence[str] | None = None,
    ) -> Call[ChannelInfo]:
        """One channel's state: ``occupied``, and what ``info`` asks for."""
        query = params_of(ChannelParams, params, info=info)
        parse = functools.partial(ChannelInfo.from_json, name=channel)
        return Call(self._get(self._channel_path(channel), query), _typed(parse))

    @operation
    def get_channel_users(self, channel: str) -> Call[ChannelUsers]:
        """The user ids present on a ``presence-`` channel."""
        path = self._channel_path(channel, "/users")
        return Call(self._get(path), _typed(ChannelUsers.from_json))

    # -- durable history --------------------------------------------------------------------

    @operation
    def get_channel_history(
        self, channel: str, params: HistoryParams | None = None, **keywords: Any
    ) -> Call[HistoryPage]:
        """One page of retained messages (keywords: the fields of :class:`HistoryParams`)."""
        return self._stream_page(channel, "/history", HistoryPage, params, keywords)

    @paginated
    def iter_channel_history(
        self, channel: str, params: HistoryParams | None = None, **keywords: Any
    ) -> Walk[HistoryItem]:
        """Every retained message from ``params`` on, page after page (same direction, bounds)."""
        first = params_or(HistoryParams, params, keywords)
        return _walk(lambda p: self._stream_page(channel, "/history", HistoryPage, p, {}), first)

    @operation
    def get_channel_history_state(self, channel: str) -> Call[StreamState]:
        """The history stream's id, next serial, retained range and durable state."""
        path = self._channel_path(channel, "/history/state")
        return Call(self._get(path), _typed(StreamState.from_json))

    @operation
    def reset_channel_history(
        self, channel: str, reason: str, requested_by: str | None = None
    ) -> Call[OperatorResult]:
        """Delete all retained history and start a new stream (serials restart at 1).

        Not idempotent: a retry deletes whatever was published since, and rotates the stream again.
        """
        body = operator_body(channel, "reset", reason, requested_by)
        path = self._channel_path(channel, "/history/reset")
        return Call(self._post(path, body), _typed(OperatorResult.from_json))

    @operation
    def purge_channel_history(
        self,
        channel: str,
        mode: str,
        reason: str,
        requested_by: str | None = None,
        before_serial: int | None = None,
        before_time_ms: int | None = None,
    ) -> Call[OperatorResult]:
        """Delete retained history: ``all``, or ``before_serial`` / ``before_time_ms`` (exclusive).

        The ``before_*`` modes are repeat-safe; ``all`` also deletes rows written since a first try.
        """
        body = operator_body(channel, "purge", reason, requested_by)
        body.update(purge_fields(mode, before_serial, before_time_ms))
        path = self._channel_path(channel, "/history/purge")
        return Call(self._post(path, body), _typed(OperatorResult.from_json))

    # -- presence history -------------------------------------------------------------------

    @operation
    def get_channel_presence_history(
        self, channel: str, params: PresenceHistoryParams | None = None, **keywords: Any
    ) -> Call[PresenceHistoryPage]:
        """One page of member joins, updates and leaves of a ``presence-`` channel."""
        params = params_or(PresenceHistoryParams, params, keywords)
        return self._stream_page(channel, "/presence/history", PresenceHistoryPage, params, {})

    @paginated
    def iter_channel_presence_history(
        self, channel: str, params: PresenceHistoryParams | None = None, **keywords: Any
    ) -> Walk[PresenceEvent]:
        """Every presence event from ``params`` on, page after page."""
        first = params_or(PresenceHistoryParams, params, keywords)
        page = PresenceHistoryPage
        return _walk(lambda p: self._stream_page(channel, "/presence/history", page, p, {}), first)

    def _stream_page(
        self,
        channel: str,
        suffix: str,
        page: type[HistoryPage],
        params: HistoryParams | None,
        keywords: Mapping[str, Any],
    ) -> Call[Any]:
        query = params_of(HistoryParams, params, **keywords)
        return Call(self._get(self._channel_path(channel, suffix), query), _typed(page.from_json))

    @operation
    def get_channel_presence_history_state(self, channel: str) -> Call[StreamState]:
        path = self._channel_path(channel, "/presence/history/state")
        return Call(self._get(path), _typed(StreamState.from_json))

    @operation
    def reset_channel_presence_history(
        self, channel: str, reason: str, requested_by: str | None = None
    ) -> Call[OperatorResult]:
        """Delete a presence channel's presence history. Not idempotent (see history reset)."""
        body = operator_body(channel, "reset", reason, requested_by)
        path = self._channel_path(channel, "/presence/history/reset")
        return Call(self._post(path, body), _typed(OperatorResult.from_json))

    @operation
    def get_channel_presence_snapshot(
        self,
        channel: str,
        params: PresenceSnapshotParams | None = None,
        *,
        at_serial: int | None = None,
        at_time_ms: int | None = None,
    ) -> Call[PresenceSnapshot]:
        """The members present at a serial or a time (inclusive), rebuilt from presence history."""
        query = params_of(
            PresenceSnapshotParams, params, at_serial=at_serial, at_time_ms=at_time_ms
        )
        path = self._channel_path(channel, "/presence/history/snapshot")
        return Call(self._get(path, query), _typed(PresenceSnapshot.from_json))

    # -- versioned messages -----------------------------------------------------------------

    @operation
    def get_message(self, channel: str, message_serial: str) -> Call[Message]:
        """The latest version of a message, by the ``message_serial`` its publish answered."""
        path = self._message_path(channel, message_serial)
        return Call(self._get(path), _typed(Message.from_json))

    @operation
    def get_message_versions(
        self,
        channel: str,
        message_serial: str,
        params: MessageVersionsParams | None = None,
        *,
        limit: int | None = None,
        direction: str | None = None,
        cursor: str | None = None,
    ) -> Call[MessageVersionsPage]:
        """One page of a message's versions (``direction`` exactly newest_first/oldest_first)."""
        query = params_of(
            MessageVersionsParams, params, limit=limit, direction=direction, cursor=cursor
        )
        if query.get("direction", "newest_first") not in HISTORY_DIRECTIONS:
            raise InvalidEvent("direction must be newest_first or oldest_first", field="direction")
        path = self._message_path(channel, message_serial, "/versions")
        return Call(self._get(path, query), _typed(MessageVersionsPage.from_json))

    @paginated
    def iter_message_versions(
        self,
        channel: str,
        message_serial: str,
        params: MessageVersionsParams | None = None,
        **keywords: Any,
    ) -> Walk[MessageVersion]:
        """Every version of a message, page after page."""
        first = params_or(MessageVersionsParams, params, keywords)
        build = Operations.get_message_versions.build
        return _walk(lambda p: build(self, channel, message_serial, p), first)

    @operation
    def update_message(
        self,
        channel: str,
        message_serial: str,
        mutation: MessageMutation | Mapping[str, Any] | None = None,
        *,
        op_id: str | None = None,
        **fields: Any,
    ) -> Call[MutationResult]:
        """Patch a message (``name``, ``data``, ``extras``; ``clear_fields`` to blank them).

        Last writer wins. ``op_id`` (yours, or a new one for this call) makes a retry of the same
        call an answered ``duplicate`` instead of a second version.
        """
        return self._mutation("update", channel, message_serial, mutation, op_id, fields)

    @operation
    def delete_message(
        self,
        channel: str,
        message_serial: str,
        mutation: MessageMutation | Mapping[str, Any] | None = None,
        *,
        op_id: str | None = None,
        **fields: Any,
    ) -> Call[MutationResult]:
        """Soft-delete a message: data and extras are kept unless ``clear_fields`` lists them, and
        a later update revives it. ``op_id`` as for :meth:`update_message`."""
        return self._mutation("delete", channel, message_serial, mutation, op_id, fields)

    @operation
    def append_message(
        self,
        channel: str,
        message_serial: str,
        data: str,
        socket_id: str | None = None,
        *,
        op_id: str | None = None,
        extras: Mapping[str, Any] | None = None,
        client_id: str | None = None,
        description: str | None = None,
        metadata: Any = None,
    ) -> Call[MutationResult]:
        """Append ``data`` to a message's string data, in arrival order.

        Without an ``op_id`` every retry would append again; this client always sends one.
        """
        body = append_body(
            data,
            op_id,
            extras=extras,
            client_id=client_id,
            socket_id=socket_id,
            description=description,
            metadata=metadata,
        )
        path = self._message_path(channel, message_serial, "/append")
        return Call(self._post(path, body), _typed(MutationResult.from_json))

    def _mutation(
        self,
        action: str,
        channel: str,
        message_serial: str,
        mutation: MessageMutation | Mapping[str, Any] | None,
        op_id: str | None,
        fields: Mapping[str, Any],
    ) -> Call[MutationResult]:
        body = mutation_body(mutation_from(mutation, fields), op_id, action=action)
        path = self._message_path(channel, message_serial, f"/{action}")
        return Call(self._post(path, body), _typed(MutationResult.from_json))

    # -- annotations ------------------------------------------------------------------------

    @operation
    def publish_annotation(
        self,
        channel: str,
        message_serial: str,
        request: PublishAnnotationRequest | Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> Call[AnnotationPublished]:
        """Annotate a message (keywords: the fields of :class:`PublishAnnotationRequest`).

        Not idempotent on the server: a retry after a lost answer adds a second annotation
        (``total`` and ``multiple`` summaries count it twice).
        """
        body = annotation_request_body(request, fields)
        path = self._message_path(channel, message_serial, "/annotations")
        return Call(self._post(path, body), _typed(AnnotationPublished.from_json))

    @operation
    def list_annotations(
        self,
        channel: str,
        message_serial: str,
        params: AnnotationEventsParams | None = None,
        **keywords: Any,
    ) -> Call[AnnotationPage]:
        """One page of annotation events, ascending by serial (raw events, not the summary)."""
        query = params_of(AnnotationEventsParams, params, **keywords)
        path = self._message_path(channel, message_serial, "/annotations")
        return Call(self._get(path, query), _typed(AnnotationPage.from_json))

    @paginated
    def iter_annotations(
        self,
        channel: str,
        message_serial: str,
        params: AnnotationEventsParams | None = None,
        **keywords: Any,
    ) -> Walk[AnnotationEvent]:
        """Every annotation event of a message, page after page."""
        first = params_or(AnnotationEventsParams, params, keywords)
        build = Operations.list_annotations.build
        return _walk(
            lambda p: build(self, channel, message_serial, p), first, cursor_field="from_serial"
        )

    @operation
    def delete_annotation(
        self,
        channel: str,
        message_serial: str,
        annotation_serial: str,
        socket_id: str | None = None,
    ) -> Call[AnnotationDeleted]:
        """Delete one annotation. A repeat answers 200 and writes nothing."""
        path = self._annotation_path(channel, message_serial, annotation_serial)
        query = {} if socket_id is None else {"socket_id": socket_id}
        return Call(
            PreparedRequest("DELETE", path, None, query), _typed(AnnotationDeleted.from_json)
        )

    # -- requests built from what an outbox row stored ---------------------------------------

    def prepare_message_request(
        self, operation: str, channel: str, message_serial: str, stored: str
    ) -> PreparedRequest:
        """The request of an outbox mutation row: ``stored`` is its exact body (``op_id``
        included), or for ``unannotate`` the serial of the annotation to delete."""
        if operation == "unannotate":
            path = self._annotation_path(channel, message_serial, stored)
            return PreparedRequest("DELETE", path, None)
        suffix = "/annotations" if operation == "annotate" else f"/{operation}"
        if suffix not in _STORED_SUFFIXES:
            raise InvalidEvent(f"unknown message operation {operation!r}", field="operation")
        path = self._message_path(channel, message_serial, suffix)
        return PreparedRequest("POST", path, stored.encode())

    def prepare_annotation_lookup(
        self, channel: str, message_serial: str, annotation_type: str, cursor: str | None
    ) -> PreparedRequest:
        """One page of a message's annotation events of one type (an outbox retry's lookup)."""
        query = {"type": annotation_type}
        if cursor is not None:
            query["from_serial"] = cursor
        return self._get(self._message_path(channel, message_serial, "/annotations"), query)

    def prepare_history_scan(
        self, channel: str, start_time_ms: int, end_time_ms: int, cursor: str | None
    ) -> PreparedRequest:
        """One page of a channel's history between two times, newest first (an outbox lookup
        of a message's serial by its ``message_id``: no endpoint finds a message by that id).
        Every page repeats the bounds and direction its cursor was issued for."""
        params = HistoryParams(
            direction="newest_first",
            cursor=cursor,
            start_time_ms=start_time_ms,
            end_time_ms=end_time_ms,
        )
        return self._get(self._channel_path(channel, "/history"), params.to_query())

    # -- users ------------------------------------------------------------------------------

    @operation
    def terminate_user_connections(self, user_id: str) -> Call[Result]:
        """Close every connection of a signed-in user (Pusher's endpoint; soketi has it)."""
        return Call(self._post(self._user_path(user_id, "/terminate_connections"), {}), keep)

    @operation
    def force_reconnect_user(self, user_id: str) -> Call[Result]:
        """Ask every connection of a user to reconnect (Sockudo's endpoint)."""
        return Call(self._post(self._user_path(user_id, "/force_reconnect"), {}), keep)

    def _user_path(self, user_id: str, suffix: str) -> str:
        check_text(user_id, "user_id")
        return self.app_path(f"/users/{quote_path_segment(user_id)}{suffix}")

    def channel_shared_secret(self, channel: str) -> bytes:
        """The 32-byte key of a ``private-encrypted-`` channel (what its subscribers decrypt with)."""
        if not crypto.is_encrypted_channel(channel):
            raise InvalidEvent(
                f"{channel!r} is not a {crypto.ENCRYPTED_PREFIX} channel", field="channel"
            )
        if self._master_key is None:
            raise InvalidEvent("no encryption master key is configured", field="channel")
        return crypto.channel_key(channel, self._master_key)


_STORED_SUFFIXES = ("/update", "/delete", "/append", "/annotations")


def params_of(cls: type[Any], given: Any, **keywords: Any) -> dict[str, str]:
    """The query of an SDK params object, or of our keywords (see :func:`.params.merge_params`)."""
    return params_or(cls, given, keywords).to_query()


def params_or(cls: type[Any], given: Any, keywords: Mapping[str, Any]) -> Any:
    try:
        return merge_params(cls, given, keywords)
    except TypeError as exc:  # an unknown keyword
        raise InvalidEvent(f"{cls.__name__}: {exc}", field="params") from exc


def _walk(
    page_call: Callable[[Any], Call[Any]], first: Any, cursor_field: str = "cursor"
) -> Walk[Any]:
    """Pages of ``page_call``: each next page repeats ``first`` with only the cursor changed."""

    def after(page: Page) -> Call[Page] | None:
        if not page.has_more or not page.next_cursor:
            return None
        return page_call(dataclasses.replace(first, **{cursor_field: page.next_cursor}))

    return Walk(page_call(first), after)


def check_serial(value: object, field: str) -> str:
    """A message, version or annotation serial as Sockudo takes it in a request path, or
    :class:`InvalidEvent` naming ``field``."""
    serial = check_text(value, field)
    if utf8_len(serial) > MAX_SERIAL_BYTES or any(c.isspace() for c in serial):
        raise InvalidEvent(
            f"{field} must be 1..{MAX_SERIAL_BYTES} bytes without whitespace", field=field
        )
    return serial

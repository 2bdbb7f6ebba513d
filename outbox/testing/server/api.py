"""Sockudo's API beyond publishing, as plain functions over :mod:`.store`.

Channel state (``http_handler/channels.rs``), durable history and its operator controls
(``http_handler/history/mod.rs``), presence history (``http_handler/presence_history/mod.rs``),
versioned messages (``http_handler/versioned_messages/``) and annotations
(``http_handler/annotations/mod.rs``). Checks run in the handlers' order: body and query
extraction, channel name, feature flags and policy, input validation, then existence.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote

from .config import ServerConfig
from .request import parse_json, validate_channel
from .state import Clock, DeliveryLog
from .store import (
    DIRECTIONS,
    AnnotationEvent,
    Bounds,
    Connection,
    StoreError,
    Stores,
    Stream,
    Version,
    VersionedMessage,
    fingerprint,
    read_page,
)
from .wire import ApiError, Rejection, Response, bad_request, dumps

_CHANNEL_ROUTE = re.compile(r"^/apps/[^/]+/channels(?:/([^/]+)(/.*)?)?$")
_USER_ROUTE = re.compile(r"^/apps/[^/]+/users/([^/]+)/(terminate_connections|force_reconnect)$")
#: (method, sub-path pattern under a channel) -> handler name; first match wins.
_CHANNEL_ENDPOINTS: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"^$"), "channel"),
    ("GET", re.compile(r"^/users$"), "channel_users"),
    ("GET", re.compile(r"^/history$"), "history"),
    ("GET", re.compile(r"^/history/state$"), "history_state"),
    ("POST", re.compile(r"^/history/reset$"), "history_reset"),
    ("POST", re.compile(r"^/history/purge$"), "history_purge"),
    ("GET", re.compile(r"^/presence/history$"), "presence_history"),
    ("GET", re.compile(r"^/presence/history/state$"), "presence_history_state"),
    ("POST", re.compile(r"^/presence/history/reset$"), "presence_history_reset"),
    ("GET", re.compile(r"^/presence/history/snapshot$"), "presence_snapshot"),
    ("GET", re.compile(r"^/messages/([^/]+)$"), "message"),
    ("GET", re.compile(r"^/messages/([^/]+)/versions$"), "message_versions"),
    ("POST", re.compile(r"^/messages/([^/]+)/(update|delete|append)$"), "mutation"),
    ("GET", re.compile(r"^/messages/([^/]+)/annotations$"), "annotations"),
    ("POST", re.compile(r"^/messages/([^/]+)/annotations$"), "annotation_publish"),
    ("DELETE", re.compile(r"^/messages/([^/]+)/annotations/([^/]+)$"), "annotation_delete"),
]
_SUMMARIZERS = ("total", "flag", "distinct", "unique", "multiple")
_ANNOTATION_TYPE = re.compile(r"^[^\s:]+:(total|flag|distinct|unique|multiple)\.v1$")
#: Field types of the mutation bodies (serde: a mismatch is axum's plain-text 422).
_MUTATION_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "extras": (dict,),
    "clear_fields": (list,),
    "client_id": (str,),
    "socket_id": (str,),
    "description": (str,),
    "op_id": (str,),
}


@dataclass(frozen=True)
class Route:
    """A matched endpoint: its name for the request counters, and how to answer it."""

    endpoint: str
    method: str
    answer: Callable[[dict[str, str], bytes, Mapping[str, str]], Response]


def _feature_disabled(message: str) -> ApiError:
    return ApiError(422, "feature_disabled", message)


def _ok(value: Any) -> Response:
    return Response(200, dumps(value))


def _int(query: Mapping[str, str], *names: str) -> int | None:
    """A numeric query value (the first of ``names`` present); not a number: axum's 400."""
    for name in names:
        if name in query:
            try:
                return int(query[name])
            except ValueError:
                raise Rejection(
                    400, f"Failed to deserialize query string: {name}: invalid digit found"
                ) from None
    return None


def _limit(query: Mapping[str, str], cap: int, what: str) -> int:
    limit = _int(query, "limit")
    if limit is not None and limit < 0:
        raise Rejection(400, "Failed to deserialize query string: limit: invalid digit found")
    if limit == 0:
        raise bad_request(f"{what} limit must be greater than 0")
    return min(limit or cap, cap)


class AppState(Protocol):
    """What the routes below read of their app (:class:`~.app.SockudoApp`), at every request:
    the HTTP layer swaps ``config`` while the server runs (features and limits)."""

    config: ServerConfig
    clock: Clock
    stores: Stores
    deliveries: DeliveryLog


class ChannelApi:
    """The non-publish routes of one app; state lives in ``app.stores``."""

    def __init__(self, app: AppState) -> None:
        self.app = app

    @property
    def stores(self) -> Stores:
        return self.app.stores

    def now_ms(self) -> int:
        return int(self.app.clock.now() * 1000)

    # -- routing ------------------------------------------------------------------------------

    def match(self, path: str) -> tuple[str, dict[str, Route]] | None:
        """The endpoint name and its routes by method, or None (a 404 without a body)."""
        user = _USER_ROUTE.match(path)
        if user:
            user_id, action = unquote(user.group(1)), user.group(2)
            route = Route(
                action, "POST", lambda q, b, h: self.terminate(user_id, action == "force_reconnect")
            )
            return action, {"POST": route}
        found = _CHANNEL_ROUTE.match(path)
        if found is None:
            return None
        if found.group(1) is None:
            return "channels", {"GET": Route("channels", "GET", self.list_channels)}
        channel, rest = unquote(found.group(1)), found.group(2) or ""
        routes: dict[str, Route] = {}
        name = None
        for method, pattern, endpoint in _CHANNEL_ENDPOINTS:
            hit = pattern.match(rest)
            if hit and method not in routes:
                args = [unquote(g) for g in hit.groups()]
                handler = getattr(self, endpoint)
                routes[method] = Route(
                    endpoint,
                    method,
                    lambda q, b, h, handler=handler, args=args: handler(channel, *args, q, b, h),
                )
                name = name or endpoint
        return (name, routes) if name else None

    # -- channel state ------------------------------------------------------------------------

    def list_channels(self, query: dict[str, str], body: bytes, headers: Any) -> Response:
        prefix = query.get("filter_by_prefix", "")
        info = {t.strip() for t in query.get("info", "").split(",")} if "info" in query else None
        result: dict[str, Any] = {}
        with self.stores.lock:
            for name in self.stores.occupied_channels():
                if not name.startswith(prefix):
                    continue
                validate_channel(name, self.app.config)
                if info is None:
                    result[name] = {}
                    continue
                if (
                    "user_count" in info
                    and not prefix.startswith("presence-")
                    and not name.startswith("presence-")
                ):
                    raise bad_request(
                        "user_count is only available for presence channels. "
                        "Use filter_by_prefix=presence-"
                    )
                entry = self._counts(name, info)
                if entry:  # asked for info, got none for this channel: left out
                    result[name] = entry
        return _ok({"channels": result})

    def _counts(self, channel: str, info: set[str]) -> dict[str, int]:
        entry: dict[str, int] = {}
        if "subscription_count" in info:
            entry["subscription_count"] = self.stores.subscribers(channel)
        if "user_count" in info and channel.startswith("presence-"):
            entry["user_count"] = len(self.stores.members(channel))
        return entry

    def channel(self, channel: str, query: dict[str, str], body: bytes, headers: Any) -> Response:
        validate_channel(channel, self.app.config)
        info = {t.strip() for t in query.get("info", "").split(",")}
        if "user_count" in info and not channel.startswith("presence-"):
            raise bad_request("user_count is only available for presence channels")
        with self.stores.lock:
            value: dict[str, Any] = {"occupied": self.stores.subscribers(channel) > 0}
            value.update(self._counts(channel, info))
        return _ok(value)

    def channel_users(
        self, channel: str, query: dict[str, str], body: bytes, headers: Any
    ) -> Response:
        validate_channel(channel, self.app.config)
        if not channel.startswith("presence-"):
            raise bad_request("Only presence channels support this endpoint")
        with self.stores.lock:
            users = [{"id": user_id} for user_id in self.stores.members(channel)]
        return _ok({"users": users})

    def terminate(self, user_id: str, reconnect: bool) -> Response:
        """Both close the user's connections here: a reconnecting client is a new connection."""
        with self.stores.lock:
            for conn in [c for c in self.stores.connections.values() if c.user_id == user_id]:
                self.disconnect(conn.socket_id, "forced_disconnect")
        return _ok({"ok": True})

    # -- connections (driven by the control API) ------------------------------------------------

    def connect(
        self, channels: list[str], user_id: str | None = None, user_info: Any = None
    ) -> str:
        """A simulated subscriber joins ``channels``; a presence channel needs a ``user_id``."""
        with self.stores.lock:
            socket_id = self.stores.new_socket_id()
            conn = Connection(socket_id, user_id, user_info)
            self.stores.connections[socket_id] = conn
            for channel in channels:
                validate_channel(channel, self.app.config)
                if channel.startswith("presence-") and user_id is None:
                    raise ValueError(f"{channel} is a presence channel: a user_id is required")
                joined = channel.startswith("presence-") and user_id not in self.stores.members(
                    channel
                )
                conn.channels.add(channel)
                if joined:
                    self._presence_event(channel, "member_added", "join", conn)
            return socket_id

    def disconnect(self, socket_id: str, cause: str = "disconnect") -> None:
        with self.stores.lock:
            conn = self.stores.connections.pop(socket_id, None)
            if conn is None:
                raise KeyError(f"no connection {socket_id}")
            for channel in sorted(conn.channels):
                if channel.startswith("presence-") and conn.user_id not in self.stores.members(
                    channel
                ):
                    self._presence_event(channel, "member_removed", cause, conn)

    def _presence_event(self, channel: str, event: str, cause: str, conn: Connection) -> None:
        if not self.app.config.presence_history:
            return
        payload: dict[str, Any] = {"user_id": conn.user_id}
        if conn.user_info is not None:
            payload["user_info"] = conn.user_info
        fields = {
            "event": event,
            "cause": cause,
            "user_id": conn.user_id,
            "connection_id": conn.socket_id,
            "dead_node_id": None,
            "presence_event": payload,
        }
        stream = self.stores.stream(self.stores.presence, channel)
        stream.append(self.now_ms(), len(dumps(payload)), fields)

    # -- durable history ----------------------------------------------------------------------

    def history_on(self, channel: str) -> bool:
        """``resolved_history``: on globally, or forced on by the app's annotation policy."""
        config = self.app.config
        return config.history or config.app_annotations

    def _require_history(self, channel: str) -> None:
        validate_channel(channel, self.app.config)
        if not self.history_on(channel):
            raise _feature_disabled(
                f"Durable history is disabled by policy for channel '{channel}'"
            )

    def record_publish(
        self, channel: str, name: str, data: str, event: Mapping[str, Any]
    ) -> dict[str, Any]:
        """After a publish reached ``channel``: its history row and create version, if on.

        Returns the serials for the publish answer (``message_serial``... when versioned).
        """
        config = self.app.config
        if not self.history_on(channel):
            return {}
        if not config.history:
            # The annotation policy forces history on, but the store is Sockudo's
            # NoopHistoryStore: every publish fails with a Configuration error.
            raise ApiError(500, "internal_error", "Internal server error")
        now = self.now_ms()
        with self.stores.lock:
            stream = self.stores.stream(self.stores.history, channel)
            delivery = self.stores.next_delivery_serial(channel)
            message: dict[str, Any] = {"event": name, "channel": channel, "data": data}
            for key in ("message_id", "extras"):
                if event.get(key) is not None:
                    message[key] = event[key]
            message.update(stream_id=stream.stream_id, serial=stream.next_serial)
            serial = self.stores.process_serial(now) if config.versioned_messages else None
            row = stream.append(
                now,
                len(data.encode()),
                {
                    "message_id": event.get("message_id"),
                    "event_name": name,
                    "operation_kind": "append",
                    "message": message,
                    "message_serial": serial,
                },
            )
            if serial is None:
                return {}
            create = Version(
                "create", serial, now, name, data, event.get("extras"), delivery_serial=delivery
            )
            self.stores.messages[(channel, serial)] = VersionedMessage(
                channel, serial, row.serial, [create]
            )
        return {
            "message_serial": serial,
            "history_serial": row.serial,
            "delivery_serial": delivery,
            "version_serial": serial,
        }

    def _history_page_query(self, query: dict[str, str], cap: int, what: str) -> dict[str, Any]:
        limit = _limit(query, cap, what)
        raw = query.get("direction", "newest_first").lower()
        aliases = {"newest_first": "newest_first", "backwards": "newest_first"}
        aliases.update(reverse="newest_first", oldest_first="oldest_first")
        aliases.update(forwards="oldest_first", forward="oldest_first")
        if raw not in aliases:
            raise bad_request(
                f"Invalid direction '{raw}'. Accepted values: newest_first, oldest_first, "
                "backwards, forwards"
            )
        bounds = Bounds(
            _int(query, "start_serial"),
            _int(query, "end_serial"),
            _int(query, "start_time_ms", "start"),
            _int(query, "end_time_ms", "end"),
        )
        if None not in (bounds.start_serial, bounds.end_serial) and (
            bounds.start_serial > bounds.end_serial  # type: ignore[operator]
        ):
            raise bad_request("start_serial must be less than or equal to end_serial")
        if None not in (bounds.start_time_ms, bounds.end_time_ms) and (
            bounds.start_time_ms > bounds.end_time_ms  # type: ignore[operator]
        ):
            raise bad_request("start_time_ms must be less than or equal to end_time_ms")
        return {
            "direction": aliases[raw],
            "limit": limit,
            "bounds": bounds,
            "cursor": query.get("cursor"),
        }

    def _page(
        self, stream: Stream, channel: str, page_query: dict[str, Any], kind: str
    ) -> tuple[list[Any], dict[str, Any]]:
        try:
            page = read_page(stream, app_id=self.app.config.app_id, channel=channel, **page_query)
        except StoreError as error:
            raise bad_request(str(error)) from None
        retained = stream.retained()
        continuity = {
            "stream_id": stream.stream_id,
            "oldest_available_serial": retained["oldest_available_serial"],
            "newest_available_serial": retained["newest_available_serial"],
            "oldest_available_published_at_ms": retained["oldest_available_published_at_ms"],
            "newest_available_published_at_ms": retained["newest_available_published_at_ms"],
            f"retained_{kind}": retained["count"],
            "retained_bytes": retained["bytes"],
        }
        if kind == "events":
            continuity["degraded"] = False
        continuity["complete"] = not page.has_more and not page.truncated
        continuity["truncated_by_retention"] = page.truncated
        envelope = {
            "direction": page_query["direction"],
            "limit": page_query["limit"],
            "has_more": page.has_more,
            "next_cursor": page.next_cursor,
            "bounds": vars(page_query["bounds"]).copy(),
            "continuity": continuity,
            "stream_state": self._state(stream, kind),
        }
        return page.rows, envelope

    def _state(self, stream: Stream, kind: str) -> dict[str, Any]:
        state: dict[str, Any] = {"stream_id": stream.stream_id, "durable_state": "healthy"}
        if kind == "events":
            state["continuity_proven"] = True
        else:
            state["recovery_allowed"] = True
        state.update(
            reset_required=False,
            reason=None,
            node_id=None,
            last_transition_at_ms=None,
            authoritative_source="memory",
            observed_source="memory",
        )
        return state

    def _stream_payload(self, stream: Stream, kind: str) -> dict[str, Any]:
        retained = stream.retained()
        return {
            "stream_id": stream.stream_id,
            "next_serial": stream.next_serial,
            "retained": {
                "stream_id": stream.stream_id,
                f"retained_{kind}": retained["count"],
                "retained_bytes": retained["bytes"],
                "oldest_available_serial": retained["oldest_available_serial"],
                "newest_available_serial": retained["newest_available_serial"],
                "oldest_available_published_at_ms": retained["oldest_available_published_at_ms"],
                "newest_available_published_at_ms": retained["newest_available_published_at_ms"],
            },
            "state": self._state(stream, kind),
        }

    def history(self, channel: str, query: dict[str, str], body: bytes, headers: Any) -> Response:
        self._require_history(channel)
        page_query = self._history_page_query(
            query, self.app.config.history_max_page_size, "History"
        )
        with self.stores.lock:
            stream = self.stores.stream(self.stores.history, channel)
            rows, envelope = self._page(stream, channel, page_query, "messages")
            items = [self._history_item(channel, stream, row) for row in rows]
        return _ok({"items": items, **envelope})

    def _history_item(self, channel: str, stream: Stream, row: Any) -> dict[str, Any]:
        item = {
            "stream_id": stream.stream_id,
            "serial": row.serial,
            "published_at_ms": row.published_at_ms,
            "message_id": row.fields["message_id"],
            "event_name": row.fields["event_name"],
            "operation_kind": row.fields["operation_kind"],
            "payload_size_bytes": row.size,
            "message": row.fields["message"],
        }
        if self.app.config.versioned_messages:
            # Each item shows the latest version of its logical message, at its original serial.
            found = self.stores.messages.get((channel, row.fields["message_serial"]))
            if found is not None:
                action = found.latest.action
                item.update(
                    event_name=f"sockudo:message.{action}",
                    operation_kind=f"message.{action}",
                    message=self._wire(found, found.latest, aggregate=True),
                )
        return item

    def history_state(
        self, channel: str, query: dict[str, str], body: bytes, headers: Any
    ) -> Response:
        self._require_history(channel)
        with self.stores.lock:
            stream = self.stores.stream(self.stores.history, channel)
            return _ok({"channel": channel, "stream": self._stream_payload(stream, "messages")})

    def _operator_body(
        self, channel: str, body: bytes, headers: Mapping[str, str], operation: str
    ) -> dict[str, Any]:
        payload = parse_json(headers, body)
        required = ("confirm_channel", "confirm_operation", "reason")
        if not isinstance(payload, dict) or any(
            not isinstance(payload.get(k), str) for k in required
        ):
            raise Rejection(
                422,
                "Failed to deserialize the JSON body into the target type: missing field "
                "`confirm_channel`, `confirm_operation` or `reason`",
            )
        if payload["confirm_channel"] != channel:
            raise bad_request("confirm_channel must exactly match the channel path")
        if payload["confirm_operation"] != operation:
            raise bad_request(f"confirm_operation must be '{operation}'")
        if not payload["reason"].strip():
            raise bad_request("reason must not be empty")
        return payload

    def _reset(
        self, streams: dict[str, Stream], channel: str, payload: dict[str, Any], kind: str
    ) -> Response:
        with self.stores.lock:
            old = self.stores.stream(streams, channel)
            new = Stream()
            streams[channel] = new
            return _ok(
                {
                    "ok": True,
                    "operation": "reset",
                    "channel": channel,
                    "reason": payload["reason"],
                    "requested_by": payload.get("requested_by"),
                    "previous_stream_id": old.stream_id,
                    "new_stream_id": new.stream_id,
                    f"purged_{kind}": len(old.rows),
                    "purged_bytes": sum(r.size for r in old.rows),
                    "stream": self._stream_payload(new, kind),
                }
            )

    def history_reset(
        self, channel: str, query: dict[str, str], body: bytes, headers: Mapping[str, str]
    ) -> Response:
        payload = self._operator_body(channel, body, headers, "reset")
        self._require_history(channel)
        # Only the history store is reset: message serials still resolve (history/mod.rs).
        return self._reset(self.stores.history, channel, payload, "messages")

    def history_purge(
        self, channel: str, query: dict[str, str], body: bytes, headers: Mapping[str, str]
    ) -> Response:
        payload = self._operator_body(channel, body, headers, "purge")
        mode = payload.get("mode")
        if mode not in ("all", "before_serial", "before_time_ms"):
            raise Rejection(
                422,
                "Failed to deserialize the JSON body into the target type: mode: unknown variant",
            )
        self._require_history(channel)
        before_serial, before_time = payload.get("before_serial"), payload.get("before_time_ms")
        given = tuple(
            k
            for k, v in (("before_serial", before_serial), ("before_time_ms", before_time))
            if v is not None
        )
        expected = {
            "all": (),
            "before_serial": ("before_serial",),
            "before_time_ms": ("before_time_ms",),
        }
        if given != expected[mode]:
            messages = {
                "all": "Purge mode 'all' does not accept bounds",
                "before_serial": "Purge mode 'before_serial' requires before_serial only",
                "before_time_ms": "Purge mode 'before_time_ms' requires before_time_ms only",
            }
            raise bad_request(messages[mode])
        with self.stores.lock:
            stream = self.stores.stream(self.stores.history, channel)
            gone = [
                r
                for r in stream.rows
                if mode == "all"
                or (mode == "before_serial" and r.serial < before_serial)
                or (mode == "before_time_ms" and r.published_at_ms < before_time)
            ]
            stream.rows = [r for r in stream.rows if r not in gone]
            return _ok(
                {
                    "ok": True,
                    "operation": "purge",
                    "channel": channel,
                    "mode": mode,
                    "before_serial": before_serial,
                    "before_time_ms": before_time,
                    "reason": payload["reason"],
                    "requested_by": payload.get("requested_by"),
                    "purged_messages": len(gone),
                    "purged_bytes": sum(r.size for r in gone),
                    "stream": self._stream_payload(stream, "messages"),
                }
            )

    # -- presence history ---------------------------------------------------------------------

    def _require_presence_history(self, channel: str) -> None:
        validate_channel(channel, self.app.config)
        if not channel.startswith("presence-"):
            raise bad_request("Only presence channels support this endpoint")
        if not self.app.config.presence_history:
            raise _feature_disabled(
                f"Presence history is disabled by policy for channel '{channel}'"
            )

    def presence_history(
        self, channel: str, query: dict[str, str], body: bytes, headers: Any
    ) -> Response:
        self._require_presence_history(channel)
        cap = self.app.config.presence_history_max_page_size
        page_query = self._history_page_query(query, cap, "Presence history")
        with self.stores.lock:
            stream = self.stores.stream(self.stores.presence, channel)
            rows, envelope = self._page(stream, channel, page_query, "events")
            items = [
                {
                    "stream_id": stream.stream_id,
                    "serial": r.serial,
                    "published_at_ms": r.published_at_ms,
                    **{k: v for k, v in r.fields.items() if k != "presence_event"},
                    "payload_size_bytes": r.size,
                    "presence_event": r.fields["presence_event"],
                }
                for r in rows
            ]
        return _ok({"items": items, **envelope})

    def presence_history_state(
        self, channel: str, query: dict[str, str], body: bytes, headers: Any
    ) -> Response:
        self._require_presence_history(channel)
        with self.stores.lock:
            stream = self.stores.stream(self.stores.presence, channel)
            return _ok({"channel": channel, "stream": self._stream_payload(stream, "events")})

    def presence_history_reset(
        self, channel: str, query: dict[str, str], body: bytes, headers: Mapping[str, str]
    ) -> Response:
        payload = self._operator_body(channel, body, headers, "reset")
        self._require_presence_history(channel)
        return self._reset(self.stores.presence, channel, payload, "events")

    def presence_snapshot(
        self, channel: str, query: dict[str, str], body: bytes, headers: Any
    ) -> Response:
        self._require_presence_history(channel)
        at_serial = _int(query, "at_serial")
        at_time = _int(query, "at_time_ms", "at")
        with self.stores.lock:
            stream = self.stores.stream(self.stores.presence, channel)
            replayed = [
                r
                for r in stream.rows
                if (at_serial is None or r.serial <= at_serial)
                and (at_time is None or r.published_at_ms <= at_time)
            ]
            members: dict[str, Any] = {}
            for r in replayed:
                if r.fields["event"] == "member_removed":
                    members.pop(r.fields["user_id"], None)
                else:
                    members[r.fields["user_id"]] = {
                        "user_id": r.fields["user_id"],
                        "last_event": r.fields["event"],
                        "last_event_serial": r.serial,
                        "last_event_at_ms": r.published_at_ms,
                    }
            retained = stream.retained()
            return _ok(
                {
                    "channel": channel,
                    "members": list(members.values()),
                    "member_count": len(members),
                    "events_replayed": len(replayed),
                    "snapshot_serial": replayed[-1].serial if replayed else None,
                    "snapshot_time_ms": replayed[-1].published_at_ms if replayed else None,
                    "continuity": {
                        "stream_id": stream.stream_id,
                        "oldest_available_serial": retained["oldest_available_serial"],
                        "newest_available_serial": retained["newest_available_serial"],
                        "retained_events": retained["count"],
                        "degraded": False,
                        "complete": True,
                    },
                }
            )

    # -- versioned messages -------------------------------------------------------------------

    def _require_versioned(self, channel: str) -> None:
        validate_channel(channel, self.app.config)
        if not self.app.config.versioned_messages:
            raise _feature_disabled(f"Versioned messages are disabled for channel '{channel}'")

    @staticmethod
    def _check_serial(serial: str) -> None:
        if not serial or len(serial.encode()) > 128 or any(c.isspace() for c in serial):
            raise bad_request("message serial must be 1..=128 bytes without whitespace")

    def _find(self, channel: str, serial: str) -> VersionedMessage:
        found = self.stores.messages.get((channel, serial))
        if found is None:
            raise ApiError(
                404, "not_found", f"Message '{serial}' was not found in channel '{channel}'"
            )
        return found

    def _wire(self, message: VersionedMessage, version: Version, aggregate: bool) -> dict[str, Any]:
        """``VersionedRealtimeMessage``; the mutation projection shows an append's fragment."""
        data = version.fragment if (not aggregate and version.action == "append") else version.data
        item: dict[str, Any] = {
            "event": f"sockudo:message.{version.action}",
            "channel": message.channel,
            "data": data,
        }
        if version.name is not None:
            item["name"] = version.name
        if version.extras is not None:
            item["extras"] = version.extras
        item.update(
            action=version.action,
            message_serial=message.message_serial,
            history_serial=message.history_serial,
            delivery_serial=version.delivery_serial,
        )
        meta: dict[str, Any] = {"serial": version.serial}
        for key in ("client_id",):
            if getattr(version, key) is not None:
                meta[key] = getattr(version, key)
        meta["timestamp_ms"] = version.timestamp_ms
        for key in ("description", "metadata"):
            if getattr(version, key) is not None:
                meta[key] = getattr(version, key)
        item["version"] = meta
        return item

    def message(
        self, channel: str, serial: str, query: dict[str, str], body: bytes, headers: Any
    ) -> Response:
        self._require_versioned(channel)
        self._check_serial(serial)
        with self.stores.lock:
            found = self._find(channel, serial)
            return _ok({"channel": channel, "item": self._wire(found, found.latest, True)})

    def message_versions(
        self, channel: str, serial: str, query: dict[str, str], body: bytes, headers: Any
    ) -> Response:
        direction = query.get("direction", "newest_first")
        if direction not in DIRECTIONS:  # a serde enum in the Query struct: axum's plain 400
            raise Rejection(
                400, f"Failed to deserialize query string: unknown variant `{direction}`"
            )
        self._require_versioned(channel)
        limit = _limit(query, self.app.config.versioned_max_page_size, "Version history")
        self._check_serial(serial)
        cursor = query.get("cursor")
        with self.stores.lock:
            found = self._find(channel, serial)
            versions = list(found.versions)
            if direction == "newest_first":
                versions.reverse()
            if cursor is not None:
                versions = [
                    v
                    for v in versions
                    if (v.serial < cursor if direction == "newest_first" else v.serial > cursor)
                ]
            page, has_more = versions[:limit], len(versions) > limit
            answer: dict[str, Any] = {
                "channel": channel,
                "direction": direction,
                "limit": limit,
                "has_more": has_more,
            }
            if has_more:  # omitted, not null, on the last page
                answer["next_cursor"] = page[-1].serial
            answer["items"] = [self._wire(found, v, aggregate=False) for v in page]
        return _ok(answer)

    def mutation(
        self,
        channel: str,
        serial: str,
        action: str,
        query: dict[str, str],
        body: bytes,
        headers: Mapping[str, str],
    ) -> Response:
        payload = parse_json(headers, body)
        request = self._mutation_request(payload, action)
        self._require_versioned(channel)
        if not self.history_on(channel):
            raise _feature_disabled(
                f"Durable history is disabled by policy for channel '{channel}'"
            )
        self._validate_mutation(request, action)
        op_id = request.get("op_id")
        if op_id is not None and not 1 <= len(op_id.encode()) <= 64:
            raise bad_request("op_id must be 1..=64 bytes")
        self._check_serial(serial)
        if request.get("socket_id") is not None:
            raise ApiError(401, "auth_failed", "Actor socket is not connected")
        with self.stores.lock:
            found = self._find(channel, serial)
            print_ = fingerprint(
                (k, v) for k, v in request.items() if k not in ("op_id", "socket_id")
            )
            if op_id is not None and (action, op_id) in found.operations:
                first_print, version = found.operations[(action, op_id)]
                if first_print != print_:
                    raise bad_request("idempotency key was already used with a different payload")
                return self._mutation_answer(found, version, "duplicate")
            version = self._apply(found, action, request)
            if op_id is not None:
                found.operations[(action, op_id)] = (print_, version)
            found.versions.append(version)
            self.app.deliveries.record(
                self.app.clock,
                channel=channel,
                name=f"sockudo:message.{action}",
                data=json.dumps(self._wire(found, version, aggregate=False)),
                message_id=version.serial,
                endpoint="mutation",
            )
            return self._mutation_answer(found, version, "applied")

    @staticmethod
    def _mutation_request(payload: Any, action: str) -> dict[str, Any]:
        if not isinstance(payload, dict):
            raise Rejection(422, "Failed to deserialize the JSON body into the target type")
        for key, types in _MUTATION_TYPES.items():
            if payload.get(key) is not None and not isinstance(payload[key], types):
                raise Rejection(
                    422,
                    f"Failed to deserialize the JSON body into the target type: {key}: "
                    "invalid type",
                )
        if action == "append" and not isinstance(payload.get("data"), str):
            raise Rejection(
                422,
                "Failed to deserialize the JSON body into the target type: missing field `data`",
            )
        known = set(_MUTATION_TYPES) | {"data", "metadata"}
        if action == "delete":
            known.discard("name")
        if action == "append":
            known -= {"name", "clear_fields"}
        return {k: v for k, v in payload.items() if k in known and v is not None}

    @staticmethod
    def _validate_mutation(request: dict[str, Any], action: str) -> None:
        if action == "update" and not request:
            raise bad_request("update requires at least one field")
        if action == "append" and request["data"] == "":
            raise bad_request("append data must not be empty")
        cleared = request.get("clear_fields", [])
        if len(set(map(str, cleared))) != len(cleared):
            raise bad_request("clear_fields must not contain duplicates")
        for name in cleared:
            if name not in ("name", "data", "extras"):
                raise Rejection(
                    422,
                    f"Failed to deserialize the JSON body: clear_fields: unknown variant `{name}`",
                )
            if name in request:
                raise bad_request(f"field '{name}' cannot be both replaced and cleared")

    def _apply(self, message: VersionedMessage, action: str, request: dict[str, Any]) -> Version:
        """Last writer wins: a shallow keep / clear / replace of the latest version."""
        latest = message.latest
        now = self.now_ms()
        values = {"name": latest.name, "data": latest.data, "extras": latest.extras}
        fragment = None
        if action == "append":
            if latest.data is not None and not isinstance(latest.data, str):
                raise bad_request("append requires string message data")
            fragment = request["data"]
            values["data"] = (latest.data or "") + fragment
            if "extras" in request:
                values["extras"] = request["extras"]
        else:
            for name in ("name", "data", "extras"):
                if name in request:
                    values[name] = request[name]
            for name in request.get("clear_fields", []):
                values[name] = None
        return Version(
            action,
            self.stores.process_serial(now),
            now,
            values["name"],
            values["data"],
            values["extras"],
            delivery_serial=self.stores.next_delivery_serial(message.channel),
            client_id=request.get("client_id"),
            description=request.get("description"),
            metadata=request.get("metadata"),
            fragment=fragment,
        )

    @staticmethod
    def _mutation_answer(message: VersionedMessage, version: Version, status: str) -> Response:
        return _ok(
            {
                "channel": message.channel,
                "message_serial": message.message_serial,
                "action": version.action,
                "accepted": True,
                "version_serial": version.serial,
                "history_serial": message.history_serial,
                "delivery_serial": version.delivery_serial,
                "status": status,
            }
        )

    # -- annotations --------------------------------------------------------------------------

    def _require_annotations(self, channel: str, history: bool = True) -> None:
        self._require_versioned(channel)
        config = self.app.config
        if not config.annotations:
            raise _feature_disabled(f"Annotations are disabled globally for channel '{channel}'")
        if not config.app_annotations:
            raise ApiError(
                403,
                "forbidden",
                f"Annotations are disabled by channel policy for channel '{channel}'",
            )
        if history and not self.history_on(channel):
            raise _feature_disabled(
                f"Durable history is disabled by policy for channel '{channel}'"
            )

    def annotation_publish(
        self, channel: str, serial: str, query: dict[str, str], body: bytes, headers: Any
    ) -> Response:
        payload = parse_json(headers, body)
        if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
            raise Rejection(
                422,
                "Failed to deserialize the JSON body into the target type: missing field `type`",
            )
        # camelCase only (no alias): a snake_case client_id is silently ignored.
        request = {
            k: payload.get(k)
            for k in ("type", "name", "clientId", "socketId", "count", "data", "encoding")
        }
        self._require_annotations(channel)
        if request["count"] == 0:
            raise bad_request("annotation count must be greater than 0")
        self._check_serial(serial)
        with self.stores.lock:
            self._find(channel, serial)
            kind = _ANNOTATION_TYPE.match(request["type"])
            if kind is None or len(request["type"].encode()) > 256:
                raise bad_request(
                    f"annotation type must be namespace:summarizer.v1 with summarizer one of "
                    f"{', '.join(_SUMMARIZERS)}"
                )
            if request["socketId"] is not None:
                raise ApiError(401, "auth_failed", "Actor socket is not connected")
            summarizer = kind.group(1)
            if summarizer in ("distinct", "unique", "multiple") and not request["name"]:
                raise bad_request("annotation name is required")
            if summarizer in ("flag", "distinct", "unique") and not request["clientId"]:
                raise bad_request("annotation client_id is required")
            now = self.now_ms()
            annotation_serial = self.stores.process_serial(now)
            event = {
                "action": "annotation.create",
                "id": str(uuid.uuid4()),  # never the caller's: no idempotency on native REST
                "serial": annotation_serial,
                "messageSerial": serial,
                "type": request["type"],
            }
            for key in ("name", "clientId", "count", "data", "encoding"):
                if request[key] is not None:
                    event[key] = request[key]
            event["timestamp"] = now
            self.stores.annotations.setdefault((channel, serial), []).append(
                AnnotationEvent(annotation_serial, event)
            )
        return _ok({"annotationSerial": annotation_serial})

    def annotations(
        self, channel: str, serial: str, query: dict[str, str], body: bytes, headers: Any
    ) -> Response:
        self._require_annotations(channel)
        limit = _limit(query, self.app.config.versioned_max_page_size, "Annotation")
        self._check_serial(serial)
        if query.get("socket_id") is not None:
            raise ApiError(401, "auth_failed", "Actor socket is not connected")
        with self.stores.lock:
            self._find(channel, serial)
            events = sorted(
                self.stores.annotations.get((channel, serial), []), key=lambda e: e.serial
            )
            chosen = [
                e
                for e in events
                if ("type" not in query or e.payload["type"] == query["type"])
                and ("from_serial" not in query or e.serial > query["from_serial"])
            ]
            page, has_more = chosen[:limit], len(chosen) > limit
        return _ok(
            {
                "channel": channel,
                "messageSerial": serial,
                "limit": limit,
                "hasMore": has_more,
                "nextCursor": page[-1].serial if has_more else None,
                "items": [e.payload for e in page],
            }
        )

    def annotation_delete(
        self,
        channel: str,
        serial: str,
        annotation_serial: str,
        query: dict[str, str],
        body: bytes,
        headers: Any,
    ) -> Response:
        self._require_annotations(channel, history=False)
        self._check_serial(serial)
        if query.get("socket_id") is not None:
            raise ApiError(401, "auth_failed", "Actor socket is not connected")
        with self.stores.lock:
            events = self.stores.annotations.get((channel, serial), [])
            target = next((e for e in events if e.serial == annotation_serial), None)
            if target is None:
                raise ApiError(404, "not_found", f"Annotation '{annotation_serial}' was not found")
            if target.payload["action"] != "annotation.create":
                raise bad_request("cannot delete an annotation delete event")
            already = any(e.deletes == target.payload["id"] for e in events)
            if already:
                return _ok(
                    {
                        "annotationSerial": annotation_serial,
                        "deletedAnnotationSerial": annotation_serial,
                    }
                )
            now = self.now_ms()
            delete_serial = self.stores.process_serial(now)
            # A delete event repeats the target's fields but carries no id of its own.
            event = {
                k: v
                for k, v in target.payload.items()
                if k not in ("serial", "timestamp", "action", "id")
            }
            event = {
                "action": "annotation.delete",
                "serial": delete_serial,
                **event,
                "timestamp": now,
            }
            events.append(AnnotationEvent(delete_serial, event, deletes=target.payload["id"]))
        return _ok(
            {"annotationSerial": delete_serial, "deletedAnnotationSerial": annotation_serial}
        )

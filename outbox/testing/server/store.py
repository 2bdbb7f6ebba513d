"""The test server's memory beyond publishing: history streams, versioned messages, annotations,
connections and presence history. No HTTP here; ``api.py`` applies Sockudo's rules on top.

Modelled on Sockudo's memory stores (``sockudo-core/src/history/memory.rs``,
``version_store/memory.rs``, ``presence_history``): per-channel streams with serials from 1, an
opaque cursor bound to (app, channel, stream, direction, bounds), a reset that rotates the stream.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import threading
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

DIRECTIONS = ("newest_first", "oldest_first")
#: A cursor longer than this is refused (``HistoryCursor::decode``).
MAX_CURSOR_BYTES = 16 * 1024


class StoreError(Exception):
    """A request the stores refuse: Sockudo's ``InvalidMessageFormat`` (400 invalid_input)."""


@dataclass(frozen=True)
class Bounds:
    start_serial: int | None = None
    end_serial: int | None = None
    start_time_ms: int | None = None
    end_time_ms: int | None = None

    def matches(self, serial: int, at_ms: int) -> bool:
        return (
            (self.start_serial is None or serial >= self.start_serial)
            and (self.end_serial is None or serial <= self.end_serial)
            and (self.start_time_ms is None or at_ms >= self.start_time_ms)
            and (self.end_time_ms is None or at_ms <= self.end_time_ms)
        )


@dataclass
class Row:
    """One retained entry of a stream: a published message, or a presence transition."""

    serial: int
    published_at_ms: int
    size: int
    fields: dict[str, Any]


@dataclass
class Stream:
    """A channel's history (or presence history) stream."""

    stream_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    next_serial: int = 1
    rows: list[Row] = field(default_factory=list)

    def append(self, at_ms: int, size: int, fields: dict[str, Any]) -> Row:
        row = Row(self.next_serial, at_ms, size, fields)
        self.next_serial += 1
        self.rows.append(row)
        return row

    def retained(self) -> dict[str, Any]:
        rows = self.rows
        return {
            "stream_id": self.stream_id,
            "oldest_available_serial": rows[0].serial if rows else None,
            "newest_available_serial": rows[-1].serial if rows else None,
            "oldest_available_published_at_ms": rows[0].published_at_ms if rows else None,
            "newest_available_published_at_ms": rows[-1].published_at_ms if rows else None,
            "count": len(rows),
            "bytes": sum(r.size for r in rows),
        }


@dataclass(frozen=True)
class PageRead:
    rows: list[Row]
    has_more: bool
    next_cursor: str | None
    truncated: bool


def encode_cursor(
    app_id: str, channel: str, stream_id: str, serial: int, direction: str, bounds: Bounds
) -> str:
    payload = {
        "version": 1,
        "app_id": app_id,
        "channel": channel,
        "stream_id": stream_id,
        "serial": serial,
        "direction": direction,
        "bounds": asdict(bounds),
    }
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(text: str) -> dict[str, Any]:
    if len(text.encode()) > MAX_CURSOR_BYTES:
        raise StoreError("History cursor exceeds 16 KiB")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        cursor = json.loads(raw)
        if not isinstance(cursor, dict):
            raise ValueError("not an object")
    except (binascii.Error, ValueError) as exc:
        raise StoreError(f"Invalid history cursor: {exc}") from None
    if cursor.get("version") != 1:
        raise StoreError(f"Unsupported history cursor version: {cursor.get('version')}")
    return cursor


def read_page(
    stream: Stream,
    *,
    app_id: str,
    channel: str,
    direction: str,
    limit: int,
    bounds: Bounds,
    cursor: str | None,
) -> PageRead:
    """One page, as ``MemoryHistoryStore::read_page``: the cursor must match everything but
    ``limit``; the next page is exclusive of the cursor's serial."""
    after: int | None = None
    if cursor is not None:
        decoded = decode_cursor(cursor)
        checks = (
            ("app_id", app_id, "History cursor app does not match the request"),
            ("channel", channel, "History cursor channel does not match the request"),
            ("direction", direction, "History cursor direction does not match the request"),
            ("bounds", asdict(bounds), "History cursor bounds do not match the request"),
        )
        for key, expected, message in checks:
            if decoded.get(key) != expected:
                raise StoreError(message)
        if decoded.get("stream_id") != stream.stream_id:
            raise StoreError("Expired history cursor: channel stream changed")
        after = int(decoded.get("serial", 0))
        if stream.rows and after < stream.rows[0].serial:
            raise StoreError("Expired history cursor: cursor points before retained history")
    rows = stream.rows if direction == "oldest_first" else list(reversed(stream.rows))
    chosen = [
        r
        for r in rows
        if bounds.matches(r.serial, r.published_at_ms)
        and (
            after is None or (r.serial > after if direction == "oldest_first" else r.serial < after)
        )
    ][: limit + 1]
    has_more = len(chosen) > limit
    chosen = chosen[:limit]
    next_cursor = (
        encode_cursor(app_id, channel, stream.stream_id, chosen[-1].serial, direction, bounds)
        if has_more and chosen
        else None
    )
    oldest = stream.rows[0].serial if stream.rows else None
    truncated = (
        oldest is not None
        and oldest > 1
        and (bounds.start_serial is None or bounds.start_serial < oldest)
    )
    return PageRead(chosen, has_more, next_cursor, truncated)


# -- versioned messages ----------------------------------------------------------------------------


@dataclass
class Version:
    action: str
    serial: str
    timestamp_ms: int
    name: str | None
    data: Any
    extras: Any
    delivery_serial: int
    client_id: str | None = None
    description: str | None = None
    metadata: Any = None
    fragment: str | None = None


@dataclass
class VersionedMessage:
    channel: str
    message_serial: str
    history_serial: int
    versions: list[Version]
    #: (action, op_id) -> (payload fingerprint, the version it created)
    operations: dict[tuple[str, str], tuple[str, Version]] = field(default_factory=dict)

    @property
    def latest(self) -> Version:
        return self.versions[-1]


# -- annotations -----------------------------------------------------------------------------------


@dataclass
class AnnotationEvent:
    """One stored annotation event, already in its camelCase wire form."""

    serial: str
    payload: dict[str, Any]
    #: On a delete event: the id of the annotation it deleted.
    deletes: str | None = None


# -- connections -----------------------------------------------------------------------------------


@dataclass
class Connection:
    """A simulated subscriber (the test server has no WebSocket): its channels and user."""

    socket_id: str
    user_id: str | None = None
    user_info: Any = None
    channels: set[str] = field(default_factory=set)


class Stores:
    """All of it, behind one lock (requests are short; the test server is not a benchmark)."""

    def __init__(self, node_id: str = "node") -> None:
        self.lock = threading.RLock()
        self.node_id = node_id
        self.history: dict[str, Stream] = {}
        self.presence: dict[str, Stream] = {}
        self.messages: dict[tuple[str, str], VersionedMessage] = {}
        self.annotations: dict[tuple[str, str], list[AnnotationEvent]] = {}
        self.connections: dict[str, Connection] = {}
        self.delivery_serials: dict[str, int] = {}
        self._counter = itertools.count(1)
        self._socket_counter = itertools.count(1)

    def process_serial(self, now_ms: int) -> str:
        """``{now_ms:020}:{node}:{counter:020}``: message, version and annotation serials."""
        return f"{now_ms:020d}:{self.node_id}:{next(self._counter):020d}"

    def next_delivery_serial(self, channel: str) -> int:
        self.delivery_serials[channel] = self.delivery_serials.get(channel, 0) + 1
        return self.delivery_serials[channel]

    def stream(self, streams: dict[str, Stream], channel: str) -> Stream:
        if channel not in streams:
            streams[channel] = Stream()
        return streams[channel]

    # -- connections -------------------------------------------------------------------------

    def new_socket_id(self) -> str:
        return f"{next(self._socket_counter)}.{uuid.uuid4().int % 10**9}"

    def members(self, channel: str) -> dict[str, Connection]:
        """user_id -> one connection of that user on a presence channel."""
        found: dict[str, Connection] = {}
        for conn in self.connections.values():
            if channel in conn.channels and conn.user_id is not None:
                found.setdefault(conn.user_id, conn)
        return found

    def subscribers(self, channel: str) -> int:
        return sum(1 for c in self.connections.values() if channel in c.channels)

    def occupied_channels(self) -> list[str]:
        names: set[str] = set()
        for conn in self.connections.values():
            names.update(conn.channels)
        return sorted(names)

    def clear(self) -> None:
        with self.lock:
            for table in (
                self.history,
                self.presence,
                self.messages,
                self.annotations,
                self.connections,
                self.delivery_serials,
            ):
                table.clear()


def fingerprint(values: Iterable[tuple[str, Any]]) -> str:
    """A stable digest of a mutation's payload (Sockudo hashes its canonical operation)."""
    text = json.dumps(dict(values), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()

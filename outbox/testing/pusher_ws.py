"""A minimal Pusher-protocol (v7) WebSocket subscriber for tests, on asyncio and ``websockets``.

It does what a browser's pusher-js would, and nothing more: connect, read the socket id, subscribe
(with an authorization our own client produced), sign in, answer pings, and record every event per
channel so a test can wait for them::

    async with PusherSubscriber(server.ws_url()) as sub:
        await sub.subscribe("orders")
        sockudo.trigger("orders", "created", {"id": 1})
        [event] = await sub.wait_for("orders", 1)
        assert event.data == '{"id":1}'

``data`` is kept exactly as the server sent it (the string the publisher sent), never decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import websockets
from websockets.asyncio.client import ClientConnection


class PusherProtocolError(RuntimeError):
    """The server answered with ``pusher:error``, ``pusher:subscription_error`` or closed on us."""


@dataclass(frozen=True)
class ReceivedEvent:
    """One message as received: ``data`` is the raw string (or value) of the frame's ``data``."""

    event: str
    channel: str | None
    data: Any
    user_id: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)
    #: When the frame was read (``time.time()``), e.g. for delivery latency.
    received_at: float = field(default_factory=time.time, repr=False, compare=False)

    def json(self) -> Any:
        """``data`` parsed as JSON (when the publisher sent JSON text)."""
        return json.loads(self.data) if isinstance(self.data, str) else self.data


class PusherSubscriber:
    """One WebSocket connection to a Pusher-compatible server (soketi, Sockudo)."""

    def __init__(self, ws_url: str, *, timeout: float = 10.0) -> None:
        self.ws_url = ws_url
        self.timeout = timeout
        self.socket_id: str | None = None
        #: Every event received, per channel (``None`` for events without a channel).
        self.events: dict[str | None, list[ReceivedEvent]] = defaultdict(list)
        #: Every ``pusher:error`` / ``pusher:subscription_error`` frame received.
        self.errors: list[ReceivedEvent] = []
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._subscribed: dict[str, Any] = {}
        self._signed_in: Any = None
        self._closed_reason: str | None = None

    # -- connection -----------------------------------------------------------------------------

    async def connect(self) -> str:
        """Open the socket and wait for ``pusher:connection_established``; return the socket id."""
        self._ws = await asyncio.wait_for(websockets.connect(self.ws_url), self.timeout)
        first = await asyncio.wait_for(self._ws.recv(), self.timeout)
        message = json.loads(first)
        if message.get("event") != "pusher:connection_established":
            await self._ws.close()
            raise PusherProtocolError(f"expected pusher:connection_established, got {first!r}")
        self.socket_id = str(_json_data(message)["socket_id"])
        # Everything after the handshake is read by one task, so no frame is lost between waits.
        self._reader = asyncio.create_task(self._read_loop(), name=f"pusher-ws {self.socket_id}")
        return self.socket_id

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._ws = None
        self._reader = None

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- requests -------------------------------------------------------------------------------

    async def send(self, event: str, data: Any, channel: str | None = None) -> None:
        """Send one raw protocol frame."""
        if self._ws is None:
            raise PusherProtocolError("not connected")
        frame: dict[str, Any] = {"event": event, "data": data}
        if channel is not None:
            frame["channel"] = channel
        await self._ws.send(json.dumps(frame))

    async def subscribe(
        self,
        channel: str,
        auth: str | Mapping[str, Any] | None = None,
        channel_data: str | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Subscribe and wait for ``pusher_internal:subscription_succeeded``; return its data.

        ``auth`` is the ``auth`` string, or the whole dict our ``authenticate`` returned (its
        ``channel_data`` is then used too). Raises :class:`PusherProtocolError` on a refusal.
        """
        if isinstance(auth, Mapping):
            channel_data = channel_data if channel_data is not None else auth.get("channel_data")
            auth = auth.get("auth")
        data: dict[str, Any] = {"channel": channel}
        if auth is not None:
            data["auth"] = auth
        if channel_data is not None:
            data["channel_data"] = channel_data
        errors_before = len(self.errors)
        await self.send("pusher:subscribe", data)
        await self._wait(
            lambda: channel in self._subscribed,
            timeout,
            f"subscription to {channel!r}",
            errors_before,
        )
        return self._subscribed[channel]

    async def signin(
        self,
        auth: str | Mapping[str, Any],
        user_data: str | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """``pusher:signin`` with what our ``authenticate_user`` returned; wait for success."""
        if isinstance(auth, Mapping):
            user_data = user_data if user_data is not None else auth.get("user_data")
            auth = str(auth["auth"])
        errors_before = len(self.errors)
        await self.send("pusher:signin", {"auth": auth, "user_data": user_data})
        await self._wait(lambda: self._signed_in is not None, timeout, "sign-in", errors_before)
        return self._signed_in

    async def wait_for(
        self, channel: str | None, count: int = 1, timeout: float | None = None
    ) -> list[ReceivedEvent]:
        """Wait until ``channel`` has received at least ``count`` events; return them all."""
        await self._wait(
            lambda: len(self.events[channel]) >= count,
            timeout,
            f"{count} event(s) on {channel!r} (got {len(self.events[channel])})",
        )
        return list(self.events[channel])

    async def assert_no_more(
        self, channel: str | None, count: int, quiet_for: float = 0.3
    ) -> list[ReceivedEvent]:
        """Wait ``quiet_for`` seconds and check ``channel`` still has exactly ``count`` events."""
        await asyncio.sleep(quiet_for)
        got = list(self.events[channel])
        if len(got) != count:
            raise AssertionError(f"expected {count} event(s) on {channel!r}, got {got!r}")
        return got

    async def wait_closed(self, timeout: float | None = None) -> str:
        """Wait until the server closes this connection; return how it closed."""
        await self._wait(lambda: self._closed_reason is not None, timeout, "the server to close")
        assert self._closed_reason is not None
        return self._closed_reason

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    # -- internals ------------------------------------------------------------------------------

    async def _wait(
        self,
        predicate: Any,
        timeout: float | None,
        what: str,
        errors_before: int | None = None,
    ) -> None:
        def done() -> bool:
            if errors_before is not None and len(self.errors) > errors_before:
                return True
            return self._closed_reason is not None or bool(predicate())

        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(done), timeout if timeout is not None else self.timeout
                )
            except TimeoutError:
                raise TimeoutError(f"timed out waiting for {what}") from None
        if predicate():
            return
        if errors_before is not None and len(self.errors) > errors_before:
            raise PusherProtocolError(f"{what} failed: {self.errors[errors_before].raw!r}")
        raise PusherProtocolError(
            f"connection closed while waiting for {what}: {self._closed_reason}"
        )

    async def _read_loop(self) -> None:
        assert self._ws is not None
        try:
            async for frame in self._ws:
                message = json.loads(frame)
                await self._handle(message)
        except websockets.ConnectionClosed as exc:
            reason = f"closed: {exc}"
        else:
            reason = "closed by the server"
        async with self._changed:
            self._closed_reason = reason
            self._changed.notify_all()

    async def _handle(self, message: dict[str, Any]) -> None:
        name = str(message.get("event", ""))
        channel = message.get("channel")
        if name == "pusher:ping":
            await self.send("pusher:pong", {})
            return
        received = ReceivedEvent(
            event=name,
            channel=channel,
            data=message.get("data"),
            user_id=message.get("user_id"),
            raw=message,
        )
        async with self._changed:
            if name == "pusher_internal:subscription_succeeded" and channel is not None:
                self._subscribed[channel] = _maybe_json(received.data)
            elif name == "pusher:signin_success":
                self._signed_in = _maybe_json(received.data) or {}
            elif name in ("pusher:error", "pusher:subscription_error"):
                self.errors.append(received)
            elif not name.startswith("pusher_internal:") and name != "pusher:pong":
                self.events[channel].append(received)
            self._changed.notify_all()


def _json_data(message: Mapping[str, Any]) -> dict[str, Any]:
    data = message.get("data")
    parsed = json.loads(data) if isinstance(data, str) else data
    if not isinstance(parsed, dict):
        raise PusherProtocolError(f"unexpected data in {message!r}")
    return parsed


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


__all__ = ["PusherProtocolError", "PusherSubscriber", "ReceivedEvent"]

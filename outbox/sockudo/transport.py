"""How :class:`~outbox.sockudo.AsyncSockudo` moves bytes: one small seam, two implementations.

The client signs requests and interprets answers; a transport only sends one request and returns
the answer, or raises :class:`~outbox.sockudo.errors.EndpointUnavailable`. Each transport translates
its own failures into that family at its boundary (see :mod:`.responses`), so the client above it
never sees a library's exception.

* :class:`HttpxTransport` (``transport="httpx"``, the default): ``httpx.AsyncClient``. TLS with
  certificate checks, HTTP/2 (with the ``http2`` extra), any ``httpx`` client you pass.
* :class:`H11Transport` (``transport="h11"``): HTTP/1.1 over asyncio streams, parsed by ``h11``
  (already installed with ``httpx``). Plain ``http://`` only. It costs a third to a half of
  ``httpx``'s CPU per request (docs/performance.md, "HTTP client"): httpx is the largest single
  part of the outbox worker's Python time when it drains a backlog.

Both keep the client's guarantees: every connect, write, read and wait for a free connection is
bounded by ``Config.timeout``; the body goes out byte for byte as given; a failure before the
first byte of the request was written is ``maybe_delivered=False`` and any later one ``True``; a
response with ``Connection: close`` closes its connection, a keep-alive one returns it for reuse.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import h11
import httpx

from .config import Config, ConfigError
from .responses import translate_connection_error, translate_transport_error

#: The named transports ``AsyncSockudo(..., transport=NAME)`` accepts.
TRANSPORT_NAMES = ("httpx", "h11")


@dataclass(frozen=True)
class TransportResponse:
    """A complete answer: status, headers (names in any case) and the body's bytes."""

    status: int
    headers: Mapping[str, str]
    content: bytes = field(repr=False)


@runtime_checkable
class AsyncTransport(Protocol):
    """Sends one request as given and returns the whole answer; owns its connections."""

    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> TransportResponse:
        """Send once (no retries); raise ``EndpointUnavailable`` if no complete answer came."""
        ...

    async def aclose(self) -> None:
        """Close every connection; the transport cannot be used afterwards."""
        ...


class HttpxTransport:
    """A transport over an ``httpx.AsyncClient`` (TLS, HTTP/2, a client of your own)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> TransportResponse:
        try:
            response = await self.client.request(method, url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise translate_transport_error(exc) from exc
        return TransportResponse(response.status_code, response.headers, response.content)

    async def aclose(self) -> None:
        await self.client.aclose()


class _Connection:
    """One TCP connection and the h11 state machine that reads and writes it."""

    __slots__ = ("http", "idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.http = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    def reusable(self, now: float, expiry: float) -> bool:
        """False once the server has closed or reset it, or it sat idle too long.

        An idle connection has nothing to read: readable means the server's FIN, a reset, or
        stray bytes. The socket is polled directly because the event loop may not have run
        since the server closed it (httpcore checks the same way).
        """
        if now - self.idle_since > expiry or self.writer.is_closing():
            return False
        if self.reader.at_eof() or self.reader.exception() is not None:
            return False
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return False
        poller = select.poll()  # not select.select: file descriptors above 1023 are fine
        poller.register(sock.fileno(), select.POLLIN)
        return not poller.poll(0)

    def close(self) -> None:
        self.writer.close()


class H11Transport:
    """HTTP/1.1 over asyncio streams, with ``h11`` doing all the parsing. Plain ``http://`` only.

    A pool of keep-alive connections per origin (at most ``max_connections`` in use at once, at
    most ``max_idle`` kept idle, each for ``keepalive_expiry`` seconds). Every wait (for a free
    connection, the connect, each write and each read) is bounded by ``timeout`` seconds.
    """

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        max_connections: int = 100,
        max_idle: int = 20,
        keepalive_expiry: float = 5.0,
    ) -> None:
        if not timeout > 0:
            raise ConfigError("timeout must be a positive number of seconds")
        if max_connections < 1 or max_idle < 0:
            raise ConfigError("max_connections must be at least 1 and max_idle at least 0")
        self.timeout = timeout
        self.max_idle = max_idle
        self.keepalive_expiry = keepalive_expiry
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._closed = False

    @classmethod
    def from_config(cls, config: Config, **options: Any) -> H11Transport:
        """The transport for ``config``; a ConfigError if it needs what h11 cannot do."""
        if config.use_tls:
            raise ConfigError(
                "the h11 transport speaks plain http:// only; use transport='httpx' for https://"
            )
        if config.http2_prior_knowledge:
            raise ConfigError("the h11 transport speaks HTTP/1.1 only; use transport='httpx'")
        return cls(timeout=config.timeout, **options)

    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> TransportResponse:
        if self._closed:
            raise RuntimeError("this transport has been closed")
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError("the h11 transport sends to http:// URLs only")
        origin = (parts.hostname, parts.port or 80)
        target = f"{parts.path or '/'}?{parts.query}" if parts.query else parts.path or "/"
        fields = [("Host", parts.netloc.rpartition("@")[2]), *headers.items()]
        fields.append(("Accept-Encoding", "identity"))
        if body is not None:
            fields.append(("Content-Length", str(len(body))))
        loop = asyncio.get_running_loop()
        stage = "pool"
        connection: _Connection | None = None
        try:
            async with asyncio.timeout(self.timeout) as deadline:
                await self._slots.acquire()
                try:
                    stage = "connect"
                    connection = self._take_idle(origin, loop.time())
                    if connection is None:
                        deadline.reschedule(loop.time() + self.timeout)
                        connection = _Connection(*await asyncio.open_connection(*origin))
                    http = connection.http
                    data = http.send(h11.Request(method=method, target=target, headers=fields))
                    if body:
                        data += http.send(h11.Data(data=body))
                    data += http.send(h11.EndOfMessage())
                    stage = "write"
                    deadline.reschedule(loop.time() + self.timeout)
                    connection.writer.write(data)
                    await connection.writer.drain()
                    stage = "read"
                    response = await self._read(connection, deadline, loop)
                    stage = "done"
                finally:
                    self._slots.release()
                    if connection is not None:
                        self._release(origin, connection, keep=stage == "done", now=loop.time())
        except (OSError, h11.ProtocolError) as exc:  # TimeoutError is an OSError
            raise translate_connection_error(exc, stage) from exc
        return response

    async def _read(
        self,
        connection: _Connection,
        deadline: asyncio.Timeout,
        loop: asyncio.AbstractEventLoop,
    ) -> TransportResponse:
        """Read the whole answer; the read timeout starts again before every read."""
        http = connection.http
        status = 0
        headers: dict[str, str] = {}
        chunks: list[bytes] = []
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                deadline.reschedule(loop.time() + self.timeout)
                received = await connection.reader.read(65536)
                if not received and not status:
                    raise h11.RemoteProtocolError("server disconnected without sending a response")
                http.receive_data(received)
            elif isinstance(event, h11.Response):
                status = event.status_code
                for name, value in event.headers:
                    headers[name.decode("latin-1")] = value.decode("latin-1")
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return TransportResponse(status, headers, b"".join(chunks))
            # InformationalResponse (100 Continue): the final answer follows.

    def _take_idle(self, origin: tuple[str, int], now: float) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.reusable(now, self.keepalive_expiry):
                return connection
            connection.close()
        return None

    def _release(
        self, origin: tuple[str, int], connection: _Connection, keep: bool, now: float
    ) -> None:
        http = connection.http
        idle = self._idle.setdefault(origin, [])
        if (
            keep
            and not self._closed
            and len(idle) < self.max_idle
            and http.our_state is h11.DONE
            and http.their_state is h11.DONE
        ):
            http.start_next_cycle()
            connection.idle_since = now
            idle.append(connection)
        else:
            # Connection: close, an error, a cancelled request or a full pool.
            connection.close()

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
            idle.clear()
        # Let the transports run connection_lost, which closes the sockets.
        await asyncio.sleep(0)


def open_transport(name: str, config: Config, httpx_options: dict[str, Any]) -> AsyncTransport:
    """The transport named ``name`` for ``config`` (``httpx_options``: AsyncClient arguments)."""
    if name == "httpx":
        return HttpxTransport(httpx.AsyncClient(**httpx_options))
    if name == "h11":
        return H11Transport.from_config(config)
    raise ConfigError(f"unknown transport {name!r}: use one of {', '.join(TRANSPORT_NAMES)}")


__all__ = [
    "TRANSPORT_NAMES",
    "AsyncTransport",
    "H11Transport",
    "HttpxTransport",
    "TransportResponse",
    "open_transport",
]

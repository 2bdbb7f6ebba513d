"""The async client's transports (httpx and h11) keep the same guarantees, over real sockets.

Against the Sockudo-faithful test server (Connection: close, or keep-alive as Sockudo serves),
soketi, and, for the misbehaviours no HTTP server offers on purpose (a listen queue that never
accepts, a peer that never reads, an answer that trickles in), plain sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from outbox.sockudo import (
    AsyncSockudo,
    ConfigError,
    EndpointUnavailable,
    EventRefused,
    PreparedRequest,
)
from outbox.sockudo.responses import translate_connection_error
from outbox.sockudo.transport import AsyncTransport, H11Transport, HttpxTransport
from outbox.testing.server import TestServer, TestServerProcess
from outbox.testing.soketi import SoketiServer

TRANSPORTS = ("httpx", "h11")
#: Bytes a re-encoding JSON library would change: spacing, key order, escapes, raw UTF-8.
ODD_BODY = (
    '{ "batch" : [ {"data": "caf\u00e9 \\u00e9 \\"q\\"", "name":"e", "channel":"orders"},\n'
    '  {"channel":"orders","name":"f","data":"\U0001f600"} ] }'
).encode()


def client(url: str, transport: str | AsyncTransport, timeout: float = 5.0) -> AsyncSockudo:
    return AsyncSockudo.from_url(url, transport=transport, timeout=timeout)


def limited(name: str, timeout: float, max_connections: int) -> AsyncTransport:
    """A transport of either kind with a small pool (as a caller would configure one)."""
    if name == "h11":
        return H11Transport(timeout=timeout, max_connections=max_connections)
    limits = httpx.Limits(max_connections=max_connections)
    return HttpxTransport(httpx.AsyncClient(timeout=timeout, limits=limits))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def sockets_to(port: int) -> int:
    """This process's TCP sockets connected to ``port`` on loopback (from /proc/net/tcp): what a
    leak would keep open, unlike a count of every descriptor, which other tests' leftovers move."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                ours.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in ours:
                    count += 1
    return count


def record_bodies(server: TestServer) -> list[bytes]:
    """The request bodies the server read, in order (the server parses these very bytes)."""
    bodies: list[bytes] = []
    handle = server.app.handle

    def recording(method: str, path: str, headers: Any, body: bytes, client: str) -> Any:
        bodies.append(body)
        return handle(method, path, headers, body, client)

    server.app.handle = recording  # type: ignore[method-assign]
    return bodies


# -- plain sockets for what no server does on purpose --------------------------------------------


class RawPeer:
    """A listening socket on 127.0.0.1 whose accepted connections run ``behave(conn)``."""

    def __init__(self, behave: Callable[[socket.socket], None] | None, backlog: int = 8) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://app-key:app-secret@127.0.0.1:{self.port}/apps/app-id"
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread: threading.Thread | None = None
        if behave is not None:
            self._thread = threading.Thread(target=self._serve, args=(behave,), daemon=True)
            self._thread.start()

    def _serve(self, behave: Callable[[socket.socket], None]) -> None:
        self.sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self._conns.append(conn)
            threading.Thread(target=behave, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self.sock.close()


@contextlib.contextmanager
def raw_peer(behave: Callable[[socket.socket], None] | None, backlog: int = 8) -> Iterator[RawPeer]:
    peer = RawPeer(behave, backlog)
    try:
        yield peer
    finally:
        peer.close()


def read_head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def trickle(seconds: float) -> Callable[[socket.socket], None]:
    """Answer 200 in chunks, one every 50 ms for ``seconds``: never idle for a whole timeout."""

    def behave(conn: socket.socket) -> None:
        read_head(conn)
        with contextlib.suppress(OSError):
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                time.sleep(0.05)
                conn.sendall(b"1\r\n \r\n")
            conn.sendall(b"1\r\n}\r\n0\r\n\r\n")

    return behave


def never_read(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    time.sleep(10)


def big_request(size: int) -> PreparedRequest:
    return PreparedRequest("POST", "/apps/app-id/events", b"x" * size)


# -- bodies, results and the error mapping ----------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_body_bytes_go_out_exactly_as_given_on_every_attempt(
    sockudo_server: TestServer, transport: str
) -> None:
    bodies = record_bodies(sockudo_server)
    sockudo_server.drop_next(1, stage="published")
    async with client(sockudo_server.url, transport) as sockudo:
        request = sockudo.prepare_batch_body(ODD_BODY)
        with pytest.raises(EndpointUnavailable) as dropped:
            await sockudo.send(request)
        result = await sockudo.send(request)
    assert dropped.value.maybe_delivered is True
    assert result.status_code == 200
    assert bodies == [ODD_BODY, ODD_BODY]
    # The drop came after publishing, and the items carry no idempotency key: twice each.
    assert [d.data for d in sockudo_server.deliveries()] == [
        'caf\u00e9 \u00e9 "q"',
        "\U0001f600",
    ] * 2


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_error_answers_are_classified_alike(transport: str) -> None:
    with TestServer(max_payload_kb=1) as server:
        server.fail_next(1, status=503, code="backpressure", retry_after=2, stage="received")
        async with client(server.url, transport) as sockudo:
            with pytest.raises(EndpointUnavailable) as busy:
                await sockudo.trigger("orders", "e", "x")
            with pytest.raises(EventRefused) as refused:
                await sockudo.trigger("orders", "e", "x" * 2000)
    assert (busy.value.status, busy.value.retry_after, busy.value.maybe_delivered) == (
        503,
        2,
        False,
    )
    assert refused.value.status == 413


def test_connection_errors_are_translated_by_stage() -> None:
    before = [translate_connection_error(TimeoutError(), s) for s in ("pool", "connect")]
    after = [
        translate_connection_error(ConnectionResetError(104, "reset"), "write"),
        translate_connection_error(TimeoutError(), "read"),
    ]
    assert [str(e) for e in before] == ["PoolTimeout: timed out", "ConnectTimeout: timed out"]
    assert [e.maybe_delivered for e in before] == [False, False]
    assert [str(e) for e in after] == ["WriteError: [Errno 104] reset", "ReadTimeout: timed out"]
    assert [e.maybe_delivered for e in after] == [True, True]


# -- maybe_delivered ------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("keep_alive", [False, True])
async def test_refused_connection_was_never_sent_even_after_a_kept_alive_one(
    transport: str, keep_alive: bool
) -> None:
    with TestServer(keep_alive=keep_alive) as server:
        async with client(server.url, transport) as sockudo:
            await sockudo.trigger("orders", "e", "x")  # leaves a pooled connection if kept alive
            server.go_down()
            with pytest.raises(EndpointUnavailable) as info:
                await sockudo.trigger("orders", "e", "y")
    assert info.value.maybe_delivered is False
    assert "ConnectError" in str(info.value)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("stage", ["received", "published"])
async def test_a_drop_after_sending_may_have_been_delivered(
    sockudo_server: TestServer, transport: str, stage: str
) -> None:
    sockudo_server.drop_next(1, stage=stage)
    async with client(sockudo_server.url, transport) as sockudo:
        with pytest.raises(EndpointUnavailable) as info:
            await sockudo.trigger("orders", "e", "x")
    assert info.value.maybe_delivered is True
    assert sockudo_server.delivered_count() == (1 if stage == "published" else 0)


# -- a timeout for every wait ---------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_read_timeout(sockudo_server: TestServer, transport: str) -> None:
    sockudo_server.add_latency(5.0, stage="published", count=1)
    started = time.monotonic()
    async with client(sockudo_server.url, transport, timeout=0.3) as sockudo:
        with pytest.raises(EndpointUnavailable) as info:
            await sockudo.trigger("orders", "e", "x")
    assert time.monotonic() - started < 4.0
    assert "ReadTimeout" in str(info.value) and info.value.maybe_delivered is True


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_connect_timeout_when_the_listen_queue_is_full(transport: str) -> None:
    with raw_peer(None, backlog=0) as peer:
        # The queue holds one connection; the kernel drops the SYNs of the next.
        filler = socket.create_connection(("127.0.0.1", peer.port), timeout=2)
        started = time.monotonic()
        try:
            async with client(peer.url, transport, timeout=0.3) as sockudo:
                with pytest.raises(EndpointUnavailable) as info:
                    await sockudo.trigger("orders", "e", "x")
        finally:
            filler.close()
    assert time.monotonic() - started < 4.0
    assert "ConnectTimeout" in str(info.value) and info.value.maybe_delivered is False


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_write_timeout_when_the_peer_never_reads(transport: str) -> None:
    with raw_peer(never_read) as peer:
        started = time.monotonic()
        async with client(peer.url, transport, timeout=0.3) as sockudo:
            with pytest.raises(EndpointUnavailable) as info:
                await sockudo.send(big_request(64 * 1024 * 1024))
    assert time.monotonic() - started < 8.0
    assert "WriteTimeout" in str(info.value) and info.value.maybe_delivered is True


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_pool_timeout_while_every_connection_is_busy(transport: str) -> None:
    """An answer trickling in for 3 s holds the only connection (no read waits 1 s: a chunk
    comes every 50 ms, with room for a loaded machine's scheduling)."""
    with raw_peer(trickle(3.0)) as peer:
        one_connection = limited(transport, 1.0, 1)
        sockudo = AsyncSockudo.from_url(peer.url, transport=one_connection)
        try:
            slow = asyncio.create_task(sockudo.trigger("orders", "e", "x"))
            await asyncio.sleep(0.2)
            with pytest.raises(EndpointUnavailable) as info:
                await sockudo.trigger("orders", "e", "y")
            assert (await slow).status_code == 200  # the trickle was read to its end
        finally:
            await one_connection.aclose()
    assert "PoolTimeout" in str(info.value) and info.value.maybe_delivered is False


# -- connection handling --------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("keep_alive", [False, True])
async def test_many_requests_leak_no_socket(transport: str, keep_alive: bool) -> None:
    """Sequential and concurrent requests; the server in its own process, so every fd
    counted here is the client's."""
    with TestServerProcess(keep_alive=keep_alive) as server:
        before = open_fds()
        async with client(server.url, transport) as sockudo:
            for i in range(100):
                await sockudo.trigger("orders", "e", str(i))
            await asyncio.sleep(0)  # closed transports release their socket on the next turn
            during = open_fds() - before
            for _ in range(10):
                await asyncio.gather(*(sockudo.trigger("orders", "e", "x") for _ in range(8)))
        await asyncio.sleep(0)
        after = open_fds() - before
        assert server.delivered_count() == 180
    # Kept alive: the one connection is reused; closed by the server: none stays open.
    assert during == (1 if keep_alive else 0)
    assert after == 0


async def test_h11_reuses_a_kept_alive_connection_and_closes_on_connection_close() -> None:
    with TestServer(keep_alive=True) as alive, TestServer() as closing:
        transport = H11Transport(timeout=5.0)
        for server in (alive, closing):
            for _ in range(3):
                response = await transport.send("GET", f"{server.base_url}/up", {}, None)
                assert response.status == 200
        assert len(transport._idle[("127.0.0.1", alive.port)]) == 1
        assert transport._idle[("127.0.0.1", closing.port)] == []
        await transport.aclose()
        assert transport._idle[("127.0.0.1", alive.port)] == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_cancelled_request_frees_its_connection(
    sockudo_server: TestServer, transport: str
) -> None:
    sockudo_server.add_latency(1.0, stage="received", count=1)
    one_connection = limited(transport, 5.0, 1)
    sockudo = AsyncSockudo.from_url(sockudo_server.url, transport=one_connection)
    try:
        request = asyncio.create_task(sockudo.trigger("orders", "e", "cancelled"))
        await asyncio.sleep(0.2)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        # The only connection slot is free again.
        assert (await sockudo.trigger("orders", "e", "next")).status_code == 200
    finally:
        await one_connection.aclose()


@pytest.mark.soketi
async def test_h11_against_soketi_publishes_and_leaks_no_socket(soketi: SoketiServer) -> None:
    port = urlsplit(soketi.url).port
    assert port is not None
    before = sockets_to(port)
    async with client(soketi.url, "h11") as sockudo:
        results = await asyncio.gather(*(sockudo.trigger("orders", "e", str(i)) for i in range(50)))
        for i in range(50):
            await sockudo.trigger("orders", "e", str(i))
        await asyncio.sleep(0)
        during = sockets_to(port) - before
    await asyncio.sleep(0)
    assert all(r.status_code == 200 for r in results)
    assert (during, sockets_to(port) - before) == (0, 0)  # soketi closes every connection


# -- choosing a transport -------------------------------------------------------------------------


def test_h11_refuses_what_it_cannot_do_with_a_clear_config_error() -> None:
    with pytest.raises(ConfigError, match="https://"):
        AsyncSockudo.from_url("https://k:s@push.example.com/apps/1", transport="h11")
    with pytest.raises(ConfigError, match=r"HTTP/1\.1"):
        AsyncSockudo.from_url(
            "http://k:s@127.0.0.1:6001/apps/1", transport="h11", http2_prior_knowledge=True
        )
    with pytest.raises(ConfigError, match="unknown transport 'curl'"):
        AsyncSockudo.from_url("http://k:s@127.0.0.1:6001/apps/1", transport="curl")
    with pytest.raises(ConfigError, match="not both"):
        AsyncSockudo("1", "k", "s", client=httpx.AsyncClient(), transport="h11")


async def test_the_default_is_httpx_and_a_given_transport_is_left_open(
    sockudo_server: TestServer,
) -> None:
    async with AsyncSockudo.from_url(sockudo_server.url) as default:
        assert isinstance(default._transport, HttpxTransport)
    assert default._transport.client.is_closed
    mine = H11Transport(timeout=5.0)
    async with AsyncSockudo.from_url(sockudo_server.url, transport=mine) as sockudo:
        await sockudo.trigger("orders", "e", "x")
    # Not closed by the client: it can still send.
    response = await mine.send("GET", f"{sockudo_server.base_url}/up", {}, None)
    assert (response.status, response.content) == (200, b"OK")
    await mine.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await mine.send("GET", f"{sockudo_server.base_url}/up", {}, None)

"""The worker's HTTP side door: ``/metrics``, ``/healthz`` and ``/readyz`` on ``OUTBOX_METRICS_PORT``.

Served from the worker's own event loop, so an answer from ``/healthz`` proves the loop is turning
(a blocked loop times the probe out). ``/readyz`` says whether the worker is doing its job: the
database answered its last statement, the claim loop made progress recently, and the endpoint is
neither down nor refusing the credentials. The decision is :func:`readiness`, a plain function.

A minimal HTTP/1.1 responder (one request per connection, GET only): probes and Prometheus
need no more, and the worker stays free of a web framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger("outbox.worker")

#: Longest wait for a request's head; a silent client is dropped.
READ_TIMEOUT = 5.0
#: Largest request head accepted (probes and scrapers send a few hundred bytes).
MAX_HEAD = 16 * 1024


class PortUnavailable(RuntimeError):
    """The metrics port cannot be opened (in use, or an address this host does not have)."""


@dataclass(frozen=True)
class Readiness:
    ready: bool
    problems: list[str] = field(default_factory=list)

    def as_json(self) -> bytes:
        return json.dumps({"ready": self.ready, "problems": self.problems}).encode()


def readiness(
    *,
    since_progress: float | None,
    window: float,
    database_errors_in_a_row: int,
    paused_because: str | None,
) -> Readiness:
    """Whether a worker is ready, and if not, why (one sentence per problem).

    ``since_progress``: seconds since the claim loop last completed a claim or recorded an
    outcome (None: not yet). An idle worker on an empty queue claims every poll, so it stays
    ready. ``paused_because``: why publishing is paused (endpoint down, credentials refused).
    """
    problems = []
    if since_progress is None:
        problems.append("starting: no claim has run yet")
    elif since_progress > window:
        problems.append(f"the claim loop made no progress for {since_progress:.0f} s")
    if database_errors_in_a_row:
        problems.append(f"the database failed the last {database_errors_in_a_row} statement(s)")
    if paused_because:
        problems.append(f"publishing is paused: {paused_because}")
    return Readiness(not problems, problems)


class HealthServer:
    """Answers the three paths; ``metrics`` gives the page and its content type."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ready: Callable[[], Readiness],
        metrics: Callable[[], Awaitable[tuple[bytes, str]]],
    ) -> None:
        self.host = host
        self.port = port
        self._ready = ready
        self._metrics = metrics
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        except OSError as exc:
            raise PortUnavailable(
                f"cannot serve metrics on {self.host}:{self.port} "
                f"(OUTBOX_METRICS_HOST/OUTBOX_METRICS_PORT): "
                f"{os.strerror(exc.errno) if exc.errno else exc}"
            ) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info(
            "metrics and health on http://%s:%d (/metrics, /healthz, /readyz)",
            self.host,
            self.port,
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            status, content_type, body = await self._answer(head)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        except Exception:
            log.exception("the health server failed to answer a request")
            status, content_type, body = 500, "text/plain", b"internal error\n"
        writer.write(
            f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode("ascii")
            + body
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _answer(self, head: bytes) -> tuple[int, str, bytes]:
        if len(head) > MAX_HEAD:
            return 400, "text/plain", b"request too large\n"
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3:
            return 400, "text/plain", b"bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method != b"GET":
            return 405, "text/plain", b"GET only\n"
        if target == b"/healthz":
            return 200, "text/plain", b"ok\n"
        if target == b"/readyz":
            ready = self._ready()
            return (200 if ready.ready else 503), "application/json", ready.as_json()
        if target == b"/metrics":
            body, content_type = await self._metrics()
            return 200, content_type, body
        return 404, "text/plain", b"not found: /metrics, /healthz, /readyz\n"


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

"""Which asyncio HTTP client posts our batches at the least cost: ``python -m outbox.bench.http_clients``.

Every candidate posts the same kind of body (B pre-built ``/batch_events`` items, signed before
the clock starts at one timestamp per round, fresh idempotency keys for each run) to the server,
K requests in flight, N requests a run. For each run it records requests/s, events/s, this
process's CPU seconds per request (``time.process_time``: the client's whole cost, event loop
included) and the server process's, from ``/proc``. Runs repeat R times, the order of the
candidates reversed every other round, all in one process, one server after the other:

* ``soketi`` (npm, batch limit 100): answers every request with ``Connection: close``;
* ``test-server``: our Sockudo-faithful server in its own process, ``Connection: close`` too;
* ``test-server-keepalive``: the same with keep-alive connections, as Sockudo serves them.

Candidates: ``httpx`` (AsyncClient, default transport), ``httpcore`` (AsyncConnectionPool),
``httpx-aiohttp`` (httpx with the ``httpx-aiohttp`` transport), ``aiohttp`` (ClientSession),
``h11`` (h11 over asyncio streams: ``outbox.sockudo.transport.H11Transport``); and the whole
client path as the worker uses it, signing each request at send time:
``AsyncSockudo[httpx]`` and ``AsyncSockudo[h11]``. A candidate whose library is not installed
is reported as skipped. See docs/performance.md, "HTTP client".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..sockudo import AsyncSockudo, Config
from ..sockudo.bodies import batch_body, event_item
from ..sockudo.signing import Signer
from ..sockudo.transport import H11Transport
from .cpu import CpuMeter
from .servers import SERVERS, server

CHANNEL = "bench"
EVENT = "tick"
HEADERS = {"Content-Type": "application/json", "User-Agent": "sockudo-outbox-bench"}
#: Generous: a slow run must show up as a low rate, not as a timeout.
TIMEOUT = 30.0

#: POST one pre-signed request; returns (status, body).
Post = Callable[[str, bytes], Awaitable[tuple[int, bytes]]]
#: Opens a client for ``sockudo_url`` and yields its Post; closes it afterwards.
Candidate = Callable[[str], contextlib.AbstractAsyncContextManager[Post]]


# -- the requests ------------------------------------------------------------------------------


def presigned_batches(
    url: str, events: int, batch: int, *, now: int | None = None, tag: str | None = None
) -> list[tuple[str, bytes]]:
    """``/batch_events`` requests of ``batch`` items each, signed at ``now``: (URL, body)."""
    config = Config.from_url(url)
    signer = Signer(config.key, config.secret)
    path = f"/apps/{config.app_id}/batch_events"
    now = int(time.time()) if now is None else now
    tag = tag or uuid.uuid4().hex[:8]
    requests: list[tuple[str, bytes]] = []
    for start in range(0, events, batch):
        items = [
            event_item(
                [CHANNEL],
                EVENT,
                f'{{"n":{i}}}',
                idempotency_key=f"bench-{tag}-{i}",
                message_id=f"bench-{i}",
            )
            for i in range(start, min(start + batch, events))
        ]
        body = batch_body(items)
        query = signer.signed_query("POST", path, body, now)
        requests.append((f"{config.base_url}{path}?{query}", body))
    return requests


def accepted(status: int, content: bytes) -> None:
    """Raise unless the server took the batch (soketi reports some errors with HTTP 200)."""
    if status != 200 or b'"error"' in content:
        raise RuntimeError(f"request refused: HTTP {status}: {content[:200]!r}")


@dataclass
class Run:
    """One candidate's run: wall seconds and CPU seconds per process ('client', 'server')."""

    requests: int
    events: int
    seconds: float
    cpu: dict[str, float | None] = field(default_factory=dict)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds

    def cpu_per(self, process: str, unit: int) -> float | None:
        used = self.cpu.get(process)
        return used / unit if used is not None else None


async def post_all(
    post: Post,
    requests: Sequence[tuple[str, bytes]],
    in_flight: int,
    events: int,
    server_pid: int | None = None,
) -> Run:
    """Post every request, ``in_flight`` at a time, and measure the span (and CPU) it took."""
    pending = iter(requests)

    async def lane() -> None:
        for url, body in pending:
            accepted(*await post(url, body))

    gc.collect()
    meter = CpuMeter({"client": [None], "server": [server_pid] if server_pid else []}).start()
    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(in_flight)))
    seconds = time.perf_counter() - started
    return Run(len(requests), events, seconds, meter.stop())


# -- the candidates ----------------------------------------------------------------------------


def httpx_over(transport: Callable[[], Any] | None = None) -> Candidate:
    """httpx.AsyncClient over its default transport, or over the one ``transport()`` makes."""

    @contextlib.asynccontextmanager
    async def open_client(url: str) -> AsyncIterator[Post]:
        import httpx

        given = transport() if transport is not None else None
        async with httpx.AsyncClient(transport=given, timeout=TIMEOUT) as client:

            async def post(target: str, body: bytes) -> tuple[int, bytes]:
                response = await client.post(target, content=body, headers=HEADERS)
                return response.status_code, response.content

            yield post

    return open_client


def _aiohttp_transport() -> Any:
    from httpx_aiohttp import AiohttpTransport

    return AiohttpTransport()


with_httpx = httpx_over()
with_httpx_aiohttp = httpx_over(_aiohttp_transport)


@contextlib.asynccontextmanager
async def with_httpcore(url: str) -> AsyncIterator[Post]:
    import httpcore

    headers = list(HEADERS.items())
    timeouts = {"timeout": dict.fromkeys(("connect", "read", "write", "pool"), TIMEOUT)}
    async with httpcore.AsyncConnectionPool() as pool:

        async def post(target: str, body: bytes) -> tuple[int, bytes]:
            response = await pool.request(
                "POST", target, headers=headers, content=body, extensions=timeouts
            )
            return response.status, response.content

        yield post


@contextlib.asynccontextmanager
async def with_aiohttp(url: str) -> AsyncIterator[Post]:
    import aiohttp
    import yarl

    timeout = aiohttp.ClientTimeout(total=None, connect=TIMEOUT, sock_read=TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def post(target: str, body: bytes) -> tuple[int, bytes]:
            # encoded=True: send the signed path and query exactly as signed.
            async with session.post(
                yarl.URL(target, encoded=True), data=body, headers=HEADERS
            ) as response:
                return response.status, await response.read()

        yield post


@contextlib.asynccontextmanager
async def with_h11(url: str) -> AsyncIterator[Post]:
    transport = H11Transport(timeout=TIMEOUT)
    try:

        async def post(target: str, body: bytes) -> tuple[int, bytes]:
            response = await transport.send("POST", target, HEADERS, body)
            return response.status, response.content

        yield post
    finally:
        await transport.aclose()


def with_client(transport: str) -> Candidate:
    """The whole client path: ``AsyncSockudo.send``, which signs each request at send time."""

    @contextlib.asynccontextmanager
    async def open_client(url: str) -> AsyncIterator[Post]:
        async with AsyncSockudo.from_url(url, transport=transport, timeout=TIMEOUT) as client:

            async def post(target: str, body: bytes) -> tuple[int, bytes]:
                result = await client.send(client.prepare_batch_body(body))
                return result.status_code, result.raw

            yield post

    return open_client


CANDIDATES: dict[str, Candidate] = {
    "httpx": with_httpx,
    "httpcore": with_httpcore,
    "httpx-aiohttp": with_httpx_aiohttp,
    "aiohttp": with_aiohttp,
    "h11": with_h11,
    "AsyncSockudo[httpx]": with_client("httpx"),
    "AsyncSockudo[h11]": with_client("h11"),
}


# -- the measurement ---------------------------------------------------------------------------


def available(names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The candidates whose libraries import, and why the others cannot run."""
    modules = {"httpx-aiohttp": ("httpx_aiohttp", "aiohttp"), "aiohttp": ("aiohttp", "yarl")}
    usable, skipped = [], {}
    for name in names:
        try:
            for module in modules.get(name, ()):
                __import__(module)
        except ImportError as exc:
            skipped[name] = f"not installed ({exc.name})"
            continue
        usable.append(name)
    return usable, skipped


async def measure_server(
    url: str,
    pid: int | None,
    names: Sequence[str],
    *,
    requests: int,
    batch: int,
    in_flight: int,
    repeats: int,
    say: Callable[[str], None],
) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = {name: [] for name in names}
    now = int(time.time())
    events = requests * batch
    # Untimed warm-up of every candidate: imports, the server's JIT (node) and caches.
    for name in names:
        async with CANDIDATES[name](url) as post:
            warm = presigned_batches(url, 10 * batch, batch, now=now)
            await post_all(post, warm, in_flight, 10 * batch)
    for round_ in range(repeats):
        now = int(time.time())  # one timestamp per round, well inside the 600 s window
        order = list(names) if round_ % 2 == 0 else list(reversed(names))
        for name in order:
            bodies = presigned_batches(url, events, batch, now=now)
            async with CANDIDATES[name](url) as post:
                run = await post_all(post, bodies, in_flight, events, pid)
            runs[name].append(run)
            say(
                f"{name}: {run.requests_per_s:,.0f} req/s, "
                f"client {_ms(run.cpu_per('client', run.requests))} ms/req, "
                f"server {_ms(run.cpu_per('server', run.requests))} ms/req, "
                f"other processes {(run.cpu.get('other') or 0.0) / run.seconds:.2f} cores"
            )
    return runs


def summarize(runs: dict[str, list[Run]]) -> list[dict[str, Any]]:
    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    rows = []
    for name, done in runs.items():
        if not done:
            continue
        rows.append(
            {
                "candidate": name,
                "runs": len(done),
                "requests_per_s": med([r.requests_per_s for r in done]),
                "requests_per_s_all": [round(r.requests_per_s) for r in done],
                "events_per_s": med([r.events_per_s for r in done]),
                "client_cpu_ms_per_request": _scaled(
                    med([r.cpu_per("client", r.requests) for r in done]), 1000
                ),
                "client_cpu_us_per_event": _scaled(
                    med([r.cpu_per("client", r.events) for r in done]), 1e6
                ),
                "server_cpu_ms_per_request": _scaled(
                    med([r.cpu_per("server", r.requests) for r in done]), 1000
                ),
                # Cores used by every other process during the runs (noise from the machine).
                "other_cores_max": max((r.cpu.get("other") or 0.0) / r.seconds for r in done),
            }
        )
    return rows


def render(server_name: str, rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'candidate':<22} {'req/s':>8} {'events/s':>10} {'client ms/req':>14} "
        f"{'client us/ev':>13} {'server ms/req':>14} {'other':>6}  req/s of each run"
    )
    lines = [f"server: {server_name}", header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['candidate']:<22} {r['requests_per_s']:>8,.0f} {r['events_per_s']:>10,.0f} "
            f"{_ms(r['client_cpu_ms_per_request'], 1):>14} {_ms(r['client_cpu_us_per_event'], 1):>13} "
            f"{_ms(r['server_cpu_ms_per_request'], 1):>14} {r['other_cores_max']:>6.2f}  "
            + " / ".join(f"{v:,}" for v in r["requests_per_s_all"])
        )
    return "\n".join(lines)


def _scaled(value: float | None, factor: float) -> float | None:
    return value * factor if value is not None else None


def _ms(value: float | None, scale: float = 1000) -> str:
    return f"{value * scale:.2f}" if value is not None else "-"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m outbox.bench.http_clients", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--requests", type=int, default=1000, help="requests per run (default 1000)")
    p.add_argument("--batch", type=int, default=100, help="events per request (default 100)")
    p.add_argument("--in-flight", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="runs per candidate (default 3)")
    p.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"comma-separated, of {', '.join(SERVERS)} (default: all)",
    )
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--json", type=Path, help="also write the figures as JSON to this path")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    wanted = [c.strip() for c in args.candidates.split(",") if c.strip()]
    unknown = set(wanted) - set(CANDIDATES)
    if unknown:
        raise SystemExit(f"unknown candidate(s): {', '.join(sorted(unknown))}")
    names, skipped = available(wanted)
    say = lambda text: print(f"[http-clients] {text}", file=sys.stderr, flush=True)  # noqa: E731
    for name, why in skipped.items():
        say(f"{name}: skipped, {why}")
    report: dict[str, Any] = {
        "started": time.time(),
        "requests": args.requests,
        "batch": args.batch,
        "in_flight": args.in_flight,
        "repeats": args.repeats,
        "skipped": skipped,
        "servers": {},
    }
    tables = []
    for kind in [s.strip() for s in args.servers.split(",") if s.strip()]:
        with server(kind, args.batch) as target:
            say(f"{kind}: pid {target.pid}")
            runs = asyncio.run(
                measure_server(
                    target.url,
                    target.pid,
                    names,
                    requests=args.requests,
                    batch=args.batch,
                    in_flight=args.in_flight,
                    repeats=args.repeats,
                    say=lambda text, kind=kind: say(f"{kind}: {text}"),
                )
            )
        rows = summarize(runs)
        report["servers"][kind] = rows
        tables.append(render(kind, rows))
    print("\n\n".join(tables))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        say(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

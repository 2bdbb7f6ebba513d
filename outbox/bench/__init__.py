"""The benchmark harness: ``python -m outbox.bench`` (also ``outbox bench``).

One run measures, against one real server (soketi by default, started on loopback with a batch
limit of 100; or the bundled test server): the ceiling (pre-signed batches from a bare httpx
client) and the server's real intake (the same bodies from the lean h11 transport), the per-event
baseline (our client and the sockudo-http-python SDK), the cost enqueue adds to a transaction,
outbox drains on SQLite, PostgreSQL and MariaDB with one and two workers (on SQLite and
PostgreSQL also the one-worker drain with its events spread over 1,000 ordering keys),
commit-to-ack latency under a steady load, worker memory, and the drain with a large published
history, with CPU per event for each process where it applies. It prints a table and writes the
same figures as JSON. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..testing.databases import DEFAULT_SERVER_URLS, DatabaseServer, scratch_database
from . import scenarios
from .report import evaluate_targets, render_table
from .scenarios import Measurement
from .servers import SERVERS, server

#: name -> (events, baseline events, single-commit transactions, latency rate, latency seconds, history rows)
SIZES = {
    "smoke": dict(
        events=2_000,
        baseline=200,
        transactions=200,
        rate=200,
        latency_s=3,
        history=5_000,
        gauge_history=5_000,
        metrics_rounds=1,
        backlogs=(5_000,),
        overload_s=2,
    ),
    "default": dict(
        events=20_000,
        baseline=1_000,
        transactions=1_000,
        rate=1_000,
        latency_s=10,
        history=200_000,
        gauge_history=1_000_000,
        metrics_rounds=3,
        backlogs=(100_000,),
        overload_s=10,
    ),
    "long": dict(
        events=1_000_000,
        baseline=2_000,
        transactions=2_000,
        rate=1_000,
        latency_s=30,
        history=1_000_000,
        gauge_history=1_000_000,
        metrics_rounds=3,
        backlogs=(100_000, 1_000_000),
        overload_s=30,
    ),
}
#: Pending rows beside the published history when the gauges are timed (a small backlog).
GAUGE_BACKLOG = 1_000


SCENARIOS = (
    "ceiling",
    "intake",
    "baseline",
    "enqueue",
    "drain",
    "catch-up",
    "overload",
    "metrics",
    "latency",
    "history",
    "gauges",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="outbox bench", description=__doc__.split("\n\n")[1])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="smallest size (CI smoke test)")
    size.add_argument("--long", action="store_true", help="1,000,000-event drain and history")
    p.add_argument("--events", type=int, help="events per drain (overrides the size)")
    p.add_argument("--batch", type=int, default=100, help="events per batch (default 100)")
    p.add_argument("--in-flight", type=int, default=4, help="batches in flight (default 4)")
    p.add_argument("--server", choices=SERVERS, default="soketi")
    p.add_argument("--backends", default="sqlite,postgresql,mariadb")
    p.add_argument(
        "--postgres-url",
        default=os.environ.get("OUTBOX_BENCH_POSTGRES_URL", DEFAULT_SERVER_URLS["postgresql"]),
        help="a PostgreSQL database to create a scratch schema in",
    )
    p.add_argument(
        "--mariadb-url",
        default=os.environ.get("OUTBOX_BENCH_MARIADB_URL", DEFAULT_SERVER_URLS["mariadb"]),
        help="a MariaDB or MySQL server (mariadb:// or mysql://) to create a scratch database on",
    )
    p.add_argument(
        "--ordering-keys",
        type=int,
        default=scenarios.ORDERED_KEYS,
        help="keys of the ordered drain, next to the one-worker drain on SQLite and PostgreSQL "
        f"(default {scenarios.ORDERED_KEYS:,}; 0: skip it)",
    )
    p.add_argument("--latency-rate", type=float, help="events/s for the latency run")
    p.add_argument("--history", type=int, help="published rows kept for the history run (0: skip)")
    p.add_argument(
        "--gauge-history", type=int, help="published rows under the gauge timing (0: skip)"
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)",
    )
    p.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    servers = {"postgresql": args.postgres_url, "mariadb": args.mariadb_url}
    size = dict(SIZES["smoke" if args.smoke else "long" if args.long else "default"])
    if args.events:
        size["events"] = args.events
    if args.latency_rate:
        size["rate"] = args.latency_rate
    if args.history is not None:
        size["history"] = args.history
    if args.gauge_history is not None:
        size["gauge_history"] = args.gauge_history
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    chosen = {c.strip() for c in args.scenarios.split(",") if c.strip()}
    unknown = chosen - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    results: list[Measurement] = []
    started = time.time()
    settings = {
        "batch_size": args.batch,
        "server_batch_limit": max(args.batch, 100),
        "in_flight": args.in_flight,
        "poll_interval": 0.5,
    }
    with (
        tempfile.TemporaryDirectory(prefix="outbox-bench-") as tmp,
        server(args.server, args.batch) as target,
    ):
        url, pid = target.url, target.pid
        workdir = Path(tmp)
        say = lambda text: print(f"[bench] {text}", file=sys.stderr, flush=True)  # noqa: E731
        say(f"server: {args.server}; sizes: {size}")
        if "ceiling" in chosen:
            results.append(scenarios.ceiling(url, size["events"], args.batch, args.in_flight, pid))
            say(f"ceiling: {results[-1].rate:,.0f} events/s")
        if "intake" in chosen:
            results.append(scenarios.intake(url, size["events"], args.batch, args.in_flight, pid))
            say(f"server intake: {results[-1].rate:,.0f} events/s")
        if "baseline" in chosen:
            results.append(scenarios.baseline_ours(url, size["baseline"]))
            say(f"baseline (ours): {results[-1].rate:,.0f} events/s")
            sdk = scenarios.baseline_sdk(url, size["baseline"])
            if sdk is not None:
                results.append(sdk)
                say(f"baseline (SDK): {sdk.rate:,.0f} events/s")
        for backend in backends:
            if "enqueue" in chosen:
                for per_commit in (1, 10):
                    with database(backend, servers, workdir) as db:
                        results.append(
                            scenarios.enqueue_cost(db, backend, size["transactions"], per_commit)
                        )
                        added = results[-1].extra["added_ms_per_commit"]
                        say(f"{backend}: {results[-1].scenario}: +{added:.3f} ms")
                with database(backend, servers, workdir) as db:
                    results.append(scenarios.bulk_enqueue(db, backend, size["events"]))
                    say(f"{backend}: bulk enqueue {results[-1].rate:,.0f} events/s")
            if "drain" in chosen:
                # One worker unordered, then the same drain over ordering keys right after it
                # (where the backend takes keys), then two workers unordered.
                keyed = args.ordering_keys if backend in scenarios.ORDERED_BACKENDS else 0
                for count, keys in [(1, 0), *([(1, keyed)] if keyed else []), (2, 0)]:
                    with database(backend, servers, workdir) as db:
                        results.append(
                            scenarios.drain(
                                db,
                                url,
                                backend,
                                size["events"],
                                count,
                                workdir,
                                server_pid=pid,
                                progress=lambda line, backend=backend, keys=keys: say(
                                    f"{backend}: {'ordered ' if keys else ''}drain: {line}"
                                ),
                                ordering_keys=keys,
                                **settings,
                            )
                        )
                    say(f"{backend}: {results[-1].scenario}: {results[-1].rate:,.0f} events/s")
                    if keys:
                        plain = results[-2]
                        ratio = results[-1].rate / plain.rate if plain.rate else 0.0
                        results[-1].extra["x_unordered"] = ratio
                        say(f"{backend}: ordered / unordered: {ratio:.2f}x")
            if "catch-up" in chosen:
                results.extend(catch_up(backend, url, pid, size, settings, servers, workdir, say))
            if "overload" in chosen:
                # Half keyed too, where the backend takes keys (MariaDB and MySQL refuse them).
                ordered = backend in scenarios.ORDERED_BACKENDS
                for keyed in (False, True) if ordered else (False,):
                    with database(backend, servers, workdir) as db:
                        results.append(
                            scenarios.overload(
                                db,
                                url,
                                backend,
                                size["overload_s"],
                                workdir,
                                keyed=keyed,
                                server_pid=pid,
                                progress=lambda line, backend=backend: say(
                                    f"{backend}: overload: {line}"
                                ),
                                **settings,
                            )
                        )
                    m = results[-1]
                    say(
                        f"{backend}: {m.scenario}: backlog peak {m.extra['backlog_peak']:,}, "
                        f"caught up at {m.rate:,.0f} events/s"
                    )
            if "metrics" in chosen:
                results.extend(
                    metrics_pair(
                        backend,
                        url,
                        pid,
                        size["events"],
                        settings,
                        servers,
                        workdir,
                        say,
                        size["metrics_rounds"],
                    )
                )
            if "gauges" in chosen and size["gauge_history"]:
                with database(backend, servers, workdir) as db:
                    say(f"{backend}: gauges: adding {size['gauge_history']:,} published rows")
                    for m in scenarios.gauge_cost(
                        db, backend, size["gauge_history"], GAUGE_BACKLOG
                    ):
                        results.append(m)
                        say(f"{backend}: {m.scenario}: {m.extra['read_median_ms']:.2f} ms (median)")
            if "latency" in chosen:
                with database(backend, servers, workdir) as db:
                    results.append(
                        scenarios.latency(
                            db, url, backend, size["rate"], size["latency_s"], workdir, **settings
                        )
                    )
                    say(f"{backend}: latency p99 {results[-1].extra['p99_ms']:.1f} ms")
            if "history" in chosen and size["history"]:
                with database(backend, servers, workdir) as db:
                    took = scenarios.add_history(db, size["history"])
                    say(f"{backend}: {size['history']:,} published rows added in {took:.1f} s")
                    results.append(
                        scenarios.drain(
                            db,
                            url,
                            backend,
                            size["events"],
                            1,
                            workdir,
                            label=f"outbox drain, 1 worker, {size['history']:,} published rows kept",
                            server_pid=pid,
                            **settings,
                        )
                    )
                    say(f"{backend}: drain with history: {results[-1].rate:,.0f} events/s")
    targets = evaluate_targets(results)
    print(render_table(results, targets))
    if args.json:
        report = {
            "started": started,
            "duration_s": time.time() - started,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "server": args.server,
            "sizes": size,
            "settings": settings,
            "results": [
                {
                    "scenario": r.scenario,
                    "backend": r.backend,
                    "events": r.events,
                    "seconds": r.seconds,
                    "events_per_s": r.rate,
                    **r.extra,
                }
                for r in results
            ],
            "targets": targets,
        }
        args.json.write_text(json.dumps(report, indent=2))
        print(f"JSON written to {args.json}", file=sys.stderr)
    return 0


def catch_up(
    backend: str,
    url: str,
    server_pid: int | None,
    size: dict[str, Any],
    settings: dict[str, Any],
    servers: dict[str, str],
    workdir: Path,
    say: Callable[[str], None],
) -> list[Measurement]:
    """One worker meets each backlog of ``size["backlogs"]`` at once, as after an outage: the
    table has no fresh statistics and the server its default settings. Unkeyed, then (where the
    backend takes keys) the first backlog half keyed."""
    runs = [(events, False) for events in size["backlogs"]]
    if backend in scenarios.ORDERED_BACKENDS:
        runs.append((size["backlogs"][0], True))
    measured = []
    for events, keyed in runs:
        label = scenarios.catch_up_label(events, keyed)
        with database(backend, servers, workdir) as db:
            measured.append(
                scenarios.drain(
                    db,
                    url,
                    backend,
                    events,
                    1,
                    workdir,
                    label=label,
                    server_pid=server_pid,
                    progress=lambda line, label=label: say(f"{backend}: {label}: {line}"),
                    ordering_keys=scenarios.MIXED_KEYS if keyed else 0,
                    keyed_every=2,
                    timeout=3600.0,
                    **settings,
                )
            )
        measured[-1].extra["backlog"] = events
        say(f"{backend}: {label}: {measured[-1].rate:,.0f} events/s")
    return measured


def metrics_pair(
    backend: str,
    url: str,
    server_pid: int | None,
    events: int,
    settings: dict[str, Any],
    servers: dict[str, str],
    workdir: Path,
    say: Callable[[str], None],
    rounds: int,
) -> list[Measurement]:
    """The same one-worker drain with metrics off and on (scraped every second), ``rounds`` times
    in alternating order; for each, the round with the median rate (its rates in ``extra``).

    On a shared machine one drain can run a third faster or slower than the next: a single pair
    would price the noise, not the metrics."""
    runs: dict[str, list[Measurement]] = {scenarios.METRICS_OFF: [], scenarios.METRICS_ON: []}
    for round_number in range(rounds):
        order = [scenarios.METRICS_OFF, scenarios.METRICS_ON]
        for label in order if round_number % 2 == 0 else order[::-1]:
            extra = {"metrics_port": scenarios.free_port()} if label == scenarios.METRICS_ON else {}
            with database(backend, servers, workdir) as db:
                run = scenarios.drain(
                    db,
                    url,
                    backend,
                    events,
                    1,
                    workdir,
                    label=label,
                    server_pid=server_pid,
                    progress=lambda line, label=label: say(f"{backend}: {label}: {line}"),
                    **settings,
                    **extra,
                )
            runs[label].append(run)
            say(f"{backend}: {label} (round {round_number + 1}): {run.rate:,.0f} events/s")
    chosen = []
    for measured in runs.values():
        ranked = sorted(measured, key=lambda m: m.rate)
        median = ranked[len(ranked) // 2]
        median.extra["rounds_events_per_s"] = [round(m.rate) for m in measured]
        chosen.append(median)
    return chosen


@contextlib.contextmanager
def database(backend: str, servers: dict[str, str], workdir: Path) -> Iterator[str]:
    """A fresh, migrated database for one scenario; removed afterwards (``servers``: the URL of
    each database server by backend name)."""
    if backend == "sqlite":
        with scratch_database(backend, workdir, prefix="bench", migrated=True) as url:
            yield url
        return
    if backend not in servers:
        raise SystemExit(f"unknown backend {backend!r}: use sqlite, postgresql and/or mariadb")
    # An engine on the server for this scenario alone, disposed with its database: no connection
    # of ours stays open on the server through the scenarios after it.
    with (
        contextlib.closing(DatabaseServer(backend, servers[backend])) as server,
        scratch_database(backend, workdir, server, prefix="bench", migrated=True) as url,
    ):
        yield url


__all__ = ["main"]

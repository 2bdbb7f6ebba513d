"""What the benchmark measures, one function per scenario.

Every number is taken in the same run against the same server, so ratios (to the ceiling, to the
per-event baseline) hold on a noisy machine even when absolute figures move.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import statistics
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .. import admin
from ..database import create_engine
from ..enqueue import OutboxEvent, enqueue, enqueue_many
from ..schema import EVENT_COLUMNS, MYSQL_NAMES, outbox_table, published_table, utc_now
from ..sockudo import Sockudo
from ..testing.worker_process import WorkerProcess
from . import http_clients
from .cpu import CpuMeter, pids_named

CHANNEL = "bench"
EVENT = "tick"


@dataclass
class Measurement:
    """One row of the report."""

    scenario: str
    backend: str = ""
    events: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def payload(i: int) -> dict[str, Any]:
    return {"n": i, "kind": "benchmark", "text": "x" * 64}


# -- 1. the ceiling and the intake: pre-built, pre-signed batches, no database ----------------

CEILING = "ceiling (pre-signed batches)"
INTAKE = "server intake (pre-signed batches, h11)"


def ceiling(
    url: str, events: int, batch: int, in_flight: int, server_pid: int | None = None
) -> Measurement:
    """The most this server takes from one Python process through httpx: bare async POSTs of
    ready bodies. httpx's own CPU is usually the limit here, not the server."""
    return _presigned(CEILING, http_clients.with_httpx, url, events, batch, in_flight, server_pid)


def intake(
    url: str, events: int, batch: int, in_flight: int, server_pid: int | None = None
) -> Measurement:
    """The server's real intake: the same bodies through the lean h11 transport, which costs a
    fraction of httpx's CPU per request, so the server is the limit (docs/performance.md)."""
    return _presigned(INTAKE, http_clients.with_h11, url, events, batch, in_flight, server_pid)


def _presigned(
    label: str,
    candidate: http_clients.Candidate,
    url: str,
    events: int,
    batch: int,
    in_flight: int,
    server_pid: int | None,
) -> Measurement:
    requests = http_clients.presigned_batches(url, events, batch)

    async def run() -> http_clients.Run:
        async with candidate(url) as post:
            return await http_clients.post_all(post, requests, in_flight, events, server_pid)

    done = asyncio.run(run())
    return Measurement(
        label,
        events=events,
        seconds=done.seconds,
        extra={
            "batch": batch,
            "in_flight": in_flight,
            **cpu_figures(done.cpu, events, done.seconds),
        },
    )


def cpu_figures(used: dict[str, float | None], events: int, seconds: float) -> dict[str, Any]:
    """``<group>_cpu_us_per_event`` for every measured group, and the other processes' cores."""
    figures: dict[str, Any] = {
        f"{name}_cpu_us_per_event": (value / events * 1e6 if value is not None and events else None)
        for name, value in used.items()
        if name != "other"
    }
    figures["other_cores"] = (used.get("other") or 0.0) / seconds if seconds > 0 else None
    return figures


# -- 2. the baseline without an outbox: one request per event ----------------------------------


def baseline_ours(url: str, events: int) -> Measurement:
    with Sockudo.from_url(url) as client:
        started = time.perf_counter()
        for i in range(events):
            client.trigger(CHANNEL, EVENT, payload(i))
        seconds = time.perf_counter() - started
    return Measurement("per-event trigger (outbox.sockudo)", events=events, seconds=seconds)


def baseline_sdk(url: str, events: int) -> Measurement | None:
    """The PyPI sockudo-http-python SDK's trigger, for comparison (None when not installed)."""
    try:
        import sockudo_http_python as sdk
    except ImportError:
        return None
    client = sdk.Sockudo.from_url(url)
    client.options.http2 = False
    try:
        started = time.perf_counter()
        for i in range(events):
            result = client.trigger(CHANNEL, EVENT, payload(i))
            if not result.ok:
                raise RuntimeError(f"SDK trigger failed: {result.message[:200]}")
        seconds = time.perf_counter() - started
    finally:
        client.close()
    return Measurement("per-event trigger (sockudo-http-python)", events=events, seconds=seconds)


# -- 3. the outbox: enqueue cost and drains ----------------------------------------------------


APP_TABLE = sa.Table(
    "bench_orders",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("note", sa.String(50)),
)


def enqueue_cost(url: str, backend: str, transactions: int, per_commit: int) -> Measurement:
    """Median cost an outbox write adds to an application transaction (its own insert + commit)."""
    engine = create_engine(url)
    APP_TABLE.create(engine, checkfirst=True)
    try:
        plain = _time_transactions(engine, transactions, lambda conn, i: None)
        with_outbox = _time_transactions(
            engine,
            transactions,
            lambda conn, i: [
                enqueue(conn, CHANNEL, EVENT, payload(i * per_commit + k))
                for k in range(per_commit)
            ],
        )
    finally:
        engine.dispose()
    added = statistics.median(with_outbox) - statistics.median(plain)
    return Measurement(
        f"enqueue, {per_commit} event(s) per commit",
        backend,
        events=transactions * per_commit,
        seconds=sum(with_outbox),
        extra={
            "median_txn_ms": statistics.median(with_outbox) * 1000,
            "median_plain_txn_ms": statistics.median(plain) * 1000,
            "added_ms_per_commit": added * 1000,
        },
    )


def _time_transactions(
    engine: sa.Engine, count: int, work: Callable[[sa.Connection, int], object]
) -> list[float]:
    timings = []
    for i in range(count):
        started = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(APP_TABLE.insert().values(note=f"order {i}"))
            work(conn, i)
        timings.append(time.perf_counter() - started)
    return timings


def bulk_enqueue(
    url: str,
    backend: str,
    events: int,
    chunk: int = 10_000,
    ordering_keys: int = 0,
    keyed_every: int = 1,
) -> Measurement:
    """``events`` through ``enqueue_many``, ``chunk`` per transaction; with ``ordering_keys``,
    every ``keyed_every``-th event ``i`` gets the key ``k{i % ordering_keys}`` (the keys
    interleaved in id order; ``keyed_every=2``: half the events keyed, half not)."""
    engine = create_engine(url)
    try:
        started = time.perf_counter()
        for start in range(0, events, chunk):
            with engine.begin() as conn:
                enqueue_many(
                    conn, events_from(start, min(events, start + chunk), ordering_keys, keyed_every)
                )
        seconds = time.perf_counter() - started
    finally:
        engine.dispose()
    return Measurement("bulk enqueue (enqueue_many)", backend, events=events, seconds=seconds)


def events_from(
    start: int, stop: int, ordering_keys: int = 0, keyed_every: int = 1
) -> list[OutboxEvent]:
    """Events ``start`` to ``stop`` of a run (see :func:`bulk_enqueue` for their keys)."""
    return [
        OutboxEvent(
            CHANNEL,
            EVENT,
            payload(i),
            ordering_key=f"k{i % ordering_keys}"
            if ordering_keys and i % keyed_every == 0
            else None,
        )
        for i in range(start, stop)
    ]


def add_history(url: str, rows: int) -> float:
    """Insert ``rows`` already-published rows straight in SQL; returns seconds taken."""
    engine = create_engine(url)
    t = outbox_table()
    started = time.perf_counter()
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(
                    sa.text(
                        f"""
                        INSERT INTO {t.name} (event_id, idempotency_key, channel, event, data,
                                              attempts, published_at)
                        SELECT gen_random_uuid(), 'history-' || g, 'bench', 'old', '{{}}',
                               1, now()
                        FROM generate_series(1, :rows) AS g
                        """
                    ),
                    {"rows": rows},
                )
            elif conn.dialect.name in MYSQL_NAMES:
                # No series generator common to MariaDB and MySQL (MySQL caps recursive CTEs
                # at 1,000 rows): multi-row INSERTs from here, which PyMySQL's executemany
                # sends as one statement per chunk.
                now = conn.execute(sa.select(utc_now())).scalar_one()
                for start in range(0, rows, 10_000):
                    conn.execute(
                        sa.insert(t),
                        [
                            {
                                "event_id": uuid.uuid4(),
                                "idempotency_key": f"history-{n}",
                                "channel": "bench",
                                "event": "old",
                                "data": "{}",
                                "attempts": 1,
                                "published_at": now,
                            }
                            for n in range(start, min(rows, start + 10_000))
                        ],
                    )
            else:
                conn.execute(
                    sa.text(
                        f"""
                        WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :rows)
                        INSERT INTO {t.name} (event_id, idempotency_key, channel, event, data,
                                              attempts, published_at)
                        SELECT lower(hex(randomblob(16))), 'history-' || n, 'bench', 'old', '{{}}',
                               1, strftime('%Y-%m-%d %H:%M:%f000', 'now')
                        FROM g
                        """
                    ),
                    {"rows": rows},
                )
            # Ids come from the hot table's sequence; then the rows move to the log, as acks
            # move them.
            log = published_table(t)
            old = sa.and_(t.c.channel == "bench", t.c.event == "old")
            columns = [t.c[c] for c in EVENT_COLUMNS]
            conn.execute(sa.insert(log).from_select(EVENT_COLUMNS, sa.select(*columns).where(old)))
            conn.execute(sa.delete(t).where(old))
        if engine.dialect.name == "postgresql":
            # The history went through the hot table: its dead rows go, as autovacuum would
            # take them. No ANALYZE: a drain meets the tables with the statistics they have.
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(sa.text(f"VACUUM {t.name}"))
    finally:
        engine.dispose()
    return time.perf_counter() - started


def scrape_metrics(port: int) -> None:
    """One Prometheus scrape of a worker (the gauges read the table)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        response.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the cost of the queue gauges on a long published history ---------------------------------

GAUGES = "queue gauges read"
#: The drain pair that prices the metrics (one worker each, same sizes, one after the other).
METRICS_OFF = "metrics off: outbox drain, 1 worker"
METRICS_ON = "metrics on, scraped every second: outbox drain, 1 worker"
FULL_STATUS = "full status read (outbox status)"


def gauge_cost(
    url: str, backend: str, history: int, unsent: int, repeats: int = 20
) -> list[Measurement]:
    """Time the read behind the worker's gauges, and the full ``outbox status`` report, on a
    table holding ``history`` published rows and ``unsent`` pending ones (a small backlog).

    ``events`` is the number of reads; the figures are the median and slowest read in ms."""
    add_history(url, history)
    bulk_enqueue(url, backend, unsent)
    engine = create_engine(url)
    t = outbox_table()
    results = []
    try:
        for label, published, count in ((GAUGES, False, repeats), (FULL_STATUS, True, 3)):
            times = []
            for _ in range(count):
                with engine.connect() as conn:
                    started = time.perf_counter()
                    report = admin.snapshot(conn, t, published=published, errors=5 * published)
                    times.append(time.perf_counter() - started)
            assert report.counts["pending"] == unsent
            times.sort()
            results.append(
                Measurement(
                    f"{label}, {history:,} published rows",
                    backend,
                    events=count,
                    seconds=sum(times),
                    extra={
                        "read_median_ms": statistics.median(times) * 1000,
                        "read_max_ms": times[-1] * 1000,
                        "published_rows": history,
                        "unsent_rows": unsent,
                    },
                )
            )
    finally:
        engine.dispose()
    return results


def database_pids(backend: str) -> dict[str, list[int | None]]:
    """The database server's processes, for the CPU meter (none for SQLite: it runs in the
    worker). PostgreSQL runs a process per connection; MariaDB one process of threads."""
    if backend == "postgresql":
        return {"database": list(pids_named("postgres"))}
    if backend == "mariadb":
        return {"database": [*pids_named("mariadbd"), *pids_named("mysqld")]}
    return {}


def rss_kb(pid: int) -> int:
    """A process's resident memory (kB), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


@contextmanager
def workers(
    count: int, database_url: str, sockudo_url: str, workdir: Path, **settings: Any
) -> Iterator[list[WorkerProcess]]:
    """``count`` worker processes (``settings`` by Settings name), stopped afterwards."""
    procs = [
        WorkerProcess(
            database_url,
            sockudo_url,
            workdir / f"worker-{n}-{uuid.uuid4().hex[:6]}.log",
            log_level="WARNING",
            retention_seconds=0,
            **settings,
        )
        for n in range(count)
    ]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            if p.alive:
                p.signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.close()


#: The label of a drain of keyed events (issue 11: within 2x of the unordered drain).
ORDERED_DRAIN = "outbox drain, {workers} worker(s), {keys:,} ordering keys"
#: The keys an ordered drain spreads its events over.
ORDERED_KEYS = 1_000
#: The backends that take ordering keys (MariaDB and MySQL refuse them).
ORDERED_BACKENDS = ("sqlite", "postgresql")


class Backlog:
    """What a drain has left, read cheaply enough to ask every 20 ms over any backlog.

    Counting the hot table costs a scan of the backlog (100 ms over a million rows on
    PostgreSQL), which would load the database whose speed is measured: whether it is empty is
    one step down the primary key, and what was published since :meth:`mark` is a range of the
    published log's key (new rows take ids above every row there before).
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.hot = outbox_table()
        self.log = published_table(self.hot)
        self.since = 0

    def mark(self) -> None:
        with self.engine.connect() as conn:
            self.since = conn.execute(sa.select(sa.func.max(self.log.c.id))).scalar() or 0

    def published(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(sa.func.count()).where(self.log.c.id > self.since)
            ).scalar_one()

    def started(self) -> bool:
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    sa.select(self.log.c.id).where(self.log.c.id > self.since).limit(1)
                ).first()
                is not None
            )

    def empty(self) -> bool:
        with self.engine.connect() as conn:
            return (
                conn.execute(sa.select(self.hot.c.id).order_by(self.hot.c.id).limit(1)).first()
                is None
            )

    def size(self) -> int:
        """The exact backlog: a scan, so read at most once a second (the overload's samples),
        never in the 20 ms loop of a drain."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(self.hot)).scalar_one()


def drain(
    database_url: str,
    sockudo_url: str,
    backend: str,
    events: int,
    worker_count: int,
    workdir: Path,
    label: str = "",
    timeout: float = 600.0,
    server_pid: int | None = None,
    progress: Callable[[str], None] = lambda line: None,
    ordering_keys: int = 0,
    keyed_every: int = 1,
    **settings: Any,
) -> Measurement:
    """Enqueue ``events`` (not timed), then time ``worker_count`` workers publishing them all.

    With ``ordering_keys``, the events are spread over that many ordering keys, interleaved
    (event ``i`` has key ``k{i % ordering_keys}``), so the claim takes only the head of each key
    and at most one row per key is in flight (the ordered drain, :data:`ORDERED_DRAIN`); with
    ``keyed_every=2`` only every other event has a key.

    Nothing analyzes the table: the workers meet the backlog as they would after an outage,
    with whatever statistics the server has (none, on a new table with autovacuum behind).

    CPU per event is measured over the same span for the workers, the server (``server_pid``)
    and, on PostgreSQL, every ``postgres`` process of the machine. With a ``metrics_port``
    setting (one worker), ``/metrics`` is scraped every second as Prometheus would, so the
    figure includes the queue gauges' reads. ``progress`` gets a line every few seconds."""
    engine = create_engine(database_url)
    backlog = Backlog(engine)
    backlog.mark()
    bulk_enqueue(
        database_url, backend, events, ordering_keys=ordering_keys, keyed_every=keyed_every
    )
    peak_rss = 0
    rss_after_warmup = 0
    warmup_at = time.perf_counter() + 1.0
    metrics_port = settings.get("metrics_port")
    scrapes = 0
    next_scrape = next_progress = time.monotonic() + 1.0
    with workers(worker_count, database_url, sockudo_url, workdir, **settings) as procs:
        first = None
        deadline = time.monotonic() + timeout
        while True:
            now = time.perf_counter()
            rss = sum(rss_kb(p.pid) for p in procs)
            peak_rss = max(peak_rss, rss)
            if first is None and backlog.started():
                first = now
                warmup_at = now + 1.0
                # Rows published before this sample are counted out of the timed span.
                first_count = backlog.published()
                meter = CpuMeter(
                    {
                        "worker": [p.pid for p in procs],
                        "server": [server_pid] if server_pid else [],
                        **database_pids(backend),
                    }
                ).start()
            if first is not None and not rss_after_warmup and now >= warmup_at:
                rss_after_warmup = rss
            if first is not None and backlog.empty():
                finished = time.perf_counter()
                used = meter.stop()
                break
            # From the first publish on: the worker serves its port before its first claim.
            if metrics_port is not None and first is not None and time.monotonic() >= next_scrape:
                scrape_metrics(metrics_port)
                scrapes += 1
                next_scrape = time.monotonic() + 1.0
            if time.monotonic() >= next_progress:
                progress(f"{backlog.published():,} of {events:,} published")
                next_progress = time.monotonic() + 5.0
            for p in procs:
                if not p.alive:
                    raise RuntimeError(f"worker exited early; see {p.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"drain did not finish in {timeout:.0f} s ({backlog.published()}/{events})"
                )
            time.sleep(0.02)
        end_rss = sum(rss_kb(p.pid) for p in procs)
    published = backlog.published()
    engine.dispose()
    assert first is not None
    if published != events:
        raise RuntimeError(f"the drain published {published:,} of {events:,} events")
    timed_events = events - first_count
    seconds = max(finished - first, 1e-6)
    if not label:
        label = f"outbox drain, {worker_count} worker(s)"
        if ordering_keys:
            label = ORDERED_DRAIN.format(workers=worker_count, keys=ordering_keys)
    return Measurement(
        label,
        backend,
        events=timed_events,
        seconds=seconds,
        extra={
            "worker_peak_rss_mb": peak_rss / 1024,
            "rss_growth_mb": (end_rss - rss_after_warmup) / 1024 if rss_after_warmup else None,
            "workers": worker_count,
            **({"ordering_keys": ordering_keys} if ordering_keys else {}),
            **({"keyed_every": keyed_every} if ordering_keys and keyed_every != 1 else {}),
            **({"metrics_scrapes": scrapes} if metrics_port is not None else {}),
            **cpu_figures(used, timed_events, seconds),
        },
    )


#: The label of a drain of a backlog the workers meet all at once (issue 22).
CATCH_UP = "catch-up: {events:,}-event backlog, 1 worker{keys}"
#: The label of the sustained-overload run.
OVERLOAD = "overload: producers above the drain for {seconds:.0f} s, 1 worker{keys}"
#: How the backlog drains and the overload run key their events when keyed: every other event,
#: over this many keys (the other half unkeyed).
MIXED_KEYS = 1_000


def catch_up_label(events: int, keyed: bool) -> str:
    return CATCH_UP.format(
        events=events, keys=f", half keyed on {MIXED_KEYS:,} keys" if keyed else ""
    )


def overload(
    database_url: str,
    sockudo_url: str,
    backend: str,
    seconds: float,
    workdir: Path,
    producers: int = 2,
    keyed: bool = False,
    server_pid: int | None = None,
    progress: Callable[[str], None] = lambda line: None,
    timeout: float = 600.0,
    **settings: Any,
) -> Measurement:
    """Producers above the drain rate for ``seconds`` while one worker drains, then stopped.

    ``producers`` processes each write ``enqueue_many`` transactions of 1,000 events as fast as
    they can (with ``keyed``, half of them keyed as in :data:`MIXED_KEYS`), so the backlog grows
    while the worker runs. The measurement is the catch-up: the backlog when the producers stop
    (``backlog_peak``), drained at ``events_per_s``; a system that sinks under a backlog would
    catch up slower than the same backlog drained alone (:data:`CATCH_UP`).
    """
    import multiprocessing

    engine = create_engine(database_url)
    backlog = Backlog(engine)
    backlog.mark()
    context = multiprocessing.get_context("spawn")
    with workers(1, database_url, sockudo_url, workdir, **settings) as procs:
        procs[0].wait_until_started()
        with context.Pool(producers) as pool:
            started = time.perf_counter()
            produced_async = pool.starmap_async(
                produce,
                [(database_url, seconds, n, MIXED_KEYS if keyed else 0) for n in range(producers)],
            )
            samples = []
            while not produced_async.ready():
                time.sleep(1.0)
                samples.append(backlog.size())
                progress(f"backlog {samples[-1]:,}")
            produced = sum(produced_async.get())
            stopped = time.perf_counter()
            peak = backlog.size()
            published_during = backlog.published()
        meter = CpuMeter(
            {
                "worker": [procs[0].pid],
                "server": [server_pid] if server_pid else [],
                **database_pids(backend),
            }
        ).start()
        deadline = time.monotonic() + timeout
        while not backlog.empty():
            procs[0].check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the overload backlog did not drain in {timeout:.0f} s")
            time.sleep(0.02)
        finished = time.perf_counter()
        used = meter.stop()
    published = backlog.published()
    engine.dispose()
    if published != produced:
        raise RuntimeError(f"the overload run published {published:,} of {produced:,} events")
    catch_up_seconds = max(finished - stopped, 1e-6)
    produced_seconds = stopped - started
    return Measurement(
        OVERLOAD.format(
            seconds=seconds, keys=f", half keyed on {MIXED_KEYS:,} keys" if keyed else ""
        ),
        backend,
        events=peak,
        seconds=catch_up_seconds,
        extra={
            "backlog_peak": max([peak, *samples]),
            "produced": produced,
            "produced_per_s": produced / produced_seconds,
            "drained_per_s_under_load": published_during / produced_seconds,
            "workers": 1,
            **({"ordering_keys": MIXED_KEYS, "keyed_every": 2} if keyed else {}),
            **cpu_figures(used, peak, catch_up_seconds),
        },
    )


def produce(database_url: str, seconds: float, producer: int, ordering_keys: int) -> int:
    """One producer process of :func:`overload`: returns how many events it committed."""
    engine = create_engine(database_url)
    deadline = time.perf_counter() + seconds
    chunk = 1_000
    done = 0
    base = producer * 1_000_000_000
    try:
        while time.perf_counter() < deadline:
            with engine.begin() as conn:
                enqueue_many(conn, events_from(base + done, base + done + chunk, ordering_keys, 2))
            done += chunk
    finally:
        engine.dispose()
    return done


# -- 4. latency: steady load, commit to acknowledgement ----------------------------------------


def latency(
    database_url: str,
    sockudo_url: str,
    backend: str,
    rate: float,
    seconds: float,
    workdir: Path,
    **settings: Any,
) -> Measurement:
    """A producer commits ``rate`` events/s (one per transaction) while one worker runs."""
    engine = create_engine(database_url)
    t = outbox_table()
    committed: dict[uuid.UUID, float] = {}
    with workers(1, database_url, sockudo_url, workdir, **settings):
        time.sleep(1.5)  # let the worker start and LISTEN before the first commit
        total = int(rate * seconds)
        # One commit costs about a millisecond on PostgreSQL (the WAL flush): a single producer
        # cannot commit 1,000 times a second, so several share the schedule, like the request
        # handlers of an application would.
        producers = 4
        started = time.perf_counter()

        def produce(offset: int) -> None:
            for i in range(offset, total, producers):
                pause = started + i / rate - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                with engine.begin() as conn:
                    event_id = enqueue(conn, CHANNEL, EVENT, payload(i))
                committed[event_id] = time.time()

        threads = [threading.Thread(target=produce, args=(n,)) for n in range(producers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        produced = time.perf_counter() - started
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                left = conn.execute(
                    sa.select(sa.func.count()).where(t.c.event_id.in_(list(committed)))
                ).scalar_one()
            if not left:
                break
            time.sleep(0.05)
    with engine.connect() as conn:
        log = published_table(t)
        rows = conn.execute(
            sa.select(log.c.event_id, log.c.published_at).where(log.c.event_id.in_(list(committed)))
        ).all()
    engine.dispose()
    waits = sorted(
        max(0.0, r.published_at.timestamp() - committed[r.event_id]) * 1000
        for r in rows
        if r.published_at is not None
    )
    if len(waits) != len(committed):
        raise RuntimeError(f"latency run: {len(committed) - len(waits)} events were not published")
    return Measurement(
        f"latency at {rate:.0f} events/s",
        backend,
        events=len(waits),
        seconds=produced,
        extra={
            "p50_ms": _percentile(waits, 50),
            "p95_ms": _percentile(waits, 95),
            "p99_ms": _percentile(waits, 99),
            "max_ms": waits[-1],
        },
    )


def _percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    k = (len(sorted_values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)

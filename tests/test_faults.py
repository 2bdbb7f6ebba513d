"""Crash and fault injection: the worker as a real process, the server in a process of its own.

Every scenario runs ``python -m outbox worker`` (configured by environment, like production)
against the Sockudo-faithful test server started by ``TestServerProcess``, so killing a worker
never kills the server and the server's record of deliveries is the ground truth. Each scenario
compares the database rows with the server's deliveries by ``message_id`` (the row's idempotency
key) and adds a line to the table printed at the end of the module (also written as JSON; the
path is printed).

Run alone: ``pytest tests/test_faults.py -m faults -s``.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

import outbox
from outbox import OutboxEvent, enqueue, enqueue_many, outbox_table
from outbox.database import create_engine
from outbox.sockudo.validation import DEFAULT_LIMITS, Limits
from outbox.testing.server import RemoteTestServer, TestServerProcess
from outbox.testing.worker_process import WorkerProcess
from tests.faultlib import (
    Results,
    all_rows,
    in_flight,
    report_summary,
    retry_after_violations,
    settled,
    spawning,
    worker_config,
)
from tests.helpers.producers import Producer
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.faults

#: Long enough that no retry in this module arrives after the server's idempotency window.
IDEMPOTENCY_TTL = 900
SEED = int(os.environ.get("OUTBOX_FAULTS_SEED", str(int(time.time()))))


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_results(
    request: pytest.FixtureRequest,
) -> Iterator[Results]:
    """Collects one row per scenario; prints the table and writes JSON when the module ends."""
    results = Results()
    yield results
    report_summary(request, results, "Fault suite summary", "faults-summary.json", SEED)


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """``spawn_worker(config, name)`` starts a worker process (``python -m outbox worker``);
    every one still alive at the end of the test is killed. (``spawn`` starts any command.)"""
    with spawning(tmp_path) as start:
        yield start


def _server(tmp_path: Path, **options: Any) -> TestServerProcess:
    """The scenario's test server, in its own process (it outlives every worker killed)."""
    return TestServerProcess(
        stderr=tmp_path / "server.err", idempotency_ttl=IDEMPOTENCY_TTL, **options
    )


def _events(n: int, channel: str, name: str, start: int = 0) -> list[OutboxEvent]:
    return [OutboxEvent(channel, name, {"n": start + i}) for i in range(n)]


def _enqueue(engine: sa.Engine, events: list[OutboxEvent], limits: Limits = DEFAULT_LIMITS) -> None:
    with engine.begin() as conn:
        enqueue_many(conn, events, limits=limits)


def _live_producer(engine: sa.Engine, per_commit: int) -> Producer:
    """An application still writing during a storm: ``per_commit`` events a transaction, a
    transaction every 0.2 s, until stopped (``committed`` transactions made
    ``committed * per_commit`` events)."""

    def transaction(number: int) -> None:
        start = number * per_commit
        _enqueue(engine, _events(per_commit, "live", "produced", start=start))

    return Producer(transaction, pause=0.2)


def _audit(
    engine: sa.Engine, server: RemoteTestServer
) -> tuple[list[Any], Counter[str], dict[str, Any]]:
    """Rows, deliveries per message_id, and the standard figures (lost, phantom, duplicates...)."""
    rows = all_rows(engine)
    delivered = Counter(d.message_id for d in server.deliveries())
    keys = {r.idempotency_key for r in rows}
    figures = {
        "rows": len(rows),
        # committed, not refused by the server, and never delivered
        "lost": sum(1 for r in rows if r.status != "dead" and delivered[r.idempotency_key] == 0),
        "phantom": sum(1 for k in delivered if k not in keys),
        "duplicates": sum(1 for n in delivered.values() if n > 1),
        "extra_deliveries": sum(n - 1 for n in delivered.values() if n > 1),
        "dead": sum(1 for r in rows if r.status == "dead"),
        "not_published": sum(1 for r in rows if r.status != "published"),
    }
    return rows, delivered, figures


def _assert_all_delivered(
    rows: list[Any], delivered: Counter[str], figures: dict[str, Any]
) -> None:
    never = [r.id for r in rows if delivered[r.idempotency_key] == 0]
    assert not never, f"{len(never)} committed rows never reached the server, e.g. {never[:10]}"
    statuses = Counter(r.status for r in rows)
    assert statuses == Counter({"published": len(rows)}), f"row statuses at the end: {statuses}"
    assert figures["phantom"] == 0, "the server received events that are not in the table"


def _with_app_name(url: str, name: str) -> str:
    return (
        make_url(url)
        .update_query_dict({"application_name": name})
        .render_as_string(hide_password=False)
    )


# -- 1. kill -9 storm --------------------------------------------------------------------------

STORM_UPFRONT = 5000
STORM_KILLS = 22
#: Events in each transaction of the producer that keeps writing through the storm.
STORM_PER_COMMIT = 10


@pytest.mark.parametrize("idempotency", [True, False], ids=["idempotency-on", "idempotency-off"])
def test_kill9_storm(
    backend: str,
    database_url: str,
    idempotency: bool,
    tmp_path: Path,
    spawn_worker: Callable[..., WorkerProcess],
    fault_results: Results,
) -> None:
    """SIGKILL the worker 22 times at random moments while it drains 5,000 events (plus a live
    producer); restart it each time. Nothing is lost; with server idempotency no subscriber sees a
    duplicate; without it every duplicate is explained by a kill (or a timed-out request).

    Explanation check (idempotency off): right after each SIGKILL (and before the next worker
    starts) the rows ``in_flight`` are exactly the dead worker's unacknowledged claims. A row can
    reach the server twice only if a claim of it ended without an ack (a kill) or with an endpoint
    error (then its row was claimed again: ``attempts`` above 1). So every duplicated event must
    be in the union of those in-flight snapshots or among the retried rows; and no row may be
    delivered more times than it was claimed (``attempts``), which rules out a batch re-sent
    within one claim.
    """
    started = time.monotonic()
    rng = random.Random(f"{SEED}-{backend}-{idempotency}")
    engine = create_engine(database_url)
    producer = _live_producer(engine, per_commit=STORM_PER_COMMIT)
    orphaned: set[int] = set()
    kills = 0
    try:
        _enqueue(engine, _events(STORM_UPFRONT, "storm", "up-front"))
        with _server(tmp_path, idempotency=idempotency) as server:
            # Batches are answered 80 ms after they are published: a kill in that window leaves
            # published rows unacknowledged (the case idempotency exists for).
            server.add_latency(0.08, stage="published", endpoints=("batch_events",))
            env = worker_config(
                database_url,
                server.url,
                lease_seconds=2,
                request_timeout=1,
                batch_size=20,
                in_flight=2,
            )
            producer.start()
            for i in range(STORM_KILLS):
                worker = spawn_worker(env, f"storm-{i:02d}")
                worker.wait_until_started(60)
                time.sleep(rng.uniform(0.05, 0.6))
                assert worker.alive, f"worker {i} died on its own:\n{worker.log_text()[-3000:]}"
                worker.kill()
                kills += 1
                orphaned |= set(in_flight(engine))
            producer.stop()
            assert not producer.errors, f"producer failed: {producer.errors[0]!r}"
            expected = STORM_UPFRONT + producer.committed * STORM_PER_COMMIT
            mid_storm = server.delivered_count()
            final = spawn_worker(env, "storm-final")
            wait_until(
                lambda: settled(engine, expected),
                f"all {expected} rows settled",
                timeout=240,
                interval=0.5,
            )
            exit_code = final.terminate()
            rows, delivered, figures = _audit(engine, server)
            server_duplicates = server.duplicates()
    finally:
        producer.stop()
        engine.dispose()

    by_key = {r.idempotency_key: r for r in rows}
    # A row claimed more than once was retried (after an endpoint error, or a lease expiry).
    retried_keys = {r.idempotency_key for r in rows if r.attempts > 1}
    dup_keys = [k for k, n in delivered.items() if n > 1]
    by_kill = sum(1 for k in dup_keys if by_key[k].id in orphaned)
    by_retry = sum(1 for k in dup_keys if by_key[k].id not in orphaned and k in retried_keys)
    unexplained = [k for k in dup_keys if by_key[k].id not in orphaned and k not in retried_keys]
    over_claimed = [r.id for r in rows if delivered[r.idempotency_key] > r.attempts]
    fault_results.record(
        f"kill -9 storm ({'idem on' if idempotency else 'idem OFF'})",
        backend,
        rows,
        figures,
        started,
        kills=kills,
        notes=(
            f"{STORM_UPFRONT} up front + {expected - STORM_UPFRONT} by a live producer; "
            f"{mid_storm} delivered during the kills; {len(orphaned)} rows orphaned in flight by "
            f"kills; {figures['extra_deliveries']} extra deliveries"
            + (
                f" ({by_kill} dup events explained by a kill, {by_retry} by a retried request)"
                if not idempotency
                else ""
            )
        ),
    )

    assert kills >= 20
    assert exit_code == 0, "the final worker must drain and exit 0 on SIGTERM"
    assert len(rows) == expected >= 5000
    assert mid_storm > 0, "the kills must land while the worker is publishing"
    assert orphaned, "no kill left a claimed row behind: the storm did not test recovery"
    _assert_all_delivered(rows, delivered, figures)
    assert not over_claimed, f"rows delivered more often than claimed: {over_claimed[:10]}"
    if idempotency:
        assert server_duplicates == {}, f"subscriber-visible duplicates: {server_duplicates}"
        assert figures["duplicates"] == 0
    else:
        assert not unexplained, (
            f"{len(unexplained)} duplicated events were neither in flight at a kill nor retried "
            f"after an endpoint error, e.g. {unexplained[:5]}"
        )


# -- 2. two workers, one killed ----------------------------------------------------------------


def test_two_workers_one_killed(
    server_database_url: str,
    tmp_path: Path,
    spawn_worker: Callable[..., WorkerProcess],
    fault_results: Results,
) -> None:
    """Two workers drain one PostgreSQL (or MariaDB) table; one is SIGKILLed mid-drain. Its leased rows stay
    leased until the lease expires, then the survivor takes them over (sent alone, answered from
    the server's cache where they had reached it): nothing lost, nothing duplicated."""
    started = time.monotonic()
    total = 3000
    lease = 8.0
    engine = create_engine(server_database_url)
    try:
        _enqueue(engine, _events(total, "pair", "shared"))
        with _server(tmp_path) as server:
            # Requests are held 150 ms before publishing, so a worker always has claims in flight.
            server.add_latency(0.15, stage="claimed", endpoints=("batch_events",))
            env = worker_config(
                server_database_url,
                server.url,
                lease_seconds=lease,
                request_timeout=2,
                batch_size=20,
                in_flight=4,
            )
            victim = spawn_worker(env, "victim")
            survivor = spawn_worker(env, "survivor")
            victim.wait_until_started(60)
            survivor.wait_until_started(60)
            wait_until(lambda: server.delivered_count() >= 400, "400 deliveries", timeout=60)
            # The victim has reported acknowledgements of its own (its stats file).
            wait_until(lambda: victim.stats().get("published", 0) > 0, "victim acks", timeout=30)
            leased_at_kill = in_flight(engine)
            victim.kill()
            leased_at_kill |= in_flight(engine)
            # The survivor finishes its own requests within the request timeout (2 s) and records
            # them at once; the victim's claims are at most ~2.5 s old at the kill, so their 8 s
            # leases still run. Rows with the same lease token 4 s after the kill are the victim's.
            time.sleep(4.0)
            still = in_flight(engine)
            orphans = {
                row_id: lease_info
                for row_id, lease_info in still.items()
                if row_id in leased_at_kill and leased_at_kill[row_id][0] == lease_info[0]
            }
            wait_until(
                lambda: settled(engine, total), "all rows settled", timeout=120, interval=0.5
            )
            exit_code = survivor.terminate()
            rows, delivered, figures = _audit(engine, server)
            server_duplicates = server.duplicates()
    finally:
        engine.dispose()

    # The victim's counts as it last wrote them (at most a second before the kill).
    victim_published = victim.stats().get("published", 0)
    survivor_reclaimed = survivor.stats()["reclaimed"]
    by_id = {r.id: r for r in rows}
    fault_results.record(
        "two workers, one killed",
        make_url(server_database_url).get_backend_name(),
        rows,
        figures,
        started,
        kills=1,
        notes=(
            f"{len(orphans)} rows leased by the killed worker taken over after the {lease:.0f} s "
            f"lease; victim acked {victim_published} before dying"
        ),
    )
    assert victim.returncode == -9
    assert exit_code == 0
    assert victim_published > 0 and survivor.alive is False
    assert orphans, "the killed worker held no lease: the kill did not land mid-drain"
    assert survivor_reclaimed >= len(orphans), "the survivor never reclaimed expired leases"
    _assert_all_delivered(rows, delivered, figures)
    for row_id, (_token, expires_at) in orphans.items():
        row = by_id[row_id]
        assert row.status == "published" and row.attempts >= 2, row
        # Taken over only after the lease ran out (database clock on both sides).
        assert row.published_at >= expires_at, (row_id, row.published_at, expires_at)
    assert server_duplicates == {}, f"duplicates: {server_duplicates}"


# -- 3. database connection loss / SQLite lock -------------------------------------------------


@contextlib.contextmanager
def _worker_connections(
    backend: str, url: str, request: pytest.FixtureRequest
) -> Iterator[tuple[str, Callable[[], int]]]:
    """A URL for the worker whose connections the server can tell apart, and a function that
    kills them all from an admin connection (returns how many it killed).

    PostgreSQL: an application_name, then pg_terminate_backend. MariaDB has no such name in its
    process list: the worker logs in as a user of its own, then KILL CONNECTION on each.
    """
    tag = f"outbox_fault_{uuid.uuid4().hex[:8]}"
    if backend == "postgresql":
        admin = request.getfixturevalue("postgres_server").engine

        def terminate() -> int:
            with admin.begin() as conn:
                return int(
                    conn.execute(
                        sa.text(
                            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                            "FROM pg_stat_activity "
                            "WHERE application_name = :name AND pid <> pg_backend_pid()"
                        ),
                        {"name": tag},
                    ).scalar_one()
                )

        yield _with_app_name(url, tag), terminate
        return
    admin = request.getfixturevalue("mariadb_server").engine
    parsed = make_url(url)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE USER '{tag}'@'%' IDENTIFIED BY '{tag}'"))
        conn.execute(sa.text(f"GRANT ALL ON `{parsed.database}`.* TO '{tag}'@'%'"))

    def kill() -> int:
        killed = 0
        with admin.connect() as conn:
            ids = conn.execute(
                sa.text("SELECT id FROM information_schema.processlist WHERE user = :user"),
                {"user": tag},
            ).scalars()
            for connection_id in list(ids):
                try:
                    conn.execute(sa.text(f"KILL CONNECTION {int(connection_id)}"))
                    killed += 1
                except sa.exc.DBAPIError:  # it closed between the list and the kill
                    pass
        return killed

    try:
        yield parsed.set(username=tag, password=tag).render_as_string(hide_password=False), kill
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP USER IF EXISTS '{tag}'@'%'"))


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"], indirect=True)
def test_database_connections_killed(
    backend: str,
    database_url: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    spawn_worker: Callable[..., WorkerProcess],
    fault_results: Results,
) -> None:
    """Every connection of the worker killed by the server (pg_terminate_backend, MariaDB's
    KILL CONNECTION), 5 times mid-drain: it reconnects and finishes; it never exits on its own;
    database errors in its log stay bounded."""
    started = time.monotonic()
    total = 3000
    rounds = 5
    engine = create_engine(database_url)
    terminated: list[int] = []
    try:
        _enqueue(engine, _events(total, "db", "reconnect"))
        with (
            _server(tmp_path) as server,
            _worker_connections(backend, database_url, request) as (url, kill_connections),
        ):
            server.add_latency(0.05, stage="claimed")
            env = worker_config(
                url,
                server.url,
                lease_seconds=4,
                request_timeout=2,
                batch_size=10,
                in_flight=2,
            )
            worker = spawn_worker(env, f"{backend}-worker")
            worker.wait_until_started(60)
            wait_until(lambda: server.delivered_count() >= 100, "100 deliveries", timeout=60)
            for _ in range(rounds):
                killed = kill_connections()
                terminated.append(int(killed))
                assert worker.alive, (
                    f"worker exited after a termination:\n{worker.log_text()[-3000:]}"
                )
                time.sleep(1.0)
            delivered_during = server.delivered_count()
            wait_until(
                lambda: settled(engine, total), "all rows settled", timeout=120, interval=0.5
            )
            assert worker.alive, f"worker exited on its own:\n{worker.log_text()[-3000:]}"
            exit_code = worker.terminate()
            rows, delivered, figures = _audit(engine, server)
    finally:
        engine.dispose()

    log = worker.log_text()
    errors = worker.stats()["database_errors"]
    fault_results.record(
        "pg_terminate_backend x5" if backend == "postgresql" else "KILL CONNECTION x5",
        backend,
        rows,
        figures,
        started,
        notes=(
            f"connections terminated per round {terminated}; {errors} database errors logged; "
            f"{delivered_during} delivered before the last termination"
        ),
    )
    assert all(n >= 1 for n in terminated), f"no worker connection found to kill: {terminated}"
    assert delivered_during < total, "the drain ended before the terminations: nothing was tested"
    assert exit_code == 0
    assert log.count("worker started") == 1, "the worker restarted (crash loop?)"
    assert "Traceback" not in log, log[-3000:]
    # Each termination can fail at most the statements running at that moment: the claim loop,
    # the in-flight records (in_flight) and the upkeep, each retried once more at most.
    bound = rounds * (1 + 2 + 1) * 2
    assert errors <= bound, f"{errors} database errors for {rounds} terminations (bound {bound})"
    _assert_all_delivered(rows, delivered, figures)
    assert figures["duplicates"] == 0


def test_sqlite_write_lock_held(
    tmp_path: Path,
    spawn_worker: Callable[..., WorkerProcess],
    fault_results: Results,
) -> None:
    """Another connection holds SQLite's write lock (BEGIN EXCLUSIVE for 4 s, later BEGIN
    IMMEDIATE for 3 s, each writing events of its own) mid-drain: the worker waits and goes on."""
    from outbox import migrate

    started = time.monotonic()
    url = f"sqlite:///{tmp_path / 'locked.db'}"
    engine = create_engine(url)
    migrate.upgrade(engine)
    holder = create_engine(url, isolation_level="AUTOCOMMIT")
    total = 3000
    locks: list[tuple[float, float]] = []
    request_timeout = 1.0
    try:
        _enqueue(engine, _events(total, "lite", "locked"))
        with _server(tmp_path) as server:
            server.add_latency(0.05, stage="claimed")
            env = worker_config(
                url,
                server.url,
                lease_seconds=10,
                request_timeout=request_timeout,
                batch_size=10,
                in_flight=2,
            )
            worker = spawn_worker(env, "sqlite-worker")
            worker.wait_until_started(60)
            wait_until(lambda: server.delivered_count() >= 200, "200 deliveries", timeout=60)
            for mode, hold in (("EXCLUSIVE", 4.0), ("IMMEDIATE", 3.0)):
                with holder.connect() as conn:
                    conn.exec_driver_sql(f"BEGIN {mode}")
                    acquired = time.time()
                    for i in range(5):
                        enqueue(conn, "lite", "written-under-lock", {"mode": mode, "i": i})
                    time.sleep(hold)
                    conn.exec_driver_sql("COMMIT")
                    locks.append((acquired, time.time()))
                assert worker.alive, worker.log_text()[-3000:]
                time.sleep(1.0)
            total += 10
            delivered_during = server.delivered_count()
            wait_until(
                lambda: settled(engine, total), "all rows settled", timeout=120, interval=0.5
            )
            exit_code = worker.terminate()
            deliveries = server.deliveries()
            rows, delivered, figures = _audit(engine, server)
    finally:
        holder.dispose()
        engine.dispose()

    log = worker.log_text()
    database_errors = worker.stats()["database_errors"]
    # While the lock is held the worker can neither claim nor ack: once requests sent before
    # the lock are answered (request timeout + slack), no delivery may happen until it ends.
    slack = request_timeout + 0.5
    during_lock = [
        d for d in deliveries for start, end in locks if start + slack < d.time < end - 0.05
    ]
    fault_results.record(
        "sqlite write lock 4 s + 3 s",
        "sqlite",
        rows,
        figures,
        started,
        notes=f"{database_errors} database errors; deliveries while locked: {len(during_lock)}",
    )
    assert delivered_during < total, "the drain ended before the locks: nothing was tested"
    assert not during_lock, "the lock did not hold the worker back: the test proves nothing"
    assert exit_code == 0
    assert log.count("worker started") == 1
    assert database_errors == 0, "the busy timeout should absorb a few seconds of lock"
    _assert_all_delivered(rows, delivered, figures)
    assert figures["duplicates"] == 0


# -- 4. endpoint outage, 503 Retry-After, 429 ----------------------------------------------------


def test_endpoint_outage_then_503_then_429(
    server_database_url: str,
    tmp_path: Path,
    spawn_worker: Callable[..., WorkerProcess],
    fault_results: Results,
) -> None:
    """The server is down for 30 s, then answers 503 with Retry-After: 2, then rate-limits
    (429) in two bursts. Nothing goes dead, everything arrives once, the worker backs off
    (visible in its log) and never hot-loops (request counts bounded from the settings)."""
    started = time.monotonic()
    batch_size, in_flight_n, threshold = 20, 4, 3
    backoff_min, backoff_max = 0.2, 2.0
    alone = 8
    outage = 30.0
    engine = create_engine(server_database_url)
    producer_rows = 0
    try:
        _enqueue(engine, _events(400, "outage", "before"))
        with _server(tmp_path) as server:
            env = worker_config(
                server_database_url,
                server.url,
                lease_seconds=3,
                request_timeout=1,
                batch_size=batch_size,
                in_flight=in_flight_n,
                alone_concurrency=alone,
                backoff_min_seconds=backoff_min,
                backoff_max_seconds=backoff_max,
                breaker_threshold=threshold,
            )
            worker = spawn_worker(env, "outage-worker")
            worker.wait_until_started(60)
            wait_until(
                lambda: server.delivered_count() >= 400, "the first 400 delivered", timeout=60
            )

            # Phase 1: down for 30 s, while the application keeps writing. The worker's own
            # request count is sampled as it goes (its stats file, rewritten every second).
            server.go_down()
            down_at = time.time()
            samples = [(down_at, worker.stats()["requests"])]
            for k in range(6):
                _enqueue(engine, _events(100, "outage", "during", start=100 * k))
                producer_rows += 100
                time.sleep(outage / 6)
                samples.append((time.time(), worker.stats()["requests"]))
            remaining = outage - (time.time() - down_at)
            if remaining > 0:
                time.sleep(remaining)
                samples.append((time.time(), worker.stats()["requests"]))
            # Phase 2: back, but the first 8 requests get 503 with Retry-After: 2.
            server.fail_next(
                count=8,
                status=503,
                code="service_unavailable",
                message="Service temporarily unavailable",
                retry_after=2,
                stage="received",
            )
            server.come_up()
            up_at = time.time()
            assert worker.alive, worker.log_text()[-3000:]
            wait_until(
                lambda: server.request_count(status=503) >= 8, "the 503s to be served", timeout=60
            )
            # Phase 3: two bursts of rate limiting (3 requests/s, Retry-After: 1).
            limited: list[tuple[float, float]] = []
            for burst in range(2):
                _enqueue(engine, _events(200, "outage", f"burst-{burst}"))
                producer_rows += 200
                server.rate_limit(3, retry_after=1)
                begin = time.time()
                time.sleep(4.0)
                server.rate_limit(None)
                limited.append((begin, time.time()))
                time.sleep(2.0)
            expected = 400 + producer_rows
            wait_until(
                lambda: settled(engine, expected), "all rows settled", timeout=180, interval=0.5
            )
            exit_code = worker.terminate()
            rows, delivered, figures = _audit(engine, server)
            requests = server.requests()
            stats = server.stats()
    finally:
        engine.dispose()

    outage_requests = samples[-1][1] - samples[0][1]
    steady_from, steady_start = next((t, n) for t, n in samples if t >= down_at + 12.0)
    steady_requests = samples[-1][1] - steady_start
    pauses = worker.stats()["pauses"]
    early = retry_after_violations(requests)
    retried_keys = Counter(key for r in requests for key in r["keys"])
    per_sec_429 = Counter(
        int(r["time"]) for r in requests for a, b in limited if a <= r["time"] <= b
    )
    max_rate_429 = max(per_sec_429.values(), default=0)
    windows_429 = [sum(1 for r in requests if a <= r["time"] <= b) for a, b in limited]
    fault_results.record(
        "outage 30s + 503 + 429",
        make_url(server_database_url).get_backend_name(),
        rows,
        figures,
        started,
        notes=(
            f"{outage_requests} requests in the 30 s outage ({steady_requests} in its last "
            f"{up_at - steady_from:.0f} s); {pauses} breaker pauses; "
            f"{stats['by_status'].get('503', 0)} x 503, {stats['by_status'].get('429', 0)} x 429; "
            f"{windows_429} requests in the two 4 s rate-limited windows (max {max_rate_429} "
            f"in one second); max attempts "
            f"{max((r.attempts for r in rows), default=0)}"
        ),
    )
    assert exit_code == 0
    assert figures["dead"] == 0, [
        (r.id, r.last_error_status, r.last_error_message) for r in rows if r.status == "dead"
    ][:10]
    _assert_all_delivered(rows, delivered, figures)
    assert figures["duplicates"] == 0
    assert pauses, "the breaker never opened"
    assert any(n > 1 for n in retried_keys.values()), "no row was sent twice: nothing retried"
    # No hot loop while the endpoint is down. Before the breaker opens, at most threshold +
    # in_flight claims fail (each at most one request per row); once open, at most one probe
    # per backoff_min; once the backoff reached its cap, one probe per backoff_max.
    bound = (threshold + in_flight_n) * batch_size + math.ceil(outage / backoff_min)
    assert 0 < outage_requests <= bound, (outage_requests, bound)
    steady_bound = math.ceil((up_at - steady_from) / backoff_max) + 3
    assert steady_requests <= steady_bound, (steady_requests, steady_bound)
    # Retry-After is honoured: a row refused with Retry-After: 2 (or 1) comes back no sooner,
    # as the server saw it.
    assert not early, early[:10]
    assert stats["by_status"].get("429", 0) > 0, "the rate limit was never hit"
    # While rate-limited: a 429 carries Retry-After: 1, so the breaker allows at most one round
    # of claims per second. In a round, a claim stops sending the moment the endpoint fails (and
    # while the breaker is open), so a round is at most the probe, one batch request per claim
    # and the requests already in the worker's alone pool.
    round_bound = 1 + in_flight_n + alone
    for (a, b), window in zip(limited, windows_429, strict=True):
        window_bound = (math.ceil(b - a) + 1) * round_bound
        assert window <= window_bound, (window, window_bound)
    assert max_rate_429 <= 2 * round_bound, per_sec_429


# -- 5. slow server ----------------------------------------------------------------------------


def test_slow_server_answers_after_timeout(
    tmp_path: Path,
    spawn_worker: Callable[..., WorkerProcess],
    fault_results: Results,
) -> None:
    """The server publishes, then answers after the worker's request timeout (2 s vs 1 s): the
    worker gives up on those batches and retries their rows alone; the server answers the repeats
    from its idempotency cache, so each event is delivered exactly once and every row ends
    published."""
    from outbox import migrate

    started = time.monotonic()
    url = f"sqlite:///{tmp_path / 'slow.db'}"
    engine = create_engine(url)
    migrate.upgrade(engine)
    total = 300
    try:
        _enqueue(engine, _events(total, "slow", "late-answer"))
        with _server(tmp_path) as server:
            server.add_latency(2.0, stage="published", count=3, endpoints=("batch_events",))
            env = worker_config(
                url,
                server.url,
                lease_seconds=3,
                request_timeout=1,
                batch_size=50,
                in_flight=4,
            )
            worker = spawn_worker(env, "slow-worker")
            worker.wait_until_started(60)
            wait_until(lambda: settled(engine, total), "all rows settled", timeout=90, interval=0.5)
            exit_code = worker.terminate()
            rows, delivered, figures = _audit(engine, server)
            server_duplicates = server.duplicates()
            alone_requests = server.request_count("events")
            batch_requests = server.request_count("batch_events")
    finally:
        engine.dispose()

    retried_rows = sum(1 for r in rows if r.attempts >= 2)
    fault_results.record(
        "slow server (answer > timeout)",
        "sqlite",
        rows,
        figures,
        started,
        notes=(
            f"{retried_rows} rows retried alone after a timeout; {batch_requests} batch and "
            f"{alone_requests} /events requests"
        ),
    )
    assert exit_code == 0
    assert retried_rows >= 50, f"expected at least one timed-out batch of 50, got {retried_rows}"
    assert alone_requests >= retried_rows, "retried rows must go alone through /events"
    _assert_all_delivered(rows, delivered, figures)
    assert server_duplicates == {}, server_duplicates
    assert all(n == 1 for n in delivered.values())


# -- 6. bad input ------------------------------------------------------------------------------


class _Opaque:
    pass


BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    # (case id, enqueue arguments, field named by the error)
    ("channel with a space", {"channel": "has space"}, "channel"),
    ("channel with unicode", {"channel": "caf\u00e9"}, "channel"),
    ("channel too long", {"channel": "c" * 101}, "channel"),
    ("empty channel", {"channel": ""}, "channel"),
    ("no channel at all", {"channel": []}, "channel"),
    ("channel not a string", {"channel": 123}, "channel"),
    ("channel None", {"channel": None}, "channel"),
    ("channel listed twice", {"channel": ["a", "a"]}, "channel"),
    ("namespace the app lacks", {"channel": "ns:x"}, "channel"),
    ("user-limited channel", {"channel": "chat#alice"}, "channel"),
    ("event name too long", {"event": "e" * 101}, "event"),
    ("event name over 100 bytes, 51 chars", {"event": "\u00e9" * 51}, "event"),
    ("empty event name", {"event": ""}, "event"),
    ("event None", {"event": None}, "event"),
    ("NUL in event name", {"event": "ok\x00"}, "event"),
    ("data over 100 KB", {"data": "x" * (100 * 1024 + 1)}, "data"),
    (
        "encrypted data over 100 KB once sealed",
        {"channel": "private-encrypted-x", "data": "x" * 80_000},
        "data",
    ),
    ("data not serializable", {"data": {"f": _Opaque()}}, "data"),
    ("data with NaN", {"data": {"x": float("nan")}}, "data"),
    ("data bytes", {"data": b"raw"}, "data"),
    ("NUL in data string", {"data": "a\x00b"}, "data"),
    ("lone surrogate in data", {"data": "\ud800"}, "data"),
    ("lone surrogate in JSON data", {"data": {"k": "\udfff"}}, "data"),
    ("idempotency key over 128 bytes", {"idempotency_key": "k" * 129}, "idempotency_key"),
    ("empty idempotency key", {"idempotency_key": ""}, "idempotency_key"),
    ("socket id not a string", {"socket_id": 123}, "socket_id"),
    ("tags not a mapping", {"tags": ["a"]}, "tags"),
    ("tag value not a string", {"tags": {"a": 1}}, "tags"),
    ("extras with infinity", {"extras": {"x": float("inf")}}, "extras"),
    ("info not a string", {"info": 5}, "info"),
]


def test_bad_input_refused_at_enqueue(engine: sa.Engine, fault_results: Results) -> None:
    """Every malformed event raises outbox.InvalidEvent naming the field, before any SQL, inside
    the caller's transaction, which stays usable (PostgreSQL aborts a transaction on any failed
    statement, so this also proves nothing was sent)."""
    started = time.monotonic()
    t = outbox_table()
    refused: dict[str, str] = {}
    problems: list[str] = []
    with engine.connect() as conn, conn.begin():
        enqueue(conn, "ok", "before", {"n": 1})
        for case, override, field_name in BAD_INPUTS:
            args = {"channel": "ok", "event": "ev", "data": {"n": 2}} | override
            channel, event, data = args.pop("channel"), args.pop("event"), args.pop("data")
            try:
                enqueue(conn, channel, event, data, **args)
            except outbox.InvalidEvent as exc:
                refused[case] = str(exc)
                if exc.field != field_name:
                    problems.append(f"{case}: field {exc.field!r}, expected {field_name!r}")
                elif field_name.split("_")[0] not in str(exc).lower():
                    problems.append(f"{case}: message does not name {field_name}: {exc}")
            except Exception as exc:
                problems.append(f"{case}: {type(exc).__name__} instead of InvalidEvent: {exc}")
            else:
                problems.append(f"{case}: accepted")
        # enqueue_many validates everything first: one bad event refuses the whole call.
        try:
            enqueue_many(conn, [OutboxEvent("ok", "ev", 1), OutboxEvent("ok", "e" * 101, 2)])
        except outbox.InvalidEvent as exc:
            if exc.field != "event" or "#1" not in str(exc):
                problems.append(f"enqueue_many: {exc.field!r} {exc}")
        else:
            problems.append("enqueue_many accepted an event name over 100 bytes")
        enqueue(conn, "ok", "after", {"n": 3})
        # The transaction is still usable and holds exactly the two good rows.
        events = conn.execute(sa.select(t.c.event).order_by(t.c.id)).scalars().all()
    with engine.connect() as conn:
        committed = conn.execute(sa.select(t.c.event).order_by(t.c.id)).scalars().all()
    fault_results.add(
        scenario="bad input at enqueue",
        backend=engine.dialect.name,
        events=len(BAD_INPUTS) + 1,
        kills=0,
        lost=0,
        duplicates=0,
        dead=0,
        duration_s=time.monotonic() - started,
        notes=f"{len(refused)}/{len(BAD_INPUTS)} refused with InvalidEvent; {len(problems)} problems",
    )
    assert not problems, "\n".join(problems)
    assert len(BAD_INPUTS) >= 15
    assert events == ["before", "after"]
    assert committed == ["before", "after"]


SERVER_REFUSALS = [
    # (position in the stream, channel, event, data, expected status, expected code)
    (5, "refuse", "big", "x" * 2000, 413, "payload_too_large"),
    (47, "ns:x", "nsless", '{"n":47}', 400, "invalid_input"),
    (90, "refuse", "an-event-name-of-30-bytes-long", '{"n":90}', 400, "limit_exceeded"),
    (133, "refuse", "big", "y" * 1500, 413, "payload_too_large"),
    (170, "ns:y", "nsless", '{"n":170}', 400, "invalid_input"),
]


def test_server_refusals_dead_lettered(
    backend: str,
    database_url: str,
    tmp_path: Path,
    spawn_worker: Callable[..., WorkerProcess],
    fault_results: Results,
) -> None:
    """A server with tighter limits than the outbox (1 KB payloads, 20-byte event names, no
    namespaces) refuses 5 events that enqueue accepted. Each is dead-lettered with the server's
    status, code and message on its row; the 195 events sharing their batches arrive, once."""
    started = time.monotonic()
    total = 200
    refusals = {pos: rest for pos, *rest in SERVER_REFUSALS}
    events = []
    for i in range(total):
        if i in refusals:
            channel, name, data, _status, _code = refusals[i]
            events.append(OutboxEvent(channel, name, data, idempotency_key=f"bad-{i}"))
        else:
            events.append(OutboxEvent("refuse", "fine", {"n": i}, idempotency_key=f"good-{i}"))
    engine = create_engine(database_url)
    try:
        # The application declares namespace "ns"; the server (wrongly) does not configure it.
        _enqueue(engine, events, Limits(namespaces=frozenset({"ns"})))
        with _server(
            tmp_path,
            max_payload_kb=1,
            max_event_name_bytes=20,
        ) as server:
            env = worker_config(
                database_url,
                server.url,
                lease_seconds=4,
                request_timeout=2,
                batch_size=20,
                in_flight=4,
            )
            worker = spawn_worker(env, "refusals-worker")
            worker.wait_until_started(60)
            # A timeout here is reported below, row by row, with each bad row's state.
            with contextlib.suppress(AssertionError):
                wait_until(
                    lambda: settled(engine, total), "all rows settled", timeout=45, interval=0.5
                )
            exit_code = worker.terminate()
            rows, delivered, figures = _audit(engine, server)
    finally:
        engine.dispose()

    by_key = {r.idempotency_key: r for r in rows}

    def bad(position: int) -> Any:
        return by_key[outbox.derive_channel_key(f"bad-{position}", refusals[position][0])]

    fault_results.record(
        "server refusals (413/400)",
        backend,
        rows,
        figures,
        started,
        notes="bad rows: "
        + ", ".join(
            f"{bad(p).status}/{bad(p).last_error_status}/{bad(p).last_error_code}" for p in refusals
        ),
    )
    assert exit_code == 0
    wrong = []
    for pos, (_channel, _name, _data, status, code) in refusals.items():
        row = bad(pos)
        if not (
            row.status == "dead"
            and row.last_error_status == status
            and row.last_error_code == code
            and row.last_error_message
        ):
            wrong.append(
                f"bad-{pos}: {row.status} attempts={row.attempts} "
                f"[{row.last_error_status} {row.last_error_code}] {row.last_error_message}"
            )
    assert not wrong, "refused events not dead-lettered with the server's reason:\n" + "\n".join(
        wrong
    )
    good = [r for r in rows if r.event == "fine"]
    assert all(r.status == "published" for r in good), Counter(r.status for r in good)
    assert all(delivered[r.idempotency_key] == 1 for r in good)
    assert len(good) == total - len(refusals)
    assert not any(delivered[bad(p).idempotency_key] for p in refusals)

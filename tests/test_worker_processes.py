"""Worker processes (``python worker.py`` / ``outbox worker``): several draining one table, and signals.

The test server runs in the test process; the workers are real subprocesses configured only through
the environment, as in production.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from outbox import OutboxEvent, enqueue_many, outbox_table
from outbox.database import create_engine
from outbox.settings import Settings
from outbox.testing.worker_process import WorkerProcess
from outbox.worker import Worker
from tests.helpers.waiting import wait_until
from tests.outbox_rows import EV, counts

REPO = Path(__file__).resolve().parents[1]
T = outbox_table()


def worker_settings(database_url: str, sockudo_url: str, **settings: object) -> dict[str, object]:
    values: dict[str, object] = {
        "poll_interval": 0.05,
        "backoff_min_seconds": 0.05,
        "backoff_max_seconds": 1,
        "request_timeout": 5,
        "lease_seconds": 10,
        "retention_seconds": 0,
    }
    return {"database_url": database_url, "sockudo_url": sockudo_url, **values, **settings}


def start(command: list[str], tmp_path: Path, name: str, **settings: object) -> WorkerProcess:
    """A worker process run by ``command`` (``python worker.py`` from the repository, or the
    ``outbox`` command), configured by environment only."""
    log = tmp_path / f"{name}.log"
    return WorkerProcess(command=command, cwd=REPO, log_path=log, **settings).start()  # type: ignore[arg-type]


PYTHON_WORKER = [sys.executable, "worker.py"]
CLI_WORKER = [str(Path(sys.executable).with_name("outbox")), "worker"]


def statuses(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return counts(conn)


def rows(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(EV).order_by(EV.c.id)))


def enqueue_events(engine: sa.Engine, n: int) -> None:
    with engine.begin() as conn:
        enqueue_many(conn, [OutboxEvent("orders", "created", {"n": i}) for i in range(n)])


# -- 2. several worker processes, one table on a database server ----------------------------------


def test_two_worker_processes_drain_disjoint_rows(server_database_url, sockudo_server, tmp_path):
    """On PostgreSQL and on MariaDB (SKIP LOCKED on both; MariaDB's workers poll)."""
    n = 3000
    engine = create_engine(server_database_url)
    # Latency per request keeps batches in flight (a drain by one worker alone would take 3 s),
    # so both workers get a share even when one of them is scheduled late.
    sockudo_server.add_latency(0.1, stage="claimed")
    settings = worker_settings(server_database_url, sockudo_server.url, batch_size=50, in_flight=2)
    workers = [
        start(PYTHON_WORKER, tmp_path, "python-worker", **settings),
        start(CLI_WORKER, tmp_path, "cli-worker", **settings),
    ]
    try:
        for w in workers:
            w.wait_for_log("worker started")
        enqueue_events(engine, n)  # one commit: NOTIFY (or the next poll) wakes both workers
        wait_until(lambda: statuses(engine).get("published", 0) == n, "all published", timeout=60)
        assert [w.terminate() for w in workers] == [0, 0]
    finally:
        for w in workers:
            w.close()
        engine.dispose()

    assert sockudo_server.delivered_count() == n
    assert not sockudo_server.duplicates()
    assert len({d.idempotency_key for d in sockudo_server.deliveries()}) == n
    counts = [w.stats()["published"] for w in workers]
    assert all(c > 0 for c in counts), counts  # both did work
    assert sum(counts) == n, counts  # and no row was acknowledged by both
    assert sockudo_server.request_count("batch_events") == n // 50
    assert sockudo_server.request_count("events") == 0  # nothing needed a retry


# -- 8. SIGTERM during a drain -------------------------------------------------------------------


def test_sigterm_drains_in_flight_batches_then_exits_0(database_url, sockudo_server, tmp_path):
    n = 400
    engine = create_engine(database_url)
    enqueue_events(engine, n)
    sockudo_server.add_latency(0.3, stage="claimed")  # every batch stays in flight a while
    settings = worker_settings(database_url, sockudo_server.url, batch_size=20, in_flight=2)
    worker = start(PYTHON_WORKER, tmp_path, "worker", **settings)
    try:
        wait_until(lambda: sockudo_server.delivered_count() > 0, "a first delivery", timeout=20)
        wait_until(
            lambda: statuses(engine).get("in_flight", 0) > 0, "a batch in flight", timeout=20
        )
        assert worker.terminate() == 0, worker.log_text()
    finally:
        worker.close()
    # The operator is told what the signal does.
    assert "SIGTERM: finishing in-flight batches" in worker.log_text()

    state = statuses(engine)
    assert "in_flight" not in state, state
    assert set(state) <= {"published", "pending"}, state
    assert state.get("pending", 0) > 0, "the signal came before the end of the drain"
    published = {r.idempotency_key for r in rows(engine) if r.status == "published"}
    delivered = [d.idempotency_key for d in sockudo_server.deliveries()]
    # Every published row was delivered, and nothing pending was: batches in flight finished.
    assert published == set(delivered)
    assert not sockudo_server.duplicates()
    # The rows given back kept a clean attempt count: they go in a batch next time.
    assert {r.attempts for r in rows(engine) if r.status == "pending"} == {0}

    sockudo_server.clear_faults()
    settings = Settings(
        database_url=database_url,
        sockudo_url=sockudo_server.url,
        poll_interval=0.05,
        retention_seconds=0,
    )
    asyncio.run(Worker(settings, engine=engine).run(once=True))
    assert statuses(engine) == {"published": n}
    assert sockudo_server.delivered_count() == n
    assert not sockudo_server.duplicates()
    engine.dispose()


def test_second_signal_exits_at_once(database_url, sockudo_server, tmp_path):
    engine = create_engine(database_url)
    enqueue_events(engine, 40)
    sockudo_server.add_latency(3.0, stage="claimed", count=1)  # the first batch hangs
    settings = worker_settings(database_url, sockudo_server.url, batch_size=20)
    worker = start(PYTHON_WORKER, tmp_path, "worker", **settings)
    try:
        wait_until(
            lambda: statuses(engine).get("in_flight", 0) > 0, "a batch in flight", timeout=20
        )
        worker.signal(signal.SIGTERM)
        worker.wait_for_log("finishing in-flight batches")
        worker.signal(signal.SIGTERM)
        rc = worker.wait()
    finally:
        worker.close()
    assert rc == 128 + signal.SIGTERM, worker.log_text()
    # It did not wait for the hanging batch: its rows are still leased (another worker takes
    # them over when the lease expires), and it never reached its clean stop.
    assert statuses(engine).get("in_flight", 0) > 0
    assert worker.stats()["running"] is True
    engine.dispose()

"""Worker processes (``python worker.py`` / ``outbox worker``): several draining one table, and signals.

The test server runs in the test process; the workers are real subprocesses configured only through
the environment, as in production.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from outbox import OutboxEvent, enqueue_many, outbox_table
from outbox.database import create_engine
from outbox.settings import Settings
from outbox.worker import Worker

REPO = Path(__file__).resolve().parents[1]
T = outbox_table()


class WorkerProcess:
    """A worker subprocess whose stderr (its log) is collected line by line."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, line) for line in self.lines):
            if self.proc.poll() is not None:
                time.sleep(0.1)  # let the reader catch the last lines
                raise AssertionError(f"worker exited ({self.proc.returncode}):\n{self.log}")
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n{self.log}"
            time.sleep(0.02)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 20.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def published_count(self) -> int:
        match = re.search(r"worker stopped: (\d+) published", self.log)
        assert match, self.log
        return int(match.group(1))


def worker_env(database_url: str, sockudo_url: str, **extra: str) -> dict[str, str]:
    env = {
        "OUTBOX_DATABASE_URL": database_url,
        "SOCKUDO_URL": sockudo_url,
        "OUTBOX_POLL_INTERVAL": "0.05",
        "OUTBOX_BACKOFF_MIN": "0.05",
        "OUTBOX_BACKOFF_MAX": "1",
        "OUTBOX_REQUEST_TIMEOUT": "5",
        "OUTBOX_LEASE_SECONDS": "10",
        "OUTBOX_RETENTION_SECONDS": "0",
        "OUTBOX_LOG_LEVEL": "INFO",
    }
    env.update(extra)
    return env


PYTHON_WORKER = [sys.executable, "worker.py"]
CLI_WORKER = [str(Path(sys.executable).with_name("outbox")), "worker"]


def statuses(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(T.c.status, sa.func.count()).group_by(T.c.status)).all())


def rows(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(T).order_by(T.c.id)))


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def enqueue_events(engine: sa.Engine, n: int) -> None:
    with engine.begin() as conn:
        enqueue_many(conn, [OutboxEvent("orders", "created", {"n": i}) for i in range(n)])


# -- 2. several worker processes, one PostgreSQL table -------------------------------------------


def test_two_worker_processes_drain_disjoint_rows(postgres_url, sockudo_server):
    n = 3000
    engine = create_engine(postgres_url)
    # A little latency per request keeps batches in flight, so both workers get a share.
    sockudo_server.add_latency(0.02, stage="claimed")
    env = worker_env(postgres_url, sockudo_server.url, OUTBOX_BATCH_SIZE="50", OUTBOX_IN_FLIGHT="2")
    workers = [WorkerProcess(PYTHON_WORKER, env), WorkerProcess(CLI_WORKER, env)]
    try:
        for w in workers:
            w.wait_for_line("worker started")
        enqueue_events(engine, n)  # one commit: NOTIFY wakes both workers
        wait_until(lambda: statuses(engine).get("published", 0) == n, 60, "all published")
        for w in workers:
            w.signal(signal.SIGTERM)
        assert [w.wait() for w in workers] == [0, 0]
    finally:
        for w in workers:
            w.kill()
        engine.dispose()

    assert sockudo_server.delivered_count() == n
    assert not sockudo_server.duplicates()
    assert len({d.idempotency_key for d in sockudo_server.deliveries()}) == n
    counts = [w.published_count() for w in workers]
    assert all(c > 0 for c in counts), counts  # both did work
    assert sum(counts) == n, counts  # and no row was acknowledged by both
    assert sockudo_server.request_count("batch_events") == n // 50
    assert sockudo_server.request_count("events") == 0  # nothing needed a retry


# -- 8. SIGTERM during a drain -------------------------------------------------------------------


def test_sigterm_drains_in_flight_batches_then_exits_0(database_url, sockudo_server):
    n = 400
    engine = create_engine(database_url)
    enqueue_events(engine, n)
    sockudo_server.add_latency(0.3, stage="claimed")  # every batch stays in flight a while
    env = worker_env(database_url, sockudo_server.url, OUTBOX_BATCH_SIZE="20", OUTBOX_IN_FLIGHT="2")
    worker = WorkerProcess(PYTHON_WORKER, env)
    try:
        wait_until(lambda: sockudo_server.delivered_count() > 0, 20, "a first delivery")
        wait_until(lambda: statuses(engine).get("in_flight", 0) > 0, 20, "a batch in flight")
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.log
    finally:
        worker.kill()
    assert "SIGTERM: finishing in-flight batches" in worker.log

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


def test_second_signal_exits_at_once(database_url, sockudo_server):
    engine = create_engine(database_url)
    enqueue_events(engine, 40)
    sockudo_server.add_latency(3.0, stage="claimed", count=1)  # the first batch hangs
    env = worker_env(database_url, sockudo_server.url, OUTBOX_BATCH_SIZE="20")
    worker = WorkerProcess(PYTHON_WORKER, env)
    try:
        wait_until(lambda: statuses(engine).get("in_flight", 0) > 0, 20, "a batch in flight")
        worker.signal(signal.SIGTERM)
        worker.wait_for_line("finishing in-flight batches")
        worker.signal(signal.SIGTERM)
        rc = worker.wait()
    finally:
        worker.kill()
    assert rc == 128 + signal.SIGTERM, worker.log
    # It did not wait for the hanging batch: its rows are still leased (another worker takes
    # them over when the lease expires), and "worker stopped" was never reached.
    assert statuses(engine).get("in_flight", 0) > 0
    assert "worker stopped" not in worker.log
    engine.dispose()

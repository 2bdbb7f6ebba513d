"""MariaDB's locking: producers and workers never wait for each other, and never deadlock.

InnoDB's default isolation (REPEATABLE READ) takes gap locks that would make an application's
INSERT wait for a worker's claim; the worker's connections run at READ COMMITTED instead (see
outbox/drivers/mysql.py). These tests hold transactions open at the worst moment, on a real
MariaDB, and show who waits: the first one also shows the trap itself, at REPEATABLE READ.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from outbox import OutboxEvent, enqueue, enqueue_many, outbox_table
from outbox.database import create_engine, normalize_url
from outbox.drivers import Ack, Failure, driver_for
from tests.outbox_rows import EV

#: Runs in the full tier (see tests/plugins/tiers.py).
pytestmark = pytest.mark.mariadb

T = outbox_table()
#: A lock wait this long is a lock wait, whatever the machine's load (the default is 50 s).
LOCK_WAIT_SECONDS = 3
LOCK_WAIT_TIMEOUT = 1205
DEADLOCK = 1213


@pytest.fixture
def app_engine(mariadb_url: str) -> Iterator[sa.Engine]:
    """The application's engine: SQLAlchemy's defaults (the server's REPEATABLE READ), not ours,
    with lock waits cut short so that a wait shows as error 1205 instead of a slow test."""
    engine = sa.create_engine(normalize_url(mariadb_url))
    sa.event.listen(engine, "connect", _short_lock_waits)
    yield engine
    engine.dispose()


@pytest.fixture
def worker_engine(mariadb_url: str) -> Iterator[sa.Engine]:
    """The worker's engine, as ``outbox.database.create_engine`` makes it (READ COMMITTED)."""
    engine = create_engine(mariadb_url)
    yield engine
    engine.dispose()


def _short_lock_waits(dbapi_connection: Any, _record: object) -> None:
    with dbapi_connection.cursor() as cursor:
        cursor.execute(f"SET SESSION innodb_lock_wait_timeout = {LOCK_WAIT_SECONDS}")


def _error_code(exc: BaseException) -> int | None:
    orig = getattr(exc, "orig", None)
    return orig.args[0] if orig is not None and orig.args else None


def _in_thread(work: Callable[[], Any]) -> Any:
    """Run ``work`` on another thread (its own connection) and return what it returned or raised."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(work())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=LOCK_WAIT_SECONDS * 10)
    assert not thread.is_alive(), "still waiting after the lock wait timeout"
    return outcome[0]


def _add(engine: sa.Engine, n: int) -> None:
    with engine.begin() as conn:
        enqueue_many(conn, [OutboxEvent("c", "e", {"n": i}) for i in range(n)])


def test_the_worker_engine_reads_committed_and_the_apps_keeps_its_own(worker_engine, app_engine):
    with worker_engine.connect() as worker, app_engine.connect() as app:
        assert worker.execute(sa.text("SELECT @@tx_isolation")).scalar_one() == "READ-COMMITTED"
        assert app.execute(sa.text("SELECT @@tx_isolation")).scalar_one() == "REPEATABLE-READ"


@pytest.mark.parametrize(
    "isolation", ["worker default", "REPEATABLE READ"], ids=["read-committed", "repeatable-read"]
)
def test_a_producer_never_waits_for_a_claim_in_progress(mariadb_url, app_engine, isolation):
    """A worker has claimed every due row and not yet committed; the application commits a new
    row meanwhile. With the worker's engine (READ COMMITTED) the INSERT goes straight through; at
    REPEATABLE READ the claim's next-key lock on the end of the pending index holds it back until
    the lock wait times out: the trap the isolation level avoids."""
    options = {} if isolation == "worker default" else {"isolation_level": isolation}
    worker_engine = create_engine(mariadb_url, **options)
    _add(worker_engine, 5)
    driver = driver_for(worker_engine, T)
    try:
        with worker_engine.connect() as conn, conn.begin():
            claimed = driver.claim(conn, 10, 60.0, uuid.uuid4())
            assert len(claimed) == 5  # the whole pending range: the scan reached its end

            def produce() -> uuid.UUID:
                with app_engine.begin() as app:
                    return enqueue(app, "c", "e", "written while a claim is open")

            outcome = _in_thread(produce)
    finally:
        worker_engine.dispose()
    if isolation == "worker default":
        assert isinstance(outcome, uuid.UUID), outcome
    else:
        assert isinstance(outcome, sa.exc.OperationalError), outcome
        assert _error_code(outcome) == LOCK_WAIT_TIMEOUT


def test_a_claim_passes_over_a_producers_uncommitted_rows(worker_engine, app_engine):
    """An application transaction is still open with rows in it: a claim neither waits for them
    nor sees them; it takes the committed rows and returns at once."""
    _add(worker_engine, 3)
    driver = driver_for(worker_engine, T)
    with app_engine.connect() as app, app.begin():
        enqueue_many(app, [OutboxEvent("c", "uncommitted", "{}") for _ in range(3)])
        outcome = _in_thread(lambda: _claim(worker_engine, driver, 10))
    assert not isinstance(outcome, BaseException), outcome
    assert [r.event for r in outcome] == ["e"] * 3


def test_reclaim_passes_over_a_row_a_late_worker_is_recording(worker_engine):
    """A lease expired while its worker was still publishing; that worker is recording the ack
    (row locked) when another worker's upkeep runs: the reclaim does not wait for the lock and
    does not take the row; the ack then lands (it still holds the token)."""
    _add(worker_engine, 2)
    driver = driver_for(worker_engine, T)
    token = uuid.uuid4()
    with worker_engine.begin() as conn:
        claimed = driver.claim(conn, 10, 60.0, token)
        conn.execute(sa.update(T).values(lease_expires_at=sa.text("UTC_TIMESTAMP(6)")))
    late, other = (r.id for r in claimed)
    with worker_engine.connect() as recorder, recorder.begin():
        assert driver.publish(recorder, token, [Ack(late)]) == 1  # holds the row lock

        def reclaim() -> int:
            with worker_engine.begin() as conn:
                return driver.reclaim_expired(conn)

        assert _in_thread(reclaim) == 1  # only the other row: no wait, no take-over
    with worker_engine.connect() as conn:
        statuses = dict(conn.execute(sa.select(EV.c.id, EV.c.status)).all())
    assert statuses == {late: "published", other: "pending"}


def _claim(engine: sa.Engine, driver: Any, limit: int) -> list[Any]:
    with engine.begin() as conn:
        return driver.claim(conn, limit, 60.0, uuid.uuid4())


# -- many producers, many workers, the upkeep: all at once ----------------------------------------

PRODUCERS, TRANSACTIONS, PER_TRANSACTION = 4, 40, 5
WORKERS, BATCH = 3, 20


def test_producers_workers_and_upkeep_at_once_never_deadlock(mariadb_url):
    """Four producers commit small transactions while three workers claim, renew, ack,
    reschedule and give back rows, and an upkeep thread reclaims and trims, all against one
    table. No statement meets a deadlock or a lock wait timeout; every row is acked exactly once,
    by the worker that held it."""
    engine = create_engine(mariadb_url, pool_size=WORKERS + PRODUCERS + 2)
    driver = driver_for(engine, T)
    errors: list[BaseException] = []
    acked: list[int] = []
    acked_lock = threading.Lock()
    produced_all = threading.Event()
    finished = threading.Event()
    total = PRODUCERS * TRANSACTIONS * PER_TRANSACTION

    def guarded(work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                work()
            except BaseException as exc:
                errors.append(exc)
                finished.set()

        return run

    def producer(index: int) -> None:
        for t in range(TRANSACTIONS):
            with engine.begin() as conn:
                enqueue_many(
                    conn,
                    [
                        OutboxEvent("c", f"p{index}", {"t": t, "i": i})
                        for i in range(PER_TRANSACTION)
                    ],
                )

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        while not finished.is_set():
            token = uuid.uuid4()
            with engine.begin() as conn:
                rows = driver.claim(conn, BATCH, 60.0, token)
            if not rows:
                if produced_all.is_set() and _remaining(engine) == 0:
                    finished.set()
                time.sleep(0.01)
                continue
            with engine.begin() as conn:
                assert driver.extend_lease(conn, token, 60.0, [r.id for r in rows]) == len(rows)
            ids = [r.id for r in rows]
            rng.shuffle(ids)  # outcomes in any order: the statements must not care
            cut = max(1, len(ids) * 3 // 4)  # at least one: a lone row must move on too
            publish, retry = ids[:cut], ids[cut:]
            give_back_refund, retry = retry[:1], retry[1:]
            with engine.begin() as conn:
                assert driver.publish(conn, token, [Ack(i) for i in publish]) == len(publish)
                failures = [Failure(i, 503, "backpressure", "busy") for i in retry]
                assert driver.retry(conn, token, failures, refund=True) == len(retry)
                assert driver.give_back(conn, token, give_back_refund, refund=True) == len(
                    give_back_refund
                )
            with acked_lock:
                acked.extend(publish)

    def upkeep() -> None:
        while not finished.is_set():
            with engine.begin() as conn:
                driver.reclaim_expired(conn)
            with engine.begin() as conn:
                cutoff = conn.execute(sa.text("SELECT UTC_TIMESTAMP(6)")).scalar_one()
            with engine.begin() as conn:
                driver.delete_published_before(conn, cutoff.replace(tzinfo=dt.UTC), 50)
            time.sleep(0.01)

    producers = [
        threading.Thread(target=guarded(lambda i=i: producer(i))) for i in range(PRODUCERS)
    ]
    others = [threading.Thread(target=guarded(lambda s=s: worker(s))) for s in range(WORKERS)]
    others.append(threading.Thread(target=guarded(upkeep)))
    try:
        for thread in producers + others:
            thread.start()
        for thread in producers:
            thread.join(timeout=120)
        produced_all.set()
        finished.wait(timeout=120)
        finished.set()
        for thread in others:
            thread.join(timeout=60)
        with engine.connect() as conn:
            left = conn.execute(sa.select(T)).all()  # the hot table: what was never published
    finally:
        finished.set()
        engine.dispose()
    codes = [_error_code(e) for e in errors]
    assert not errors, f"{len(errors)} failures (codes {codes}): {errors[0]!r}"
    assert DEADLOCK not in codes and LOCK_WAIT_TIMEOUT not in codes
    assert not left, f"rows never published: {left[:5]}"
    assert len(acked) == len(set(acked)) == total, (len(acked), len(set(acked)), total)


def _remaining(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(T)).scalar_one())

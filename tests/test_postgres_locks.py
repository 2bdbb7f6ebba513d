"""Who waits for whom on PostgreSQL, proven on the real server: producers of one ordering key
whatever path they reach the table by, and a producer against a worker's acknowledgement.

Each race is staged, not hoped for: a transaction is held open at the worst moment and the other
side is shown waiting in ``pg_stat_activity`` (or shown not waiting) before the first one moves.
Every wait is bounded (``lock_timeout``, ``asyncio.wait_for``), so a regression fails instead of
hanging; ``deadlock_timeout`` is short so a deadlock is reported in a tenth of a second.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from outbox import enqueue, outbox_table
from outbox.database import create_engine
from outbox.drivers import Ack, Failure, Recording, driver_for
from outbox.drivers.postgresql import _publish_params
from outbox.worker import Worker
from tests.helpers.drivers import run_step
from tests.outbox_rows import T
from tests.plugins.databases import POSTGRES_URL
from tests.test_ordering import stop, waits_on_advisory_lock_of
from tests.test_worker import fast_settings, table_rows

#: Runs in the full tier (see tests/plugins/tiers.py).
pytestmark = pytest.mark.postgres

on_postgres = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


def backend_pid(conn: sa.Connection) -> int:
    return int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


def blocked_by(engine: sa.Engine, holder: int) -> list[int]:
    """The backends waiting for a lock that backend ``holder`` holds."""
    with engine.connect() as conn:
        found = conn.execute(
            sa.text(
                "SELECT pid FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND :holder = ANY(pg_blocking_pids(pid))"
            ),
            {"holder": holder},
        )
        return list(found.scalars())


async def until(done: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``done()`` (a blocking check, run on a thread) until it is true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(done):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def bounded(conn: sa.Connection) -> None:
    """Waits in this transaction fail instead of hanging; a deadlock is found in 100 ms."""
    conn.execute(sa.text("SET LOCAL lock_timeout = '15s'"))
    conn.execute(sa.text("SET LOCAL deadlock_timeout = '100ms'"))


def row_of(conn: sa.Connection, event_id: uuid.UUID) -> int:
    return conn.execute(sa.select(T.c.id).where(T.c.event_id == event_id)).scalar_one()


# -- producers of one key ------------------------------------------------------------------------


@on_postgres
async def test_producers_reaching_one_table_by_two_search_paths_share_its_key_locks(
    engine, database_url, sockudo_server
):
    """Producer 1 reaches the outbox through its search_path (``outbox_table()``), producer 2
    through a schema-qualified Table with the default search_path (public first). It is one
    table, so it is one key: producer 2's enqueue on key K waits for producer 1's advisory lock
    until producer 1 commits, and the worker delivers 1 then 2.

    Before the fix the lock id was mixed with ``current_schema()`` and the Table's own name, both
    of which differ between the two paths: producer 2 did not wait, took the larger id, committed
    first and was delivered first."""
    with engine.connect() as conn:
        schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
    qualified = outbox_table(T.name, schema=schema)
    public = create_engine(POSTGRES_URL)
    worker = Worker(fast_settings(database_url, sockudo_server.url), engine=engine)
    task = asyncio.create_task(worker.run())
    second_pid: list[int] = []

    def second_producer() -> None:
        with public.begin() as conn:
            bounded(conn)
            second_pid.append(backend_pid(conn))
            enqueue(conn, "orders", "second", {"n": 1}, ordering_key="K", table=qualified)

    first = engine.connect()
    try:
        with public.connect() as conn:
            assert conn.execute(sa.text("SELECT current_schema()")).scalar_one() != schema
        first_tx = first.begin()
        bounded(first)
        first_pid = backend_pid(first)
        enqueue(first, "orders", "first", {"n": 0}, ordering_key="K")
        second = asyncio.create_task(asyncio.wait_for(asyncio.to_thread(second_producer), 30))
        await until(
            lambda: (
                second.done()
                or (
                    second_pid != [] and waits_on_advisory_lock_of(engine, second_pid[0], first_pid)
                )
            ),
            "the second producer to wait on the key's lock",
        )
        assert not second.done(), "the second producer did not wait for the first"
        first_tx.commit()
        await second
        await until(lambda: sockudo_server.delivered_count("orders") == 2, "both events")
    finally:
        first.close()
        await stop(worker, task)
        public.dispose()
    assert [d.name for d in sockudo_server.deliveries("orders")] == ["first", "second"]
    assert not sockudo_server.duplicates()


# -- a producer against an acknowledgement in progress ---------------------------------------------


@on_postgres
@pytest.mark.parametrize("outcome", ["published", "dead"])
async def test_a_producer_repeating_a_key_under_a_recording_fails_at_once_never_deadlocks(
    engine, outcome
):
    """The deadlock of issue #20 item 7, staged. A worker claimed row S (idempotency key "dup")
    and row R, the newest row of ordering key K (S has the smaller id). A producer enqueues on K:
    it holds R (KEY SHARE) until it commits. The worker's recording of S and R (both published,
    or both dead) starts and must wait for the producer, as R is held. Then the producer
    enqueues the key "dup" again.

    Before the fix, the recording had already deleted S (uncommitted) when it came to R and
    waited: the producer's insert then waited on the unique index for the recording, and
    PostgreSQL aborted one of the two as a deadlock. Now the recording locks the keyed rows it
    takes out before it deletes anything: while it waits for the producer, S is still a live
    row, so the producer's insert fails at once with IntegrityError (the documented answer to a
    key whose row is still waiting to be sent), and the recording goes through when the producer
    rolls back."""
    with engine.begin() as conn:
        s = row_of(conn, enqueue(conn, "orders", "first", {"n": 0}, idempotency_key="dup"))
        r = row_of(conn, enqueue(conn, "orders", "keyed", {"n": 1}, ordering_key="K"))
    assert s < r
    if outcome == "published":
        recording = Recording(published=[Ack(s), Ack(r)], heads_gone=["K"])
    else:
        refused = [Failure(i, 413, "payload_too_large", "too large", charged=True) for i in (s, r)]
        recording = Recording(buried=refused, park=[r], heads_gone=["K"])
    driver = driver_for(engine, T)
    producer = engine.connect()
    try:
        token = uuid.uuid4()
        assert [row.id for row in await driver.events_claim(10, 60, token)] == [s, r]
        transaction = producer.begin()
        bounded(producer)
        producer_pid = backend_pid(producer)
        enqueue(producer, "orders", "behind", {"n": 2}, ordering_key="K")  # holds R

        written = driver.events_record(token, recording)
        recorded = asyncio.create_task(asyncio.wait_for(written, 30))
        await until(lambda: bool(blocked_by(engine, producer_pid)), "the recording to wait for R")

        def repeat_the_key() -> None:
            enqueue(producer, "orders", "again", {"n": 3}, idempotency_key="dup")

        with pytest.raises(sa.exc.IntegrityError):
            await asyncio.to_thread(repeat_the_key)
        transaction.rollback()
        await recorded
    finally:
        producer.close()
        await driver.aclose()
    assert [(row.id, row.status) for row in table_rows(engine)] == [(s, outcome), (r, outcome)]


@on_postgres
async def test_a_producer_repeating_the_key_of_a_row_being_acked_waits_for_that_ack_alone(engine):
    """The one wait of a producer for a worker (README, "Ordered delivery per key"): a recording
    has taken row S out (acknowledged, not yet committed) and a producer enqueues S's key "dup"
    again. Its insert waits on the unique index for that transaction, shown in pg_stat_activity,
    and for nothing else: when the recording commits, the key is accepted again (S left the
    table) and the producer commits."""
    with engine.begin() as conn:
        s = row_of(conn, enqueue(conn, "orders", "first", {"n": 0}, idempotency_key="dup"))
    driver = driver_for(engine, T)
    token = uuid.uuid4()
    try:
        assert [row.id for row in await driver.events_claim(10, 60, token)] == [s]
    finally:
        await driver.aclose()
    producer_pids: list[int] = []

    def repeat_the_key() -> uuid.UUID:
        with engine.begin() as conn:
            bounded(conn)
            producer_pids.append(backend_pid(conn))
            return enqueue(conn, "orders", "again", {"n": 1}, idempotency_key="dup")

    with engine.connect() as worker:
        transaction = worker.begin()
        bounded(worker)
        worker_pid = backend_pid(worker)
        run_step(worker, driver, "publish", _publish_params(token, [Ack(s)]))
        producer = asyncio.create_task(asyncio.wait_for(asyncio.to_thread(repeat_the_key), 30))
        await until(
            lambda: producer_pids != [] and blocked_by(engine, worker_pid) == producer_pids,
            "the producer to wait for the recording",
        )
        assert not producer.done()
        transaction.commit()
    again = await producer
    first, second = table_rows(engine)
    assert (first.id, first.status) == (s, "published")
    assert (second.event_id, second.status) == (again, "pending")


@on_postgres
def test_a_recording_locks_only_the_keyed_rows_it_holds_the_lease_of(engine):
    """The lock step's reach: of the rows a recording takes out, it locks those with an ordering
    key (only those can be held by a producer) and still leased under its token (a row taken
    over by another claim is not its to take out); an unkeyed row is left unlocked, so drains
    without keys pay nothing for it."""
    with engine.begin() as conn:
        keyed = row_of(conn, enqueue(conn, "orders", "keyed", {"n": 0}, ordering_key="K"))
        unkeyed = row_of(conn, enqueue(conn, "orders", "plain", {"n": 1}))
        taken_over = row_of(conn, enqueue(conn, "orders", "other", {"n": 2}, ordering_key="J"))
        ours, theirs = uuid.uuid4(), uuid.uuid4()
        for row, token in ((keyed, ours), (unkeyed, ours), (taken_over, theirs)):
            conn.execute(sa.update(T).where(T.c.id == row).values(lease_token=token))
    with engine.connect() as worker, engine.connect() as probe, worker.begin():
        leaving = {"ids": [keyed, unkeyed, taken_over], "token": ours}
        run_step(worker, driver_for(engine, T), "lock_leaving", leaving)
        locked = []
        for row in (keyed, unkeyed, taken_over):
            with probe.begin():
                try:
                    probe.execute(
                        sa.select(T.c.id).where(T.c.id == row).with_for_update(nowait=True)
                    )
                except sa.exc.OperationalError:
                    locked.append(row)
    assert locked == [keyed]

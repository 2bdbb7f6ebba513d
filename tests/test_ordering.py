"""Per-key ordering in the worker, on PostgreSQL and SQLite (MariaDB refuses ordering keys).

Each test drives one promise of ``ordering_key`` through ``Worker`` and the test server: events of
one key are published one after another in commit order (the server's delivery log per channel
is the subscriber's view; each key here has a channel of its own), a key's head that is retried
or dead holds back only its own key, and events without a key do not wait for anyone.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from outbox import InvalidEvent, OutboxEvent, admin, enqueue, enqueue_many, mutations
from outbox.enqueue import BY_CHANNEL
from outbox.schema import ORDERING_KEY_MAX, parked_table
from outbox.testing.server import TestServer
from outbox.worker import Worker
from tests.helpers.producers import Producer
from tests.outbox_rows import FAR_FUTURE
from tests.test_worker import T, fast_settings, run_until, table_rows

#: Ordering keys work on these two; MariaDB refuses them (the last tests).
ORDERED_BACKENDS = pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
LONG_AGO = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
#: Over the 1 KB payload limit of ``TestServer(max_payload_kb=1)``: refused with 413 (dead).
TOO_BIG = "x" * 2048


# -- helpers ------------------------------------------------------------------------------------


async def wait_for(done: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``done()`` (the event loop keeps running the worker) until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def stop(worker: Worker, task: asyncio.Task[None]) -> None:
    worker.stop()
    await asyncio.wait_for(task, timeout=15)


def steps(server: TestServer, channel: str) -> list[Any]:
    """What subscribers of ``channel`` received, in order: each event's ``n`` (or "big")."""
    return [
        "big" if d.data == TOO_BIG else json.loads(d.data)["n"] for d in server.deliveries(channel)
    ]


def key_rows(engine: sa.Engine, key: str) -> list[Any]:
    """The rows of ordering key ``key``, wherever they are, in id order."""
    return [r for r in table_rows(engine) if r.ordering_key == key]


def parked(engine: sa.Engine) -> dict[str, int]:
    """Parked ordering key -> the id of the dead head that parked it."""
    table = parked_table(T)
    with engine.connect() as conn:
        return {r.ordering_key: r.row_id for r in conn.execute(sa.select(table))}


def row_id_of(conn: sa.Connection, event_id: uuid.UUID) -> int:
    return conn.execute(sa.select(T.c.id).where(T.c.event_id == event_id)).scalar_one()


def backend_pid(conn: sa.Connection) -> int:
    return int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


def waits_on_advisory_lock_of(engine: sa.Engine, pid: int, holder: int) -> bool:
    """True while PostgreSQL backend ``pid`` waits for an advisory lock that ``holder`` holds."""
    with engine.connect() as conn:
        found = conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"
                " AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
                " AND :holder = ANY(pg_blocking_pids(pid))"
            ),
            {"pid": pid, "holder": holder},
        ).scalar_one()
    return bool(found)


class KeyedEvent:
    """A producer's one transaction here: on a connection of its own, enqueue one keyed event,
    then commit. It notes its PostgreSQL backend (to see what that waits on) and when enqueue
    returned, its transaction still open."""

    def __init__(self, engine: sa.Engine, channel: str, event: str, key: str) -> None:
        self.engine, self.channel, self.event, self.key = engine, channel, event, key
        self.pid: int | None = None
        self.enqueued = threading.Event()

    def __call__(self, number: int) -> None:
        with self.engine.begin() as conn:
            self.pid = backend_pid(conn)
            enqueue(conn, self.channel, self.event, {"n": 0}, ordering_key=self.key)
            self.enqueued.set()


# -- 1. the reordering race (PostgreSQL) ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_second_producer_of_a_key_waits_for_the_first_to_commit(
    engine, database_url, sockudo_server
):
    """The trap: producer 1 enqueues on key K (smaller id) and commits late; producer 2 enqueues
    on K (larger id) and commits at once. Without a lock the worker would see and publish 2's
    event first, and 1's after it. With the per-key advisory lock, producer 2's enqueue does not
    return while producer 1's transaction is open (it waits on the lock 1 holds), so ids of a
    key follow commit order and the worker delivers 1 then 2. A producer of another key is not
    held up at all: it commits, and the worker delivers its event, while 1 is still open."""
    worker = Worker(fast_settings(database_url, sockudo_server.url), engine=engine)
    task = asyncio.create_task(worker.run())
    first_conn = engine.connect()
    second_event = KeyedEvent(engine, "orders", "second", "order-42")
    other_event = KeyedEvent(engine, "payments", "other", "order-7")
    second = Producer(second_event, transactions=1)
    other = Producer(other_event, transactions=1)
    try:
        first_tx = first_conn.begin()
        enqueue(first_conn, "orders", "first", {"n": 0}, ordering_key="order-42")
        first_pid = backend_pid(first_conn)

        second.start()
        await wait_for(
            lambda: (
                second_event.enqueued.is_set()
                or (
                    second_event.pid is not None
                    and waits_on_advisory_lock_of(engine, second_event.pid, first_pid)
                )
            ),
            "the second producer to wait on the key's lock",
        )
        assert not second_event.enqueued.is_set(), (
            "enqueue returned while the first producer was open"
        )

        # Another key: its producer takes no lock producer 1 holds; it commits and is delivered
        # while producer 1 stays open (if it waited, it would wait until the timeout).
        other.start()
        await wait_for(lambda: other.committed == 1, "the other key's producer to commit")
        await wait_for(
            lambda: sockudo_server.delivered_count("payments") == 1, "the other key's event"
        )

        # Margin: a whole claim-publish-ack round later, producer 2 still waits on the lock and
        # nothing of key order-42 went out.
        assert second_event.pid is not None
        assert waits_on_advisory_lock_of(engine, second_event.pid, first_pid)
        assert not second_event.enqueued.is_set() and second.committed == 0
        assert sockudo_server.deliveries("orders") == []

        first_tx.commit()
        await wait_for(lambda: second.committed == 1, "the second producer to commit")
        await wait_for(lambda: sockudo_server.delivered_count("orders") == 2, "both of order-42")
    finally:
        first_conn.close()
        await stop(worker, task)
        for producer in (second, other):
            if producer.ident is not None:  # started
                producer.join(timeout=10)
    assert not second.errors and not other.errors
    assert [d.name for d in sockudo_server.deliveries("orders")] == ["first", "second"]
    rows = key_rows(engine, "order-42")
    assert [r.event for r in rows] == ["first", "second"]  # ids in commit order
    assert {r.status for r in table_rows(engine)} == {"published"}
    assert not sockudo_server.duplicates()


# -- 2. a retried head -----------------------------------------------------------------------------


@ORDERED_BACKENDS
async def test_a_retried_head_holds_back_its_key_and_no_other(engine, database_url, sockudo_server):
    """Key a's head fails with 500 again and again (a fault on /events, where a lone row goes;
    the heads of keys b, c, d go together through /batch_events). While it is retried, a's later
    events are never even claimed, and b, c, d are delivered in full. Once the server recovers,
    the head goes out first and then the rest of a, in order."""
    # The breaker would pause every key after a few endpoint failures in a row: that is tested
    # elsewhere; here the 500s stand for one request's failures. The budget is not the point.
    settings = fast_settings(
        database_url, sockudo_server.url, breaker_threshold=1000, max_attempts=1000
    )
    sockudo_server.fail_next(
        None, status=500, message="boom", stage="received", endpoints=("events",)
    )
    with engine.begin() as conn:
        enqueue(conn, "orders-a", "step", {"n": 0}, ordering_key="a")
    worker = Worker(settings, engine=engine)
    task = asyncio.create_task(worker.run())
    try:
        await wait_for(
            lambda: key_rows(engine, "a")[0].attempts >= 2, "the head of a to fail twice"
        )
        with engine.begin() as conn:
            enqueue_many(
                conn,
                [
                    OutboxEvent(f"orders-{key}", "step", {"n": n}, ordering_key=key)
                    for n in range(5)
                    for key in ("a", "b", "c", "d")
                    if (key, n) != ("a", 0)
                ],
            )
        await wait_for(
            lambda: all(sockudo_server.delivered_count(f"orders-{k}") == 5 for k in "bcd"),
            "keys b, c and d delivered",
        )
        head, *rest = key_rows(engine, "a")
        assert head.status in ("pending", "in_flight") and head.last_error_status == 500
        assert head.attempts >= 2
        assert [(r.status, r.attempts) for r in rest] == [("pending", 0)] * 4  # never claimed
        assert sockudo_server.deliveries("orders-a") == []

        sockudo_server.clear_faults()
        await wait_for(lambda: sockudo_server.delivered_count("orders-a") == 5, "key a delivered")
    finally:
        await stop(worker, task)
    for key in "abcd":
        assert steps(sockudo_server, f"orders-{key}") == [0, 1, 2, 3, 4], key
    assert sockudo_server.request_count("events", status=500) >= 2
    assert not sockudo_server.duplicates()
    assert {r.status for r in table_rows(engine)} == {"published"}


# -- 3. many keys, two workers ---------------------------------------------------------------------


@ORDERED_BACKENDS
async def test_many_keys_two_workers_exactly_once_and_in_order(
    engine, database_url, sockudo_server
):
    """50 keys x 10 events, enqueued interleaved in one enqueue_many, drained by two workers
    at once (each with several batches in flight): every event is delivered exactly once and
    each key in enqueue order. The heads of many keys still share /batch_events requests, and
    no request carries two events of one key."""
    keys, per_key = 50, 10
    with engine.begin() as conn:
        enqueue_many(
            conn,
            [
                OutboxEvent(f"orders-{k}", "step", {"n": n}, ordering_key=f"order-{k}")
                for n in range(per_key)
                for k in range(keys)
            ],
        )
    key_of = {r.idempotency_key: r.ordering_key for r in table_rows(engine)}
    settings = fast_settings(database_url, sockudo_server.url, in_flight=4)
    assert settings.in_flight > 1
    workers = [Worker(settings, engine=engine) for _ in range(2)]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        await wait_for(
            lambda: sockudo_server.delivered_count() >= keys * per_key, "every event delivered"
        )
        await wait_for(
            lambda: {r.status for r in table_rows(engine)} == {"published"}, "every row acked"
        )
    finally:
        for worker, task in zip(workers, tasks, strict=True):
            await stop(worker, task)

    assert sockudo_server.delivered_count() == keys * per_key
    assert not sockudo_server.duplicates()
    for k in range(keys):
        assert steps(sockudo_server, f"orders-{k}") == list(range(per_key)), k
    assert sum(w.stats.published for w in workers) == keys * per_key
    batches = [r for r in sockudo_server.requests() if r["endpoint"] == "batch_events"]
    assert sockudo_server.request_count("batch_events") > 0
    assert max(len(r["keys"]) for r in batches) > 1
    for request in sockudo_server.requests():
        carried = [key_of[k] for k in request["keys"]]
        assert len(carried) == len(set(carried)), carried  # one event per key per request


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_the_next_event_of_a_key_goes_right_after_its_heads_ack(
    engine, database_url, sockudo_server
):
    """Nothing notifies when a head's ack makes the next event of its key due (PostgreSQL's
    NOTIFY is on insert): the worker that acked claims again at once instead of sleeping until
    its next poll, so a key of 20 events drains in well under one poll interval."""
    with engine.begin() as conn:
        enqueue_many(
            conn, [OutboxEvent("orders", "step", {"n": n}, ordering_key="k") for n in range(20)]
        )
    settings = fast_settings(database_url, sockudo_server.url, poll_interval=60.0)
    await run_until(
        Worker(settings, engine=engine),
        lambda: sockudo_server.delivered_count() == 20,
        timeout=30,
        what="the key drained without waiting for polls",
    )
    assert steps(sockudo_server, "orders") == list(range(20))


# -- 4 and 5. a dead head --------------------------------------------------------------------------


@ORDERED_BACKENDS
async def test_a_dead_head_parks_its_key_until_replayed_or_unparked(engine, database_url):
    """Default policy (park): the server refuses the heads of keys a and c (413). Each key is
    parked behind its dead head and its later events are never claimed, while key b keeps
    flowing, also after the park. Replaying a's dead head un-parks a: the head goes out first,
    then the rest in order. Dialect.unpark lets c go on without its head, which stays dead."""
    with TestServer(max_payload_kb=1) as server:
        with engine.begin() as conn:
            for n in range(4):
                for key in "abc":
                    data = TOO_BIG if n == 0 and key != "b" else {"n": n}
                    enqueue(conn, f"orders-{key}", "step", data, ordering_key=f"order-{key}")
        a_head, c_head = key_rows(engine, "order-a")[0].id, key_rows(engine, "order-c")[0].id
        worker = Worker(fast_settings(database_url, server.url), engine=engine)
        task = asyncio.create_task(worker.run())
        try:
            await wait_for(
                lambda: (
                    server.delivered_count("orders-b") == 4
                    and parked(engine) == {"order-a": a_head, "order-c": c_head}
                ),
                "b delivered, a and c parked",
            )
            # Other keys keep flowing while a and c are parked.
            with engine.begin() as conn:
                enqueue(conn, "orders-b", "step", {"n": 4}, ordering_key="order-b")
            await wait_for(lambda: server.delivered_count("orders-b") == 5, "b's later event")

            for key in ("order-a", "order-c"):
                head, *rest = key_rows(engine, key)
                assert (head.status, head.last_error_status) == ("dead", 413)
                assert [(r.status, r.attempts) for r in rest] == [("pending", 0)] * 3
            assert server.deliveries("orders-a") == server.deliveries("orders-c") == []
            assert parked(engine) == {"order-a": a_head, "order-c": c_head}

            server.set_limits(max_payload_kb=100)  # the operator fixed the cause
            with engine.begin() as conn:
                assert admin.replay(conn, T, admin.ReplayFilter(ids=[a_head])) == 1
                assert admin.skip_parked(conn, T, ["order-c"]) == 1
            assert parked(engine) == {}
            await wait_for(
                lambda: (
                    server.delivered_count("orders-a") == 4
                    and server.delivered_count("orders-c") == 3
                ),
                "a and c drained",
            )
        finally:
            await stop(worker, task)
        assert steps(server, "orders-a") == ["big", 1, 2, 3]  # the replayed head first
        assert steps(server, "orders-b") == [0, 1, 2, 3, 4]
        assert steps(server, "orders-c") == [1, 2, 3]  # skipped its head
        assert [r.status for r in key_rows(engine, "order-c")] == ["dead"] + ["published"] * 3
        assert [r.status for r in key_rows(engine, "order-a")] == ["published"] * 4
        assert parked(engine) == {}
        assert not server.duplicates()


@ORDERED_BACKENDS
async def test_a_dead_head_with_the_skip_policy_lets_its_key_go_on(engine, database_url):
    """dead_head="skip": key a's head is refused (413) and dead, a's later events go on in
    order without it, nothing is parked, and key b is unaffected."""
    with TestServer(max_payload_kb=1) as server:
        with engine.begin() as conn:
            for n in range(4):
                for key in "ab":
                    data = TOO_BIG if (key, n) == ("a", 0) else {"n": n}
                    enqueue(conn, f"orders-{key}", "step", data, ordering_key=f"order-{key}")
        settings = fast_settings(database_url, server.url, dead_head="skip")
        await run_until(
            Worker(settings, engine=engine),
            lambda: (
                server.delivered_count("orders-a") == 3 and server.delivered_count("orders-b") == 4
            ),
            what="a's later events and b delivered",
        )
        assert steps(server, "orders-a") == [1, 2, 3]
        assert steps(server, "orders-b") == [0, 1, 2, 3]
        head, *rest = key_rows(engine, "order-a")
        assert (head.status, head.last_error_status) == ("dead", 413)
        assert [r.status for r in rest] == ["published"] * 3
        assert parked(engine) == {}
        assert not server.duplicates()


# -- 6. BY_CHANNEL -------------------------------------------------------------------------------


@ORDERED_BACKENDS
async def test_by_channel_makes_each_channel_the_key_of_its_row(
    engine, database_url, sockudo_server
):
    """ordering_key=BY_CHANNEL: an event on two channels makes two rows whose keys are their
    channels (enqueue and enqueue_many alike); each channel receives its events in order."""
    with engine.begin() as conn:
        for n in range(3):
            enqueue(conn, ["orders", "audit"], "step", {"n": n}, ordering_key=BY_CHANNEL)
        enqueue_many(
            conn,
            [OutboxEvent(["orders", "audit"], "step", {"n": 3}, ordering_key=BY_CHANNEL)],
        )
    rows = table_rows(engine)
    assert len(rows) == 8
    assert all(r.ordering_key == r.channel for r in rows)
    assert {r.ordering_key for r in rows} == {"orders", "audit"}
    await run_until(
        Worker(fast_settings(database_url, sockudo_server.url), engine=engine),
        lambda: sockudo_server.delivered_count() == 8,
        what="both channels delivered",
    )
    assert steps(sockudo_server, "orders") == steps(sockudo_server, "audit") == [0, 1, 2, 3]
    assert not sockudo_server.duplicates()


# -- 7. validation -------------------------------------------------------------------------------


@ORDERED_BACKENDS
@pytest.mark.parametrize(
    "key",
    ["", "k" * (ORDERING_KEY_MAX + 1), "a\x00b", 42, b"order-1"],
    ids=["empty", "too-long", "nul", "int", "bytes"],
)
def test_a_bad_ordering_key_is_refused_and_nothing_is_inserted(engine, key):
    """An ordering key that is empty, longer than 200 characters, holds a NUL or is not a
    string raises InvalidEvent naming ``ordering_key``, from enqueue and enqueue_many, before
    anything is written."""
    with engine.begin() as conn:
        with pytest.raises(InvalidEvent) as refused:
            enqueue(conn, "orders", "created", {"n": 0}, ordering_key=key)
        assert refused.value.field == "ordering_key"
        with pytest.raises(InvalidEvent) as refused:
            enqueue_many(
                conn,
                [
                    OutboxEvent("orders", "created", {"n": 1}),
                    OutboxEvent("orders", "created", {"n": 2}, ordering_key=key),
                ],
            )
        assert refused.value.field == "ordering_key"
        assert "event #1" in str(refused.value)
    assert table_rows(engine) == []
    # The longest allowed key is taken.
    with engine.begin() as conn:
        enqueue(conn, "orders", "created", {"n": 3}, ordering_key="k" * ORDERING_KEY_MAX)
    assert [r.ordering_key for r in table_rows(engine)] == ["k" * ORDERING_KEY_MAX]


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
def test_mariadb_refuses_ordering_keys_and_mutations_at_enqueue(engine):
    """MariaDB has no ordering keys: enqueue with a key (or BY_CHANNEL), enqueue_many with one,
    and every mutation (all of which are keyed by their message) raise InvalidEvent saying
    PostgreSQL or SQLite is needed, before anything is written. Unkeyed events still go in."""
    target = uuid.uuid4()
    attempts: list[Callable[[sa.Connection], Any]] = [
        lambda c: enqueue(c, "orders", "created", {"n": 0}, ordering_key="order-1"),
        lambda c: enqueue(c, ["orders", "audit"], "created", {"n": 0}, ordering_key=BY_CHANNEL),
        lambda c: enqueue_many(c, [OutboxEvent("orders", "created", 1, ordering_key="o-1")]),
        lambda c: mutations.update_message(c, "orders", target, data="paid"),
        lambda c: mutations.update_message(c, "orders", "serial-1", data="paid"),
        lambda c: mutations.delete_message(c, "orders", target),
        lambda c: mutations.append_message(c, "orders", target, "-more"),
        lambda c: mutations.publish_annotation(
            c, "orders", target, type="reactions:total.v1", name="like", client_id="u1"
        ),
        lambda c: mutations.delete_annotation(c, "orders", "serial-1", "annotation-1"),
    ]
    for attempt in attempts:
        with engine.begin() as conn:
            with pytest.raises(InvalidEvent) as refused:
                attempt(conn)
            assert refused.value.field == "ordering_key"
            assert "need PostgreSQL or SQLite" in str(refused.value)
    assert table_rows(engine) == []
    with engine.begin() as conn:
        enqueue(conn, "orders", "created", {"n": 1})
    assert [r.ordering_key for r in table_rows(engine)] == [None]


# -- 8. unkeyed events ---------------------------------------------------------------------------


@ORDERED_BACKENDS
@pytest.mark.parametrize("held", ["leased", "retrying"])
async def test_unkeyed_events_do_not_wait_for_a_held_head(
    engine, database_url, sockudo_server, held
):
    """Key a's head is held: leased by a worker that does not finish it, or waiting for a
    retry. Unkeyed events enqueued among a's events (and key b's) are claimed and delivered
    meanwhile; a's later events wait unclaimed. When the head is free again, a drains in order."""
    with engine.begin() as conn:
        head_id = row_id_of(conn, enqueue(conn, "orders-a", "step", {"n": 0}, ordering_key="a"))
        if held == "leased":
            hold = {"lease_token": uuid.uuid4(), "lease_expires_at": FAR_FUTURE}
            free = {"lease_expires_at": LONG_AGO}  # an expired lease: claimable, taken over
        else:
            hold = {"next_attempt_at": FAR_FUTURE, "last_error_status": 500}
            free = {"next_attempt_at": LONG_AGO}
        conn.execute(sa.update(T).where(T.c.id == head_id).values(attempts=1, **hold))
        enqueue_many(
            conn,
            [
                event
                for n in range(1, 4)
                for event in (
                    OutboxEvent("orders-a", "step", {"n": n}, ordering_key="a"),
                    OutboxEvent("news", "step", {"n": 2 * n - 2}),
                    OutboxEvent("orders-b", "step", {"n": n - 1}, ordering_key="b"),
                    OutboxEvent("news", "step", {"n": 2 * n - 1}),
                )
            ],
        )
    settings = fast_settings(database_url, sockudo_server.url)
    await run_until(
        Worker(settings, engine=engine),
        lambda: (
            sockudo_server.delivered_count("news") == 6
            and sockudo_server.delivered_count("orders-b") == 3
        ),
        what="the unkeyed events and key b",
    )
    head, *rest = key_rows(engine, "a")
    assert head.status == ("in_flight" if held == "leased" else "pending")
    assert [(r.status, r.attempts) for r in rest] == [("pending", 0)] * 3
    assert sockudo_server.deliveries("orders-a") == []
    # Unkeyed rows go in no particular order; they all went, once.
    assert sorted(steps(sockudo_server, "news")) == list(range(6))

    with engine.begin() as conn:
        conn.execute(sa.update(T).where(T.c.id == head_id).values(**free))
    await run_until(
        Worker(settings, engine=engine),
        lambda: sockudo_server.delivered_count("orders-a") == 4,
        what="key a drained",
    )
    assert steps(sockudo_server, "orders-a") == [0, 1, 2, 3]
    assert steps(sockudo_server, "orders-b") == [0, 1, 2]
    assert not sockudo_server.duplicates()
    assert {r.status for r in table_rows(engine)} == {"published"}

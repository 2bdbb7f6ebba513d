"""The draining worker, in-process, against the Sockudo-faithful test server, on SQLite and PostgreSQL.

Each test drives one invariant of the design (see README, "Guarantees") through ``Worker`` and checks it on both
sides: what the server delivered (its own count, duplicates included) and what the table says.
Subprocess tests (several worker processes, signals) are in test_worker_processes.py.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import nacl.secret
import pytest
import sqlalchemy as sa

from outbox import admin, enqueue, outbox_table
from outbox.cli import main as cli_main
from outbox.settings import Settings
from outbox.sockudo import AsyncSockudo
from outbox.sockudo.validation import Limits
from outbox.testing.server import TestServer
from outbox.testing.worker_process import WorkerProcess
from outbox.worker import Worker
from tests.outbox_rows import EV, add_published

T = outbox_table()
MASTER_KEY = bytes(range(32))


# -- helpers ------------------------------------------------------------------------------------


def fast_settings(database_url: str, sockudo_url: str, **overrides: Any) -> Settings:
    """Short leases, backoff and polls so retries happen in tenths of seconds."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "sockudo_url": sockudo_url,
        "poll_interval": 0.05,
        "backoff_min_seconds": 0.05,
        "backoff_max_seconds": 1.0,
        "request_timeout": 1.0,
        "lease_seconds": 2.0,
        "misconfigured_retry_seconds": 0.3,
        "shutdown_timeout": 5.0,
        "retention_seconds": 0,
    }
    values.update(overrides)
    return Settings(**values)


def table_rows(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(EV).order_by(EV.c.id)))


def by_status(engine: sa.Engine) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in table_rows(engine):
        counts[row.status] = counts.get(row.status, 0) + 1
    return counts


def enqueue_n(engine: sa.Engine, n: int, channel: str = "orders", **kwargs: Any) -> list[str]:
    """Commit ``n`` events; returns their idempotency keys in id order."""
    with engine.begin() as conn:
        for i in range(n):
            enqueue(conn, channel, "created", {"n": i}, **kwargs)
    return [r.idempotency_key for r in table_rows(engine)]


def delivered_keys(server: TestServer) -> list[str]:
    return [d.idempotency_key or d.message_id for d in server.deliveries()]


def assert_published_means_delivered(engine: sa.Engine, server: TestServer) -> None:
    """Nothing is reported published that the server did not deliver, and nothing twice."""
    published = {r.idempotency_key for r in table_rows(engine) if r.status == "published"}
    delivered = delivered_keys(server)
    assert published <= set(delivered), published - set(delivered)
    assert not server.duplicates()
    assert len(delivered) == len(set(delivered))


async def run_until(
    worker: Worker, done: Callable[[], bool], timeout: float = 20.0, what: str = "condition"
) -> None:
    """Run the worker (not ``once``) in the background until ``done()``; then stop it cleanly."""
    task = asyncio.create_task(worker.run())
    try:
        deadline = time.monotonic() + timeout
        while not done():
            if task.done():
                await task  # surface a crash
                raise AssertionError("worker exited on its own")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}; table: {by_status_safe(worker)}"
                )
            await asyncio.sleep(0.05)
    finally:
        worker.stop()
        await asyncio.wait_for(task, timeout=15)


def by_status_safe(worker: Worker) -> dict[str, int]:
    try:
        return by_status(worker.engine)
    except Exception as exc:  # pragma: no cover - diagnostics only
        return {"error": str(exc)}  # type: ignore[dict-item]


def all_published(engine: sa.Engine, n: int) -> Callable[[], bool]:
    return lambda: by_status(engine).get("published", 0) == n


# -- 1. commit -> delivered once; rollback -> never ---------------------------------------------


async def test_commit_delivered_once_rollback_never(engine, database_url, sockudo_server):
    with engine.begin() as conn:
        for i in range(250):
            enqueue(conn, "orders", "created", {"n": i})
    with engine.connect() as conn, conn.begin() as tx:
        enqueue(conn, "orders", "rolled-back", "x")
        tx.rollback()
    worker = Worker(fast_settings(database_url, sockudo_server.url), engine=engine)
    await worker.run(once=True)

    delivered = sockudo_server.deliveries()
    assert sorted(d.data for d in delivered) == sorted(f'{{"n":{i}}}' for i in range(250))
    assert all(d.name == "created" for d in delivered)  # the rolled-back event never went out
    assert not sockudo_server.duplicates()
    rows = table_rows(engine)
    assert len(rows) == 250  # the rolled-back row never existed
    assert {r.status for r in rows} == {"published"}
    # The acknowledgement stored is the server's, for that very event (it echoes message_id).
    assert all(r.acknowledgement_id == r.idempotency_key for r in rows)
    assert {d.message_id for d in delivered} == {r.idempotency_key for r in rows}
    assert all(r.attempts == 1 for r in rows)
    # First attempts go in batches: 250 events took 3 requests, not 250.
    assert sockudo_server.request_count("batch_events") == 3
    assert sockudo_server.request_count("events") == 0
    assert worker.stats.published == 250


# -- 3. the idempotency traps, through the worker ------------------------------------------------


async def test_batch_failing_at_item_loses_nothing(engine, database_url, sockudo_server):
    """(a) A batch fails at item 4 with a 500: items 0-3 were published, item 4's key is left
    "processing", items 5-9 were never looked at. The batch must not be sent again (the server
    would skip item 4 and answer 200): each row goes alone; item 4 waits out the key's TTL."""
    keys = enqueue_n(engine, 10)
    sockudo_server.fail_batch_item(4, status=500, code="internal_error", message="boom")
    worker = Worker(fast_settings(database_url, sockudo_server.url), engine=engine)

    def stuck_on_item_4() -> bool:
        rows = table_rows(engine)
        return (
            sum(r.status == "published" for r in rows) == 9
            and rows[4].status == "pending"
            and rows[4].last_error_code == "backpressure"
        )

    await run_until(worker, stuck_on_item_4, what="nine published, item 4 in backpressure")
    assert sockudo_server.idempotency_state(keys[4]) == "processing"
    assert keys[4] not in delivered_keys(sockudo_server)
    assert_published_means_delivered(engine, sockudo_server)
    row4 = table_rows(engine)[4]
    assert row4.status == "pending"  # not dead: backpressure is no one's fault
    assert row4.attempts <= 4  # each backpressure retry waits Retry-After (1 s): no hot loop

    sockudo_server.advance_clock(sockudo_server.config.idempotency_ttl + 1)
    worker = Worker(fast_settings(database_url, sockudo_server.url), engine=engine)
    await run_until(worker, all_published(engine, 10), what="item 4 published")

    assert sorted(delivered_keys(sockudo_server)) == sorted(keys)
    assert_published_means_delivered(engine, sockudo_server)
    item4 = [d for d in sockudo_server.deliveries() if d.idempotency_key == keys[4]]
    assert [d.endpoint for d in item4] == ["events"]  # delivered later, alone
    assert sockudo_server.request_count("batch_events") == 1  # the batch was sent only once


async def test_batch_refused_at_item_dead_letters_only_that_item(
    engine, database_url, sockudo_server
):
    """(a) A batch refused (413) at item 3: the refused event is dead with the server's reason,
    the items before it (published by the batch) and after it (never reached) are delivered."""
    keys = enqueue_n(engine, 8)
    sockudo_server.fail_batch_item(3, status=413, code="payload_too_large", message="too big")
    worker = Worker(fast_settings(database_url, sockudo_server.url), engine=engine)
    await worker.run(once=True)

    rows = table_rows(engine)
    assert [r.status for r in rows] == ["published"] * 3 + ["dead"] + ["published"] * 4
    dead = rows[3]
    assert (dead.last_error_status, dead.last_error_code) == (413, "payload_too_large")
    assert "too big" in dead.last_error_message
    assert sorted(delivered_keys(sockudo_server)) == sorted(k for i, k in enumerate(keys) if i != 3)
    assert_published_means_delivered(engine, sockudo_server)
    assert sockudo_server.request_count("batch_events") == 1


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "alone"])
async def test_answer_lost_after_publish_is_retried_alone_once(
    engine, database_url, sockudo_server, batch
):
    """(b) The server published, then the connection dropped before the answer: the worker
    cannot know; it retries alone and the server answers from its cache. Delivered once."""
    n = 5 if batch else 1
    keys = enqueue_n(engine, n)
    sockudo_server.drop_next(1, stage="published")
    worker = Worker(fast_settings(database_url, sockudo_server.url), engine=engine)
    await run_until(worker, all_published(engine, n), what="all published")

    assert sorted(delivered_keys(sockudo_server)) == sorted(keys)
    assert_published_means_delivered(engine, sockudo_server)
    assert sockudo_server.request_count(status=0) == 1  # the dropped one
    assert sockudo_server.request_count("batch_events") == (1 if batch else 0)
    # The retries went alone: one /events request per row after the drop (plus the first, alone).
    assert sockudo_server.request_count("events", 200) == n
    assert all(r.attempts == 2 for r in table_rows(engine))


async def test_timeout_after_publish_is_retried_alone_once(engine, database_url, sockudo_server):
    """(b) The answer comes later than the request timeout (1 s): retried alone, delivered once,
    and the row gets the acknowledgement from the server's cached answer."""
    (key,) = enqueue_n(engine, 1)
    sockudo_server.add_latency(1.5, stage="published", count=1)
    worker = Worker(fast_settings(database_url, sockudo_server.url), engine=engine)
    await run_until(worker, all_published(engine, 1), what="published")

    assert delivered_keys(sockudo_server) == [key]
    assert not sockudo_server.duplicates()
    (row,) = table_rows(engine)
    assert row.status == "published"
    assert row.acknowledgement_id == key
    assert row.attempts == 2
    deadline = time.monotonic() + 5  # the first request is counted when its late answer goes out
    while sockudo_server.request_count("events") < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert sockudo_server.request_count("events") == 2


async def test_lease_expiring_mid_publish(engine, database_url):
    """(c) Worker A's lease expires while its request is in flight; worker B takes the row.
    B's repeat meets A's key in flight (503 backpressure) and backs off; A's late ack is refused
    by the lease token; the row is delivered exactly once."""
    with TestServer(inflight_wait=0.05) as server:
        (key,) = enqueue_n(engine, 1)
        server.add_latency(0.8, stage="claimed", count=1)  # A's publish, key held "processing"
        settings = fast_settings(database_url, server.url)
        a = Worker(settings, engine=engine)
        task_a = asyncio.create_task(a.run(once=True))
        deadline = time.monotonic() + 5
        while server.idempotency_state(key) != "processing":
            assert time.monotonic() < deadline, "A never reached the server"
            await asyncio.sleep(0.01)
        # A's lease runs out now (as if A had stalled): take the row back as any worker would.
        with engine.begin() as conn:
            past = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
            conn.execute(sa.update(T).values(lease_expires_at=past))
        assert await a.driver.events_reclaim_expired() == 1
        b = Worker(settings, engine=engine)
        await b.run(once=True)
        (row,) = table_rows(engine)
        assert (row.status, row.last_error_code, row.attempts) == ("pending", "backpressure", 2)

        await task_a  # A's publish succeeded, but its ack must change nothing
        assert a.stats.published == 0
        (row,) = table_rows(engine)
        assert (row.status, row.attempts) == ("pending", 2)
        assert row.published_at is None and row.acknowledgement_id is None

        c = Worker(settings, engine=engine)
        await run_until(c, all_published(engine, 1), what="published")
        assert delivered_keys(server) == [key]
        assert not server.duplicates()
        (row,) = table_rows(engine)
        assert row.status == "published" and row.acknowledgement_id == key


# -- 4. poison events ----------------------------------------------------------------------------


@pytest.mark.parametrize("poison", ["payload_too_large", "unknown_namespace"])
async def test_poison_event_in_a_batch(engine, database_url, poison):
    """The server's limits are tighter than the outbox's: the bad event goes dead with the
    server's status, code and message; the rest of its batch is delivered; in one pass."""
    with TestServer(max_payload_kb=1) as server:
        with engine.begin() as conn:
            for i in range(6):
                if i == 2 and poison == "payload_too_large":
                    enqueue(conn, "orders", "created", "x" * 2048)
                elif i == 2:
                    # The app declares namespace "ns"; the server does not configure it.
                    limits = Limits(namespaces=frozenset({"ns"}))
                    enqueue(conn, "ns:foo", "created", {"n": i}, limits=limits)
                else:
                    enqueue(conn, "orders", "created", {"n": i})
        keys = [r.idempotency_key for r in table_rows(engine)]
        worker = Worker(fast_settings(database_url, server.url), engine=engine)
        await worker.run(once=True)

        rows = table_rows(engine)
        assert [r.status for r in rows] == ["published"] * 2 + ["dead"] + ["published"] * 3
        dead = rows[2]
        if poison == "payload_too_large":
            assert (dead.last_error_status, dead.last_error_code) == (413, "payload_too_large")
            assert "exceeds limit" in dead.last_error_message
        else:
            assert (dead.last_error_status, dead.last_error_code) == (400, "invalid_input")
            assert "namespace" in dead.last_error_message
        assert sorted(delivered_keys(server)) == sorted(k for i, k in enumerate(keys) if i != 2)
        assert_published_means_delivered(engine, server)
        assert worker.stats.dead == 1


async def test_poison_event_alone(engine, database_url):
    with TestServer(max_payload_kb=1) as server:
        with engine.begin() as conn:
            enqueue(conn, "orders", "created", "x" * 2048)
        worker = Worker(fast_settings(database_url, server.url), engine=engine)
        await worker.run(once=True)
        (row,) = table_rows(engine)
        assert (row.status, row.last_error_status, row.last_error_code) == (
            "dead",
            413,
            "payload_too_large",
        )
        assert server.delivered_count() == 0


# -- 5. endpoint down ----------------------------------------------------------------------------


@pytest.mark.parametrize("outage", ["down", "503"])
async def test_endpoint_outage_costs_few_attempts(engine, database_url, sockudo_server, outage):
    n = 20
    keys = enqueue_n(engine, n)
    if outage == "down":
        sockudo_server.go_down()
    else:
        # The idempotency cache is unreachable: refused before any key is claimed, no Retry-After.
        sockudo_server.fail_next(
            None, status=503, code="service_unavailable", message="cache down", stage="received"
        )
    settings = fast_settings(database_url, sockudo_server.url)
    worker = Worker(settings, engine=engine)
    task = asyncio.create_task(worker.run())
    outage_seconds = 2.0  # 40 poll intervals
    await asyncio.sleep(outage_seconds)
    rows = table_rows(engine)
    requests_during_outage = worker.stats.requests
    server_requests = sockudo_server.request_count()
    assert not task.done()
    assert {r.status for r in rows} <= {"pending", "in_flight"}  # nothing dead
    assert max(r.attempts for r in rows) <= 3, [r.attempts for r in rows]
    assert worker.breaker.tripped
    # A worker polling every 50 ms with one request per row would have sent ~800 requests.
    assert requests_during_outage <= 3 * n + 15, requests_during_outage
    if outage == "503":
        # The worker counts a request when its answer is back, the server when it arrives:
        # they differ by the requests in flight at the moment the two are read.
        in_flight = settings.in_flight + settings.alone_concurrency
        assert requests_during_outage <= server_requests <= requests_during_outage + in_flight
        assert sockudo_server.request_count(status=503) == server_requests
    else:
        assert server_requests == 0

    if outage == "down":
        sockudo_server.come_up()
    else:
        sockudo_server.clear_faults()
    try:
        deadline = time.monotonic() + 15
        while by_status(engine).get("published", 0) != n:
            assert time.monotonic() < deadline, by_status(engine)
            await asyncio.sleep(0.05)
    finally:
        worker.stop()
        await task
    assert sorted(delivered_keys(sockudo_server)) == sorted(keys)
    assert not sockudo_server.duplicates()
    assert max(r.attempts for r in table_rows(engine)) <= 4


# -- 6. misconfiguration (401) -------------------------------------------------------------------


async def test_wrong_secret_keeps_rows_pending_and_says_so(
    engine, database_url, sockudo_server, caplog
):
    keys = enqueue_n(engine, 5)
    wrong_secret = "s3cr3t-that-must-never-be-logged"
    wrong_url = sockudo_server.url.replace(":app-secret@", f":{wrong_secret}@")
    assert wrong_secret in wrong_url
    caplog.set_level(logging.DEBUG)
    worker = Worker(fast_settings(database_url, wrong_url), engine=engine)
    task = asyncio.create_task(worker.run())
    deadline = time.monotonic() + 5
    while sockudo_server.request_count(status=401) < 3:
        assert time.monotonic() < deadline, "the worker did not retry"
        await asyncio.sleep(0.05)
    worker.stop()
    await task

    rows = table_rows(engine)
    assert {r.status for r in rows} == {"pending"}
    assert all(r.attempts == 0 for r in rows)  # the budget is not charged
    assert {r.last_error_status for r in rows if r.last_error_at} == {401}
    assert sockudo_server.delivered_count() == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("credentials" in m and "SOCKUDO_URL" in m and "secret" in m for m in errors), errors
    assert wrong_secret not in caplog.text
    for record in caplog.records:
        assert wrong_secret not in record.getMessage()
    # Slow retries: one probe per misconfigured_retry_seconds, not one request per row per poll.
    assert sockudo_server.request_count(status=401) <= 8

    fixed = Worker(fast_settings(database_url, sockudo_server.url), engine=engine)
    await run_until(fixed, all_published(engine, 5), what="published after the fix")
    assert sorted(delivered_keys(sockudo_server)) == sorted(keys)
    assert not sockudo_server.duplicates()


# -- 7. replay and status ------------------------------------------------------------------------


def cli_status(capsys, monkeypatch, database_url: str) -> dict[str, Any]:
    monkeypatch.setenv("OUTBOX_DATABASE_URL", database_url)
    capsys.readouterr()
    assert cli_main(["status", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


async def test_replay_dead_events_delivers_them(
    engine, database_url, sockudo_server, capsys, monkeypatch
):
    enqueue_n(engine, 3)
    # Refused before any key is claimed (as a validation error before the idempotency claim).
    sockudo_server.fail_next(
        None, status=400, code="invalid_input", message="nope", stage="received"
    )
    settings = fast_settings(database_url, sockudo_server.url)
    await Worker(settings, engine=engine).run(once=True)
    assert by_status(engine) == {"dead": 3}
    report = cli_status(capsys, monkeypatch, database_url)
    assert report["counts"] == {"pending": 0, "in_flight": 0, "published": 0, "dead": 3}
    assert report["dead"] == 3
    assert {e["last_error_code"] for e in report["last_errors"]} == {"invalid_input"}

    sockudo_server.clear_faults()
    with engine.begin() as conn:
        assert admin.replay(conn, T, admin.ReplayFilter(statuses=("dead",))) == 3
    report = cli_status(capsys, monkeypatch, database_url)
    assert report["counts"] == {"pending": 3, "in_flight": 0, "published": 0, "dead": 0}

    await Worker(settings, engine=engine).run(once=True)
    assert sockudo_server.delivered_count() == 3
    assert not sockudo_server.duplicates()
    report = cli_status(capsys, monkeypatch, database_url)
    assert report["counts"] == {"pending": 0, "in_flight": 0, "published": 3, "dead": 0}
    assert report["dead"] == 0 and report["oldest_pending_age_seconds"] is None
    assert {r.idempotency_key for r in table_rows(engine)} == set(delivered_keys(sockudo_server))


# -- 9. rate limiting ----------------------------------------------------------------------------


async def test_rate_limit_honours_retry_after(engine, database_url, sockudo_server):
    n = 24
    keys = enqueue_n(engine, n)
    sockudo_server.rate_limit(4, retry_after=1)
    settings = fast_settings(database_url, sockudo_server.url, batch_size=4, in_flight=4)
    worker = Worker(settings, engine=engine)
    await run_until(worker, all_published(engine, n), timeout=30, what="all published")

    assert sorted(delivered_keys(sockudo_server)) == sorted(keys)
    assert not sockudo_server.duplicates()
    limited = sockudo_server.request_count(status=429)
    assert limited >= 1  # the limit was hit
    # No hot loop: every 429 asked for 1 s, so a row that got one is not retried before then.
    requests = sockudo_server.requests()
    first_429 = min(r["time"] for r in requests if r["status"] == 429)
    rows = table_rows(engine)
    assert all(r.status == "published" for r in rows)
    retried = [r for r in rows if r.last_error_status == 429]
    assert retried, "some rows were rate limited"
    for r in retried:
        assert (r.published_at.timestamp() - first_429) >= 0.9, "retried before Retry-After"
    # In any one-second window the worker sends a handful of requests, not hundreds.
    times = sorted(r["time"] for r in requests)
    busiest = max(sum(1 for t in times if s <= t < s + 1.0) for s in times)
    assert busiest <= 16, busiest
    assert limited <= 12, limited


# -- 10. encrypted channels ----------------------------------------------------------------------


async def test_encrypted_channel_same_bytes_on_retry(engine, database_url, sockudo_server):
    channel = "private-encrypted-orders"
    plaintexts = [json.dumps({"n": i, "secret": "é"}, separators=(",", ":")) for i in range(3)]
    with engine.begin() as conn:
        for text in plaintexts:
            enqueue(conn, channel, "created", text)
    # Record every request body the worker sends.
    bodies: list[tuple[str, bytes]] = []

    async def record(request: httpx.Request) -> None:
        bodies.append((request.url.path, request.content))

    settings = fast_settings(
        database_url,
        sockudo_server.url,
        encryption_master_key_base64=base64.b64encode(MASTER_KEY).decode(),
    )
    http = httpx.AsyncClient(
        timeout=1.0, headers={"Content-Type": "application/json"}, event_hooks={"request": [record]}
    )
    client = AsyncSockudo(settings.sockudo_config(), client=http, limits=Limits())
    # The first attempt (the batch) is refused before anything is claimed: all three retry alone.
    sockudo_server.fail_next(1, status=500, stage="received")
    try:
        worker = Worker(settings, engine=engine, client=client)
        await run_until(worker, all_published(engine, 3), what="all published")
    finally:
        await http.aclose()

    # Delivered data opens under SHA-256(channel || master key) to the data as enqueued.
    box = nacl.secret.SecretBox(hashlib.sha256(channel.encode() + MASTER_KEY).digest())
    delivered = sockudo_server.deliveries(channel)
    assert len(delivered) == 3 and not sockudo_server.duplicates()
    opened = []
    for d in delivered:
        envelope = json.loads(d.data)
        nonce = base64.b64decode(envelope["nonce"])
        opened.append(box.decrypt(base64.b64decode(envelope["ciphertext"]), nonce).decode())
    assert sorted(opened) == sorted(plaintexts)

    # The retry of each row sent byte-identical data (same nonce, same ciphertext).
    batch_items = [
        item
        for path, body in bodies
        if path.endswith("/batch_events")
        for item in json.loads(body)["batch"]
    ]
    alone_items = [json.loads(body) for path, body in bodies if path.endswith("/events")]
    assert len(batch_items) == 3 and len(alone_items) == 3
    first = {i["idempotency_key"]: i["data"] for i in batch_items}
    retry = {i["idempotency_key"]: i["data"] for i in alone_items}
    assert first == retry
    assert {d.idempotency_key: d.data for d in delivered} == retry
    # And the plaintext never travelled.
    assert not any(p.encode() in body for _, body in bodies for p in plaintexts)


# -- refunds, lease renewal, keep-key replays ---------------------------------------------------


async def test_connection_refused_keeps_first_attempts_batchable(
    engine, database_url, sockudo_server
):
    n = 12
    keys = enqueue_n(engine, n)
    sockudo_server.go_down()
    worker = Worker(fast_settings(database_url, sockudo_server.url), engine=engine)
    await run_until(worker, lambda: worker.stats.requests >= 2, what="a refused request")
    rows = table_rows(engine)
    # Nothing left the machine, so the attempt was taken back: still first attempts.
    assert {r.status for r in rows} == {"pending"}
    assert {r.attempts for r in rows} == {0}
    assert {r.last_error_status for r in rows} == {None}
    # Refused at connect, or held back once the worker paused: never sent either way.
    assert all(
        "ConnectError" in (r.last_error_message or "") or "not sent" in (r.last_error_message or "")
        for r in rows
    ), [r.last_error_message for r in rows]

    sockudo_server.come_up()
    worker = Worker(fast_settings(database_url, sockudo_server.url), engine=engine)
    await run_until(worker, all_published(engine, n), what="delivery after recovery")
    assert sorted(delivered_keys(sockudo_server)) == sorted(keys)
    # Each row's one counted attempt is the one that delivered it: the refused ones were taken
    # back, so the rows went out as first attempts, in batches.
    assert {r.attempts for r in table_rows(engine)} == {1}
    assert sockudo_server.request_count("batch_events") >= 1


async def test_lease_is_renewed_while_rows_go_alone(engine, database_url, sockudo_server, caplog):
    n = 6
    keys = enqueue_n(engine, n)
    with engine.begin() as conn:  # tried before: each goes alone through /events
        conn.execute(sa.update(T).values(attempts=1))
    # One request at a time, 0.8 s each: the claim takes ~5 s against a 3 s lease, renewed every
    # second (2 s of margin for a renewal delayed by a busy machine).
    sockudo_server.add_latency(0.8, stage="received")
    settings = fast_settings(
        database_url, sockudo_server.url, alone_concurrency=1, in_flight=2, lease_seconds=3.0
    )
    caplog.set_level(logging.WARNING, logger="outbox.worker")
    worker = Worker(settings, engine=engine)
    await run_until(worker, all_published(engine, n), timeout=30, what="slow alone rows")
    assert sorted(delivered_keys(sockudo_server)) == sorted(keys)
    # Without renewal the lease expires mid-claim, the upkeep reclaims the rest and they are
    # sent a second time by another slot.
    assert sockudo_server.request_count("events") == n
    assert "reclaimed" not in caplog.text
    assert {r.attempts for r in table_rows(engine)} == {2}


async def test_replay_keep_key_goes_alone_and_is_not_lost(engine, database_url, sockudo_server):
    n = 3
    keys = enqueue_n(engine, n)
    with engine.begin() as conn:
        conn.execute(sa.update(T).values(attempts=1))
    # Each publish is refused after its key was claimed: the keys stay "processing" on the server.
    sockudo_server.fail_next(n, status=413, code="payload_too_large", stage="claimed")
    settings = fast_settings(database_url, sockudo_server.url)
    await Worker(settings, engine=engine).run(once=True)
    assert by_status(engine) == {"dead": n}
    assert {sockudo_server.idempotency_state(k) for k in keys} == {"processing"}

    with engine.begin() as conn:
        replayed = admin.replay(conn, T, admin.ReplayFilter(statuses=("dead",)), key=admin.KEY_KEEP)
    assert replayed == n
    assert {r.attempts for r in table_rows(engine)} == {1}
    batches_before = sockudo_server.request_count("batch_events")

    worker = Worker(fast_settings(database_url, sockudo_server.url), engine=engine)

    window_ended = False

    def released() -> bool:
        # The kept keys meet backpressure until the server's window ends; then they publish.
        nonlocal window_ended
        if not window_ended and sockudo_server.request_count("events", 503) >= n:
            sockudo_server.advance_clock(sockudo_server.config.idempotency_ttl + 1)
            window_ended = True
        return by_status(engine).get("published", 0) == n

    await run_until(worker, released, timeout=30, what="kept-key replays")
    assert sorted(delivered_keys(sockudo_server)) == sorted(keys)
    assert not sockudo_server.duplicates()
    # A batch would have skipped the still-known keys and answered 200 without delivering.
    assert sockudo_server.request_count("batch_events") == batches_before


async def test_an_unexpected_error_in_a_batch_is_logged_and_its_rows_come_back(
    engine, database_url, sockudo_server, caplog, monkeypatch
):
    import outbox.delivery

    keys = enqueue_n(engine, 3)
    real_row_item = outbox.delivery.row_item
    calls = {"n": 0}

    def broken_once(row, master_key):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in the delivery path")
        return real_row_item(row, master_key)

    monkeypatch.setattr(outbox.delivery, "row_item", broken_once)
    caplog.set_level(logging.WARNING, logger="outbox.worker")
    worker = Worker(fast_settings(database_url, sockudo_server.url), engine=engine)
    await run_until(worker, all_published(engine, 3), timeout=20, what="rows after the lease")
    assert "unexpected error while publishing a batch of 3" in caplog.text
    assert "a bug in the delivery path" in caplog.text
    assert sorted(delivered_keys(sockudo_server)) == sorted(keys)
    assert not sockudo_server.duplicates()


# -- 9. settings that would destroy history -------------------------------------------------------


def test_a_negative_retention_is_refused_before_anything_is_deleted(
    engine, database_url, sockudo_server, tmp_path
):
    """ "-1 means forever" is a habit: taken as a retention, the cutoff would lie in the future and
    the worker's first trim would delete the whole published log. The worker, started as
    operators start it, refuses the setting (exit 2, naming the variable) and the log is whole."""
    an_hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    for _ in range(3):
        add_published(engine, published_at=an_hour_ago)
    log_path = tmp_path / "worker.log"
    with WorkerProcess(database_url, sockudo_server.url, log_path, retention_seconds=-1) as worker:
        # Until it exits or the log shrinks: the old worker trimmed within a second of starting.
        deadline = time.monotonic() + 60
        while worker.alive and by_status(engine).get("published") == 3:
            assert time.monotonic() < deadline, "the worker neither exited nor trimmed"
            time.sleep(0.05)
        assert by_status(engine) == {"published": 3}, worker.log_text()
        assert worker.wait(timeout=10) == 2
        assert (
            "OUTBOX_RETENTION_SECONDS must be 0 (keep forever) or positive, got -1"
            in worker.log_text()
        )

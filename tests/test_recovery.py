"""Recovery paths: what happens after a crash, an outage, a replay or a refusal, on both databases.

Each test reproduces a way the outbox could lose an event, publish one it should not have,
spend an event's budget on someone else's failure, or stall; and checks the rule that replaced it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from outbox import admin, enqueue
from outbox.cli import main as cli_main
from outbox.testing.server import TestServer
from outbox.worker import Worker
from tests.helpers.drivers import call
from tests.outbox_rows import EV, move_where
from tests.test_worker import (
    T,
    all_published,
    by_status,
    delivered_keys,
    enqueue_n,
    fast_settings,
    run_until,
    table_rows,
)

LONG_AGO = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


async def leave_leased(engine: sa.Engine, worker: Worker, n: int) -> uuid.UUID:
    """Claim ``n`` rows with ``worker``'s driver, as a worker that is then killed: the rows stay
    leased, lease expired."""
    token = uuid.uuid4()
    try:
        claimed = await worker.driver.events_claim(n, 60.0, token)
    finally:
        await worker.driver.aclose()
    assert len(claimed) == n
    with engine.begin() as conn:
        conn.execute(sa.update(T).values(lease_expires_at=LONG_AGO))
    return token


# -- a killed worker's leases ---------------------------------------------------------------------


async def test_once_takes_back_leases_a_killed_worker_left(engine, database_url, sockudo_server):
    """A cron-style ``--once`` run is the next run after a crash: it must publish what the
    killed run had leased, not exit because nothing is pending."""
    keys = enqueue_n(engine, 3)
    settings = fast_settings(database_url, sockudo_server.url)
    await leave_leased(engine, Worker(settings, engine=engine), 3)
    # Still leased by the killed run, but expired: claimable, so it reads as pending.
    assert by_status(engine) == {"pending": 3}
    assert all(r.lease_token is not None for r in table_rows(engine))

    await Worker(settings, engine=engine).run(once=True)

    assert by_status(engine) == {"published": 3}
    assert sorted(delivered_keys(sockudo_server)) == sorted(keys)
    # A leased row may have been sent by the killed run: it goes alone, never in a batch.
    assert sockudo_server.request_count("batch_events") == 0


def test_leases_command_lists_and_releases_stuck_leases(engine, database_url, capsys, monkeypatch):
    monkeypatch.setenv("OUTBOX_DATABASE_URL", database_url)
    enqueue_n(engine, 3)
    live = call(engine, T, "events_claim", 1, 3600.0, uuid.uuid4())
    leave_leased_ids = {r.id for r in table_rows(engine) if r.status == "pending"}
    call(engine, T, "events_claim", 2, 60.0, uuid.uuid4())
    with engine.begin() as conn:
        conn.execute(
            sa.update(T).where(T.c.id.in_(leave_leased_ids)).values(lease_expires_at=LONG_AGO)
        )

    assert cli_main(["leases"]) == 0
    out = capsys.readouterr().out
    assert "3 leased row(s), 2 expired" in out
    for row_id in leave_leased_ids:
        assert f"row {row_id} " in out

    assert cli_main(["leases", "--release-expired"]) == 0
    assert "released 2 expired lease(s)" in capsys.readouterr().out
    rows = {r.id: r for r in table_rows(engine)}
    assert {rows[i].status for i in leave_leased_ids} == {"pending"}
    assert all(rows[i].lease_token is None for i in leave_leased_ids)
    # Released rows keep their attempt count: they may have been sent, so they go alone.
    assert {rows[i].attempts for i in leave_leased_ids} == {1}
    # A lease that has not expired belongs to a live worker: left alone without --release-all.
    assert rows[live[0].id].status == "in_flight"

    assert cli_main(["leases", "--release-all"]) == 0
    assert "released 1 lease(s)" in capsys.readouterr().out
    assert by_status(engine) == {"pending": 3}


# -- the attempt budget and the age limit are the event's own --------------------------------------


async def test_a_replayed_old_event_survives_a_rate_limit(engine, database_url, sockudo_server):
    """A two-day-old event replayed after an outage meets a 429: it is retried, not buried again."""
    enqueue_n(engine, 1)
    with engine.begin() as conn:
        move_where(
            conn,
            sa.true(),
            "dead",
            attempts=25,
            created_at=dt.datetime.now(dt.UTC) - dt.timedelta(days=2),
            last_error_status=502,
        )
        assert admin.replay(conn, T, admin.ReplayFilter(statuses=("dead",))) == 1
    sockudo_server.rate_limit(0, retry_after=1)  # every request answers 429
    settings = fast_settings(database_url, sockudo_server.url, max_attempts=3)
    await Worker(settings, engine=engine).run(once=True)
    (row,) = table_rows(engine)
    assert (row.status, row.last_error_status) == ("pending", 429)

    sockudo_server.rate_limit(None)
    await run_until(Worker(settings, engine=engine), all_published(engine, 1), what="published")
    assert len(sockudo_server.deliveries()) == 1


async def make_due(engine: sa.Engine, where: sa.ColumnElement[bool]) -> None:
    """Make rows due from a thread: the UPDATE waits for the row locks of the worker running on
    this event loop, which could never commit while the loop itself waited (a hang seen when
    the worker was recording the row's retry at that moment)."""

    def update() -> None:
        with engine.begin() as conn:
            conn.execute(sa.update(T).where(where).values(next_attempt_at=LONG_AGO))

    await asyncio.to_thread(update)


async def test_an_outage_does_not_spend_the_attempt_budget(engine, database_url, sockudo_server):
    """Seconds of 502s leave rows with many attempts. Once the endpoint serves again, one ordinary
    500 on such a row is its first failure of its own, not the one past its budget."""
    n = 5
    keys = enqueue_n(engine, n)
    sockudo_server.fail_next(None, status=502, code="bad_gateway", stage="received")
    settings = fast_settings(
        database_url, sockudo_server.url, max_attempts=3, backoff_max_seconds=0.2
    )
    outage = Worker(settings, engine=engine)
    await run_until(
        outage,
        lambda: max(r.attempts for r in table_rows(engine)) >= 4,
        what="a row with more attempts than its budget",
    )
    assert by_status(engine) == {"pending": n}
    worn = max(table_rows(engine), key=lambda r: r.attempts).id

    # The endpoint is back. The outage's rows wait until a fresh event has been published, so
    # the worker has seen the endpoint serve; then the first of them gets an ordinary 500.
    sockudo_server.clear_faults()
    with engine.begin() as conn:
        conn.execute(sa.update(T).values(next_attempt_at=dt.datetime(2100, 1, 1, tzinfo=dt.UTC)))
        fresh = enqueue(conn, "orders", "fresh", "{}")
    worker = Worker(settings, engine=engine)
    task = asyncio.create_task(worker.run())
    try:
        deadline = time.monotonic() + 10
        while not any(d.name == "fresh" for d in sockudo_server.deliveries()):
            assert time.monotonic() < deadline, "the fresh event was not published"
            await asyncio.sleep(0.02)
        sockudo_server.fail_next(1, status=500, stage="received", endpoints=("events",))
        await make_due(engine, T.c.id == worn)
        deadline = time.monotonic() + 10
        while sockudo_server.request_count("events", 500) < 1:
            assert time.monotonic() < deadline, "the worn row was not tried"
            await asyncio.sleep(0.02)
        await make_due(engine, T.c.event_id != fresh)
        deadline = time.monotonic() + 20
        while sum(by_status(engine).get(s, 0) for s in ("published", "dead")) < n + 1:
            assert time.monotonic() < deadline, by_status(engine)
            await asyncio.sleep(0.05)
    finally:
        worker.stop()
        await task
    assert sockudo_server.request_count("events", 500) == 1
    assert by_status(engine) == {"published": n + 1}
    assert set(keys) <= set(delivered_keys(sockudo_server))
    assert max(r.failures for r in table_rows(engine)) == 1


async def test_restarted_workers_do_not_spend_the_budget_on_an_outage(
    engine, database_url, sockudo_server
):
    """Each fresh worker meets the endpoint down before its breaker knows anything: those first
    failures are not the event's either."""
    enqueue_n(engine, 1)
    sockudo_server.fail_next(None, status=502, code="bad_gateway", stage="received")
    settings = fast_settings(database_url, sockudo_server.url, max_attempts=2)
    for _restart in range(4):
        await Worker(settings, engine=engine).run(once=True)
        with engine.begin() as conn:  # due again at once for the next "cron" run
            conn.execute(sa.update(T).values(next_attempt_at=LONG_AGO))
    (row,) = table_rows(engine)
    assert (row.status, row.attempts, row.failures) == ("pending", 4, 0)
    assert sockudo_server.request_count(status=502) == 4

    sockudo_server.clear_faults()
    await Worker(settings, engine=engine).run(once=True)
    assert by_status(engine) == {"published": 1}


# -- answers that claimed nothing ------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["429", "503 service_unavailable"])
async def test_a_batch_refused_before_any_key_was_claimed_stays_a_batch(
    engine, database_url, sockudo_server, answer
):
    """Sockudo's rate limiter (and an unreachable idempotency cache) answer before any key is
    claimed: the rows may go in a batch again, so a backlog keeps draining in batches."""
    n = 300
    keys = enqueue_n(engine, n)
    if answer == "429":
        sockudo_server.rate_limit(2, retry_after=1)
    else:
        sockudo_server.fail_next(
            3, status=503, code="service_unavailable", message="cache down", stage="received"
        )
    settings = fast_settings(database_url, sockudo_server.url, batch_size=100)
    await run_until(
        Worker(settings, engine=engine), all_published(engine, n), timeout=30, what="all published"
    )
    assert sorted(delivered_keys(sockudo_server)) == sorted(keys)
    # Had the refusal cost the rows their first attempt, all 300 would have gone alone. A few may
    # still go through /events legitimately: the breaker's probe, and a claim that found a single
    # row due (retry delays are jittered, so rows come due one by one over a few milliseconds).
    assert sockudo_server.request_count("events") <= n // 10
    assert sockudo_server.request_count("batch_events", 200) >= 2
    assert {r.attempts for r in table_rows(engine)} == {1}


async def test_a_refused_batch_item_is_not_batched_again_after_a_401(
    engine, database_url, sockudo_server
):
    """Item 1 of a batch is refused (its key stays "processing" on the server); its alone re-send
    meets a 401. It must not go back to being a first attempt: a batch would skip its key,
    answer 200, and the row would read published without ever being delivered."""
    keys = enqueue_n(engine, 3)
    sockudo_server.fail_batch_item(1, status=400, code="invalid_input", message="bad item")
    sockudo_server.fail_next(
        None, status=401, code="auth_failed", stage="received", endpoints=("events",)
    )
    settings = fast_settings(database_url, sockudo_server.url, misconfigured_retry_seconds=0.1)
    await Worker(settings, engine=engine).run(once=True)
    sockudo_server.clear_faults()
    await Worker(settings, engine=engine).run(once=True)

    rows = table_rows(engine)
    assert keys[1] not in delivered_keys(sockudo_server)
    assert rows[1].status != "published"
    assert sockudo_server.request_count("batch_events") == 1
    # Once the server forgets the key, the row is sent alone again (the refusal was injected, so
    # this time it is published), delivered once.
    sockudo_server.advance_clock(sockudo_server.config.idempotency_ttl + 1)
    with engine.begin() as conn:
        conn.execute(sa.update(T).values(next_attempt_at=LONG_AGO))
    await Worker(settings, engine=engine).run(once=True)
    assert by_status(engine) == {"published": 3}
    assert sorted(delivered_keys(sockudo_server)) == sorted(keys)
    assert not sockudo_server.duplicates()
    assert sockudo_server.request_count("batch_events") == 1


# -- one row's problem stays that row's ------------------------------------------------------------


async def test_an_encrypted_row_without_a_master_key_does_not_pause_the_worker(
    engine, database_url, sockudo_server, caplog
):
    with engine.begin() as conn:
        enqueue(conn, "private-encrypted-orders", "created", {"secret": 1})
    keys = enqueue_n(engine, 20)[1:]
    caplog.set_level(logging.INFO, logger="outbox")
    settings = fast_settings(database_url, sockudo_server.url, misconfigured_retry_seconds=60)
    worker = Worker(settings, engine=engine)
    await run_until(worker, all_published(engine, 20), timeout=10, what="plain rows published")
    assert sorted(delivered_keys(sockudo_server)) == sorted(keys)
    encrypted = table_rows(engine)[0]
    assert encrypted.status == "pending"
    assert encrypted.last_error_code == "no_master_key"
    assert "SOCKUDO_ENCRYPTION_MASTER_KEY_BASE64" in encrypted.last_error_message
    assert not worker.breaker.tripped
    assert "SOCKUDO_URL" not in caplog.text
    assert "SOCKUDO_ENCRYPTION_MASTER_KEY_BASE64" in caplog.text


async def test_an_overlong_error_code_or_status_is_stored_bounded(engine, database_url):
    """Whatever a server answers, storing it cannot fail the outcome of the other rows."""
    keys = enqueue_n(engine, 5)
    with TestServer() as server:
        server.fail_batch_item(2, status=400, code="c" * 300, message="m" * 5000)
        settings = fast_settings(database_url, server.url)
        await Worker(settings, engine=engine).run(once=True)
        rows = table_rows(engine)
        assert [r.status for r in rows] == ["published"] * 2 + ["dead"] + ["published"] * 2
        assert rows[2].last_error_code == "c" * 64
        assert len(rows[2].last_error_message) <= 500
        assert sorted(delivered_keys(server)) == sorted(k for i, k in enumerate(keys) if i != 2)


async def test_an_absurd_status_in_a_200_error_body_is_stored_bounded(engine, database_url):
    """soketi-style servers answer errors with HTTP 200 and the status in the body: a status
    that fits no column (or no HTTP status) is kept in the message, not in the status column."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"error":"odd","code":1099511627776}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    keys = enqueue_n(engine, 2)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://app-key:app-secret@127.0.0.1:{server.server_address[1]}/apps/app-id"
        await Worker(fast_settings(database_url, url, max_attempts=1), engine=engine).run(once=True)
    finally:
        server.shutdown()
    rows = table_rows(engine)
    assert [r.idempotency_key for r in rows] == keys
    assert {r.status for r in rows} <= {"pending", "dead"}
    assert all(r.last_error_status is None for r in rows)
    assert all("1099511627776" in r.last_error_message for r in rows)


# -- shutdown gives back what it has not sent ------------------------------------------------------


async def test_sigterm_gives_back_rows_not_yet_sent_even_when_they_are_retries(
    engine, database_url, sockudo_server
):
    n = 20
    enqueue_n(engine, n)
    with engine.begin() as conn:  # tried before: each goes alone
        conn.execute(sa.update(T).values(attempts=1))
    sockudo_server.add_latency(0.4, stage="received", count=None)
    settings = fast_settings(
        database_url,
        sockudo_server.url,
        alone_concurrency=1,
        in_flight=1,
        batch_size=n,
        shutdown_timeout=30,
    )
    worker = Worker(settings, engine=engine)
    task = asyncio.create_task(worker.run())
    deadline = time.monotonic() + 10
    while by_status(engine).get("in_flight", 0) < n:
        assert time.monotonic() < deadline, "the rows were never claimed"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # the first request is in flight (each takes 0.4 s)
    worker.stop()
    started = time.monotonic()
    await asyncio.wait_for(task, 10)
    assert time.monotonic() - started < 3, "shutdown waited for every row to be sent"
    rows = table_rows(engine)
    sent = sockudo_server.request_count("events")
    assert sent <= 2
    assert sum(r.status == "published" for r in rows) == sent
    released = [r for r in rows if r.status == "pending"]
    assert len(released) == n - sent
    assert all(r.lease_token is None and r.attempts == 1 for r in released)


# -- retention ---------------------------------------------------------------------------------------


def add_published_history(engine: sa.Engine, n: int, published_at: dt.datetime) -> None:
    """``n`` published rows (and their acknowledgements), as a long-running outbox keeps them."""
    from outbox import OutboxEvent, enqueue_many

    with engine.begin() as conn:
        enqueue_many(conn, [OutboxEvent("history", "old", "{}") for _ in range(n)])
        history = sa.and_(T.c.channel == "history", T.c.lease_token.is_(None))
        move_where(conn, history, "published", attempts=1, published_at=published_at)


async def test_retention_keeps_up_with_a_large_backlog(engine, database_url, sockudo_server):
    """Retention deletes old published rows as fast as they pile up, never dead or pending ones."""
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    add_published_history(engine, 25_000, old)
    with engine.begin() as conn:
        for state in ("dead", "pending"):
            enqueue(conn, "kept", state, "{}")
        move_where(conn, T.c.event == "dead", "dead", created_at=old)
    add_published_history(engine, 3, dt.datetime.now(dt.UTC))  # recent: kept
    settings = fast_settings(database_url, sockudo_server.url, retention_seconds=24 * 3600)

    def trimmed() -> bool:
        """The old history gone, and the pending row sent (the worker does both on its own)."""
        with engine.connect() as conn:
            old_left = conn.execute(
                sa.select(sa.func.count()).where(
                    EV.c.status == "published", EV.c.published_at < old + dt.timedelta(days=1)
                )
            ).scalar_one()
        return old_left == 0 and "pending" not in by_status(engine)

    await run_until(Worker(settings, engine=engine), trimmed, timeout=20, what="old rows deleted")
    counts = by_status(engine)
    assert counts.get("dead") == 1
    assert counts.get("published") == 3 + 1  # the recent history and the pending row, now sent


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"], indirect=True)
async def test_retention_never_deletes_a_row_replay_just_put_back(
    engine, database_url, sockudo_server
):
    """An operator replays a published row while retention is deleting old ones: retention waits
    for the row lock (or, on MariaDB, passes over it), then must see the row is no longer
    published and leave it."""
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    add_published_history(engine, 5, old)
    target = table_rows(engine)[0].id
    replay_conn = engine.connect()
    replay_tx = replay_conn.begin()
    selection = admin.ReplayFilter(statuses=("published",), ids=[target])
    assert admin.replay(replay_conn, T, selection) == 1  # not committed yet: holds the row lock
    replay_pid = _connection_id(replay_conn)
    settings = fast_settings(database_url, sockudo_server.url, retention_seconds=24 * 3600)
    sockudo_server.go_down()  # the replayed row stays pending: only retention matters here
    worker = Worker(settings, engine=engine)
    task = asyncio.create_task(worker.run())
    try:
        deadline = time.monotonic() + 15
        # PostgreSQL's retention meets the locked row and waits for it. MariaDB's locks its page
        # with SKIP LOCKED (outbox/dialects/mysql.py): it deletes the others without waiting and
        # leaves the locked row for a later page. Either way the replayed row must survive.
        while not (
            _blocked_by(engine, replay_pid)
            if engine.dialect.name == "postgresql"
            else by_status(engine).get("published") == 1
        ):
            assert time.monotonic() < deadline, "retention never reached the locked row"
            await asyncio.sleep(0.05)
        replay_tx.commit()
        deadline = time.monotonic() + 15
        while by_status(engine).get("published", 0):
            assert time.monotonic() < deadline, by_status(engine)
            await asyncio.sleep(0.05)
    finally:
        replay_conn.close()
        worker.stop()
        await task
    rows = table_rows(engine)
    assert [r.id for r in rows] == [target]
    assert rows[0].status in ("pending", "in_flight")


def _connection_id(conn: sa.Connection) -> int:
    """The server's id of this connection (a PostgreSQL backend pid, a MariaDB thread id)."""
    if conn.dialect.name == "postgresql":
        return int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
    return int(conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one())


def _blocked_by(engine: sa.Engine, pid: int) -> bool:
    """True when some statement waits for a lock that PostgreSQL backend ``pid`` holds."""
    with engine.connect() as conn:
        waiting = conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"
            ),
            {"pid": pid},
        ).scalar_one()
    return bool(waiting)

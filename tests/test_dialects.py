"""The database seam, statement by statement, on every database (a driver conformance suite).

Each test calls one statement of :class:`outbox.dialects.Dialect` directly on a real database and
checks the rows it leaves: the lease token guard, refunds and charges, reclaim, release, renewal,
retention. A new database module is done when this file passes on it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from outbox import OutboxEvent, enqueue_many, outbox_table
from outbox.dialects import Ack, Dialect, Failure, dialect_for
from outbox.schema import Status

from .outbox_rows import EV, set_row_in

T = outbox_table()
PAST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
FUTURE = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
def dialect(engine: sa.Engine) -> Dialect:
    return dialect_for(engine)


def add(engine: sa.Engine, n: int, **values: Any) -> list[int]:
    """``n`` pending rows (then set to ``values``); their ids in order."""
    with engine.begin() as conn:
        enqueue_many(conn, [OutboxEvent("c", "e", {"n": i}) for i in range(n)])
        ids = list(conn.execute(sa.select(T.c.id).order_by(T.c.id)).scalars())[-n:]
        for row_id in ids if values else ():
            set_row_in(conn, row_id, **values)
    return ids


def rows(engine: sa.Engine) -> dict[int, Any]:
    with engine.connect() as conn:
        return {r.id: r for r in conn.execute(sa.select(EV).order_by(EV.c.id))}


def db_now(engine: sa.Engine) -> dt.datetime:
    from outbox.schema import utc_now

    with engine.connect() as conn:
        return conn.execute(sa.select(utc_now())).scalar_one()


def run(engine: sa.Engine, statement: Any, *args: Any) -> Any:
    with engine.begin() as conn:
        return statement(conn, T, *args)


def claim(engine: sa.Engine, dialect: Dialect, limit: int = 10, lease: float = 60.0) -> Any:
    token = uuid.uuid4()
    return token, run(engine, dialect.claim_batch, limit, lease, token)


# -- claim ----------------------------------------------------------------------------------------


def test_claim_takes_due_pending_rows_oldest_first_and_counts_an_attempt(engine, dialect):
    early, late = add(engine, 1), add(engine, 1)
    not_due = add(engine, 1, next_attempt_at=FUTURE)
    add(engine, 1, status=Status.DEAD.value)
    add(engine, 1, status=Status.PUBLISHED.value)
    with engine.begin() as conn:  # the later row became due first
        conn.execute(sa.update(T).where(T.c.id == late[0]).values(next_attempt_at=PAST))
    before = db_now(engine)
    token, claimed = claim(engine, dialect, lease=30.0)
    assert [r.id for r in claimed] == sorted(late + early)
    assert all(r.attempts == 1 and r.first_attempt for r in claimed)
    after = rows(engine)
    for row_id in late + early:
        row = after[row_id]
        assert row.status == Status.IN_FLIGHT and row.lease_token == token
        # The lease runs from the database clock.
        assert dt.timedelta(seconds=29) < row.lease_expires_at - before < dt.timedelta(seconds=40)
    assert after[not_due[0]].status == Status.PENDING
    # The limit, and the order by due time then id, hold for a second claim too.
    more = add(engine, 3)
    _token, claimed = claim(engine, dialect, limit=2)
    assert [r.id for r in claimed] == more[:2]


def test_claimed_rows_carry_what_publishing_needs(engine, dialect):
    with engine.begin() as conn:
        (event_id,) = enqueue_many(
            conn,
            [
                OutboxEvent(
                    "private-encrypted-c",
                    "e",
                    "secret",
                    socket_id="1.2",
                    info="subscription_count",
                    tags={"k": "v"},
                    extras={"ephemeral": True},
                )
            ],
        )
    (row,) = claim(engine, dialect)[1]
    assert (row.channel, row.event, row.data) == ("private-encrypted-c", "e", "secret")
    assert (row.socket_id, row.info, row.tags, row.extras) == (
        "1.2",
        "subscription_count",
        '{"k":"v"}',
        '{"ephemeral":true}',
    )
    assert isinstance(row.encryption_nonce, bytes) and len(row.encryption_nonce) == 24
    assert row.failures == 0 and row.queued_at.tzinfo is not None
    # The event's id, which the worker's log names it by (the key is the row's own).
    assert row.event_id == event_id and isinstance(row.event_id, uuid.UUID)
    assert row.idempotency_key != str(event_id)


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"], indirect=True)
def test_concurrent_claims_take_disjoint_rows(engine, dialect):
    """Two claims at once, the first holding its locks: the second skips them (SKIP LOCKED)."""
    add(engine, 6)
    first_conn = engine.connect()
    first_tx = first_conn.begin()
    try:
        first = dialect.claim_batch(first_conn, T, 3, 60.0, uuid.uuid4())
        second: list[Any] = []
        thread = threading.Thread(
            target=lambda: second.extend(run(engine, dialect.claim_batch, 3, 60.0, uuid.uuid4()))
        )
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the second claim waited for the first one's locks"
        first_tx.commit()
    finally:
        first_conn.close()
    assert len(first) == len(second) == 3
    assert not {r.id for r in first} & {r.id for r in second}


# -- the token guard ------------------------------------------------------------------------------


def test_a_stale_token_changes_nothing(engine, dialect):
    add(engine, 2)
    token, claimed = claim(engine, dialect)
    ids = [r.id for r in claimed]
    stale = uuid.uuid4()
    before = rows(engine)
    assert run(engine, dialect.ack_published, stale, [Ack(i) for i in ids]) == 0
    failure = [Failure(i, 500, "x", "m", charged=True) for i in ids]
    assert run(engine, dialect.reschedule, stale, failure) == 0
    assert run(engine, dialect.mark_dead, stale, failure) == 0
    assert run(engine, dialect.release, stale, ids) == 0
    assert run(engine, dialect.extend_lease, stale, 600.0, ids) == 0
    assert rows(engine) == before
    assert run(engine, dialect.ack_published, token, [Ack(ids[0])]) == 1


def test_ack_stores_the_acknowledgement_and_clears_the_lease(engine, dialect):
    add(engine, 2)
    token, claimed = claim(engine, dialect)
    a, b = (r.id for r in claimed)
    acks = [Ack(a, "ack-a", "00000000000000000001:n:00000000000000000001", "7"), Ack(b)]
    assert run(engine, dialect.ack_published, token, acks) == 2
    after = rows(engine)
    assert after[a].status == after[b].status == Status.PUBLISHED
    assert (after[a].acknowledgement_id, after[a].history_serial) == ("ack-a", "7")
    assert after[a].message_serial.endswith(":00000000000000000001")
    assert after[a].lease_token is None and after[a].published_at is not None
    # An ack of a row no longer leased (acked already) is a no-op.
    assert run(engine, dialect.ack_published, token, acks) == 0


def test_ack_stores_values_whole_up_to_their_columns_and_leaves_out_longer_ones(
    engine, dialect, caplog
):
    """Serials embed Sockudo's node id, a Kubernetes pod name say: 255 characters are stored
    whole in each acknowledgement column. A longer value is never stored cut (a cut serial names
    no message): it is left out, the row is still published, and a warning names it."""
    add(engine, 2)
    token, claimed = claim(engine, dialect)
    a, b = (r.id for r in claimed)
    pod_serial = f"{1:020d}:sockudo-realtime-gateway-production-eu-west-1-7d9f8c6b5d-x2k4q:{7:020d}"
    longest = Ack(a, "a" * 255, "m" * 255, "h" * 255)
    too_long = Ack(b, "x" * 256, pod_serial, "7")
    assert too_long.acknowledgement_id is None
    assert run(engine, dialect.ack_published, token, [longest, too_long]) == 2
    after = rows(engine)
    assert (after[a].acknowledgement_id, after[a].message_serial, after[a].history_serial) == (
        "a" * 255,
        "m" * 255,
        "h" * 255,
    )
    assert (after[b].status, after[b].acknowledgement_id) == (Status.PUBLISHED, None)
    assert (after[b].message_serial, after[b].history_serial) == (pod_serial, "7")
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert f"row {b}: the server's acknowledgement_id is 256 characters" in warning.getMessage()


# -- failures -------------------------------------------------------------------------------------


def test_reschedule_keeps_the_error_the_delay_and_charges_only_when_told(engine, dialect):
    add(engine, 2)
    token, claimed = claim(engine, dialect)
    a, b = (r.id for r in claimed)
    before = db_now(engine)
    failures = [
        Failure(a, 503, "backpressure", "busy", delay=30.0),
        Failure(b, 500, "internal_error", "boom", delay=0.0, charged=True),
    ]
    assert run(engine, dialect.reschedule, token, failures) == 2
    after = rows(engine)
    assert after[a].status == after[b].status == Status.PENDING
    assert (after[a].failures, after[b].failures) == (0, 1)
    assert (after[a].attempts, after[b].attempts) == (1, 1)  # kept: they go alone next time
    assert dt.timedelta(seconds=29) < after[a].next_attempt_at - before < dt.timedelta(seconds=40)
    assert after[b].next_attempt_at - before < dt.timedelta(seconds=5)
    assert (after[a].last_error_status, after[a].last_error_code) == (503, "backpressure")
    assert after[a].last_error_message == "busy" and after[a].last_error_at is not None
    assert after[a].lease_token is None and after[a].lease_expires_at is None


def test_reschedule_with_a_refund_takes_the_attempt_back(engine, dialect):
    add(engine, 1)
    token, (row,) = claim(engine, dialect)
    failure = [Failure(row.id, None, None, "connection refused")]
    assert run(engine, dialect.reschedule, token, failure, True) == 1
    after = rows(engine)[row.id]
    assert (after.status, after.attempts, after.failures) == (Status.PENDING, 0, 0)
    _token, (again,) = claim(engine, dialect)
    assert again.first_attempt  # batchable again


def test_mark_dead_keeps_the_reason_and_charges(engine, dialect):
    add(engine, 1)
    token, (row,) = claim(engine, dialect)
    failure = [Failure(row.id, 413, "payload_too_large", "too big", charged=True)]
    assert run(engine, dialect.mark_dead, token, failure) == 1
    after = rows(engine)[row.id]
    assert (after.status, after.failures, after.last_error_status) == (Status.DEAD, 1, 413)
    assert claim(engine, dialect)[1] == []  # never claimed again


def test_failures_are_bounded_to_their_columns(engine, dialect):
    """A code, status or message of any size is stored cut, not refused by the database."""
    add(engine, 1)
    token, (row,) = claim(engine, dialect)
    failure = [Failure(row.id, 2**40, "c" * 1000, "m" * 10_000)]
    assert run(engine, dialect.reschedule, token, failure) == 1
    after = rows(engine)[row.id]
    assert after.last_error_status is None
    assert after.last_error_code == "c" * 64
    assert len(after.last_error_message) == 500
    assert after.last_error_message.startswith(f"(status {2**40}) ")


# -- release, renewal, reclaim ----------------------------------------------------------------------


@pytest.mark.parametrize("refund", [True, False])
def test_release_gives_rows_back_due_now(engine, dialect, refund):
    add(engine, 2)
    token, claimed = claim(engine, dialect)
    ids = [r.id for r in claimed]
    assert run(engine, dialect.release, token, ids[:1], refund) == 1
    after = rows(engine)
    assert after[ids[0]].status == Status.PENDING
    assert after[ids[0]].attempts == (0 if refund else 1)
    assert after[ids[0]].lease_token is None
    assert after[ids[1]].status == Status.IN_FLIGHT  # not in the list: untouched


def test_extend_lease_moves_only_this_tokens_expiry(engine, dialect):
    add(engine, 2)
    mine, (a,) = claim(engine, dialect, limit=1, lease=5.0)
    _theirs, (b,) = claim(engine, dialect, limit=1, lease=5.0)
    before = rows(engine)
    assert run(engine, dialect.extend_lease, mine, 600.0, [a.id, b.id]) == 1
    after = rows(engine)
    assert after[a.id].lease_expires_at - before[a.id].lease_expires_at > dt.timedelta(seconds=500)
    assert after[b.id].lease_expires_at == before[b.id].lease_expires_at


def test_reclaim_takes_back_only_expired_leases_and_keeps_their_attempts(engine, dialect):
    add(engine, 2)
    _t1, (expired,) = claim(engine, dialect, limit=1)
    _t2, (live,) = claim(engine, dialect, limit=1)
    with engine.begin() as conn:
        conn.execute(sa.update(T).where(T.c.id == expired.id).values(lease_expires_at=PAST))
    assert run(engine, dialect.reclaim_expired) == 1
    after = rows(engine)
    assert (after[expired.id].status, after[expired.id].attempts) == (Status.PENDING, 1)
    assert after[expired.id].lease_token is None
    assert after[live.id].status == Status.IN_FLIGHT
    _token, (again,) = claim(engine, dialect)
    assert again.id == expired.id and not again.first_attempt  # it may have been sent: alone


def test_an_expired_lease_is_claimable_without_a_reclaim(engine, dialect):
    add(engine, 2)
    old_token, (expired,) = claim(engine, dialect, limit=1)
    claim(engine, dialect, limit=1)  # a live lease
    with engine.begin() as conn:
        conn.execute(sa.update(T).where(T.c.id == expired.id).values(lease_expires_at=PAST))
    token, claimed = claim(engine, dialect)
    assert [r.id for r in claimed] == [expired.id]  # the live lease is not taken
    assert claimed[0].attempts == 2 and not claimed[0].first_attempt
    # The old holder's late ack changes nothing; the new holder's moves the row.
    assert run(engine, dialect.ack_published, old_token, [Ack(expired.id)]) == 0
    assert run(engine, dialect.ack_published, token, [Ack(expired.id)]) == 1
    assert rows(engine)[expired.id].status == Status.PUBLISHED


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_claims_and_acks_write_no_index_entry_on_postgresql(engine, dialect):
    """The lean table's point: a claim is a HOT update, an ack a DELETE (see docs/performance.md)."""

    def updates() -> tuple[int, int]:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
            return conn.execute(
                sa.text(
                    "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relid = "
                    "CAST(:t AS regclass)"
                ),
                {"t": T.name},
            ).one()

    add(engine, 50)
    with engine.connect() as conn:
        fillfactor = conn.execute(
            sa.text("SELECT reloptions FROM pg_class WHERE oid = CAST(:t AS regclass)"),
            {"t": T.name},
        ).scalar_one()
    assert "fillfactor=50" in fillfactor
    before = updates()
    token, claimed = claim(engine, dialect, limit=50)
    assert run(engine, dialect.ack_published, token, [Ack(r.id) for r in claimed]) == 50
    deadline = time.monotonic() + 10  # statistics reach the view within a second or so
    while (after := updates())[0] - before[0] < 50 and time.monotonic() < deadline:
        time.sleep(0.1)
    updated, hot = after[0] - before[0], after[1] - before[1]
    assert updated == 50 and hot >= 45, (updated, hot)  # a full page may force a few


# -- retention ----------------------------------------------------------------------------------------


def test_delete_published_before_deletes_only_old_published_rows_up_to_the_limit(engine, dialect):
    old = add(engine, 5, status=Status.PUBLISHED.value, published_at=PAST)
    recent = add(engine, 1, status=Status.PUBLISHED.value, published_at=FUTURE)
    dead = add(engine, 1, status=Status.DEAD.value, published_at=PAST)
    pending = add(engine, 1)
    cutoff = dt.datetime.now(dt.UTC)
    assert run(engine, dialect.delete_published_before, cutoff, 3) == 3
    assert run(engine, dialect.delete_published_before, cutoff, 3) == 2
    assert run(engine, dialect.delete_published_before, cutoff, 3) == 0
    assert set(rows(engine)) == set(recent + dead + pending)
    assert not set(old) & set(rows(engine))


# -- operator statements ----------------------------------------------------------------------------


@pytest.mark.parametrize("new_keys", [True, False], ids=["fresh keys", "kept keys"])
def test_replay_starts_a_new_delivery(engine, dialect, new_keys):
    ids = add(
        engine,
        2,
        status=Status.DEAD.value,
        attempts=9,
        failures=9,
        queued_at=PAST,
        last_error_status=500,
        last_error_message="old",
    )
    published = add(engine, 1, status=Status.PUBLISHED.value)
    before = rows(engine)
    targets = [*ids, *published]
    keys = [f"new-{i}" for i in targets] if new_keys else None
    with engine.begin() as conn:
        changed = dialect.replay(conn, T, targets, [Status.DEAD.value], keys)
    assert changed == 2
    after = rows(engine)
    for i in ids:
        row = after[i]
        assert (row.status, row.failures) == (Status.PENDING, 0)
        assert row.attempts == (0 if new_keys else 1)  # a kept key goes alone
        assert row.queued_at > PAST and row.last_error_message is None
        assert row.idempotency_key == (f"new-{i}" if new_keys else before[i].idempotency_key)
    assert after[published[0]] == before[published[0]]  # not one of the statuses


def test_release_leases_releases_expired_or_all(engine, dialect):
    add(engine, 2)
    _t1, (expired,) = claim(engine, dialect, limit=1)
    _t2, (live,) = claim(engine, dialect, limit=1)
    with engine.begin() as conn:
        conn.execute(sa.update(T).where(T.c.id == expired.id).values(lease_expires_at=PAST))
        assert dialect.release_leases(conn, T, True) == 1
    assert rows(engine)[live.id].status == Status.IN_FLIGHT
    with engine.begin() as conn:
        assert dialect.release_leases(conn, T, False) == 1
    assert {r.status for r in rows(engine).values()} == {Status.PENDING}
    assert {r.attempts for r in rows(engine).values()} == {1}


# -- notifications -------------------------------------------------------------------------------------


async def test_listen_wakes_on_commit_where_the_database_notifies(engine, dialect):
    woken = asyncio.Event()
    task = asyncio.create_task(dialect.listen(engine, T, woken.set))
    try:
        if not dialect.notifies:
            await asyncio.sleep(0.2)
            assert not task.done() and not woken.is_set()  # waits forever, quietly
            return
        await asyncio.wait_for(woken.wait(), 5)  # the first call, once listening
        woken.clear()
        await asyncio.to_thread(add, engine, 1)
        await asyncio.wait_for(woken.wait(), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_the_sqlite_watch_outlasts_a_locked_database_at_start(tmp_path, dialect):
    """A database locked when the watch begins (a migration, an exclusive writer) delays the
    first reading; it must not end the watch (the worker would stop)."""
    import sqlite3

    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)  # rollback journal: readers are locked out
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT INTO t VALUES (1)")
    engine = sa.create_engine(f"sqlite:///{path}")
    woken = asyncio.Event()
    task = asyncio.create_task(dialect.listen(engine, T, woken.set))
    try:
        await asyncio.sleep(0.2)
        assert not task.done() and not woken.is_set()  # locked: no reading yet, still watching
        holder.execute("COMMIT")
        await asyncio.wait_for(woken.wait(), 5)  # the first reading, once the lock is gone
        woken.clear()
        holder.execute("INSERT INTO t VALUES (2)")  # another connection commits
        await asyncio.wait_for(woken.wait(), 5)
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        holder.close()
        engine.dispose()

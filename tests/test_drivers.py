"""The driver seam, operation by operation, on every database (the driver conformance suite).

Each test runs operations of :class:`outbox.drivers.Driver` (the object the worker runs, from
:func:`outbox.drivers.driver_for`) on a real database and checks the rows they leave: the claim
and its order (heads of keys only, parked keys skipped, mutations after their message), the lease
token guard, every step of a recording (publish, retry with and without a refund, bury, park,
promote, wake, give back), renewal, reclaim, retention, the producers' inserts and key locks,
mutation targets, notifications, and the operator statements built on them (replay, unpark,
releasing leases). A new database is done when its driver passes this file.
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

from outbox import InvalidEvent, OutboxEvent, admin, enqueue, enqueue_many, mutations, outbox_table
from outbox.admin.requeue import requeue
from outbox.drivers import (
    Ack,
    Driver,
    Failure,
    FoundSerial,
    Recording,
    UnknownSerial,
    driver_for,
)
from outbox.drivers.threaded import ThreadedDriver
from outbox.schema import WAITING_FOR_KEY, Status, parked_table, published_table
from outbox.sockudo.errors import EventRefused

from .helpers.drivers import call, run_step
from .outbox_rows import EV, keyed, set_row, set_row_in

T = outbox_table()
PARKED = parked_table(T)
LOG = published_table(T)
PAST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
FUTURE = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
#: The databases that keep ordering keys and mutations (MariaDB refuses them at enqueue: see
#: test_mariadb_refuses_ordering_keys_and_mutations_at_enqueue).
with_keys = pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def driver(engine: sa.Engine) -> Driver:
    return driver_for(engine, T)


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


def claim(engine: sa.Engine, limit: int = 10, lease: float = 60.0) -> Any:
    """The worker's claim: its token and the rows it leased."""
    token = uuid.uuid4()
    return token, call(engine, T, "events_claim", limit, lease, token)


def record(engine: sa.Engine, token: uuid.UUID, **steps: Any) -> int:
    """The worker's recording of a claim's outcome (``Recording`` fields); returns the rows it
    published."""
    return call(engine, T, "events_record", token, Recording(**steps))


# -- claim ----------------------------------------------------------------------------------------


def test_claim_takes_due_pending_rows_oldest_first_and_counts_an_attempt(engine):
    early, late = add(engine, 1), add(engine, 1)
    not_due = add(engine, 1, next_attempt_at=FUTURE)
    add(engine, 1, status=Status.DEAD.value)
    add(engine, 1, status=Status.PUBLISHED.value)
    with engine.begin() as conn:  # the later row became due first
        conn.execute(sa.update(T).where(T.c.id == late[0]).values(next_attempt_at=PAST))
    before = db_now(engine)
    token, claimed = claim(engine, lease=30.0)
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
    _token, claimed = claim(engine, limit=2)
    assert [r.id for r in claimed] == more[:2]


def test_claimed_rows_carry_what_publishing_needs(engine):
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
    (row,) = claim(engine)[1]
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


def claim_held_open(conn: sa.Connection, driver: Driver, limit: int) -> list[int]:
    """The driver's claim in ``conn``'s open transaction (its row locks held): the ids."""
    token = uuid.uuid4()
    if isinstance(driver, ThreadedDriver):
        return [r.id for r in driver.claim(conn, limit, 60.0, token)]
    params = {"limit": limit, "token": token, "lease": 60.0}
    run_step(conn, driver, "claim", params)  # type: ignore[arg-type]
    return list(conn.execute(sa.select(T.c.id).where(T.c.lease_token == token)).scalars())


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"], indirect=True)
def test_concurrent_claims_take_disjoint_rows(engine, driver):
    """Two claims at once, the first holding its locks: the second skips them (SKIP LOCKED)."""
    add(engine, 6)
    first_conn = engine.connect()
    first_tx = first_conn.begin()
    try:
        first = claim_held_open(first_conn, driver, 3)
        second: list[Any] = []
        thread = threading.Thread(target=lambda: second.extend(claim(engine, 3)[1]))
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the second claim waited for the first one's locks"
        first_tx.commit()
    finally:
        first_conn.close()
    assert len(first) == len(second) == 3
    assert not set(first) & {r.id for r in second}


# -- the token guard ------------------------------------------------------------------------------


def test_a_stale_token_changes_nothing(engine):
    add(engine, 2)
    token, claimed = claim(engine)
    ids = [r.id for r in claimed]
    stale = uuid.uuid4()
    before = rows(engine)
    assert record(engine, stale, published=[Ack(i) for i in ids]) == 0
    failure = [Failure(i, 500, "x", "m", charged=True) for i in ids]
    record(engine, stale, retry=failure, retry_refund=failure, buried=failure)
    record(engine, stale, give_back=ids, give_back_refund=ids)
    assert call(engine, T, "events_extend_lease", stale, 600.0, ids) == 0
    assert rows(engine) == before
    assert record(engine, token, published=[Ack(ids[0])]) == 1


def test_ack_stores_the_acknowledgement_and_clears_the_lease(engine):
    add(engine, 2)
    token, claimed = claim(engine)
    a, b = (r.id for r in claimed)
    acks = [Ack(a, "ack-a", "00000000000000000001:n:00000000000000000001", "7"), Ack(b)]
    assert record(engine, token, published=acks) == 2
    after = rows(engine)
    assert after[a].status == after[b].status == Status.PUBLISHED
    assert (after[a].acknowledgement_id, after[a].history_serial) == ("ack-a", "7")
    assert after[a].message_serial.endswith(":00000000000000000001")
    assert after[a].lease_token is None and after[a].published_at is not None
    # An ack of a row no longer leased (acked already) is a no-op.
    assert record(engine, token, published=acks) == 0


def test_ack_stores_values_whole_up_to_their_columns_and_leaves_out_longer_ones(engine, caplog):
    """Serials embed Sockudo's node id, a Kubernetes pod name say: 255 characters are stored
    whole in each acknowledgement column. A longer value is never stored cut (a cut serial names
    no message): it is left out, the row is still published, and a warning names it."""
    add(engine, 2)
    token, claimed = claim(engine)
    a, b = (r.id for r in claimed)
    pod_serial = f"{1:020d}:sockudo-realtime-gateway-production-eu-west-1-7d9f8c6b5d-x2k4q:{7:020d}"
    longest = Ack(a, "a" * 255, "m" * 255, "h" * 255)
    too_long = Ack(b, "x" * 256, pod_serial, "7")
    assert too_long.acknowledgement_id is None
    assert record(engine, token, published=[longest, too_long]) == 2
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


def test_reschedule_keeps_the_error_the_delay_and_charges_only_when_told(engine):
    add(engine, 2)
    token, claimed = claim(engine)
    a, b = (r.id for r in claimed)
    before = db_now(engine)
    failures = [
        Failure(a, 503, "backpressure", "busy", delay=30.0),
        Failure(b, 500, "internal_error", "boom", delay=0.0, charged=True),
    ]
    assert record(engine, token, retry=failures) == 0
    after = rows(engine)
    assert after[a].status == after[b].status == Status.PENDING
    assert (after[a].failures, after[b].failures) == (0, 1)
    assert (after[a].attempts, after[b].attempts) == (1, 1)  # kept: they go alone next time
    assert dt.timedelta(seconds=29) < after[a].next_attempt_at - before < dt.timedelta(seconds=40)
    assert after[b].next_attempt_at - before < dt.timedelta(seconds=5)
    assert (after[a].last_error_status, after[a].last_error_code) == (503, "backpressure")
    assert after[a].last_error_message == "busy" and after[a].last_error_at is not None
    assert after[a].lease_token is None and after[a].lease_expires_at is None


def test_reschedule_with_a_refund_takes_the_attempt_back(engine):
    add(engine, 1)
    token, (row,) = claim(engine)
    failure = [Failure(row.id, None, None, "connection refused")]
    record(engine, token, retry_refund=failure)
    after = rows(engine)[row.id]
    assert (after.status, after.attempts, after.failures) == (Status.PENDING, 0, 0)
    _token, (again,) = claim(engine)
    assert again.first_attempt  # batchable again


def test_mark_dead_keeps_the_reason_and_charges(engine):
    add(engine, 1)
    token, (row,) = claim(engine)
    failure = [Failure(row.id, 413, "payload_too_large", "too big", charged=True)]
    record(engine, token, buried=failure)
    after = rows(engine)[row.id]
    assert (after.status, after.failures, after.last_error_status) == (Status.DEAD, 1, 413)
    assert claim(engine)[1] == []  # never claimed again


def test_failures_are_bounded_to_their_columns(engine):
    """A code, status or message of any size is stored cut, not refused by the database."""
    add(engine, 1)
    token, (row,) = claim(engine)
    failure = [Failure(row.id, 2**40, "c" * 1000, "m" * 10_000)]
    record(engine, token, retry=failure)
    after = rows(engine)[row.id]
    assert after.last_error_status is None
    assert after.last_error_code == "c" * 64
    assert len(after.last_error_message) == 500
    assert after.last_error_message.startswith(f"(status {2**40}) ")


# -- release, renewal, reclaim ----------------------------------------------------------------------


@pytest.mark.parametrize("refund", [True, False])
def test_release_gives_rows_back_due_now(engine, refund):
    add(engine, 2)
    token, claimed = claim(engine)
    ids = [r.id for r in claimed]
    record(engine, token, **{"give_back_refund" if refund else "give_back": ids[:1]})
    after = rows(engine)
    assert after[ids[0]].status == Status.PENDING
    assert after[ids[0]].attempts == (0 if refund else 1)
    assert after[ids[0]].lease_token is None
    assert after[ids[1]].status == Status.IN_FLIGHT  # not in the list: untouched


def test_extend_lease_moves_only_this_tokens_expiry(engine):
    add(engine, 2)
    mine, (a,) = claim(engine, limit=1, lease=5.0)
    _theirs, (b,) = claim(engine, limit=1, lease=5.0)
    before = rows(engine)
    assert call(engine, T, "events_extend_lease", mine, 600.0, [a.id, b.id]) == 1
    after = rows(engine)
    assert after[a.id].lease_expires_at - before[a.id].lease_expires_at > dt.timedelta(seconds=500)
    assert after[b.id].lease_expires_at == before[b.id].lease_expires_at


def expired_and_live(engine: sa.Engine) -> tuple[Any, Any]:
    """Two claimed rows: one whose lease expired (a killed worker's), one whose lease holds."""
    add(engine, 2)
    _t1, (expired,) = claim(engine, limit=1)
    _t2, (live,) = claim(engine, limit=1)
    with engine.begin() as conn:
        conn.execute(sa.update(T).where(T.c.id == expired.id).values(lease_expires_at=PAST))
    return expired, live


def test_reclaim_takes_back_only_expired_leases_and_keeps_their_attempts(engine):
    expired, live = expired_and_live(engine)
    assert call(engine, T, "events_reclaim_expired") == 1
    after = rows(engine)
    assert (after[expired.id].status, after[expired.id].attempts) == (Status.PENDING, 1)
    assert after[expired.id].lease_token is None
    assert after[live.id].status == Status.IN_FLIGHT
    _token, (again,) = claim(engine)
    assert again.id == expired.id and not again.first_attempt  # it may have been sent: alone


def test_an_expired_lease_is_claimable_without_a_reclaim(engine):
    add(engine, 2)
    old_token, (expired,) = claim(engine, limit=1)
    claim(engine, limit=1)  # a live lease
    with engine.begin() as conn:
        conn.execute(sa.update(T).where(T.c.id == expired.id).values(lease_expires_at=PAST))
    token, claimed = claim(engine)
    assert [r.id for r in claimed] == [expired.id]  # the live lease is not taken
    assert claimed[0].attempts == 2 and not claimed[0].first_attempt
    # The old holder's late ack changes nothing; the new holder's moves the row.
    assert record(engine, old_token, published=[Ack(expired.id)]) == 0
    assert record(engine, token, published=[Ack(expired.id)]) == 1
    assert rows(engine)[expired.id].status == Status.PUBLISHED


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_claims_and_acks_write_no_index_entry_on_postgresql(engine):
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
    token, claimed = claim(engine, limit=50)
    assert record(engine, token, published=[Ack(r.id) for r in claimed]) == 50
    deadline = time.monotonic() + 10  # statistics reach the view within a second or so
    while (after := updates())[0] - before[0] < 50 and time.monotonic() < deadline:
        time.sleep(0.1)
    updated, hot = after[0] - before[0], after[1] - before[1]
    assert updated == 50 and hot >= 45, (updated, hot)  # a full page may force a few


# -- retention ----------------------------------------------------------------------------------------


def test_delete_published_before_deletes_only_old_published_rows_up_to_the_limit(engine):
    old = add(engine, 5, status=Status.PUBLISHED.value, published_at=PAST)
    recent = add(engine, 1, status=Status.PUBLISHED.value, published_at=FUTURE)
    dead = add(engine, 1, status=Status.DEAD.value, published_at=PAST)
    pending = add(engine, 1)
    cutoff = dt.datetime.now(dt.UTC)
    assert call(engine, T, "published_delete_before", cutoff, 3) == 3
    assert call(engine, T, "published_delete_before", cutoff, 3) == 2
    assert call(engine, T, "published_delete_before", cutoff, 3) == 0
    assert set(rows(engine)) == set(recent + dead + pending)
    assert not set(old) & set(rows(engine))


# -- producers: inserts and key locks, in the caller's transaction ------------------------------


def test_events_insert_writes_due_rows_in_the_callers_transaction(engine, driver):
    rows_in = [
        {
            "idempotency_key": f"k-{i}",
            "event_id": uuid.uuid4(),
            "channel": "c",
            "event": "e",
            "data": "{}",
        }
        for i in range(10)  # past PostgreSQL's COPY threshold
    ]
    with engine.connect() as conn, conn.begin() as tx:
        driver.events_insert(conn, rows_in)
        tx.rollback()
    assert rows(engine) == {}  # the caller's rollback takes them back
    with engine.begin() as conn:
        driver.events_insert(conn, rows_in)
    _token, claimed = claim(engine, limit=20)
    assert [r.idempotency_key for r in claimed] == [f"k-{i}" for i in range(10)]


@with_keys
def test_keyed_inserts_put_rows_behind_their_key_waiting(engine, driver):
    """The first row of a new key goes in due; the rows behind it, in the same call or a later
    one, wait out of the claim's way until their key's head leaves."""
    first = keyed(engine, "k", 3)
    other = keyed(engine, "j", 1)
    after = rows(engine)
    assert after[first[0]].next_attempt_at < WAITING_FOR_KEY
    assert [after[i].next_attempt_at for i in first[1:]] == [WAITING_FOR_KEY] * 2
    assert after[other[0]].next_attempt_at < WAITING_FOR_KEY
    with engine.begin() as conn:
        held = driver.keys_lock(conn, ["k", "new"])
        base = {"channel": "c", "event": "e", "data": "{}"}
        batch = [
            {**base, "idempotency_key": f"b-{i}", "event_id": uuid.uuid4(), "ordering_key": key}
            for i, key in enumerate(["new", "new", "k"])
        ]
        driver.events_insert_keyed(conn, batch, held)
    by_key = {r.idempotency_key: r for r in rows(engine).values()}
    assert by_key["b-0"].next_attempt_at < WAITING_FOR_KEY  # the head of a new key
    assert by_key["b-1"].next_attempt_at == WAITING_FOR_KEY  # behind it, in the same call
    assert by_key["b-2"].next_attempt_at == WAITING_FOR_KEY  # behind k's rows


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
def test_mariadb_refuses_ordering_keys_and_mutations_at_enqueue(engine, driver):
    """A database whose producers cannot be serialized per key says so, and nothing is written."""
    with engine.connect() as conn, pytest.raises(InvalidEvent, match="need PostgreSQL or SQLite"):
        driver.keys_lock(conn, ["k"])
    with engine.begin() as conn, pytest.raises(InvalidEvent):
        enqueue(conn, "c", "e", {}, ordering_key="k")
    assert rows(engine) == {}


# -- order: heads of keys, parked keys, promotion ---------------------------------------------


@with_keys
def test_the_claim_takes_only_the_head_of_each_key_and_a_recording_promotes_the_next(engine):
    a, b = keyed(engine, "a", 3), keyed(engine, "b", 2)
    loose = add(engine, 1)
    token, claimed = claim(engine)
    assert [r.id for r in claimed] == sorted([a[0], b[0], *loose])
    assert claim(engine)[1] == []  # a leased head still holds its key
    # A stale worker's recording promotes nothing.
    assert record(engine, uuid.uuid4(), published=[Ack(a[0])], heads_gone=["a"]) == 0
    assert rows(engine)[a[1]].next_attempt_at == WAITING_FOR_KEY
    assert record(engine, token, published=[Ack(a[0]), Ack(loose[0])], heads_gone=["a"]) == 2
    after = rows(engine)
    assert after[a[1]].next_attempt_at < WAITING_FOR_KEY  # promoted: due now
    assert after[a[2]].next_attempt_at == WAITING_FOR_KEY  # still behind a[1]
    assert [r.id for r in claim(engine)[1]] == [a[1]]


@with_keys
def test_a_buried_head_parks_its_key_and_unparking_promotes_the_next(engine):
    a = keyed(engine, "a", 2)
    token, (head,) = claim(engine)
    refused = Failure(head.id, 413, "payload_too_large", "too large", charged=True)
    record(engine, token, buried=[refused], park=[head.id], heads_gone=["a"])
    with engine.connect() as conn:
        assert dict(conn.execute(sa.select(PARKED.c.ordering_key, PARKED.c.row_id)).all()) == {
            "a": head.id
        }
    assert rows(engine)[a[0]].status == Status.DEAD
    assert rows(engine)[a[1]].next_attempt_at == WAITING_FOR_KEY  # parked: the key waits
    assert claim(engine)[1] == []
    with engine.begin() as conn:
        assert admin.skip_parked(conn, T, ["a"]) == 1
    assert [r.id for r in claim(engine)[1]] == [a[1]]


@with_keys
def test_a_stale_burial_parks_nothing(engine):
    keyed(engine, "a", 2)
    _token, (head,) = claim(engine)
    refused = Failure(head.id, 413, "payload_too_large", "too large", charged=True)
    record(engine, uuid.uuid4(), buried=[refused], park=[head.id], heads_gone=["a"])
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(PARKED)).scalar_one() == 0
    assert rows(engine)[head.id].status == Status.IN_FLIGHT


# -- mutations: waiting for their message, woken, their target ---------------------------------


def mutation_waiting_for(engine: sa.Engine) -> tuple[uuid.UUID, int, int]:
    """A message and an update of it enqueued together: (message event id, message row, update
    row); the update waits for the message to leave the table."""
    with engine.begin() as conn:
        message = enqueue(conn, "c", "created", {"n": 1})
        update = mutations.update_message(conn, "c", message, data="v2")
        ids = dict(conn.execute(sa.select(T.c.event_id, T.c.id)).all())
    return message, ids[message], ids[update]


@with_keys
def test_a_recording_that_takes_a_message_out_wakes_its_mutations(engine):
    message, message_row, update_row = mutation_waiting_for(engine)
    assert rows(engine)[update_row].next_attempt_at == WAITING_FOR_KEY
    token, claimed = claim(engine)
    assert [r.id for r in claimed] == [message_row]  # the mutation waits for its message
    ack = Ack(message_row, "a", "s-1", "1")
    record(engine, token, published=[ack], messages_gone=[(message, "c")])
    _token, (mutation,) = claim(engine)
    assert mutation.id == update_row and mutation.target_event_id == message


@with_keys
def test_mutations_whose_message_left_unseen_are_woken_by_upkeep(engine):
    _message, message_row, update_row = mutation_waiting_for(engine)
    set_row(engine, message_row, status="published", published_at=PAST, message_serial="s-1")
    assert claim(engine)[1] == []  # nobody woke it
    assert call(engine, T, "mutations_wake_stranded") == 1
    assert [r.id for r in claim(engine)[1]] == [update_row]
    assert call(engine, T, "mutations_wake_stranded") == 0


@with_keys
def test_targets_resolve_finds_the_serial_where_to_look_or_why_there_is_none(engine):
    """A mutation's message by its outbox event: its serial from the log; a publish without a
    receipt says where to look in history; a dead message refuses; a trimmed log row is absent;
    and a serial found in history is remembered on the log row."""
    with engine.begin() as conn:
        published, receiptless, dead, trimmed = (
            enqueue(conn, "c", "e", {"n": i}) for i in range(4)
        )
        mutated = {
            m: mutations.update_message(conn, "c", m, data="x")
            for m in (published, receiptless, dead, trimmed)
        }
        ids = dict(conn.execute(sa.select(T.c.event_id, T.c.id)).all())
    set_row(
        engine,
        ids[published],
        status="published",
        published_at=PAST,
        message_serial="s-1",
        acknowledgement_id="s-1",
    )
    set_row(engine, ids[receiptless], status="published", published_at=PAST)
    set_row(engine, ids[dead], status="dead", last_error_message="too large")
    set_row(engine, ids[trimmed], status="published", published_at=PAST, message_serial="s-0")
    with engine.begin() as conn:  # retention took its log row
        conn.execute(sa.delete(LOG).where(LOG.c.id == ids[trimmed]))
    for event in (published, receiptless, dead, trimmed):
        set_row(engine, ids[mutated[event]], next_attempt_at=PAST)
    _token, claimed = claim(engine)
    by_target = {r.target_event_id: r for r in claimed}
    assert set(by_target) == {published, receiptless, dead, trimmed}
    answers = call(engine, T, "targets_resolve", claimed)
    assert answers[by_target[published].id] == "s-1"
    where = answers[by_target[receiptless].id]
    assert (
        isinstance(where, UnknownSerial)
        and where.message_id == rows(engine)[ids[receiptless]].idempotency_key
    )
    refusal = answers[by_target[dead].id]
    assert isinstance(refusal, EventRefused) and refusal.code == "target_dead"
    assert by_target[trimmed].id not in answers  # the trimmed event is not published here
    found = [FoundSerial(receiptless, "c", "s-2")]
    assert call(engine, T, "targets_remember", found) == 1
    assert call(engine, T, "targets_resolve", claimed)[by_target[receiptless].id] == "s-2"
    assert call(engine, T, "targets_remember", found) == 0  # stored once


# -- operator statements ----------------------------------------------------------------------------


@pytest.mark.parametrize("new_keys", [True, False], ids=["fresh keys", "kept keys"])
def test_replay_starts_a_new_delivery(engine, new_keys):
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
        changed = requeue(conn, T, targets, [Status.DEAD.value], keys)
    assert changed == 2
    after = rows(engine)
    for i in ids:
        row = after[i]
        assert (row.status, row.failures) == (Status.PENDING, 0)
        assert row.attempts == (0 if new_keys else 1)  # a kept key goes alone
        assert row.queued_at > PAST and row.last_error_message is None
        assert row.idempotency_key == (f"new-{i}" if new_keys else before[i].idempotency_key)
    assert after[published[0]] == before[published[0]]  # not one of the statuses


def test_release_leases_releases_expired_or_all(engine):
    _expired, live = expired_and_live(engine)
    with engine.begin() as conn:
        assert admin.release_leases(conn, T, expired_only=True) == 1
    assert rows(engine)[live.id].status == Status.IN_FLIGHT
    with engine.begin() as conn:
        assert admin.release_leases(conn, T, expired_only=False) == 1
    assert {r.status for r in rows(engine).values()} == {Status.PENDING}
    assert {r.attempts for r in rows(engine).values()} == {1}


# -- notifications -------------------------------------------------------------------------------------


async def test_listen_wakes_on_commit_where_the_database_notifies(engine, driver):
    woken = asyncio.Event()
    task = asyncio.create_task(driver.listen(woken.set))
    try:
        if not driver.notifies:
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


async def test_the_sqlite_watch_outlasts_a_locked_database_at_start(tmp_path):
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
    task = asyncio.create_task(driver_for(engine, T).listen(woken.set))
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

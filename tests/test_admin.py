"""What operators read (outbox.admin), on SQLite and PostgreSQL: throughput per interval, the search
for an event's whole life, and the dead list the dashboard pages through and replays."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from outbox import admin, enqueue
from outbox.admin import EventRecord, ReplayFilter, ThroughputBucket
from tests.outbox_rows import EV, T, add, add_dead, add_published, row, set_row

T0 = dt.datetime(2026, 1, 1, 10, 0, tzinfo=dt.UTC)


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


# -- throughput ---------------------------------------------------------------------------------


def test_throughput_counts_each_row_in_the_bucket_of_its_time(engine):
    # Published: the bucket of published_at, start inclusive, end exclusive.
    for minute in (0, 0.999, 1, 2.5):
        add_published(engine, published_at=at(minute))
    add_published(engine, published_at=at(-0.01))  # before the window
    add_published(engine, published_at=at(3))  # at `until`: after it
    # Dead: by the error that made them dead.
    add_dead(engine, last_error_at=at(1.2))
    add_dead(engine, last_error_at=at(1.9))
    # Retried: any other row by its last error, also one published after its retry.
    add(engine, status="pending", failures=1, last_error_at=at(2))
    add_published(engine, published_at=at(1.5), last_error_at=at(0.5))
    add(engine, status="pending")  # never failed: in no series

    with engine.connect() as conn:
        buckets = admin.throughput(conn, T, since=T0, bucket_seconds=60, until=at(3))
    assert buckets == [
        ThroughputBucket(at(0), published=2, retried=1, dead=0),
        ThroughputBucket(at(1), published=2, retried=0, dead=2),
        ThroughputBucket(at(2), published=1, retried=1, dead=0),
    ]


def test_throughput_last_bucket_may_be_short_and_an_empty_table_counts_zero(engine):
    with engine.connect() as conn:
        assert admin.throughput(conn, T, since=T0, bucket_seconds=60, until=at(2.5)) == [
            ThroughputBucket(at(minute), 0, 0, 0) for minute in (0, 1, 2)
        ]
        assert admin.throughput(conn, T, since=T0, bucket_seconds=60, until=T0) == [
            ThroughputBucket(T0, 0, 0, 0)
        ]
        with pytest.raises(ValueError, match="bucket_seconds must be positive"):
            admin.throughput(conn, T, since=T0, bucket_seconds=0, until=at(1))


def test_throughput_until_defaults_to_now(engine):
    add_published(engine)  # published now, by the test's clock
    since = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=9)
    with engine.connect() as conn:
        buckets = admin.throughput(conn, T, since=since, bucket_seconds=300)
    assert [b.start for b in buckets] == [since, since + dt.timedelta(minutes=5)]
    assert sum(b.published for b in buckets) == 1


# -- find_events --------------------------------------------------------------------------------


def test_find_events_by_event_id_key_channel_or_row_id(engine):
    with engine.begin() as conn:
        event_id = enqueue(conn, ["orders", "audit"], "created", {"n": 1})
    first, second = (r.id for r in _rows_of(engine, event_id))
    other = add(engine, "orders", "updated")

    def found(text: str, limit: int = 50) -> list[int]:
        with engine.connect() as conn:
            return [r.id for r in admin.find_events(conn, T, text, limit)]

    # The event's whole life: every channel's row, newest first.
    assert found(str(event_id)) == [second, first]
    assert found(f"  {str(event_id).upper()}\n") == [second, first]
    assert found(row(engine, first).idempotency_key) == [first]
    assert found("orders") == [other, first]
    assert found("orders", limit=1) == [other]
    assert found(str(second)) == [second]
    for nothing in ("", "   ", "no-such-thing", "99999999999999999999999", "²"):
        assert found(nothing) == [], nothing


def test_find_events_reads_the_whole_life_of_a_row(engine):
    row_id = add_published(
        engine,
        "orders",
        data='{"total": 12}',
        attempts=3,
        failures=2,
        acknowledgement_id="ack-7",
        message_serial="m-9",
        history_serial="h-4",
        last_error_status=503,
        last_error_code="backpressure",
        last_error_message="try later",
        last_error_at=T0,
        published_at=at(1),
    )
    with engine.connect() as conn:
        [record] = admin.find_events(conn, T, str(row_id))
    stored = row(engine, row_id)
    assert isinstance(record, EventRecord)
    assert record.id == row_id and record.event_id == stored.event_id
    assert (record.channel, record.event, record.status) == ("orders", "created", "published")
    assert (record.attempts, record.failures) == (3, 2)
    assert (record.acknowledgement_id, record.message_serial, record.history_serial) == (
        "ack-7",
        "m-9",
        "h-4",
    )
    assert (record.last_error_status, record.last_error_code, record.last_error_message) == (
        503,
        "backpressure",
        "try later",
    )
    assert (record.last_error_at, record.published_at) == (T0, at(1))
    assert record.created_at == stored.created_at and record.queued_at == stored.queued_at
    assert record.idempotency_key == stored.idempotency_key
    assert (record.encrypted, record.data) == (False, '{"total": 12}')


def test_an_encrypted_channel_payload_is_never_read_out(engine):
    # Stored in plaintext until the worker seals it: the admin reads never hand it out.
    sealed = add(engine, "private-encrypted-orders", data="the plaintext secret")
    # Not an encrypted channel (the prefix is case-sensitive), on both databases.
    plain = add(engine, "Private-Encrypted-orders", data="shown")
    add_dead(engine, "private-encrypted-orders", data="dead plaintext")
    with engine.connect() as conn:
        records = admin.find_events(conn, T, "private-encrypted-orders")
        [shown] = admin.find_events(conn, T, str(plain))
        [dead] = admin.dead_events(conn, T)
    assert [r.id for r in records][-1] == sealed
    assert all(r.encrypted and r.data is None for r in [*records, dead])
    assert (shown.encrypted, shown.data) == (False, "shown")


# -- dead_events --------------------------------------------------------------------------------


def test_dead_events_lists_what_the_selection_matches_oldest_first_in_pages(engine):
    too_large = add_dead(engine, "orders", "created")
    invalid = add_dead(
        engine,
        "orders",
        "updated",
        last_error_status=400,
        last_error_code="invalid_event",
        last_error_message="bad",
    )
    audit = add_dead(engine, "audit", "created")
    add(engine, "orders")  # pending
    add_published(engine, "orders")

    def listed(selection: ReplayFilter | None = None, **page: int) -> list[int]:
        with engine.connect() as conn:
            return [r.id for r in admin.dead_events(conn, T, selection or ReplayFilter(), **page)]

    assert listed() == [too_large, invalid, audit]
    assert listed(ReplayFilter(channel="orders")) == [too_large, invalid]
    assert listed(ReplayFilter(event="created")) == [too_large, audit]
    assert listed(ReplayFilter(error_code="413")) == [too_large, audit]
    assert listed(ReplayFilter(error_code="invalid_event")) == [invalid]
    assert listed(ReplayFilter(ids=[audit, invalid])) == [invalid, audit]
    assert listed(limit=2) == [too_large, invalid]
    assert listed(limit=2, after_id=invalid) == [audit]
    assert listed(ReplayFilter(limit=1), limit=50) == [too_large]

    set_row(engine, too_large, created_at=at(0))
    set_row(engine, invalid, created_at=at(5))
    set_row(engine, audit, created_at=at(10))
    assert listed(ReplayFilter(since=at(5))) == [invalid, audit]
    assert listed(ReplayFilter(until=at(5))) == [too_large]

    with engine.connect() as conn:
        [record] = admin.dead_events(conn, T, ReplayFilter(ids=[invalid]))
    assert (record.status, record.last_error_status, record.last_error_code) == (
        "dead",
        400,
        "invalid_event",
    )
    assert record.last_error_message == "bad" and record.data == '{"c":"orders"}'


def test_dead_events_lists_exactly_what_a_replay_of_the_selection_changes(engine):
    for channel in ("orders", "orders", "audit"):
        add_dead(engine, channel)
    selection = ReplayFilter(channel="orders")
    with engine.begin() as conn:
        listed = {r.id for r in admin.dead_events(conn, T, selection)}
        assert admin.count_for_replay(conn, T, selection) == len(listed) == 2
        assert admin.replay(conn, T, selection) == 2
    with engine.connect() as conn:
        pending = set(conn.execute(sa.select(EV.c.id).where(EV.c.status == "pending")).scalars())
    assert pending == listed


def _rows_of(engine: sa.Engine, event_id: object) -> list[sa.Row]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(T).where(T.c.event_id == event_id).order_by(T.c.id)))


# -- search pages, one record -------------------------------------------------------------------


def test_search_events_pages_newest_first_and_event_record_reads_one_row(engine):
    ids = [add(engine, "orders", f"e{n}") for n in range(5)]
    add(engine, "audit")
    set_row(engine, ids[1], status="dead", last_error_code="x")
    set_row(engine, ids[2], status="published", published_at=T0)

    def page(before: int | None = None, limit: int = 2) -> list[tuple[int, str]]:
        with engine.connect() as conn:
            found = admin.search_events(conn, T, " orders ", limit, before)
        return [(r.id, r.status) for r in found]

    assert page() == [(ids[4], "pending"), (ids[3], "pending")]
    assert page(ids[3]) == [(ids[2], "published"), (ids[1], "dead")]
    assert page(ids[1]) == [(ids[0], "pending")]
    assert page(ids[0]) == []
    with engine.connect() as conn:
        assert admin.search_events(conn, T, "a\x00b") == []
        assert [r.id for r in admin.search_events(conn, T, str(ids[2]))] == [ids[2]]
        record = admin.event_record(conn, T, ids[1])
        assert record is not None and (record.id, record.status) == (ids[1], "dead")
        for missing in (0, -1, 10**6, 2**63):
            assert admin.event_record(conn, T, missing) is None


# -- the queue ----------------------------------------------------------------------------------


def test_queued_events_lists_pending_or_in_flight_rows_oldest_first(engine):
    now = dt.datetime.now(dt.UTC)
    due = add(engine, "orders", "due", attempts=1, failures=1, last_error_code="backpressure")
    later = add(engine, "orders", "later", next_attempt_at=now + dt.timedelta(minutes=5))
    leased = add(
        engine, "orders", "leased", attempts=1, lease_expires_at=now + dt.timedelta(hours=1)
    )
    expired = add(engine, "orders", "expired", lease_expires_at=now - dt.timedelta(minutes=1))
    add_dead(engine)
    add_published(engine)

    def listed(state: str, **page: int) -> list[int]:
        with engine.connect() as conn:
            return [r.id for r in admin.queued_events(conn, T, state, **page)]

    # An expired lease is pending again: claimable as it stands.
    assert listed("pending") == [due, later, expired]
    assert listed("pending", limit=2) == [due, later]
    assert listed("pending", after_id=later) == [expired]
    assert listed("in_flight") == [leased]
    with engine.connect() as conn:
        [first] = admin.queued_events(conn, T, "pending", limit=1)
        [held] = admin.queued_events(conn, T, "in_flight")
        with pytest.raises(ValueError, match="not 'dead'"):
            admin.queued_events(conn, T, "dead")
    assert (first.state, first.event, first.attempts, first.failures) == ("pending", "due", 1, 1)
    assert (first.last_error_code, first.waiting_for, first.ordering_key) == (
        "backpressure",
        None,
        None,
    )
    assert held.state == "in_flight" and held.lease_expires_at is not None


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)  # MariaDB: no keys
def test_queued_events_say_what_a_waiting_row_waits_for(engine):
    with engine.begin() as conn:
        for n in range(2):
            enqueue(conn, "orders", "step", {"n": n}, ordering_key="order-7")
    with engine.connect() as conn:
        head, behind = admin.queued_events(conn, T, "pending")
    assert (head.ordering_key, head.waiting_for) == ("order-7", None)
    assert (behind.ordering_key, behind.waiting_for) == ("order-7", admin.WAITING_FOR_ITS_KEY)


# -- deleting dead events -----------------------------------------------------------------------


def test_delete_dead_deletes_what_the_selection_matches_in_pages(engine):
    orders = [add_dead(engine, "orders") for _ in range(5)]
    audit = add_dead(engine, "audit")
    pending, published = add(engine, "orders"), add_published(engine, "orders")
    selection = ReplayFilter(channel="orders", limit=4)
    with engine.connect() as conn:
        assert admin.count_for_replay(conn, T, selection) == 4
        assert admin.parked_heads_among(conn, T, selection) == 0
    # Pages of 3: a first page of 3 committed, then 1 (the limit), oldest first.
    assert list(admin.delete_dead_in_pages(engine, T, selection, page=3)) == [3, 1]
    with engine.connect() as conn:
        left = set(conn.execute(sa.select(EV.c.id)).scalars())
    assert left == {orders[4], audit, pending, published}
    with engine.begin() as conn:
        assert admin.delete_dead(conn, T, ReplayFilter(ids=[orders[4], pending])) == 1
        assert admin.delete_dead(conn, T, ReplayFilter(ids=[orders[4]])) == 0
        with pytest.raises(ValueError, match="only dead events are deleted"):
            admin.delete_dead(conn, T, ReplayFilter(statuses=("published",)))
    assert {row(engine, i).status for i in (pending, published)} == {"pending", "published"}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)  # MariaDB: no keys
def test_deleting_a_parked_head_lets_its_key_go_on(engine):
    from outbox.schema import parked_table
    from tests.helpers.drivers import park_in

    with engine.begin() as conn:
        for n in range(3):
            enqueue(conn, "orders", "step", {"n": n}, ordering_key="k")
        head, second, third = conn.execute(sa.select(T.c.id).order_by(T.c.id)).scalars()
    set_row(engine, head, status="dead", last_error_code="payload_too_large")
    with engine.begin() as conn:
        park_in(conn, T, [head])
    with engine.connect() as conn:
        assert admin.parked_heads_among(conn, T, ReplayFilter(ids=[head])) == 1
        assert admin.parked_key(conn, T, "k") is not None
        assert admin.parked_key(conn, T, "other") is None
        assert [r.waiting_for for r in admin.queued_events(conn, T, "pending")] == ["key", "key"]
    with engine.begin() as conn:
        assert admin.delete_dead(conn, T, ReplayFilter(ids=[head])) == 1
    with engine.connect() as conn:
        assert conn.execute(sa.select(parked_table(T))).all() == []
        waiting = [(r.id, r.waiting_for) for r in admin.queued_events(conn, T, "pending")]
    # The next event of the key is due: the key goes on without its deleted head.
    assert waiting == [(second, None), (third, "key")]

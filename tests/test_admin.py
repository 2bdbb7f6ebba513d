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

"""What operators see and do about ordering keys: the claim's head rule, parking a dead head's key,
``outbox keys`` (list, skip), replay of a head, and the status lines for parked keys and waiting
mutations. Statement by statement on PostgreSQL and SQLite (MariaDB refuses ordering keys); the
worker's side of it is in test_ordering.py and test_mutations.py.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import uuid

import prometheus_client
import pytest
import sqlalchemy as sa

from outbox import OutboxEvent, admin, enqueue, enqueue_many, mutations
from outbox.cli import main
from outbox.drivers import Ack, Failure, Recording, driver_for, portable
from outbox.drivers.postgresql import _promote_params, _publish_params
from outbox.metrics import _StateCollector
from outbox.schema import WAITING_FOR_KEY, parked_table
from outbox.settings import ENVIRONMENT
from tests.helpers.drivers import call, park_in, run_step
from tests.outbox_rows import EV, T, keyed, set_row

#: MariaDB refuses ordering keys (tested in test_ordering.py).
on_both = pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)

NOW = dt.datetime.now(dt.UTC)
PARKED = parked_table(T)


@pytest.fixture(autouse=True)
def environment(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable, _ in ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("OUTBOX_DATABASE_URL", database_url)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().out


def claim(engine: sa.Engine, limit: int = 10) -> list[int]:
    """What a worker's claim takes now (row ids); the lease is given back at once."""
    rows = call(engine, T, "events_claim", limit, 60, uuid.uuid4())
    with engine.begin() as conn:
        conn.execute(
            sa.update(T)
            .where(T.c.id.in_([r.id for r in rows]))
            .values(lease_token=None, lease_expires_at=None)
        )
    return [r.id for r in rows]


def bury_and_park(engine: sa.Engine, row_id: int) -> int:
    """The head goes dead as the worker buries it (refused, 413) and parks its key."""
    set_row(
        engine,
        row_id,
        status="dead",
        last_error_status=413,
        last_error_code="payload_too_large",
        last_error_message="payload too large",
        last_error_at=NOW,
    )
    with engine.begin() as conn:
        return park_in(conn, T, [row_id])


def parked(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(PARKED.c.ordering_key, PARKED.c.row_id)).all())


@on_both
def test_the_claim_takes_only_the_head_of_each_key(engine):
    """One row per key, the oldest; unkeyed rows all; a leased head still holds its key."""
    a = keyed(engine, "a", 3)
    b = keyed(engine, "b", 2)
    with engine.begin() as conn:
        loose = [enqueue(conn, "orders", "loose", {"n": i}) for i in range(2)]
    assert len(loose) == 2
    first = claim(engine)
    assert a[0] in first and b[0] in first
    assert not {*a[1:], *b[1:]} & set(first)
    assert len(first) == 4  # two heads and the two unkeyed rows
    # A head that is leased (in flight) or waiting for a retry still holds its key.
    with engine.begin() as conn:
        conn.execute(
            sa.update(T)
            .where(T.c.id == a[0])
            .values(lease_token=uuid.uuid4(), lease_expires_at=NOW + dt.timedelta(hours=1))
        )
        conn.execute(
            sa.update(T).where(T.c.id == b[0]).values(next_attempt_at=NOW + dt.timedelta(hours=1))
        )
    second = claim(engine)
    assert not {*a, *b} & set(second)


@on_both
def test_a_dead_head_parks_its_key_and_outbox_keys_shows_why(engine, capsys):
    """The key's later rows wait (the claim skips them), other keys go on, and ``outbox keys``
    and ``outbox status`` say which key, behind which row, for what reason."""
    a = keyed(engine, "order-1", 3)
    b = keyed(engine, "order-2", 1)
    assert bury_and_park(engine, a[0]) == 1
    assert parked(engine) == {"order-1": a[0]}
    assert claim(engine) == [b[0]]

    code, out = cli(capsys, "keys")
    assert code == 0
    assert "1 parked key(s)" in out
    assert f"'order-1': 2 waiting behind dead row {a[0]} (orders step)" in out
    assert "payload_too_large payload too large" in out
    code, out = cli(capsys, "keys", "--json")
    report = json.loads(out)
    assert report["parked"] == 1
    assert report["keys"][0]["ordering_key"] == "order-1"
    assert report["keys"][0]["waiting"] == 2
    code, out = cli(capsys, "status")
    assert "parked keys: 1" in out


@on_both
def test_parking_keeps_the_first_head_and_ignores_rows_that_did_not_die(engine):
    """A stale worker's burial moved nothing (the row is not in the dead table): no park. An
    unkeyed dead row parks nothing. A parked key stays parked by its first head."""
    a = keyed(engine, "k", 3)
    with engine.begin() as conn:
        assert park_in(conn, T, [a[0]]) == 0  # still in the hot table
    with engine.begin() as conn:
        loose = enqueue(conn, "orders", "loose", {})
        loose_id = conn.execute(sa.select(T.c.id).where(T.c.event_id == loose)).scalar_one()
    assert bury_and_park(engine, loose_id) == 0
    assert bury_and_park(engine, a[0]) == 1
    assert bury_and_park(engine, a[1]) == 0
    assert parked(engine) == {"k": a[0]}


@on_both
def test_skip_lets_the_key_go_on_without_its_head(engine, capsys):
    a = keyed(engine, "k", 3)
    bury_and_park(engine, a[0])
    assert claim(engine) == []
    code, out = cli(capsys, "keys", "--skip", "k")
    assert (code, out.strip()) == (0, "1 key(s) go on without their dead head")
    assert parked(engine) == {}
    assert claim(engine) == [a[1]]
    with engine.connect() as conn:
        assert admin.snapshot(conn, T).dead == 1  # the head stays dead


@on_both
def test_replaying_the_dead_head_puts_it_back_in_front_of_its_key(engine, capsys):
    """Replay unparks the key and the head goes first again (it keeps its id)."""
    a = keyed(engine, "k", 3)
    bury_and_park(engine, a[0])
    code, _out = cli(capsys, "replay", str(a[0]))
    assert code == 0
    assert parked(engine) == {}
    assert claim(engine) == [a[0]]


def lease_all(engine: sa.Engine) -> tuple[uuid.UUID, list[int]]:
    """What a worker's claim takes now, kept leased (row ids) under the returned token."""
    token = uuid.uuid4()
    rows = call(engine, T, "events_claim", 10, 60, token)
    return token, [r.id for r in rows]


def ack(engine: sa.Engine, token: uuid.UUID, row_id: int, key: str) -> None:
    """The worker records ``row_id`` published (its key's next row becomes due)."""
    recording = Recording(published=[Ack(row_id)], heads_gone=[key])
    assert call(engine, T, "events_record", token, recording) == 1


def event_ids(engine: sa.Engine, ids: list[int]) -> list[uuid.UUID]:
    with engine.connect() as conn:
        found = dict(conn.execute(sa.select(EV.c.id, EV.c.event_id).where(EV.c.id.in_(ids))).all())
    return [found[i] for i in ids]


@on_both
@pytest.mark.parametrize("how", ["dead, key skipped", "published, replayed with --published"])
def test_a_replayed_event_joins_the_back_of_its_key(engine, capsys, how):
    """A replayed event that is not its key's parked head is queued again behind the key's
    events still queued, never beside the one in flight. (Replay put it back with its old id,
    due at once: the claim took it as the key's head while the next event was in flight.)"""
    a, b, c = keyed(engine, "k", 3)
    if how.startswith("dead"):
        bury_and_park(engine, a)
        assert cli(capsys, "keys", "--skip", "k")[0] == 0
        replay = ["replay", str(a)]
    else:
        set_row(engine, a, status="published", published_at=NOW)
        with engine.begin() as conn:
            portable.keys_promote(conn, T, ["k"])
        replay = ["replay", "--published", str(a)]
    (first_event,) = event_ids(engine, [a])
    token, leased = lease_all(engine)
    assert leased == [b]  # b is in flight
    assert cli(capsys, *replay)[0] == 0
    assert claim(engine) == []  # nothing else of "k" while b is in flight
    ack(engine, token, b, "k")
    token, leased = lease_all(engine)
    assert leased == [c]  # c was committed before the replay
    ack(engine, token, c, "k")
    token, leased = lease_all(engine)
    assert event_ids(engine, leased) == [first_event]  # then the replayed one, last
    assert leased[0] > c


@on_both
def test_mutations_waiting_for_their_message_wait_out_of_the_claims_way(engine):
    """Mutations of messages not sent yet are written waiting, behind the due order, so a claim
    never walks past them (it did: 5,000 waiting made claiming 100 unkeyed rows ten times
    slower); the ack of each message makes its mutations due in the same transaction, the
    burial of one makes its mutation due to die ``target_dead``."""
    with engine.begin() as conn:
        messages = [enqueue(conn, "orders", "created", {"n": i}) for i in range(300)]
        updates = [mutations.update_message(conn, "orders", m, data="paid") for m in messages]
        later = [enqueue(conn, "orders", "later", {"n": i}) for i in range(5)]
        ids = dict(conn.execute(sa.select(T.c.event_id, T.c.id)).all())
    waiting = [ids[u] for u in updates]
    assert set(next_attempts(engine, waiting)) == {WAITING_FOR_KEY}
    token, leased = lease_all(engine)
    assert leased == [ids[m] for m in messages[:10]]
    # Two of the messages go out, one goes dead: exactly their mutations become due.
    recording = Recording(
        published=[Ack(leased[0]), Ack(leased[1])],
        buried=[Failure(leased[2], 413, "payload_too_large", "too large")],
        messages_gone=[(messages[0], "orders"), (messages[1], "orders"), (messages[2], "orders")],
    )
    call(engine, T, "events_record", token, recording)
    due = [
        u
        for u, at in zip(waiting, next_attempts(engine, waiting), strict=True)
        if at != WAITING_FOR_KEY
    ]
    assert due == waiting[:3]
    assert [ids[e] for e in later] == sorted(ids[e] for e in later)


@on_both
def test_skip_all_and_the_empty_list(engine, capsys):
    for key in ("x", "y"):
        bury_and_park(engine, keyed(engine, key, 2)[0])
    code, out = cli(capsys, "keys", "--skip-all")
    assert "2 key(s)" in out
    code, out = cli(capsys, "keys")
    assert (code, out.strip()) == (0, "0 parked key(s)")


@on_both
def test_a_mutation_waits_for_its_message_and_status_counts_it(engine, capsys):
    """A mutation of an event enqueued in the same transaction waits out of the claim's way
    while that event is unsent (``outbox status`` counts it, not as waiting for its key). An
    event that leaves the table some other way than an ack or a burial (by hand, here), or whose
    ack committed before the mutation did, leaves the mutation to the worker's upkeep, which
    makes it due."""
    with engine.begin() as conn:
        created = enqueue(conn, "orders", "created", {"n": 1})
        update = mutations.update_message(conn, "orders", created, data="paid")
        ids = dict(conn.execute(sa.select(T.c.event_id, T.c.id)).all())
    assert claim(engine) == [ids[created]]
    with engine.connect() as conn:
        assert admin.snapshot(conn, T).waiting_mutations == 1
    assert cli(capsys, "status")[0] == 0
    out = cli(capsys, "status")[1]
    assert "mutations waiting for their message: 1" in out
    with engine.connect() as conn:
        assert admin.snapshot(conn, T).waiting_for_key == 0
    assert next_attempts(engine, [ids[update]]) == [WAITING_FOR_KEY]
    set_row(engine, ids[created], status="published", message_serial="s-1")
    assert claim(engine) == []
    assert call(engine, T, "mutations_wake_stranded") == 1
    assert claim(engine) == [ids[update]]
    with engine.connect() as conn:
        assert admin.snapshot(conn, T).waiting_mutations == 0


def next_attempts(engine: sa.Engine, ids: list[int]) -> list[dt.datetime]:
    with engine.connect() as conn:
        found = dict(
            conn.execute(sa.select(T.c.id, T.c.next_attempt_at).where(T.c.id.in_(ids))).all()
        )
    return [found[i] for i in ids]


@on_both
def test_rows_behind_their_keys_head_wait_out_of_the_claims_way(engine, capsys):
    """Only a key's head is due; the rows behind it wait (whatever call enqueued them), and
    ``outbox status`` counts them."""
    a = keyed(engine, "k", 2)
    with engine.begin() as conn:
        enqueue_many(
            conn, [OutboxEvent("orders", "step", {"n": n}, ordering_key="j") for n in (0, 1)]
        )
        j = list(
            conn.execute(
                sa.select(T.c.id).where(T.c.ordering_key == "j").order_by(T.c.id)
            ).scalars()
        )
    due, behind = next_attempts(engine, [a[0], j[0]]), next_attempts(engine, [a[1], j[1]])
    assert all(t < WAITING_FOR_KEY for t in due)
    assert behind == [WAITING_FOR_KEY, WAITING_FOR_KEY]
    assert cli(capsys, "status")[0] == 0
    assert "waiting behind an earlier event of their key: 2" in cli(capsys, "status")[1]


@on_both
async def test_the_ack_of_a_head_makes_the_next_row_of_its_key_due(engine):
    """The recording that takes a head out (published, or dead and the key not parked) makes
    the next row due, in the same transaction; a stale worker's ack makes nothing due."""
    a = keyed(engine, "k", 3)
    hot = driver_for(engine, T)
    try:
        stale = await hot.events_record(
            uuid.uuid4(), Recording(published=[Ack(a[0])], heads_gone=["k"])
        )
        assert stale == 0 and next_attempts(engine, [a[1]]) == [WAITING_FOR_KEY]
        token = uuid.uuid4()
        assert [r.id for r in await hot.events_claim(10, 60, token)] == [a[0]]
        await hot.events_record(token, Recording(published=[Ack(a[0])], heads_gone=["k"]))
        following, last = next_attempts(engine, [a[1], a[2]])
        assert following < WAITING_FOR_KEY and last == WAITING_FOR_KEY
        token = uuid.uuid4()
        assert [r.id for r in await hot.events_claim(10, 60, token)] == [a[1]]
        failure = Failure(a[1], 413, "payload_too_large", "too large", charged=True)
        await hot.events_record(token, Recording(buried=[failure], park=[a[1]], heads_gone=["k"]))
        assert next_attempts(engine, [a[2]]) == [WAITING_FOR_KEY]  # parked: it waits
    finally:
        await hot.aclose()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_an_ack_waits_for_a_producer_of_its_key_so_the_new_row_is_not_stranded(engine):
    """The race on PostgreSQL: a producer enqueues behind a head while a worker acks that head.
    The producer holds the key's newest row (KEY SHARE) until it commits, so the ack's DELETE
    waits for it and its promotion then sees the new row: the row ends due, never stranded
    behind a head that is gone."""
    (head,) = keyed(engine, "k", 1)
    token = uuid.uuid4()
    assert [r.id for r in call(engine, T, "events_claim", 10, 60, token)] == [head]
    producer = engine.connect()
    transaction = producer.begin()
    event_id = enqueue(producer, "orders", "step", {"n": 1}, ordering_key="k")
    acked = threading.Event()

    def ack() -> None:
        recording = Recording(published=[Ack(head)], heads_gone=["k"])
        call(engine, T, "events_record", token, recording)
        acked.set()

    worker = threading.Thread(target=ack)
    worker.start()
    try:
        # The ack cannot finish while the producer's transaction is open, however long we wait.
        assert not acked.wait(0.5)
        transaction.commit()
        worker.join(timeout=30)
        assert acked.is_set()
    finally:
        producer.close()
    with engine.connect() as conn:
        new = conn.execute(sa.select(T.c.next_attempt_at).where(T.c.event_id == event_id))
        assert new.scalar_one() < WAITING_FOR_KEY


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_producer_never_waits_for_an_ack_in_progress(engine):
    """The other order of the same race: the ack has deleted the head and not committed yet.
    The producer does not wait for the worker (the two could otherwise deadlock across keys):
    its row goes in due, so it is claimed as soon as the head is gone, in order."""
    (head,) = keyed(engine, "k", 1)
    token = uuid.uuid4()
    assert [r.id for r in call(engine, T, "events_claim", 10, 60, token)] == [head]
    driver = driver_for(engine, T)
    with engine.connect() as worker:
        transaction = worker.begin()
        # The recording's steps, held open after the head is deleted.
        run_step(worker, driver, "lock_leaving", {"ids": [head], "token": token})
        assert run_step(worker, driver, "publish", _publish_params(token, [Ack(head)])) == 1
        run_step(worker, driver, "promote", _promote_params(["k"]))
        done = threading.Event()

        def produce() -> None:
            with engine.begin() as conn:
                enqueue(conn, "orders", "step", {"n": 1}, ordering_key="k")
            done.set()

        producer = threading.Thread(target=produce)
        producer.start()
        producer.join(timeout=30)
        assert done.is_set()  # returned while the ack was still open
        transaction.commit()
    (new,) = keyed_rows(engine, "k")
    assert new.next_attempt_at < WAITING_FOR_KEY
    assert claim(engine) == [new.id]


def keyed_rows(engine: sa.Engine, key: str) -> list[sa.Row]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(T).where(T.c.ordering_key == key).order_by(T.c.id)))


@on_both
def test_the_parked_keys_gauge_reads_the_snapshot(engine):
    """``outbox_parked_keys`` is what the worker's snapshot counts in the parked table."""
    bury_and_park(engine, keyed(engine, "k", 2)[0])
    with engine.connect() as conn:
        report = admin.snapshot(conn, T, published=False)
    registry = prometheus_client.CollectorRegistry()
    registry.register(_StateCollector(T.name, lambda: report, lambda: 0, lambda: 0))
    assert registry.get_sample_value("outbox_parked_keys", {"table": T.name}) == 1


@on_both
def test_outbox_keys_says_how_long_ago_a_key_was_parked(engine, capsys):
    """``outbox keys`` shows an age against the database's clock (``parked 3 min 0 s ago``),
    not a timestamp to the microsecond; ``--json`` keeps the time, in ISO 8601."""
    a = keyed(engine, "k", 2)
    bury_and_park(engine, a[0])
    parked_at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=3)  # the database's clock too
    with engine.begin() as conn:
        conn.execute(sa.update(PARKED).values(parked_at=parked_at))
    code, out = cli(capsys, "keys")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("  'k'"))
    assert re.search(r", parked 3 min \d+ s ago: payload_too_large payload too large$", line), line
    assert not re.search(r"\d\d:\d\d:\d\d", out), out  # no clock time at all
    report = json.loads(cli(capsys, "keys", "--json")[1])
    shown = dt.datetime.fromisoformat(report["keys"][0]["parked_at"])
    assert abs(shown - parked_at) < dt.timedelta(milliseconds=1)

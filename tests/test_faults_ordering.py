"""Ordering keys under a SIGKILL storm: two ``python worker.py`` processes killed 22 times in all.

Several producer threads commit keyed events (60 keys, ``ordering_key=f"k{n}"``) and unkeyed ones
in transactions of their own, more than one producer writing to the same key, while two workers
drain the table and are SIGKILLed (and restarted) one after the other. The order to hold is the
order the producers committed in, witnessed by the application itself: in the transaction that
enqueues an event, the producer bumps a per-key counter row (``app_key_counter``), so the value it
reads is the event's place in its key's commit order (a second transaction on the key waits for
that row until the first ends). Each event's data carries a unique token; the producer keeps
token -> (key, place) for what it committed.

Against the Sockudo-faithful test server (idempotency on) the server's delivery log is the truth:
per key the places arrive as exactly 1, 2, ..., N. Against real soketi (no idempotency, so a head
whose worker was killed before its ack is sent again) a WebSocket subscriber sees every place at
least once, first occurrences in order, and a repeat only of the latest place delivered (the head
is the only row of its key in flight). Unkeyed events arrive exactly once (test server) or at
least once (soketi) in both.

Run alone: ``pytest tests/test_faults_ordering.py -m faults -s``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa

from outbox import enqueue
from outbox.database import create_engine
from outbox.testing.pusher_ws import PusherSubscriber
from outbox.testing.server import TestServerProcess
from outbox.testing.soketi import SoketiServer
from outbox.testing.worker_process import WorkerProcess
from tests.faultlib import (
    REPO,
    Results,
    report_summary,
    settled,
    spawning,
    worker_config,
)
from tests.helpers.producers import Producer
from tests.helpers.waiting import wait_until
from tests.outbox_rows import EV

pytestmark = pytest.mark.faults

SEED = int(os.environ.get("OUTBOX_FAULTS_SEED", str(int(time.time()))))
#: Long enough that no re-send in this module arrives after the server's idempotency window.
IDEMPOTENCY_TTL = 900

KEYS = [f"k{n}" for n in range(60)]
#: A key's events all go to one channel; the keys are spread over four.
KEYED_CHANNELS = [f"ordered-{n}" for n in range(4)]
UNKEYED_CHANNEL = "unordered"
#: Committed before the workers start: a backlog on every key.
UPFRONT_PER_KEY = 3
UPFRONT_UNKEYED = 100
PRODUCERS = 4
#: Transactions per producer during the storm (1-3 keys each, 1-2 events per key, 0-2 unkeyed).
TRANSACTIONS = 50
KILLS = 22


def channel_of(key: str) -> str:
    return KEYED_CHANNELS[int(key[1:]) % len(KEYED_CHANNELS)]


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ordering_results(request: pytest.FixtureRequest) -> Iterator[Results]:
    """One row per storm; printed as a table (and written as JSON) when the module ends."""
    results = Results()
    yield results
    report_summary(
        request, results, "Ordered kill storm summary", "faults-ordering-summary.json", SEED
    )


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """``spawn_worker(config, name)`` starts a worker process (``python worker.py``, as the image
    runs it); every one still alive at the end is killed. (``spawn`` starts any command.)"""
    with spawning(tmp_path, command=[sys.executable, "worker.py"], cwd=REPO) as start:
        yield start


# -- producers ---------------------------------------------------------------------------------


@dataclass
class Committed:
    """What the producers committed: token -> (key, place in the key's commit order)."""

    keyed: dict[str, tuple[str, int]] = field(default_factory=dict)
    unkeyed: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, keyed: list[tuple[str, str, int]], unkeyed: list[str]) -> None:
        with self.lock:
            self.keyed.update((token, (key, place)) for token, key, place in keyed)
            self.unkeyed.update(unkeyed)

    def per_key(self) -> dict[str, list[int]]:
        """Each key's places, sorted (1..N when the counter did its job)."""
        places: dict[str, list[int]] = defaultdict(list)
        for key, place in self.keyed.values():
            places[key].append(place)
        return {key: sorted(p) for key, p in places.items()}


def _create_app_tables(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE app_key_counter "
                "(ordering_key VARCHAR(20) PRIMARY KEY, n INTEGER NOT NULL)"
            )
        )
        conn.execute(
            sa.text("INSERT INTO app_key_counter (ordering_key, n) VALUES (:k, 0)"),
            [{"k": key} for key in KEYS],
        )


def _commit(
    engine: sa.Engine,
    committed: Committed,
    prefix: str,
    keyed: list[tuple[str, int]],
    unkeyed: int,
) -> None:
    """One application transaction: ``keyed`` is (key, events) in lock order, then ``unkeyed``
    events without a key. Each keyed event bumps its key's counter after it is enqueued."""
    made_keyed: list[tuple[str, str, int]] = []
    made_unkeyed: list[str] = []
    with engine.begin() as conn:
        for key, count in keyed:
            for _ in range(count):
                token = f"{prefix}-{len(made_keyed)}"
                enqueue(conn, channel_of(key), "step", {"t": token}, ordering_key=key)
                conn.execute(
                    sa.text("UPDATE app_key_counter SET n = n + 1 WHERE ordering_key = :k"),
                    {"k": key},
                )
                place = conn.execute(
                    sa.text("SELECT n FROM app_key_counter WHERE ordering_key = :k"), {"k": key}
                ).scalar_one()
                made_keyed.append((token, key, int(place)))
        for n in range(unkeyed):
            token = f"{prefix}-u{n}"
            enqueue(conn, UNKEYED_CHANNEL, "plain", {"t": token})
            made_unkeyed.append(token)
    committed.add(made_keyed, made_unkeyed)


#: A producer transaction PostgreSQL aborted as deadlocked is run again, up to this many times.
#: Our producers take their keys in one order, so they never deadlock each other, and the
#: advisory lock of a key is mixed with its table's OID, so producers of another test's table on
#: the same database share none of their locks short of a 64-bit hash collision (the retry stays
#: for that).
DEADLOCK_RETRIES = 4


def _producer(engine: sa.Engine, committed: Committed, index: int, seed: str) -> Producer:
    """Commits ``TRANSACTIONS`` small transactions on random keys (shared with the other
    producers), keys taken in one global order so that two producers never deadlock.

    Each transaction is drawn from a seed of its own, so that one run again after a deadlock is
    the same transaction."""

    def transaction(number: int) -> None:
        rng = random.Random(f"{seed}-producer-{index}-{number}")
        keys = sorted(rng.sample(KEYS, rng.randint(1, 3)))
        plan = [(key, rng.choice((1, 1, 2))) for key in keys]
        unkeyed = rng.choice((0, 1, 1, 2))
        _commit(engine, committed, f"p{index}-{number}", plan, unkeyed)

    pauses = random.Random(f"{seed}-producer-{index}-pauses")
    return Producer(
        transaction,
        transactions=TRANSACTIONS,
        pause=lambda: pauses.uniform(0.05, 0.3),
        deadlock_retries=DEADLOCK_RETRIES,
        name=f"producer-{index}",
    )


# -- the storm ---------------------------------------------------------------------------------


@dataclass
class Storm:
    committed: Committed
    kills: int
    workers: list[WorkerProcess]
    exit_codes: list[int]
    #: Keyed rows claimed more than once (their first claim ended without an ack).
    reclaimed_keyed: int
    dead: int
    #: Producer transactions run again after PostgreSQL aborted them as deadlocked.
    deadlocks: int
    statuses: Counter[str]


def _keyed_in_flight(engine: sa.Engine) -> bool:
    with engine.connect() as conn:
        query = sa.select(EV.c.id).where(EV.c.status == "in_flight", EV.c.ordering_key.is_not(None))
        return conn.execute(query.limit(1)).first() is not None


def _storm(
    engine: sa.Engine,
    database_url: str,
    sockudo_url: str,
    spawn_worker: Callable[..., WorkerProcess],
    seed: str,
    **settings: object,
) -> Storm:
    """Backlog, then producers and two workers killed ``KILLS`` times in turn (each restarted at
    once); then the last two workers drain everything and stop on SIGTERM."""
    rng = random.Random(seed)
    committed = Committed()
    _create_app_tables(engine)
    _commit(engine, committed, "up", [(key, UPFRONT_PER_KEY) for key in sorted(KEYS)], 0)
    _commit(engine, committed, "up", [], UPFRONT_UNKEYED)
    env = worker_config(
        database_url,
        sockudo_url,
        lease_seconds=2,
        request_timeout=1,
        in_flight=2,
        **settings,
    )
    producers = [_producer(engine, committed, i, seed) for i in range(PRODUCERS)]
    kills = 0
    try:
        workers = [spawn_worker(env, f"w{slot}-00") for slot in range(2)]
        for producer in producers:
            producer.start()
        for i in range(KILLS):
            slot = i % 2
            victim = workers[slot]
            victim.wait_until_started(60)
            time.sleep(rng.uniform(0.1, 0.4))
            # Then the first moment a keyed head is leased (by either worker), within a second:
            # a kill then often leaves a head published but unacknowledged.
            deadline = time.monotonic() + 1.0
            while not _keyed_in_flight(engine) and time.monotonic() < deadline:
                time.sleep(0.005)
            assert victim.alive, (
                f"worker {victim.log_path.name} died on its own:\n" + (victim.log_text()[-3000:])
            )
            victim.kill()
            kills += 1
            workers[slot] = spawn_worker(env, f"w{slot}-{i // 2 + 1:02d}")
        for producer in producers:
            producer.join(timeout=120)
        for producer in producers:
            assert not producer.errors, f"{producer.name} failed: {producer.errors[0]!r}"
            assert not producer.is_alive(), f"{producer.name} did not finish"
        for worker in workers:  # SIGTERM before its handler is installed would kill it
            worker.wait_until_started(60)
        expected = len(committed.keyed) + len(committed.unkeyed)
        wait_until(
            lambda: settled(engine, expected),
            f"all {expected} rows settled",
            timeout=120,
            interval=0.3,
        )
        exit_codes = [worker.terminate() for worker in workers]
    finally:
        for producer in producers:
            producer.stop()
    with engine.connect() as conn:
        rows = conn.execute(sa.select(EV.c.status, EV.c.attempts, EV.c.ordering_key)).all()
    return Storm(
        committed=committed,
        kills=kills,
        workers=workers,
        exit_codes=exit_codes,
        reclaimed_keyed=sum(1 for r in rows if r.ordering_key is not None and r.attempts > 1),
        dead=sum(1 for r in rows if r.status == "dead"),
        deadlocks=sum(producer.deadlocks for producer in producers),
        statuses=Counter(r.status for r in rows),
    )


def _storm_notes(storm: Storm, committed: Committed) -> str:
    return (
        f"{len(committed.keyed)} keyed on {len(KEYS)} keys + {len(committed.unkeyed)} unkeyed; "
        f"{storm.reclaimed_keyed} keyed rows claimed more than once; "
        f"{storm.deadlocks} producer transactions retried after a deadlock"
    )


def _assert_storm(storm: Storm) -> None:
    """What every storm must have done, whatever the server."""
    committed = storm.committed
    assert storm.kills >= 20
    assert storm.exit_codes == [0, 0], "the last two workers must drain and exit 0 on SIGTERM"
    per_key = committed.per_key()
    assert set(per_key) == set(KEYS)
    # The application's counter is a faithful witness: each key's places are 1..N.
    assert all(places == list(range(1, len(places) + 1)) for places in per_key.values())
    assert len(committed.keyed) >= len(KEYS) * 5
    assert storm.statuses == Counter({"published": len(committed.keyed) + len(committed.unkeyed)})
    assert storm.reclaimed_keyed > 0, "no kill caught a keyed head in flight: nothing was tested"


def _received_by_key(
    committed: Committed, tokens: list[tuple[str, str]]
) -> tuple[dict[str, list[int]], Counter[str], list[str]]:
    """(channel, token) as received -> each key's places in arrival order, the unkeyed tokens
    counted, and anything that nobody committed (or that arrived on the wrong channel)."""
    places: dict[str, list[int]] = defaultdict(list)
    unkeyed: Counter[str] = Counter()
    phantom = []
    for channel, token in tokens:
        if token in committed.keyed:
            key, place = committed.keyed[token]
            if channel != channel_of(key):
                phantom.append(f"{token} on {channel}")
            places[key].append(place)
        elif token in committed.unkeyed and channel == UNKEYED_CHANNEL:
            unkeyed[token] += 1
        else:
            phantom.append(f"{token} on {channel}")
    return places, unkeyed, phantom


def order_violations(received: dict[str, list[int]], expected: dict[str, int]) -> list[str]:
    """At least once and never out of order, per key: each arrival is either the next place
    (latest + 1) or a repeat of the latest one; and the last place arrived."""
    problems = []
    for key, last in expected.items():
        latest = 0
        for position, place in enumerate(received.get(key, [])):
            if place == latest + 1:
                latest = place
            elif place != latest:
                problems.append(
                    f"{key}: arrival #{position} is place {place} after place {latest} "
                    f"(arrivals {received[key]})"
                )
                break
        else:
            if latest != last:
                problems.append(f"{key}: places {latest + 1}..{last} never arrived")
    return problems


def test_order_violations_allow_only_a_repeat_of_the_latest_place() -> None:
    """The soketi check itself: in order with repeats of the latest place passes; a gap, a
    regression to an earlier place after a later one, or a missing tail is reported."""
    assert order_violations({"a": [1, 2, 2, 3], "b": [1, 1]}, {"a": 3, "b": 1}) == []
    assert order_violations({"a": [1, 3, 2]}, {"a": 3}) == [
        "a: arrival #1 is place 3 after place 1 (arrivals [1, 3, 2])"
    ]
    assert order_violations({"a": [1, 2, 1, 3]}, {"a": 3}) == [
        "a: arrival #2 is place 1 after place 2 (arrivals [1, 2, 1, 3])"
    ]
    assert order_violations({"a": [1]}, {"a": 3, "b": 1}) == [
        "a: places 2..3 never arrived",
        "b: places 1..1 never arrived",
    ]


# -- 1. test server, idempotency on: exactly once, in order ------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_ordered_kill_storm_exactly_once_in_order(
    backend: str,
    database_url: str,
    tmp_path: Path,
    spawn_worker: Callable[..., WorkerProcess],
    ordering_results: Results,
) -> None:
    """22 SIGKILLs over two workers while four producers commit keyed events on 60 shared keys
    (and unkeyed ones): the test server (idempotency on) broadcasts every event exactly once, and
    per key in exactly the order the producers committed (places 1, 2, ..., N by delivery seq);
    every unkeyed event exactly once too."""
    started = time.monotonic()
    engine = create_engine(database_url)
    try:
        with TestServerProcess(
            stderr=tmp_path / "server.err", idempotency_ttl=IDEMPOTENCY_TTL
        ) as server:
            # Batches are answered 80 ms after they are published: a kill in that window leaves
            # published heads unacknowledged, so they are sent again after their lease.
            server.add_latency(0.08, stage="published", endpoints=("batch_events",))
            storm = _storm(
                engine,
                database_url,
                server.url,
                spawn_worker,
                f"{SEED}-{backend}-server",
                batch_size=20,
            )
            deliveries = sorted(server.deliveries(), key=lambda d: d.seq)
            server_duplicates = server.duplicates()
    finally:
        engine.dispose()

    committed = storm.committed
    received, unkeyed, phantom = _received_by_key(
        committed, [(d.channel, json.loads(d.data)["t"]) for d in deliveries]
    )
    expected = {key: len(places) for key, places in committed.per_key().items()}
    out_of_order = {
        key: got for key, got in received.items() if got != list(range(1, expected[key] + 1))
    }
    ordering_results.add(
        scenario="ordered storm (test server)",
        backend=backend,
        events=len(deliveries),
        kills=storm.kills,
        lost=sum(expected.values()) - sum(len(set(p)) for p in received.values()),
        duplicates=len(server_duplicates),
        dead=storm.dead,
        duration_s=time.monotonic() - started,
        notes=_storm_notes(storm, committed),
    )
    _assert_storm(storm)
    assert not phantom, phantom[:10]
    assert server_duplicates == {}, f"subscriber-visible duplicates: {server_duplicates}"
    assert not out_of_order, "keys not delivered exactly as 1..N: " + "; ".join(
        f"{key}: {got}" for key, got in list(out_of_order.items())[:5]
    )
    assert set(received) == set(KEYS)
    assert unkeyed == Counter(dict.fromkeys(committed.unkeyed, 1))


# -- 2. real soketi: at least once, never out of order -----------------------------------------


@pytest.mark.soketi
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
async def test_ordered_kill_storm_soketi_at_least_once_in_order(
    backend: str,
    database_url: str,
    soketi: SoketiServer,
    tmp_path: Path,
    spawn_worker: Callable[..., WorkerProcess],
    ordering_results: Results,
) -> None:
    """The same storm against real soketi (no idempotency): a WebSocket subscriber receives every
    committed event at least once; per key the first arrivals follow commit order with no gap,
    and a repeat is only ever of the latest place delivered (a head re-sent after its worker was
    killed), never an earlier one after a later one; every unkeyed event arrives at least once."""
    started = time.monotonic()
    engine = create_engine(database_url)
    sub = PusherSubscriber(soketi.ws_url())
    try:
        await sub.connect()
        for channel in [*KEYED_CHANNELS, UNKEYED_CHANNEL]:
            await sub.subscribe(channel)
        storm = await asyncio.to_thread(
            _storm,
            engine,
            database_url,
            soketi.url,
            spawn_worker,
            f"{SEED}-{backend}-soketi",
            server_batch_limit=soketi.max_batch_size,
            batch_size=20,
        )
        committed = storm.committed
        everything = set(committed.keyed) | committed.unkeyed

        def arrived() -> set[str]:
            return {
                json.loads(e.data)["t"]
                for channel in [*KEYED_CHANNELS, UNKEYED_CHANNEL]
                for e in sub.events[channel]
            }

        deadline = time.monotonic() + 30
        while not everything <= arrived() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        # Every worker has stopped: a late duplicate would show up in this quiet second.
        await asyncio.sleep(1.0)
        arrivals = [
            (channel, json.loads(e.data)["t"])
            for channel in [*KEYED_CHANNELS, UNKEYED_CHANNEL]
            for e in sub.events[channel]
        ]
        errors = list(sub.errors)
    finally:
        await sub.close()
        engine.dispose()

    received, unkeyed, phantom = _received_by_key(committed, arrivals)
    expected = {key: len(places) for key, places in committed.per_key().items()}
    problems = order_violations(received, expected)
    repeats = sum(len(p) - len(set(p)) for p in received.values()) + sum(
        n - 1 for n in unkeyed.values()
    )
    ordering_results.add(
        scenario="ordered storm (soketi)",
        backend=backend,
        events=len(arrivals),
        kills=storm.kills,
        lost=len(everything) - len({token for _, token in arrivals}),
        duplicates=repeats,
        dead=storm.dead,
        duration_s=time.monotonic() - started,
        notes=_storm_notes(storm, committed),
    )
    _assert_storm(storm)
    assert errors == []
    assert not phantom, phantom[:10]
    assert not problems, "\n".join(problems[:10])
    assert set(unkeyed) == committed.unkeyed, "unkeyed events lost"

"""The model test: random interleavings of every feature against the real database and the
worker's own statements, checked after each step against a small model of what must be true.

Each feature has its own tests; the defects left live where two meet. Here Hypothesis'
rule-based state machine drives random sequences of five kinds of step:

* **enqueue**: a transaction that commits or rolls back, with unkeyed, keyed, ``BY_CHANNEL`` and
  multi-channel events and mutations (update, append) of earlier or same-transaction events,
  named by event id or, once published, by serial;
* **claim**: one of two workers leases what is due;
* **publish**: a claim goes out with an outcome (accepted, refused, 5xx, 429, the connection
  dropped, the answer lost after publishing, a batch refused at item i) and its outcome is
  recorded, or its worker is killed before it records;
* **time**: leases run out (takeover), retries come due, upkeep clears expired leases, the server
  forgets the idempotency keys it saw;
* **operate**: ``outbox replay`` of a dead or published row (fresh or kept key), ``outbox keys
  --skip-all``, retention.

The workers are :class:`~outbox.worker.Worker` objects as ``outbox worker`` builds them (their
claim, delivery, plan and recording), each dead-head policy in turn; the server is the
Sockudo-faithful test server with history and versioned messages on.

After every step: nothing committed is lost and nothing rolled back appears; each row is in
exactly one table; at most one event of a key is in flight; a key's events are claimed in commit
order (a replayed event joins the back of its key's line, except the key's parked head, which
takes its place in front again); a mutation is claimed only once its message left the queue; a
row held out of the claim's way has something to wait for; dead rows say why, and only for a
reason the run caused. At the end of each run the queue is drained: everything is published or
dead (or held behind a parked key), every published event was delivered, exactly once unless the
server was made to forget its keys, and every published mutation went to its message's serial.

Budget: ``OUTBOX_MODEL_EXAMPLES`` runs (200 on SQLite, 60 on the servers) from the seed
``OUTBOX_MODEL_SEED`` (a fixed one by default, so a run is repeatable; ``random`` explores); a
failure prints the shortest sequence of steps Hypothesis found and the seed that finds it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import hypothesis.strategies as st
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, seed, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    get_state_machine_test,
    initialize,
    invariant,
    precondition,
    rule,
)

from outbox import BY_CHANNEL, admin, enqueue, outbox_table
from outbox.database import create_engine
from outbox.delivery import Deliverer
from outbox.mutations import append_message, update_message
from outbox.schema import WAITING_FOR_KEY, dead_table, parked_table, published_table
from outbox.sockudo import AsyncSockudo
from outbox.testing.server import TestServer
from outbox.worker import Worker
from tests.test_worker import fast_settings

T = outbox_table()
DEAD, LOG, PARKED = dead_table(T), published_table(T), parked_table(T)
TABLES = {"hot": T, "dead": DEAD, "published": LOG}

CHANNELS = ("orders", "audit")
KEYS = ("k1", "k2")
LEASE = 60.0
#: The codes of the refusals a run injects (see ``publish``).
REFUSALS = {"invalid_input", "payload_too_large"}
DEFAULT_SEED = 20261207
OUTCOMES = ("ok", "ok", "5xx", "429", "dropped", "lost", "refused", "item_refused", "killed")

#: (event_id, channel): one row, whatever table holds it.
Identity = tuple[uuid.UUID, str]


def _examples(backend: str) -> int:
    raw = os.environ.get("OUTBOX_MODEL_EXAMPLES")
    return int(raw) if raw else (200 if backend == "sqlite" else 60)


def _seed() -> int:
    raw = os.environ.get("OUTBOX_MODEL_SEED", "")
    if raw == "random":
        return random.randrange(2**32)
    return int(raw) if raw else DEFAULT_SEED


# -- what the model knows -------------------------------------------------------------------------


@dataclass
class Row:
    """One committed row."""

    identity: Identity
    #: The line it waits in: its ordering key, or ("message", target) for a mutation.
    line: Any
    target: Identity | None = None
    #: A refusal was injected while it was claimed: it may be dead for that reason.
    refusable: bool = False
    #: Retention deleted it from the published log.
    trimmed: bool = False
    #: A mutation naming its message by serial (not by the event that publishes it).
    by_serial: bool = False
    #: Replayed at least once (a published message replayed is a new message, a new serial).
    replayed: bool = False


@dataclass
class Claim:
    worker: int
    token: uuid.UUID
    rows: list[Any]
    #: Its lease was made to expire: another worker may take its rows over.
    stale: bool = False

    def identities(self) -> list[Identity]:
        return [(r.event_id, r.channel) for r in self.rows]


@dataclass
class World:
    """What the database holds, read once per step: each row's table and columns."""

    where: dict[Identity, str] = field(default_factory=dict)
    rows: dict[Identity, Any] = field(default_factory=dict)
    parked: dict[str, int] = field(default_factory=dict)
    #: Rows read over the three tables (more than ``where`` holds if one is in two tables).
    count: int = 0

    def table_of(self, identity: Identity) -> str | None:
        return self.where.get(identity)

    def hot(self) -> list[Any]:
        return [r for i, r in self.rows.items() if self.where[i] == "hot"]


@dataclass
class Context:
    """What outlives one run of the machine: the database, the server, the event loop."""

    backend: str
    database_url: str
    engine: sa.Engine
    server: TestServer
    loop: asyncio.AbstractEventLoop
    #: Whether the database takes ordering keys and mutations (not MariaDB yet).
    keyed: bool

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)


class ModelClock:
    """The breakers' clock: time passes when the model says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class KilledBeforeRecord(Exception):
    """The worker died after publishing, before its outcome was written."""


class Killable:
    """Makes a worker's driver's next ``events_record`` die (the process killed). Patched on the
    driver itself, which the worker's claim loop and its claims' recording share."""

    def __init__(self, driver: Any) -> None:
        self.kill_next_record = False
        self._record = driver.events_record
        driver.events_record = self.record

    async def record(self, *args: Any) -> Any:
        if self.kill_next_record:
            self.kill_next_record = False
            raise KilledBeforeRecord
        return await self._record(*args)


# -- the machine ----------------------------------------------------------------------------------


class OutboxMachine(RuleBasedStateMachine):
    context: Context  # set by the test before a run

    def __init__(self) -> None:
        super().__init__()
        ctx = self.context
        self.ctx, self.engine, self.server = ctx, ctx.engine, ctx.server
        self.rows: dict[Identity, Row] = {}
        self.lines: dict[Any, list[Identity]] = {}
        self.claims: list[Claim] = []
        self.publish_events: list[Identity] = []
        self.server_forgot = False
        self.workers: list[Worker] = []
        self.killables: list[Killable] = []
        self.deliverers: list[Deliverer] = []
        self.clients: list[AsyncSockudo] = []
        self.clock = ModelClock()
        with self.engine.begin() as conn:
            for table in (PARKED, T, DEAD, LOG):
                conn.execute(sa.delete(table))
        self.server.reset()

    @initialize(policy=st.sampled_from(["park", "skip"]))
    def start_workers(self, policy: str) -> None:
        settings_ = fast_settings(
            self.ctx.database_url,
            self.server.url,
            dead_head=policy,
            lease_seconds=LEASE,
            request_timeout=5.0,
            max_attempts=1_000_000,
            max_age_seconds=10 * 365 * 24 * 3600.0,
            # A run depends only on its steps, so Hypothesis can replay and shrink it: nothing
            # comes due by the wall clock (retries wait for a "time" step), and the rows a claim
            # sends alone go one after another (a fault armed for "the next request" meets the
            # same row every time).
            backoff_min_seconds=1000.0,
            backoff_max_seconds=3000.0,
            alone_concurrency=1,
        )
        for _ in range(2):
            worker = Worker(settings_, engine=self.engine, clock=self.clock)
            self.killables.append(Killable(worker.driver))
            client = worker.new_client()
            self.workers.append(worker)
            self.clients.append(client)
            self.deliverers.append(worker.deliverer(client))

    def teardown(self) -> None:
        try:
            if self.workers:
                self._drain()
                self._check_drained(self._read())
        finally:
            for worker, client in zip(self.workers, self.clients, strict=True):
                self.ctx.run(worker.driver.aclose())
                self.ctx.run(client.aclose())
            self.server.clear_faults()

    # -- enqueue ------------------------------------------------------------------------------

    @rule(
        kinds=st.lists(
            st.sampled_from(["plain", "keyed", "by_channel", "multi", "mutation"]),
            min_size=1,
            max_size=4,
        ),
        keys=st.lists(st.sampled_from(KEYS), min_size=4, max_size=4),
        commit=st.sampled_from([True, True, True, False]),
        data=st.data(),
    )
    def enqueue(self, kinds: list[str], keys: list[str], commit: bool, data: Any) -> None:
        """One transaction enqueuing a few events and mutations, then committing or not."""
        added: list[Row] = []
        with self.engine.connect() as conn, conn.begin() as tx:
            for kind, key in zip(kinds, keys, strict=False):
                if kind in ("keyed", "by_channel", "mutation") and not self.ctx.keyed:
                    kind = "plain"
                if kind == "mutation":
                    added += self._enqueue_mutation(conn, added, data)
                    continue
                channels = list(CHANNELS) if kind in ("multi", "by_channel") else [CHANNELS[0]]
                ordering: Any = {"keyed": key, "by_channel": BY_CHANNEL}.get(kind)
                event_id = enqueue(
                    conn, channels, "e", {"n": len(self.rows)}, ordering_key=ordering
                )
                for channel in channels:
                    added.append(
                        Row((event_id, channel), channel if kind == "by_channel" else ordering)
                    )
            if not commit:
                tx.rollback()
                return
        for row in added:
            self.rows[row.identity] = row
            if row.line is not None:
                self.lines.setdefault(row.line, []).append(row.identity)
            if row.target is None:
                self.publish_events.append(row.identity)

    def _enqueue_mutation(self, conn: sa.Connection, added: list[Row], data: Any) -> list[Row]:
        candidates = self.publish_events + [r.identity for r in added if r.target is None]
        if not candidates:
            return []
        target = data.draw(st.sampled_from(candidates), label="message")
        message: Any = target[0]
        if data.draw(st.booleans(), label="by serial"):
            serial = conn.execute(
                sa.select(LOG.c.message_serial).where(
                    LOG.c.event_id == target[0], LOG.c.channel == target[1]
                )
            ).scalar()
            if serial is None:
                return []
            message = serial
        if data.draw(st.booleans(), label="append"):
            event_id = append_message(conn, target[1], message, "+")
        else:
            event_id = update_message(conn, target[1], message, data=uuid.uuid4().hex)
        by_serial = isinstance(message, str)
        return [Row((event_id, target[1]), ("message", target), target=target, by_serial=by_serial)]

    # -- the workers --------------------------------------------------------------------------

    @rule(
        worker=st.integers(0, 1),
        limit=st.sampled_from([1, 3, 10]),
        outcome=st.sampled_from([None, *OUTCOMES]),
        index=st.integers(0, 9),
    )
    def claim(self, worker: int, limit: int, outcome: str | None, index: int) -> None:
        """A worker leases what is due; with an ``outcome``, it publishes it at once."""
        token = uuid.uuid4()
        rows = self.ctx.run(self.workers[worker].driver.events_claim(limit, LEASE, token))
        if not rows:
            return
        claim = Claim(worker, token, rows)
        self._check_claim(claim, self._read())
        self.claims.append(claim)
        if outcome is not None:
            self._publish(claim, outcome, index)

    @precondition(lambda self: self.claims)
    @rule(data=st.data(), outcome=st.sampled_from(OUTCOMES), index=st.integers(0, 9))
    def publish(self, data: Any, outcome: str, index: int) -> None:
        """A claim taken earlier goes out now (possibly after others, or after a takeover)."""
        self._publish(data.draw(st.sampled_from(self.claims), label="claim"), outcome, index)

    def _publish(self, claim: Claim, outcome: str, index: int) -> None:
        """``claim`` published by its worker with ``outcome`` (faults armed for its first
        request) and its outcome recorded, unless the worker is killed before it records."""
        self.claims.remove(claim)
        worker, server = self.workers[claim.worker], self.server
        if outcome == "5xx":
            server.fail_next(status=503, code="internal_error", stage="claimed")
        elif outcome == "429":
            server.fail_next(status=429, code="rate_limited", retry_after=1, stage="received")
        elif outcome == "dropped":
            server.drop_next(stage="received")
        elif outcome == "lost":
            server.drop_next(stage="published")
        elif outcome == "refused":
            server.fail_next(status=400, code="invalid_input", stage="received")
        elif outcome == "item_refused":
            server.fail_batch_item(index % len(claim.rows))
        if outcome in ("refused", "item_refused"):
            for identity in claim.identities():
                self.rows[identity].refusable = True
        killable = self.killables[claim.worker]
        killable.kill_next_record = outcome == "killed"
        deliverer = self.deliverers[claim.worker]
        try:
            self.ctx.run(worker.claims.deliver(deliverer, claim.token, claim.rows))
        except KilledBeforeRecord:
            claim.stale = True  # its rows stay leased by a dead worker until the lease expires
            self.claims.append(claim)
        finally:
            killable.kill_next_record = False
            server.clear_faults()

    @rule(
        what=st.sampled_from(["retries due", "retries due", "leases expire", "reclaim", "forget"])
    )
    def time(self, what: str) -> None:
        """Time passes: retries come due (and the breakers' pauses end), leases run out (their
        workers stalled or died), upkeep clears expired leases, or the server forgets its keys
        (its idempotency window passed)."""
        now = dt.datetime.now(dt.UTC)
        # A second back: a database clock coarser than Python's (SQLite's milliseconds) must see
        # the time as past at once, whatever the timing of the run.
        past = now - dt.timedelta(seconds=1)
        if what == "retries due":
            with self.engine.begin() as conn:
                conn.execute(
                    sa.update(T)
                    .where(T.c.next_attempt_at > past, T.c.next_attempt_at < WAITING_FOR_KEY)
                    .values(next_attempt_at=past)
                )
            self.clock.now += 1e6
        elif what == "leases expire":
            with self.engine.begin() as conn:
                conn.execute(
                    sa.update(T).where(T.c.lease_token.is_not(None)).values(lease_expires_at=past)
                )
            for claim in self.claims:
                claim.stale = True
        elif what == "reclaim":
            self.ctx.run(self.workers[0].maintenance.reclaim_expired())
        else:
            app = self.server.app
            for cache in (app.keys, app.batch_keys, app.ledger):
                cache.clear()
            self.server_forgot = True

    # -- operators ----------------------------------------------------------------------------

    @rule(
        what=st.sampled_from(["replay dead", "replay dead", "replay published", "skip", "trim"]),
        fresh=st.booleans(),
        data=st.data(),
    )
    def operate(self, what: str, fresh: bool, data: Any) -> None:
        """An operator replays one dead or published row (``outbox replay ID``, fresh or kept
        key), skips every parked key (``outbox keys --skip-all``), or retention trims the
        published log (everything in it is older than the cutoff)."""
        if what == "skip":
            with self.engine.begin() as conn:
                admin.skip_parked(conn, T, None)
        elif what == "trim":
            world = self._read()
            cutoff = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
            self.ctx.run(self.workers[0].driver.published_delete_before(cutoff, 10_000))
            for identity, table in world.where.items():
                if table == "published":
                    self.rows[identity].trimmed = True
        else:
            self._replay("dead" if what == "replay dead" else "published", fresh, data)

    def _replay(self, source: str, fresh: bool, data: Any) -> None:
        before = self._read()
        choices = sorted(i for i, table in before.where.items() if table == source)
        if not choices:
            return
        identity = data.draw(st.sampled_from(choices), label=f"{source} row")
        row_id = before.rows[identity].id
        parked_head = row_id in before.parked.values()
        with self.engine.begin() as conn:
            moved = admin.replay(
                conn,
                T,
                admin.ReplayFilter(statuses=[source], ids=[row_id]),
                key=admin.KEY_FRESH if fresh else admin.KEY_KEEP,
            )
        assert moved == 1
        after = self._read()
        assert after.table_of(identity) == "hot"
        untouched = {i for i in before.where if i != identity}
        changed = {
            i
            for i in untouched
            if before.where[i] != after.where.get(i)
            or _kept(before.rows[i]) != _kept(after.rows.get(i))
        }
        assert not changed, f"replaying {identity} also changed {changed}"
        model = self.rows[identity]
        model.refusable = model.trimmed = False
        model.replayed = True
        if model.line is not None and not parked_head:
            # Not its key's parked head: it joins the back of its key's line.
            line = self.lines[model.line]
            line.remove(identity)
            line.append(identity)

    # -- what must hold after every step ------------------------------------------------------

    @invariant()
    def holds(self) -> None:
        world = self._read()
        self._check_tables(world)
        self._check_in_flight(world)
        self._check_dead(world)
        self._check_waiting(world)

    def _check_tables(self, world: World) -> None:
        """Nothing committed is lost, nothing rolled back appears (each row in one table: the
        world is keyed by identity, and a row in two tables would be read twice)."""
        assert len(world.where) == world.count, "a row is in two tables"
        for identity, row in self.rows.items():
            assert identity in world.where or row.trimmed, f"committed row {identity} is gone"
        unknown = set(world.where) - set(self.rows)
        assert not unknown, f"rows nobody committed: {unknown}"

    def _check_in_flight(self, world: World) -> None:
        """At most one event of a key is leased, in the model's claims and in the table."""
        lines = [self.rows[i].line for c in self.claims if not c.stale for i in c.identities()]
        lines = [line for line in lines if line is not None]
        assert len(lines) == len(set(lines)), f"two live claims hold one key's events: {lines}"
        now = dt.datetime.now(dt.UTC)
        leased: dict[str, int] = {}
        for row in world.hot():
            if row.ordering_key is not None and row.lease_expires_at and row.lease_expires_at > now:
                leased[row.ordering_key] = leased.get(row.ordering_key, 0) + 1
        assert all(n == 1 for n in leased.values()), f"two leased rows of one key: {leased}"

    def _check_dead(self, world: World) -> None:
        """Dead rows say why, and only for a reason this run caused."""
        for identity, table in world.where.items():
            if table != "dead":
                continue
            stored, row = world.rows[identity], self.rows[identity]
            code, message = stored.last_error_code, stored.last_error_message
            assert code and message, f"dead row {identity} has no reason"
            if row.refusable and code in REFUSALS:
                continue
            if row.target is not None:
                if code == "target_dead" and world.table_of(row.target) in ("dead", "hot"):
                    continue  # ("hot": its message was replayed since)
                if code == "target_not_found" and self.rows[row.target].trimmed:
                    continue
            raise AssertionError(
                f"{identity} is dead for no reason this run caused: {code}: {message}"
            )

    def _check_waiting(self, world: World) -> None:
        """A row held out of the claim's way has something to wait for: an earlier row of its
        key still queued, its key parked, or its message's event still queued."""
        hot = world.hot()
        for row in hot:
            if row.next_attempt_at != WAITING_FOR_KEY:
                continue
            earlier = any(h.ordering_key == row.ordering_key and h.id < row.id for h in hot)
            target = row.target_event_id is not None and any(
                (h.event_id, h.channel) == (row.target_event_id, row.channel) for h in hot
            )
            parked = row.ordering_key in world.parked
            assert earlier or target or parked, (
                f"row {row.id} ({row.ordering_key}) waits for nothing"
            )

    def _check_claim(self, claim: Claim, world: World) -> None:
        """A claimed row goes as its key's head, alone of its key in flight, and a mutation only
        once its message left the queue."""
        live = {self.rows[i].line for c in self.claims if not c.stale for i in c.identities()}
        for identity in claim.identities():
            row = self.rows[identity]
            if row.line is not None:
                assert row.line not in live, (
                    f"{identity} claimed while another event of {row.line!r} is in flight"
                )
                line = self.lines[row.line]
                for earlier in line[: line.index(identity)]:
                    assert world.table_of(earlier) != "hot", (
                        f"{identity} claimed before {earlier}, ahead of it on {row.line!r}"
                    )
            if row.target is not None and not row.by_serial:
                # (A mutation naming a serial acts on the message published with it, even if
                # its event was replayed since: that replay publishes a new message.)
                assert world.table_of(row.target) != "hot", (
                    f"mutation {identity} claimed while its message {row.target} is queued"
                )

    # -- the end of a run ---------------------------------------------------------------------

    def _drain(self) -> None:
        """No fault, leases gone, time passing, the workers claiming until nothing moves (and
        the server forgetting its keys when only backpressure is left)."""
        self.server.clear_faults()
        self.time("leases expire")
        self.claims.clear()
        stalled = False
        for _round in range(40):
            self.time("retries due")
            before = len(self._read().hot())
            for number, worker in enumerate(self.workers):
                token = uuid.uuid4()
                rows = self.ctx.run(worker.driver.events_claim(100, LEASE, token))
                if rows:
                    self._check_claim(Claim(number, token, rows), self._read())
                    self.ctx.run(worker.claims.deliver(self.deliverers[number], token, rows))
            after = len(self._read().hot())
            if not after or (after >= before and stalled):
                return
            stalled = after >= before
            if stalled:
                # Keys left "processing" by a failed publish answer backpressure until the
                # server's window ends: let it end.
                self.time("forget")

    def _check_drained(self, world: World) -> None:
        self.holds()
        for row in world.hot():
            identity = (row.event_id, row.channel)
            target = self.rows[identity].target
            held = row.ordering_key in world.parked or (
                target is not None
                and world.table_of(target) == "hot"
                and world.rows[target].ordering_key in world.parked
            )
            assert held, f"{identity} (key {row.ordering_key}) never went out, nothing holds it"
        delivered: dict[tuple[str, str], int] = {}
        for d in self.server.deliveries():
            if d.message_id is not None:
                delivered[(d.channel, d.message_id)] = (
                    delivered.get((d.channel, d.message_id), 0) + 1
                )
        for identity, table in world.where.items():
            stored = world.rows[identity]
            if table != "published":
                continue
            if stored.operation is None:
                key = (stored.channel, stored.idempotency_key)
                assert delivered.get(key), f"published {identity} was never delivered"
            else:
                target = self.rows[identity].target
                assert target is not None
                if world.table_of(target) == "published" and not self.rows[target].replayed:
                    assert stored.message_serial == world.rows[target].message_serial, (
                        f"mutation {identity} went to {stored.message_serial}, its message is "
                        f"{world.rows[target].message_serial}"
                    )
        if not self.server_forgot:
            twice = {k: n for k, n in delivered.items() if n > 1}
            assert not twice, f"delivered more than once inside the window: {twice}"

    # -- reading the database -----------------------------------------------------------------

    def _read(self) -> World:
        world = World()
        count = 0
        with self.engine.connect() as conn:
            for name, table in TABLES.items():
                for row in conn.execute(sa.select(table)):
                    identity = (row.event_id, row.channel)
                    world.where[identity] = name
                    world.rows[identity] = row
                    count += 1
            world.parked = dict(
                conn.execute(sa.select(PARKED.c.ordering_key, PARKED.c.row_id)).all()
            )
        world.count = count
        return world


def _kept(row: Any) -> tuple[Any, ...] | None:
    """What a replay of another row must leave as it was."""
    if row is None:
        return None
    return (
        row.id,
        row.idempotency_key,
        row.attempts,
        row.next_attempt_at,
        row.lease_token,
        row.message_serial,
        row.last_error_code,
    )


# -- the test -------------------------------------------------------------------------------------


@pytest.fixture
def model_context(backend: str, database_url: str) -> Iterator[Context]:
    engine = create_engine(database_url)
    loop = asyncio.new_event_loop()
    # No waiting on a key another request holds: a run's steps never overlap, so a wait would
    # only slow the run down before the same backpressure answer.
    server = TestServer(
        history=True, versioned_messages=True, inflight_wait=0.0, message_id_wait=0.0
    )
    server.start()
    try:
        yield Context(
            backend=backend,
            database_url=database_url,
            engine=engine,
            server=server,
            loop=loop,
            keyed=backend != "mariadb",
        )
    finally:
        server.stop()
        loop.close()
        engine.dispose()


def test_features_together_keep_every_invariant(model_context: Context) -> None:
    """Random interleavings of every feature keep every invariant (see the module docstring)."""
    run_seed = _seed()
    OutboxMachine.context = model_context
    test = get_state_machine_test(
        OutboxMachine,
        settings=settings(
            max_examples=_examples(model_context.backend),
            stateful_step_count=30,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        ),
    )
    try:
        seed(run_seed)(test)()
    except BaseException as exc:
        exc.add_note(f"run again with OUTBOX_MODEL_SEED={run_seed} ({model_context.backend})")
        raise

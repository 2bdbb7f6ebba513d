"""The demo's story: a producer committing orders, the worker draining them, a refusal and a replay.

Everything goes through the outbox's public API (``outbox.enqueue``, ``Worker``, ``admin.status``,
``admin.replay_in_pages``, ``migrate.upgrade``), never the outbox table itself; deliveries are read
from the bundled test server's record, or from a WebSocket subscriber of another Sockudo.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa

from .. import admin, migrate
from ..database import create_engine
from ..enqueue import enqueue
from ..schema import outbox_table
from ..settings import Settings
from ..sockudo import auth
from ..testing.server import TestServer
from .proof import (
    Claim,
    Facts,
    Refusal,
    Seen,
    Transaction,
    latencies,
    order_of,
    percentile,
    prove,
)

PLAIN_CHANNEL = "orders"
ENCRYPTED_CHANNEL = "private-encrypted-payments"
EVENT = "order-placed"
#: The bundled server's payload limit while the demo runs: below enqueue's (100 KB), so one
#: event passes the outbox's own checks and is refused by the server.
LOWERED_PAYLOAD_KB = 4
#: The limit the demo's "fix" restores (Sockudo's default).
RESTORED_PAYLOAD_KB = 100
OVERSIZED_BYTES = 6 * 1024
#: The worker's poll interval here (SQLite has no commit notification).
POLL_INTERVAL = 0.1
#: Seconds between two looks at the outbox and the server.
TICK = 0.25
#: The longest any one wait may last before the demo gives up and reports what it saw.
WAIT_LIMIT = 20.0
#: After everything arrived: anything delivered late (a duplicate) would show up here.
QUIET = 1.0

#: The demo's own application table: an order row is written in the same transaction as its event.
ORDERS = sa.Table(
    "demo_orders",
    sa.MetaData(),
    sa.Column("number", sa.Integer, primary_key=True),
    sa.Column("channel", sa.String(100), nullable=False),
    sa.Column("amount_cents", sa.Integer, nullable=False),
)


class DemoUnavailable(ValueError):
    """The demo cannot run as asked (e.g. a Sockudo to watch without the ``demo`` extra)."""


@dataclass(frozen=True)
class Script:
    """How many transactions, over how long, and which of them roll back, encrypt or are too big."""

    transactions: int = 60
    seconds: float = 6.0
    rollback_every: int = 5
    encrypt_every: int = 4
    #: The order made bigger than the server's limit (a plain, committed one).
    oversized_order: int = 7

    def __post_init__(self) -> None:
        order = self.oversized_order
        if not 1 <= order <= self.transactions or self.rolls_back(order):
            raise ValueError(f"the oversized order {order} must be one of the committed ones")

    def rolls_back(self, order: int) -> bool:
        return order % self.rollback_every == 0

    def channel(self, order: int) -> str:
        return ENCRYPTED_CHANNEL if order % self.encrypt_every == 0 else PLAIN_CHANNEL

    def amount_cents(self, order: int) -> int:
        return 1000 + 37 * order

    def data(self, order: int, oversized: bool) -> str:
        body: dict[str, Any] = {"order": order, "amount_cents": self.amount_cents(order)}
        if self.channel(order) == ENCRYPTED_CHANNEL:
            body["card"] = f"4242 4242 4242 {order:04d}"
        if oversized:
            body["gift_message"] = "x" * OVERSIZED_BYTES
        return json.dumps(body, separators=(",", ":"))


@dataclass(frozen=True)
class Snapshot:
    """One look at the run, for the live view."""

    elapsed: float
    phase: str
    counts: dict[str, int]
    committed: int
    rolled_back: int
    delivered: int
    #: Deliveries in the last second.
    rate: float
    latency_p50: float | None
    latency_p95: float | None


@dataclass
class Outcome:
    claims: list[Claim]
    latencies: list[float]
    peak_rate: float
    database_url: str
    kept: bool

    @property
    def proved(self) -> bool:
        return all(c.holds for c in self.claims)


class View(Protocol):
    def note(self, text: str) -> None: ...

    def update(self, snapshot: Snapshot) -> None: ...


class Observer(Protocol):
    """Where the demo sees deliveries: the bundled server's record, or a subscriber's."""

    url: str
    #: Whether the demo can lower and raise the server's payload limit (only the bundled one).
    adjustable: bool

    def describe(self) -> str: ...

    def seen(self) -> list[Seen]: ...

    def set_payload_limit(self, kb: int) -> None: ...


class BundledServer:
    """The test server in this process: its delivery record is what reached subscribers."""

    adjustable = True

    def __init__(self, server: TestServer) -> None:
        self.server = server
        self.url = server.url

    def describe(self) -> str:
        where = self.server.base_url
        return f"the bundled test server (outbox.testing.server) on {where}, in this process"

    def seen(self) -> list[Seen]:
        return [Seen(d.channel, d.data, d.time) for d in self.server.deliveries()]

    def set_payload_limit(self, kb: int) -> None:
        self.server.set_limits(max_payload_kb=kb)


class Subscriber:
    """A Pusher WebSocket subscriber of another Sockudo, on the demo's two channels."""

    adjustable = False

    def __init__(self, settings: Settings) -> None:
        try:
            from websockets.exceptions import WebSocketException

            from ..testing.pusher_ws import PusherProtocolError, PusherSubscriber
        except ImportError:
            raise DemoUnavailable(
                "watching the Sockudo at SOCKUDO_URL needs a WebSocket client: "
                "pip install 'sockudo-outbox[demo]' (or unset SOCKUDO_URL to use the bundled server)"
            ) from None
        self.config = settings.sockudo_config()
        self.url = settings.sockudo_url
        scheme = "wss" if self.config.use_tls else "ws"
        self.ws_url = (
            f"{scheme}://{self.config.host}:{self.config.port}/app/{self.config.key}"
            "?protocol=7&client=outbox-demo&version=1"
        )
        self.subscriber = PusherSubscriber(self.ws_url)
        self._failures = (OSError, TimeoutError, PusherProtocolError, WebSocketException)

    def describe(self) -> str:
        return (
            f"the Sockudo at SOCKUDO_URL ({self.config.masked_url}), watched by a WebSocket "
            f"subscriber on {self.ws_url.partition('?')[0]}"
        )

    async def start(self) -> None:
        try:
            socket_id = await self.subscriber.connect()
            await self.subscriber.subscribe(PLAIN_CHANNEL)
            await self.subscriber.subscribe(
                ENCRYPTED_CHANNEL, auth.authenticate(self.config, socket_id, ENCRYPTED_CHANNEL)
            )
        except self._failures as exc:
            await self.subscriber.close()
            where = self.ws_url.partition("?")[0]
            raise DemoUnavailable(
                f"cannot subscribe at {where}: {exc or type(exc).__name__}"
            ) from None

    async def stop(self) -> None:
        await self.subscriber.close()

    def seen(self) -> list[Seen]:
        return [
            Seen(channel, str(e.data), e.received_at)
            for channel in (PLAIN_CHANNEL, ENCRYPTED_CHANNEL)
            for e in list(self.subscriber.events.get(channel, ()))
        ]

    def set_payload_limit(self, kb: int) -> None:
        raise DemoUnavailable("the limits of another Sockudo are its operator's to change")


@dataclass
class _Run:
    """The state of one run, shared by the producer, the watcher and the replay."""

    view: View
    script: Script
    engine: sa.Engine
    table: sa.Table
    observer: Observer
    master_key: bytes
    started: float = field(default_factory=time.time)
    phase: str = "starting"
    transactions: list[Transaction] = field(default_factory=list)
    oversized_event: uuid.UUID | None = None
    refusal_reason: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    peak_rate: float = 0.0

    # -- the producer -------------------------------------------------------------------------

    async def produce(self) -> None:
        interval = self.script.seconds / self.script.transactions
        for order in range(1, self.script.transactions + 1):
            self.phase = f"producing: transaction {order} of {self.script.transactions}"
            await asyncio.sleep(max(0.0, self.started + order * interval - time.time()))
            done = await asyncio.to_thread(self.transaction, order)
            self.transactions.append(done)
            if done.oversized:
                self.view.note(
                    f"order {order} committed with a {len(done.data) // 1024} KB event: enqueue "
                    f"allows 100 KB, the server {LOWERED_PAYLOAD_KB} KB"
                )
            elif not done.committed and order == self.script.rollback_every:
                self.view.note(
                    f"order {order} rolled back after enqueueing its event "
                    f"(every {self.script.rollback_every}th does)"
                )

    def transaction(self, order: int) -> Transaction:
        """Insert an order and enqueue its event in one transaction; commit or roll back."""
        oversized = self.observer.adjustable and order == self.script.oversized_order
        channel = self.script.channel(order)
        data = self.script.data(order, oversized)
        commit = not self.script.rolls_back(order)
        with self.engine.connect() as conn:
            transaction = conn.begin()
            amount = self.script.amount_cents(order)
            conn.execute(ORDERS.insert().values(number=order, channel=channel, amount_cents=amount))
            event_id = enqueue(conn, channel, EVENT, data, table=self.table)
            at = time.time()
            if commit:
                transaction.commit()
            else:
                transaction.rollback()
        if oversized:
            self.oversized_event = event_id
        return Transaction(order, channel, data, commit, at, oversized)

    # -- watching -----------------------------------------------------------------------------

    async def look(self) -> Snapshot:
        report = await asyncio.to_thread(self._status)
        self.counts = dict(report.counts)
        self._notice_refusal(report)
        seen = self.observer.seen()
        now = time.time()
        rate = float(sum(1 for s in seen if s.at > now - 1.0))
        self.peak_rate = max(self.peak_rate, rate)
        waits = latencies(self.facts(seen))
        snapshot = Snapshot(
            elapsed=now - self.started,
            phase=self.phase,
            counts=self.counts,
            committed=sum(1 for t in self.transactions if t.committed),
            rolled_back=sum(1 for t in self.transactions if not t.committed),
            delivered=len(seen),
            rate=rate,
            latency_p50=percentile(waits, 0.5),
            latency_p95=percentile(waits, 0.95),
        )
        self.view.update(snapshot)
        return snapshot

    async def watch(self, done: Callable[[], bool], what: str, at_least: float = 0.0) -> bool:
        """Look every TICK until ``done()`` (and at least ``at_least`` s); False after WAIT_LIMIT."""
        start = time.monotonic()
        while True:
            await self.look()
            waited = time.monotonic() - start
            if waited >= at_least and done():
                return True
            if waited > WAIT_LIMIT:
                self.view.note(f"gave up after {WAIT_LIMIT:.0f} s waiting for {what}")
                return False
            await asyncio.sleep(TICK)

    def _status(self) -> admin.StatusReport:
        with self.engine.connect() as conn:
            return admin.status(conn, self.table, errors=20)

    def _notice_refusal(self, report: admin.StatusReport) -> None:
        if self.refusal_reason is not None or self.oversized_event is None:
            return
        for error in report.last_errors:
            if error.get("event_id") == str(self.oversized_event) and error.get("status") == "dead":
                code = " ".join(
                    str(x)
                    for x in (error.get("last_error_status"), error.get("last_error_code"))
                    if x
                )
                self.refusal_reason = f"{code}: {error.get('last_error_message')}"
                self.view.note(
                    f"order {self.script.oversized_order} is dead, with the server's reason: "
                    f"{self.refusal_reason}"
                )

    def idle(self) -> bool:
        return not (self.counts.get("pending") or self.counts.get("in_flight"))

    def delivered(self, order: int) -> bool:
        return any(order_of(s, self.master_key) == order for s in self.observer.seen())

    # -- the refusal and its replay -----------------------------------------------------------

    async def replay_refused(self, event_id: uuid.UUID) -> Refusal:
        self.phase = "the fix: raising the server's limit, replaying the dead event"
        self.observer.set_payload_limit(RESTORED_PAYLOAD_KB)
        self.view.note(
            f"the fix: the server's payload limit goes back to {RESTORED_PAYLOAD_KB} KB, and "
            f"the dead event is replayed by its id (as `outbox replay {event_id}` does)"
        )
        selection = admin.ReplayFilter(event_ids=[event_id])
        replayed_at = time.time()
        replayed = await asyncio.to_thread(
            lambda: sum(admin.replay_in_pages(self.engine, self.table, selection))
        )
        self.view.note(f"replayed {replayed} event, with a fresh idempotency key")
        self.phase = "waiting for the replayed event"
        order = self.script.oversized_order
        if await self.watch(lambda: self.delivered(order) and self.idle(), "the replayed event"):
            self.view.note(f"order {order} delivered after the replay")
        return Refusal(self.refusal_reason, replayed, replayed_at)

    def facts(self, seen: list[Seen], refusal: Refusal | None = None) -> Facts:
        return Facts(list(self.transactions), seen, self.master_key, self.counts, refusal)


async def run(
    view: View,
    *,
    sockudo_url: str | None = None,
    directory: Path | None = None,
    script: Script = Script(),
    server: TestServer | None = None,
) -> Outcome:
    """Run the demo; ``sockudo_url`` is another Sockudo to use instead of the bundled server,
    ``directory`` keeps the database, ``server`` a started TestServer to use (tests)."""
    with _folder(directory) as folder, contextlib.ExitStack() as stack:
        database_url = f"sqlite:///{folder / 'outbox.db'}"
        engine = create_engine(database_url)
        stack.callback(engine.dispose)
        master_key = secrets.token_bytes(32)
        if sockudo_url is None and server is None:
            server = stack.enter_context(TestServer())
        settings = Settings.from_env(
            database_url=database_url,
            sockudo_url=server.url if server is not None else sockudo_url,
            encryption_master_key_base64=base64.b64encode(master_key).decode("ascii"),
            poll_interval=POLL_INTERVAL,
        )
        observer: Observer = BundledServer(server) if server is not None else Subscriber(settings)
        migrate.upgrade(engine, table_name=settings.table_name)
        ORDERS.metadata.create_all(engine)
        table = outbox_table(settings.table_name)
        state = _Run(view, script, engine, table, observer, master_key)
        _introduce(view, state, database_url, kept=directory is not None)
        return await _play(state, settings, database_url, kept=directory is not None)


async def _play(state: _Run, settings: Settings, database_url: str, kept: bool) -> Outcome:
    from ..worker import Worker

    view, observer = state.view, state.observer
    if isinstance(observer, Subscriber):
        await observer.start()
    if observer.adjustable:
        observer.set_payload_limit(LOWERED_PAYLOAD_KB)
    worker = Worker(settings, engine=state.engine)
    working = asyncio.create_task(worker.run())
    refusal = None
    try:
        producing = asyncio.create_task(state.produce())
        await state.watch(producing.done, "the producer")
        await asyncio.wait_for(producing, WAIT_LIMIT)
        state.phase = "draining"
        view.note("every transaction is done; the worker drains what was committed")
        refusing = observer.adjustable
        await state.watch(
            lambda: state.idle() and (not refusing or state.refusal_reason is not None),
            "the outbox to drain (and the oversized event to go dead)",
        )
        if refusing and state.oversized_event is not None:
            refusal = await state.replay_refused(state.oversized_event)
        state.phase = f"watching {QUIET:.0f} s more: nothing else may arrive"
        await state.watch(lambda: True, "quiet", at_least=QUIET)
    finally:
        worker.stop()
        await asyncio.wait_for(working, WAIT_LIMIT)
        if isinstance(observer, Subscriber):
            await observer.stop()
    state.phase = "done"
    await state.look()
    facts = state.facts(observer.seen(), refusal)
    return Outcome(prove(facts), latencies(facts), state.peak_rate, database_url, kept)


def _introduce(view: View, state: _Run, database_url: str, kept: bool) -> None:
    script = state.script
    where = "kept after the run" if kept else "in a temporary folder, removed at the end"
    view.note(f"database: {database_url} ({where})")
    view.note(f"server: {state.observer.describe()}")
    if not state.observer.adjustable:
        view.note(
            "(the refused-event act needs the bundled server, whose payload limit the demo "
            "lowers and raises: not shown against another Sockudo)"
        )
    view.note(
        f"producer: {script.transactions} transactions over {script.seconds:.0f} s, each an "
        f"order row and its event; every {script.rollback_every}th rolls back; every "
        f"{script.encrypt_every}th goes to {ENCRYPTED_CHANNEL} (master key generated for this run)"
    )
    view.note(f"worker: outbox.worker.Worker, polling every {POLL_INTERVAL} s")


@contextlib.contextmanager
def _folder(directory: Path | None) -> Iterator[Path]:
    if directory is not None:
        if (directory / "outbox.db").exists():
            raise DemoUnavailable(f"{directory / 'outbox.db'} exists: give a new or empty folder")
        directory.mkdir(parents=True, exist_ok=True)
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="outbox-demo-") as name:
        yield Path(name)

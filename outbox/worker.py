"""The worker loop: claim -> publish -> ack, with several batches in flight.

Every database operation goes through the table's driver (:mod:`.drivers`): on PostgreSQL the
claim, the lease renewal and the recording run on psycopg's asyncio connections on the event loop,
elsewhere as short transactions on a thread; upkeep (reclaim, retention, gauges) runs on a thread.
HTTP runs on the event loop. No transaction is open while a request is in flight: a claim commits before the
publish starts, and the outcome is written in a new transaction after it ends.

The worker keeps the claim loop and the claims in flight. What happens to one claim (publish,
record the outcome) is in :mod:`.claims`; what an outcome means, in :mod:`.plan`; how rows are
sent, in :mod:`.delivery`; leases and retention, in :mod:`.maintenance`; what an operator sees
(counts, metrics, ``/readyz``, the pauses when the endpoint fails), in :mod:`.observer`. Side
tasks (maintenance, LISTEN) are supervised: if one dies, the worker stops and :meth:`Worker.run`
raises :class:`SideTaskFailed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import sqlalchemy as sa

from . import __version__
from .claims import ClaimDelivery
from .database import create_engine, display_url, short_error
from .delivery import Deliverer
from .drivers import Driver, driver_for
from .maintenance import Maintenance
from .observer import WorkerObserver, WorkerStats
from .retry import EndpointBreaker, RetryPolicy
from .schema import outbox_table
from .settings import Settings
from .sockudo import AsyncSockudo
from .sockudo.validation import Limits
from .tracing import publish_spans

log = logging.getLogger("outbox.worker")

#: The longest pause after database errors in a row (seconds).
MAX_DATABASE_PAUSE = 30.0


class SideTaskFailed(RuntimeError):
    """A task the worker runs beside its claim loop (maintenance, LISTEN) died: the worker stopped."""


def database_pause(errors_in_a_row: int, poll_interval: float) -> float:
    """Seconds to wait after the ``errors_in_a_row``-th database error in a row (>= 1)."""
    return min(poll_interval * 2 ** min(errors_in_a_row, 5), MAX_DATABASE_PAUSE)


class Worker:
    """Drains the outbox table into Sockudo until stopped (or, with ``once``, until nothing is due)."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: sa.Engine | None = None,
        client: AsyncSockudo | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` times the breaker's pauses (``tests/test_model.py`` steps it)."""
        self.settings = settings
        self.engine = engine or create_engine(settings.database_url)
        self.table = outbox_table(settings.table_name)
        self.driver: Driver = driver_for(self.engine, self.table)
        self.policy = RetryPolicy(
            min_delay=settings.backoff_min_seconds,
            max_delay=settings.backoff_max_seconds,
            max_attempts=settings.max_attempts,
            max_age=settings.max_age_seconds,
        )
        self.breaker = EndpointBreaker(
            self.policy, threshold=settings.breaker_threshold, clock=clock
        )
        self.maintenance = Maintenance(
            self.driver,
            lease_seconds=settings.lease_seconds,
            retention_seconds=settings.retention_seconds,
            on_reclaimed=self._reclaimed,
            on_due=self.wake,
        )
        self._client = client
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._side_failure: BaseException | None = None
        self.observer = WorkerObserver(
            settings, self.engine, self.table, self.breaker, in_flight=lambda: len(self._tasks)
        )
        self.claims = ClaimDelivery(
            settings,
            self.driver,
            policy=self.policy,
            breaker=self.breaker,
            observer=self.observer,
            database_trouble=self._database_trouble,
            wake=self.wake,
        )
        #: What this worker did since it started (``outbox worker`` prints it when it stops).
        self.stats: WorkerStats = self.observer.stats
        #: Why a ``once`` run ended with the endpoint failing (down, or refusing the
        #: credentials), leaving what was due for the next run; None when it did not.
        self.unavailable_reason: str | None = None

    # -- control ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming; in-flight publishes finish and record their outcome."""
        self._stopping.set()
        self._wake.set()

    def wake(self) -> None:
        """Claim now instead of at the next poll (called on NOTIFY)."""
        self._wake.set()

    def _reclaimed(self, rows: int) -> None:
        self.observer.reclaimed(rows)
        self.wake()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -- the loop -----------------------------------------------------------------------------

    async def run(self, *, once: bool = False) -> None:
        if not await self._start_driver():
            return
        config = self.settings.sockudo_config()
        client = self._client or self.new_client()
        deliverer = self.deliverer(client)
        slots = asyncio.Semaphore(self.settings.in_flight)
        # First: a metrics port that cannot be opened stops the worker before it claims anything.
        await self.observer.serve()
        side_tasks = [self._supervise("maintenance", self.maintenance.run(self._stopping.is_set))]
        if self.driver.notifies:
            listen = self.driver.listen(self.wake)
            side_tasks.append(self._supervise("LISTEN", listen))
        # A killed run leaves rows leased: take back the expired leases before the first claim,
        # so a cron-style --once run (the usual next run after a crash) publishes them too.
        await self.maintenance.reclaim_expired()
        log.info(
            "worker started: database %s, sockudo %s, batch %d, %d in flight",
            display_url(self.engine.url),
            config.masked_url,
            self.settings.batch_size,
            self.settings.in_flight,
        )
        try:
            await self._claim_loop(deliverer, slots, once)
            await self._drain_in_flight()
            if once and self.breaker.failing:
                self.unavailable_reason = self.breaker.reason
        finally:
            for task in side_tasks:
                task.cancel()
            await asyncio.gather(*side_tasks, return_exceptions=True)
            await self.observer.close()
            if self._client is None:
                await client.aclose()
            await self.driver.aclose()
            self.observer.stopped()
        if self._side_failure is not None:
            raise SideTaskFailed(str(self._side_failure)) from self._side_failure

    async def _start_driver(self) -> bool:
        """Before anything is held open: an engine the worker's own connections cannot follow
        (PostgreSQL) stops the worker here, with one line saying why (``UnfollowableEngine``).
        A database not reachable yet is waited for, as the claim loop would. False if the
        worker was stopped meanwhile."""
        while not self.stopping:
            try:
                await self.driver.start()
            except sa.exc.DBAPIError as exc:
                await self._database_trouble("start", exc)
                continue
            self.observer.database_answered()
            return True
        return False

    def new_client(self) -> AsyncSockudo:
        """The client the worker publishes with when none was given (``run`` closes it)."""
        limits = Limits(max_batch_size=self.settings.server_batch_limit)
        return AsyncSockudo(
            self.settings.sockudo_config(), limits=limits, transport=self.settings.transport
        )

    def deliverer(self, client: AsyncSockudo) -> Deliverer:
        """How this worker sends its claims through ``client``: its settings, its breaker, its
        metrics and traces."""
        config = self.settings.sockudo_config()
        return Deliverer(
            client,
            master_key=config.master_key,
            alone_concurrency=self.settings.alone_concurrency,
            stopping=self._stopping.is_set,
            paused=lambda: self.breaker.is_open,
            on_request=self.observer.metrics.request,
            spans=publish_spans(config.host, config.port, __version__),
        )

    def _supervise(self, name: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` beside the claim loop; if it ends on its own, stop the worker loudly."""

        async def watched() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.critical("the %s task died (%s); stopping the worker", name, exc, exc_info=True)
                self._side_failure = exc
                self.stop()
            else:
                self._side_failure = RuntimeError(f"the {name} task ended")
                log.critical("the %s task ended; stopping the worker", name)
                self.stop()

        return asyncio.create_task(watched(), name=f"outbox-{name}")

    async def _claim_loop(self, deliverer: Deliverer, slots: asyncio.Semaphore, once: bool) -> None:
        while not self.stopping:
            if once and self.breaker.is_open:
                # A --once run tries what is due once; a paused endpoint (down, or refusing our
                # credentials) is for the next run, not a reason to wait or spin here.
                log.warning("publishing is paused (%s); --once stops here", self.breaker.reason)
                return
            await self.breaker.wait_closed(self._stopping)
            if self.stopping:
                break
            probing = self.breaker.tripped
            await slots.acquire()
            if self.stopping:
                slots.release()
                break
            limit = 1 if probing else self.settings.batch_size
            token = uuid.uuid4()
            # Cleared before the claim, not after an empty one: a NOTIFY that lands while the
            # claim runs must still wake the idle wait that follows it.
            self._wake.clear()
            claim_started = time.perf_counter()
            try:
                rows = await self.driver.events_claim(limit, self.settings.lease_seconds, token)
            except sa.exc.DBAPIError as exc:
                slots.release()
                await self._database_trouble("claim", exc)
                continue
            self.observer.claimed(rows, time.perf_counter() - claim_started)
            if not rows:
                slots.release()
                if once and not self._tasks:
                    return
                await self._idle(once)
                continue
            task = asyncio.create_task(self.claims.deliver_in_task(deliverer, token, rows))
            self._tasks.add(task)
            task.add_done_callback(lambda t: (self._tasks.discard(t), slots.release()))
            if probing:
                # One probe at a time: wait for its verdict before claiming more.
                await asyncio.wait({task})

    async def _idle(self, once: bool) -> None:
        if once:
            # Something is still in flight and may reschedule rows due now: wait for it.
            await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=self.settings.poll_interval)

    async def _drain_in_flight(self) -> None:
        if not self._tasks:
            return
        log.info("waiting for %d batch(es) in flight", len(self._tasks))
        _done, pending = await asyncio.wait(
            set(self._tasks), timeout=self.settings.shutdown_timeout
        )
        if pending:
            log.warning(
                "%d batch(es) still in flight after %.0f s; their leases will expire and "
                "another worker will take them over",
                len(pending),
                self.settings.shutdown_timeout,
            )
            for task in pending:
                task.cancel()

    async def _database_trouble(self, what: str, exc: BaseException) -> None:
        """Count a failed statement and wait before the next try, longer for each failure in a
        row (cut short when the worker stops)."""
        pause = database_pause(self.observer.database_failed(), self.settings.poll_interval)
        log.warning(
            "database error during %s (%s); retrying in %.1f s", what, short_error(exc), pause
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=pause)

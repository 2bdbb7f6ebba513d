"""The worker loop: claim -> publish -> ack, with several batches in flight.

Every database operation goes through the table's driver (:mod:`.drivers`): on PostgreSQL
the claim, the lease renewal and the recording run on psycopg's asyncio connections on the event
loop, elsewhere as short transactions on a thread; upkeep (reclaim, retention, gauges) runs on a
thread. HTTP runs on the event loop. No transaction is open while a request is in flight: a claim commits before the
publish starts, and the outcome is written in a new transaction after it ends.

The worker keeps the claim loop, the claims in flight and the recording of their outcomes. What an
outcome means is decided in :mod:`.plan`; how rows are sent, in :mod:`.delivery`; leases and
retention, in :mod:`.maintenance`. Side tasks (maintenance, LISTEN) are supervised: if one dies,
the worker stops and :meth:`Worker.run` raises :class:`SideTaskFailed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
import uuid
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa

from . import __version__, admin
from .connections import in_transaction
from .database import create_engine, display_url, short_error
from .delivery import Deliverer, Outcome
from .drivers import ClaimedRow, Driver, driver_for
from .health import HealthServer, Readiness, readiness
from .maintenance import Maintenance
from .metrics import Recorder
from .plan import EndpointVerdict, Plan, endpoint_verdict, plan_outcome
from .retry import EndpointBreaker, RetryPolicy
from .schema import outbox_table
from .settings import Settings
from .sockudo import AsyncSockudo
from .sockudo.validation import Limits
from .tracing import publish_spans

log = logging.getLogger("outbox.worker")

#: How many times a finished publish tries to record its outcome before leaving it to the lease.
RECORD_TRIES = 5
#: The longest pause after database errors in a row (seconds).
MAX_DATABASE_PAUSE = 30.0
#: A scrape reuses a queue snapshot younger than this (seconds): scrapers at once cost one read.
QUEUE_SNAPSHOT_REUSE = 1.0
#: Longest wait for the queue snapshot of a scrape; without it the gauges are left out.
QUEUE_SNAPSHOT_TIMEOUT = 5.0
#: /readyz turns red when the claim loop made no progress for this long (at least).
READY_WINDOW_MIN = 15.0


@dataclass
class WorkerStats:
    """What this worker did since it started (rows, except ``requests``)."""

    claimed: int = 0
    published: int = 0
    retried: int = 0
    dead: int = 0
    requests: int = 0
    database_errors: int = 0
    #: Times publishing paused (the breaker opened, or the server refused the credentials).
    pauses: int = 0
    #: Rows taken over from expired leases (a killed worker's), by a claim or by upkeep.
    reclaimed: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


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
    ) -> None:
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
        self.breaker = EndpointBreaker(self.policy, threshold=settings.breaker_threshold)
        self.maintenance = Maintenance(
            self.driver,
            lease_seconds=settings.lease_seconds,
            retention_seconds=settings.retention_seconds,
            on_reclaimed=self._reclaimed,
            on_due=self.wake,
        )
        self._client = client
        self.stats = WorkerStats()
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._database_errors_in_a_row = 0
        self._side_failure: BaseException | None = None
        #: When the claim loop last completed a claim or recorded an outcome (monotonic).
        self._last_progress: float | None = None
        self._queue: admin.StatusReport | None = None
        self._queue_read_at = -QUEUE_SNAPSHOT_REUSE
        self.metrics: Recorder = Recorder()
        if settings.metrics_port is not None:
            from .metrics import PrometheusRecorder

            self.metrics = PrometheusRecorder(
                settings.table_name,
                queue=lambda: self._queue,
                breaker=self._breaker_state,
                in_flight=lambda: len(self._tasks),
            )
        self.health: HealthServer | None = None
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
        self.stats.reclaimed += rows
        self.metrics.reclaimed(rows)
        self.wake()

    # -- what it tells an operator ------------------------------------------------------------

    def readiness(self) -> Readiness:
        """Whether this worker is doing its job (``/readyz``), and if not, why."""
        s = self.settings
        since = None if self._last_progress is None else time.monotonic() - self._last_progress
        return readiness(
            since_progress=since,
            window=max(READY_WINDOW_MIN, 3 * s.poll_interval, 2 * s.request_timeout),
            database_errors_in_a_row=self._database_errors_in_a_row,
            paused_because=self.breaker.reason if self.breaker.tripped else None,
        )

    def _breaker_state(self) -> int:
        if self.breaker.is_open:
            return 1
        return 2 if self.breaker.tripped else 0

    async def _metrics_page(self) -> tuple[bytes, str]:
        await self._read_queue()
        return self.metrics.exposition()

    async def _read_queue(self) -> None:
        """Refresh the queue gauges (the unsent states), at most once per QUEUE_SNAPSHOT_REUSE."""
        if time.monotonic() - self._queue_read_at < QUEUE_SNAPSHOT_REUSE:
            return
        try:
            self._queue = await asyncio.wait_for(
                in_transaction(
                    self.engine, lambda conn: admin.snapshot(conn, self.table, published=False)
                ),
                QUEUE_SNAPSHOT_TIMEOUT,
            )
        except (sa.exc.DBAPIError, TimeoutError) as exc:
            if self._queue is not None:  # once per failure, not once per scrape
                log.warning("could not read the queue gauges: %s", short_error(exc))
            self._queue = None
        self._queue_read_at = time.monotonic()

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
        if self.settings.metrics_port is not None:
            # First: a port that cannot be opened stops the worker before it claims anything.
            self.health = HealthServer(
                self.settings.metrics_host,
                self.settings.metrics_port,
                ready=self.readiness,
                metrics=self._metrics_page,
            )
            await self.health.start()
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
            if self.health is not None:
                await self.health.close()
            if self._client is None:
                await client.aclose()
            await self.driver.aclose()
            log.info(
                "worker stopped: %d published, %d retried, %d dead",
                self.stats.published,
                self.stats.retried,
                self.stats.dead,
            )
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
            self._database_errors_in_a_row = 0
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
            on_request=self.metrics.request,
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
                self._database_errors_in_a_row = 0
            except sa.exc.DBAPIError as exc:
                slots.release()
                await self._database_trouble("claim", exc)
                continue
            self.metrics.claimed(len(rows), time.perf_counter() - claim_started)
            self._last_progress = time.monotonic()
            if not rows:
                slots.release()
                if once and not self._tasks:
                    return
                await self._idle(once)
                continue
            self.stats.claimed += len(rows)
            taken_over = sum(row.taken_over for row in rows)
            if taken_over:
                # A killed or stalled worker's lease expired: its rows go out again, alone.
                log.warning("took over %d row(s) whose lease expired", taken_over)
                self.stats.reclaimed += taken_over
                self.metrics.reclaimed(taken_over)
            task = asyncio.create_task(self._deliver(deliverer, token, rows))
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

    # -- one claimed batch --------------------------------------------------------------------

    async def _deliver(
        self, deliverer: Deliverer, token: uuid.UUID, rows: list[ClaimedRow]
    ) -> None:
        try:
            await self.deliver_claim(deliverer, token, rows)
        except Exception:
            # A bug must not kill the worker silently; the rows stay leased, and return to the
            # queue when the lease expires (then sent alone, so nothing is lost or skipped).
            log.exception(
                "unexpected error while publishing a batch of %d; its rows return after the lease",
                len(rows),
            )

    async def deliver_claim(
        self, deliverer: Deliverer, token: uuid.UUID, rows: list[ClaimedRow]
    ) -> None:
        """Publish one claim's rows through ``deliverer`` and record the outcome under the
        claim's ``token``: what the claim loop runs for every claim (tests drive it directly)."""
        started = time.perf_counter()
        # Rows sent alone go a few at a time: a claim can take longer than one request, so its
        # lease is renewed while it is being published (a killed worker stops renewing).
        renewal = asyncio.create_task(self._keep_leased(token, [row.id for row in rows]))
        try:
            try:
                targets = await self._resolve_targets(rows)
            except sa.exc.DBAPIError as exc:
                # Nothing was sent: the rows go back as they came, due at once.
                await self._database_trouble("finding mutation targets", exc)
                await self._record(token, Plan(give_back_refund=[row.id for row in rows]), rows)
                return
            outcome = await deliverer.deliver(rows, targets)
        finally:
            renewal.cancel()
        if outcome.found_serials:
            await self._remember_serials(outcome)
        self.stats.requests += outcome.requests
        # Whether the endpoint was serving before this outcome decides what is charged.
        endpoint_serving = self.breaker.serving and not self.breaker.tripped
        self._judge_endpoint(endpoint_verdict(outcome))
        plan = plan_outcome(
            outcome,
            rows,
            policy=self.policy,
            endpoint_serving=endpoint_serving,
            now=dt.datetime.now(dt.UTC),
            unsendable_retry=self.settings.misconfigured_retry_seconds,
            park_dead_heads=self.settings.dead_head == "park",
        )
        for note in plan.notes:
            log.log(note.level, note.message, *note.args)
        await self._record(token, plan, rows)
        # Rows, then requests: a row refused in its batch request is sent again alone, so one
        # row may be in both counts of requests (53 rows: 1 batch request of 53, 53 alone).
        log.info(
            "batch of %d: %d published, %d to retry, %d dead, %d given back; "
            "%d batch request%s (%d rows), %d request%s alone; in %.1f ms",
            len(rows),
            len(plan.published),
            plan.retried,
            len(plan.buried),
            len(outcome.unsent),
            outcome.requests - outcome.sent_alone,
            "" if outcome.requests - outcome.sent_alone == 1 else "s",
            outcome.sent_as_batch,
            outcome.sent_alone,
            "" if outcome.sent_alone == 1 else "s",
            (time.perf_counter() - started) * 1000,
        )

    async def _resolve_targets(self, rows: list[ClaimedRow]) -> dict[int, Any] | None:
        """The message serial of each mutation row that names its message by an outbox event
        (or why there is none); the claim let it through only once that event left the queue."""
        waiting = [r for r in rows if r.target_event_id is not None and r.target_serial is None]
        if not waiting:
            return None
        return await self.driver.targets_resolve(waiting)

    async def _remember_serials(self, outcome: Outcome) -> None:
        """Store the serials a mutation found in history with its message's log row, so the
        next mutation of that message finds it there. Only saves lookups: a failure is logged."""
        found = outcome.found_serials
        try:
            await self.driver.targets_remember(found)
        except sa.exc.DBAPIError as exc:
            log.warning("could not store a serial found in history: %s", short_error(exc))

    async def _keep_leased(self, token: uuid.UUID, ids: list[int]) -> None:
        lease = self.settings.lease_seconds
        while True:
            await asyncio.sleep(lease / 3)
            try:
                await self.driver.events_extend_lease(token, lease, ids)
            except sa.exc.DBAPIError as exc:
                log.warning("could not renew a lease (%s); it may expire", short_error(exc))

    def _judge_endpoint(self, verdict: EndpointVerdict) -> None:
        if verdict.misconfigured is not None:
            wait = self.settings.misconfigured_retry_seconds
            reason = (
                f"the server refused this worker's credentials ({verdict.misconfigured}); check "
                f"SOCKUDO_URL ({self.settings.masked_sockudo_url}): app id, key, secret and this "
                "host's clock"
            )
            log.error("%s. Rows stay pending; retrying in %g s", reason, wait)
            self.breaker.pause_for(wait, reason)
            self.stats.pauses += 1
            self.metrics.paused("misconfigured")
            return
        was_tripped = self.breaker.tripped
        # The reason says what failed, for the log, /readyz and a --once run's exit.
        failures = [(f"endpoint unavailable: {exc}", exc.retry_after) for exc in verdict.failures]
        pause = self.breaker.observe(failures, verdict.served)
        if pause is not None:
            self.stats.pauses += 1
            self.metrics.paused("endpoint")
            log.warning("%s: pausing publishing for %.1f s", self.breaker.reason, pause)
        elif was_tripped and not self.breaker.tripped:
            log.info("endpoint is back: resuming publishing")

    async def _record(self, token: uuid.UUID, plan: Plan, rows: list[ClaimedRow]) -> None:
        """Write the plan in one short transaction, retrying while the database is away."""
        acked = 0
        for attempt in range(1, RECORD_TRIES + 1):
            started = time.perf_counter()
            try:
                # Rows whose lease expired and were taken over are not acked (token guard):
                # ``acked`` counts only the rows this ack really moved.
                acked = await self.driver.events_record(token, plan)
                self._database_errors_in_a_row = 0
                self._last_progress = time.monotonic()
                if plan.heads_gone or plan.messages_gone:
                    # The next event of each key that lost its head, and the mutations waiting
                    # for a message that went out, may have just become due: claim now, not at
                    # the next poll (no notification says so; only inserts notify).
                    self._wake.set()
                self.metrics.recorded(plan, rows, acked, time.perf_counter() - started)
                break
            except sa.exc.DBAPIError as exc:
                if attempt == RECORD_TRIES:
                    log.error(
                        "could not record a batch outcome (%s); its rows stay leased and will be "
                        "published again alone after the lease expires",
                        short_error(exc),
                    )
                    return
                await self._database_trouble("record", exc)
        if acked < len(plan.published):
            log.warning(
                "%d published row(s) were no longer leased by this worker (lease expired); "
                "their new holder records them",
                len(plan.published) - acked,
            )
        self.stats.published += acked
        self.stats.retried += plan.retried
        self.stats.dead += len(plan.buried)

    # -- database helpers ---------------------------------------------------------------------

    async def _database_trouble(self, what: str, exc: BaseException) -> None:
        self.stats.database_errors += 1
        self._database_errors_in_a_row += 1
        pause = database_pause(self._database_errors_in_a_row, self.settings.poll_interval)
        log.warning(
            "database error during %s (%s); retrying in %.1f s", what, short_error(exc), pause
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=pause)

"""The worker loop: claim -> publish -> ack, with several batches in flight.

Database statements run in short transactions on a thread (the SQL seam is synchronous); HTTP runs
on the event loop. No transaction is open while a request is in flight: a claim commits before the
publish starts, and the outcome is written in a new transaction after it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import sqlalchemy as sa

from .database import create_engine, display_url, libpq_conninfo
from .delivery import (
    BACKPRESSURE,
    NO_MASTER_KEY,
    SERVICE_UNAVAILABLE,
    Deliverer,
    Outcome,
    failure_of,
)
from .dialects import ClaimedRow, Dialect, Failure, dialect_for
from .retry import EndpointBreaker, RetryPolicy
from .schema import outbox_table
from .settings import Settings
from .sockudo import AsyncSockudo
from .sockudo.events import Limits

log = logging.getLogger("outbox.worker")
T = TypeVar("T")

#: How many times a finished publish tries to record its outcome before leaving it to the lease.
_RECORD_TRIES = 5
#: Retention deletes published rows in pages of this many, one short transaction each ...
_TRIM_PAGE = 5_000
#: ... and looks again this often (seconds) once it has caught up.
_TRIM_INTERVAL = 30.0


@dataclass
class WorkerStats:
    claimed: int = 0
    published: int = 0
    retried: int = 0
    dead: int = 0
    requests: int = 0
    database_errors: int = 0


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
        self.dialect: Dialect = dialect_for(self.engine)
        self.policy = RetryPolicy(
            min_delay=settings.backoff_min_seconds,
            max_delay=settings.backoff_max_seconds,
            max_attempts=settings.max_attempts,
            max_age=settings.max_age_seconds,
        )
        self.breaker = EndpointBreaker(self.policy, threshold=settings.breaker_threshold)
        self._client = client
        self.stats = WorkerStats()
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- control ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming; in-flight publishes finish and record their outcome."""
        self._stopping.set()
        self._wake.set()

    def wake(self) -> None:
        """Claim now instead of at the next poll (called on NOTIFY)."""
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -- the loop -----------------------------------------------------------------------------

    async def run(self, *, once: bool = False) -> None:
        config = self.settings.sockudo_config()
        limits = Limits(max_batch_size=self.settings.server_batch_limit)
        client = self._client or AsyncSockudo(config, limits=limits)
        deliverer = Deliverer(
            client,
            master_key=config.master_key,
            alone_concurrency=self.settings.alone_concurrency,
            stopping=self._stopping.is_set,
            paused=lambda: self.breaker.is_open,
        )
        slots = asyncio.Semaphore(self.settings.in_flight)
        listener = self._start_listener()
        # A killed run leaves rows leased: take back the expired leases before the first claim,
        # so a cron-style --once run (the usual next run after a crash) publishes them too.
        await self._reclaim_expired()
        upkeep = asyncio.create_task(self._upkeep())
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
        finally:
            upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await upkeep
            if listener is not None:
                listener.set()
            if self._client is None:
                await client.aclose()
            log.info(
                "worker stopped: %d published, %d retried, %d dead",
                self.stats.published,
                self.stats.retried,
                self.stats.dead,
            )

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
            try:
                rows = await self._db(
                    self.dialect.claim_batch,
                    self.table,
                    limit,
                    self.settings.lease_seconds,
                    token,
                )
            except sa.exc.DBAPIError as exc:
                slots.release()
                await self._database_trouble("claim", exc)
                continue
            if not rows:
                slots.release()
                if once and not self._tasks:
                    return
                await self._idle(once)
                continue
            self.stats.claimed += len(rows)
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
            await self._deliver_claim(deliverer, token, rows)
        except Exception:
            # A bug must not kill the worker silently; the rows stay leased, and return to the
            # queue when the lease expires (then sent alone, so nothing is lost or skipped).
            log.exception(
                "unexpected error while publishing a batch of %d; its rows return after the lease",
                len(rows),
            )

    async def _deliver_claim(
        self, deliverer: Deliverer, token: uuid.UUID, rows: list[ClaimedRow]
    ) -> None:
        started = time.perf_counter()
        # Rows sent alone go a few at a time: a claim can take longer than one request, so its
        # lease is renewed while it is being published (a killed worker stops renewing).
        renewal = asyncio.create_task(self._keep_leased(token))
        try:
            outcome = await deliverer.deliver(rows)
        finally:
            renewal.cancel()
        self.stats.requests += outcome.requests
        # An endpoint failure is the event's own only when the endpoint was serving others
        # just before (its last answer was a success, the breaker closed). During an outage,
        # or for a fresh worker that has seen no success yet, nothing is charged.
        endpoint_serving = self.breaker.serving and not self.breaker.tripped
        self._update_breaker(outcome)
        retry, refunded, dead = self._plan_failures(outcome, endpoint_serving)
        await self._record(token, outcome, retry, refunded, dead)
        elapsed_ms = (time.perf_counter() - started) * 1000
        log.info(
            "batch of %d: %d published (%d in a batch, %d alone), %d to retry, %d dead, "
            "%d given back, in %.1f ms",
            len(rows),
            len(outcome.published),
            outcome.sent_as_batch,
            outcome.sent_alone,
            len(retry),
            len(dead),
            len(outcome.unsent),
            elapsed_ms,
        )

    async def _keep_leased(self, token: uuid.UUID) -> None:
        lease = self.settings.lease_seconds
        while True:
            await asyncio.sleep(lease / 3)
            try:
                await self._db(self.dialect.extend_lease, self.table, token, lease)
            except sa.exc.DBAPIError as exc:
                log.warning("could not renew a lease (%s); it may expire", _short(exc))

    def _update_breaker(self, outcome: Outcome) -> None:
        if outcome.misconfigured:
            _row, exc = outcome.misconfigured[0]
            reason = (
                f"the server refused this worker's credentials ({exc}); check SOCKUDO_URL "
                f"({self.settings.masked_sockudo_url}): app id, key, secret and this host's clock. "
                f"Rows stay pending; retrying in {self.settings.misconfigured_retry_seconds:g} s"
            )
            log.error(reason)
            self.breaker.pause_for(self.settings.misconfigured_retry_seconds, reason)
            return
        if outcome.endpoint_errors:
            # Count every failed request, not one per claimed batch. A batch that failed
            # comes back as many rows sent alone; counted once per claim, an outage took three
            # whole waves of requests (three attempts of every row) before the breaker opened.
            # Counting stops at the opening, so one bad wave does not stretch the pause.
            pause = None
            for last in outcome.endpoint_errors:
                pause = self.breaker.record_failure(str(last), last.retry_after)
                if pause is not None:
                    break
            if pause is not None:
                log.warning("endpoint unavailable (%s): pausing publishing for %.1f s", last, pause)
        elif outcome.published or outcome.refused:
            if self.breaker.tripped:
                log.info("endpoint is back: resuming publishing")
            self.breaker.record_success()

    def _plan_failures(
        self, outcome: Outcome, endpoint_serving: bool
    ) -> tuple[list[Failure], list[Failure], list[Failure]]:
        """Decide retry-or-dead for each failed row: (retry, retry with refund, dead).

        Only failures that are the event's own are charged to its budget and can end it by
        age: a refusal, or endpoint trouble while the endpoint was serving others. An outage,
        a rate limit, backpressure (the server is busy with this very key), an unreachable
        idempotency cache, or a request that never left are free, however long they last.
        """
        now = dt.datetime.now(dt.UTC)
        retry: list[Failure] = []
        refunded: list[Failure] = []
        dead: list[Failure] = []
        for row, exc in outcome.refused:
            log.warning(
                "event %s (row %d, channel %s) refused, dead-lettered: %s",
                row.idempotency_key,
                row.id,
                row.channel,
                exc,
            )
            dead.append(failure_of(row, exc, charged=True))
        failed = [(row, exc, False) for row, exc in outcome.retry]
        failed += [(row, exc, True) for row, exc in outcome.retry_unsent]
        for row, exc, refund in failed:
            free = (
                refund
                or not endpoint_serving
                or exc.status == 429
                or exc.code in (BACKPRESSURE, SERVICE_UNAVAILABLE)
            )
            if not free:
                age = (now - row.queued_at).total_seconds()
                reason = self.policy.give_up_reason(row.failures + 1, age)
                if reason is not None:
                    log.warning(
                        "event %s (row %d) dead-lettered, %s: %s",
                        row.idempotency_key,
                        row.id,
                        reason,
                        exc,
                    )
                    failure = failure_of(row, exc, prefix=f"{reason}; last error: ", charged=True)
                    dead.append(failure)
                    continue
            delay = self.policy.delay(row.attempts, exc.retry_after)
            log.warning(
                "event %s (row %d) will be retried %sin %.1f s: %s",
                row.idempotency_key,
                row.id,
                "" if refund and row.first_attempt else "alone ",
                delay,
                exc,
            )
            failure = failure_of(row, exc, delay=delay, charged=not free)
            (refunded if refund else retry).append(failure)
        # Refused by authentication, before any key was claimed: no event is at fault. Due at
        # once: this worker's breaker keeps it from retrying before its pause ends, and a
        # correctly configured worker (or this one, restarted with the fix) should not wait.
        # A row a request of this claim carried keeps its attempt (see Outcome.carried).
        for row, exc in outcome.misconfigured:
            (retry if row.id in outcome.carried else refunded).append(failure_of(row, exc))
        if outcome.unsendable:
            wait = self.settings.misconfigured_retry_seconds
            log.error(
                "%d row(s) for encrypted channels (first: row %d, %s) cannot be sent: this worker "
                "has no encryption master key; set SOCKUDO_ENCRYPTION_MASTER_KEY_BASE64. They wait "
                "(tried again every %g s); the other rows go on",
                len(outcome.unsendable),
                outcome.unsendable[0][0].id,
                outcome.unsendable[0][0].channel,
                wait,
            )
            for row, _exc in outcome.unsendable:
                refunded.append(
                    Failure(
                        id=row.id,
                        status=None,
                        code=NO_MASTER_KEY,
                        message="not sent: this worker has no encryption master key "
                        "(set SOCKUDO_ENCRYPTION_MASTER_KEY_BASE64)",
                        delay=wait,
                    )
                )
        return retry, refunded, dead

    async def _record(
        self,
        token: uuid.UUID,
        outcome: Outcome,
        retry: list[Failure],
        refunded: list[Failure],
        dead: list[Failure],
    ) -> None:
        """Write the outcome in one short transaction, retrying while the database is away."""
        # Rows not sent because the worker is stopping go back; a row whose batch went out keeps
        # its attempt, so it is not batched again.
        give_back = [row.id for row in outcome.unsent if row.id not in outcome.carried]
        give_back_carried = [row.id for row in outcome.unsent if row.id in outcome.carried]
        acked = 0

        def write(conn: sa.Connection) -> None:
            nonlocal acked
            d, t = self.dialect, self.table
            # Rows whose lease expired and were taken over are not acked (token guard): count
            # only the rows this ack really changed.
            acked = d.ack_published(conn, t, token, outcome.published)
            d.reschedule(conn, t, token, retry)
            d.reschedule(conn, t, token, refunded, refund_attempt=True)
            d.mark_dead(conn, t, token, dead)
            d.release(conn, t, token, give_back)
            d.release(conn, t, token, give_back_carried, refund_attempt=False)

        for attempt in range(1, _RECORD_TRIES + 1):
            try:
                await asyncio.to_thread(self._in_transaction, write)
                break
            except sa.exc.DBAPIError as exc:
                if attempt == _RECORD_TRIES:
                    log.error(
                        "could not record a batch outcome (%s); its rows stay leased and will be "
                        "published again alone after the lease expires",
                        _short(exc),
                    )
                    return
                await self._database_trouble("record", exc)
        # Only rows this ack really changed count: a stale worker's ack is a no-op.
        if acked < len(outcome.published):
            log.warning(
                "%d published row(s) were no longer leased by this worker (lease expired); "
                "their new holder records them",
                len(outcome.published) - acked,
            )
        self.stats.published += acked
        self.stats.retried += len(retry) + len(refunded)
        self.stats.dead += len(dead)

    # -- housekeeping -------------------------------------------------------------------------

    async def _upkeep(self) -> None:
        """Reclaim expired leases and trim published history, forever."""
        interval = max(0.5, min(self.settings.lease_seconds / 4, 15.0))
        next_trim = 0.0
        while True:
            if self.settings.retention_seconds and time.monotonic() >= next_trim:
                await self._trim_published()
                next_trim = time.monotonic() + _TRIM_INTERVAL
            await asyncio.sleep(interval)
            await self._reclaim_expired()

    async def _reclaim_expired(self) -> None:
        try:
            reclaimed = await self._db(self.dialect.reclaim_expired, self.table)
        except sa.exc.DBAPIError as exc:
            log.warning("could not reclaim expired leases: %s", _short(exc))
            return
        if reclaimed:
            log.warning("reclaimed %d row(s) whose lease expired", reclaimed)
            self.wake()

    async def _trim_published(self) -> None:
        """Delete published rows past the retention period, a page per short transaction.

        Pages follow each other as long as they come back full, so retention keeps up with any
        drain rate without one long-running delete holding locks.
        """
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=self.settings.retention_seconds)
        deleted = 0
        while not self.stopping:
            try:
                page = await self._db(
                    self.dialect.delete_published_before, self.table, cutoff, _TRIM_PAGE
                )
            except sa.exc.DBAPIError as exc:
                log.warning("retention skipped: %s", _short(exc))
                return
            deleted += page
            if page < _TRIM_PAGE:
                break
        if deleted:
            log.info("retention: deleted %d published row(s) older than the retention", deleted)

    def _start_listener(self) -> threading.Event | None:
        if self.engine.dialect.name != "postgresql":
            return None
        from .dialects.postgresql import listen_forever, notify_channel

        loop = asyncio.get_running_loop()
        stop = threading.Event()

        def notify() -> None:
            # The thread may still be connecting (or get one last NOTIFY) after run()
            # returned and its loop closed; call_soon_threadsafe then raises RuntimeError and
            # kills the thread with a traceback. Nothing is left to wake by then.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake.set)

        thread = threading.Thread(
            target=listen_forever,
            args=(
                libpq_conninfo(self.engine.url),
                notify_channel(self.table),
                notify,
                stop,
            ),
            name="outbox-listen",
            daemon=True,
        )
        thread.start()
        return stop

    # -- database helpers ---------------------------------------------------------------------

    def _in_transaction(self, fn: Callable[[sa.Connection], T]) -> T:
        with self.engine.begin() as conn:
            return fn(conn)

    async def _db(self, statement: Callable[..., T], *args: object) -> T:
        return await asyncio.to_thread(self._in_transaction, lambda conn: statement(conn, *args))

    async def _database_trouble(self, what: str, exc: BaseException) -> None:
        self.stats.database_errors += 1
        pause = min(self.settings.poll_interval * 2 ** min(self.stats.database_errors, 5), 30.0)
        log.warning("database error during %s (%s); retrying in %.1f s", what, _short(exc), pause)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=pause)


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__

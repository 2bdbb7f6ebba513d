"""What an operator sees of a worker: its counts, its Prometheus metrics, ``/readyz``, the log
line of each claim, and the pauses when the endpoint fails.

The worker tells a :class:`WorkerObserver` what happened at a few points (a claim ran, the
endpoint answered a claim's requests, an outcome was recorded, the database failed or answered)
and reads nothing back but the count of database errors in a row, for its pause. The observer
owns :class:`WorkerStats`, the metrics :class:`~outbox.metrics.Recorder`, readiness, the queue
snapshot of a scrape and the health server. It also judges the endpoint from each claim's
requests: it pauses the worker's breaker when the endpoint is down or refuses the credentials,
and says why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import sqlalchemy as sa

from . import admin
from .connections import in_transaction
from .database import short_error
from .delivery import Outcome
from .drivers import ClaimedRow
from .health import HealthServer, Readiness, readiness
from .metrics import Recorder
from .plan import Plan, endpoint_verdict
from .retry import EndpointBreaker
from .settings import Settings

# The worker's logger: operators (and tests) filter on one name for everything a worker says.
log = logging.getLogger("outbox.worker")

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


class WorkerObserver:
    """Counts, measures and reports what one worker does, and serves it on the metrics port."""

    def __init__(
        self,
        settings: Settings,
        engine: sa.Engine,
        table: sa.Table,
        breaker: EndpointBreaker,
        *,
        in_flight: Callable[[], int],
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.table = table
        self.breaker = breaker
        self.stats = WorkerStats()
        self.database_errors_in_a_row = 0
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
                in_flight=in_flight,
            )
        #: The metrics port's server, once :meth:`serve` opened it.
        self.health: HealthServer | None = None

    # -- what the worker tells it -------------------------------------------------------------

    def database_answered(self) -> None:
        """A statement succeeded: the database is back, if it was away."""
        self.database_errors_in_a_row = 0

    def database_failed(self) -> int:
        """Count a failed statement; returns how many failed in a row (this one included)."""
        self.stats.database_errors += 1
        self.database_errors_in_a_row += 1
        return self.database_errors_in_a_row

    def claimed(self, rows: Sequence[ClaimedRow], seconds: float) -> None:
        """A claim statement took ``rows`` in ``seconds`` (none: nothing was due)."""
        self.database_answered()
        self.metrics.claimed(len(rows), seconds)
        self._last_progress = time.monotonic()
        self.stats.claimed += len(rows)
        taken_over = sum(row.taken_over for row in rows)
        if taken_over:
            # A killed or stalled worker's lease expired: its rows go out again, alone.
            log.warning("took over %d row(s) whose lease expired", taken_over)
            self.reclaimed(taken_over)

    def reclaimed(self, rows: int) -> None:
        """Rows taken back from expired leases, by a claim or by upkeep."""
        self.stats.reclaimed += rows
        self.metrics.reclaimed(rows)

    def endpoint_answered(self, outcome: Outcome) -> None:
        """A claim's requests ended: count them, and pause publishing (through the breaker)
        when the endpoint is down or refuses the credentials."""
        self.stats.requests += outcome.requests
        verdict = endpoint_verdict(outcome)
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

    def recorded(self, plan: Plan, rows: Sequence[ClaimedRow], acked: int, seconds: float) -> None:
        """A claim's outcome was written in ``seconds``; ``acked`` of its published rows were
        still this worker's to acknowledge."""
        self.database_answered()
        self._last_progress = time.monotonic()
        self.metrics.recorded(plan, rows, acked, seconds)
        if acked < len(plan.published):
            log.warning(
                "%d published row(s) were no longer leased by this worker (lease expired); "
                "their new holder records them",
                len(plan.published) - acked,
            )
        self.stats.published += acked
        self.stats.retried += plan.retried
        self.stats.dead += len(plan.buried)

    def claim_finished(
        self, rows: Sequence[ClaimedRow], outcome: Outcome, plan: Plan, seconds: float
    ) -> None:
        """The log line of one claim, published and its outcome recorded (or left to its lease)."""
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
            seconds * 1000,
        )

    def stopped(self) -> None:
        """The worker's last line: what it did."""
        log.info(
            "worker stopped: %d published, %d retried, %d dead",
            self.stats.published,
            self.stats.retried,
            self.stats.dead,
        )

    # -- what it tells an operator ------------------------------------------------------------

    def readiness(self) -> Readiness:
        """Whether this worker is doing its job (``/readyz``), and if not, why."""
        s = self.settings
        since = None if self._last_progress is None else time.monotonic() - self._last_progress
        return readiness(
            since_progress=since,
            window=max(READY_WINDOW_MIN, 3 * s.poll_interval, 2 * s.request_timeout),
            database_errors_in_a_row=self.database_errors_in_a_row,
            paused_because=self.breaker.reason if self.breaker.tripped else None,
        )

    async def serve(self) -> None:
        """Open the metrics port, if there is one (:class:`~outbox.health.PortUnavailable` if it
        cannot be opened)."""
        if self.settings.metrics_port is None:
            return
        self.health = HealthServer(
            self.settings.metrics_host,
            self.settings.metrics_port,
            ready=self.readiness,
            metrics=self._metrics_page,
        )
        await self.health.start()

    async def close(self) -> None:
        if self.health is not None:
            await self.health.close()

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

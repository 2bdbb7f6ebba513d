"""One claim after the claim loop took it: publish its rows, then record what the outcome means.

:meth:`ClaimDelivery.deliver` keeps the claim's lease while its rows are sent, finds the
messages its mutations name, sends the rows through a :class:`~outbox.delivery.Deliverer`,
asks :mod:`.plan` what the outcome means and writes that in one short transaction, retrying while
the database is away. No transaction is open while a request is in flight: the targets are read
before the publish starts, and the outcome is written after it ends.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa

from .database import short_error
from .delivery import Deliverer, Outcome
from .drivers import ClaimedRow, Driver
from .observer import WorkerObserver
from .plan import Plan, plan_outcome
from .retry import EndpointBreaker, RetryPolicy
from .settings import Settings

# The worker's logger: operators (and tests) filter on one name for everything a worker says.
log = logging.getLogger("outbox.worker")

#: How many times a finished publish tries to record its outcome before leaving it to the lease.
RECORD_TRIES = 5


class ClaimDelivery:
    """Publishes a worker's claims and records their outcomes, under each claim's token."""

    def __init__(
        self,
        settings: Settings,
        driver: Driver,
        *,
        policy: RetryPolicy,
        breaker: EndpointBreaker,
        observer: WorkerObserver,
        database_trouble: Callable[[str, BaseException], Awaitable[None]],
        wake: Callable[[], None],
    ) -> None:
        self.settings = settings
        #: The worker's own driver, not a copy: a test that patches it patches both.
        self.driver = driver
        self.policy = policy
        self.breaker = breaker
        self.observer = observer
        #: Counts a failed statement and waits before the next try (cut short if the worker stops).
        self._database_trouble = database_trouble
        #: Makes the claim loop claim now instead of at its next poll.
        self._wake = wake

    async def deliver_in_task(
        self, deliverer: Deliverer, token: uuid.UUID, rows: list[ClaimedRow]
    ) -> None:
        """:meth:`deliver`, as the claim loop runs it for every claim: in a task nobody awaits
        for a result, so an unexpected error is logged here, not raised."""
        try:
            await self.deliver(deliverer, token, rows)
        except Exception:
            # A bug must not kill the worker silently; the rows stay leased, and return to the
            # queue when the lease expires (then sent alone, so nothing is lost or skipped).
            log.exception(
                "unexpected error while publishing a batch of %d; its rows return after the lease",
                len(rows),
            )

    async def deliver(self, deliverer: Deliverer, token: uuid.UUID, rows: list[ClaimedRow]) -> None:
        """Publish one claim's rows through ``deliverer`` and record the outcome under the
        claim's ``token`` (tests drive it directly)."""
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
        # Whether the endpoint was serving before this outcome decides what is charged.
        endpoint_serving = self.breaker.serving and not self.breaker.tripped
        self.observer.endpoint_answered(outcome)
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
        self.observer.claim_finished(rows, outcome, plan, time.perf_counter() - started)

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

    async def _record(self, token: uuid.UUID, plan: Plan, rows: list[ClaimedRow]) -> None:
        """Write the plan in one short transaction, retrying while the database is away."""
        for attempt in range(1, RECORD_TRIES + 1):
            started = time.perf_counter()
            try:
                # Rows whose lease expired and were taken over are not acked (token guard):
                # ``acked`` counts only the rows this ack really moved.
                acked = await self.driver.events_record(token, plan)
            except sa.exc.DBAPIError as exc:
                if attempt == RECORD_TRIES:
                    log.error(
                        "could not record a batch outcome (%s); its rows stay leased and will be "
                        "published again alone after the lease expires",
                        short_error(exc),
                    )
                    return
                await self._database_trouble("record", exc)
                continue
            if plan.heads_gone or plan.messages_gone:
                # The next event of each key that lost its head, and the mutations waiting for
                # a message that went out, may have just become due: claim now, not at the next
                # poll (no notification says so; only inserts notify).
                self._wake()
            self.observer.recorded(plan, rows, acked, time.perf_counter() - started)
            return

"""What to do about one claim's outcome: pure decisions, no I/O, no clock of their own.

:func:`plan_outcome` turns what happened to each row (an :class:`~outbox.delivery.Outcome`) into
the writes that record it (a :class:`Plan`) and the lines worth logging; :func:`endpoint_verdict`
says what the outcome tells about the endpoint, for the worker-wide breaker. The worker applies
both. Tested with plain values in ``tests/test_plan.py``.

The rules:

* A refusal (400/413/415/422 for the event) is the event's own: dead at once, charged.
* Endpoint trouble is charged to the event's budget (and can end it by age) only while the endpoint
  was serving others just before (``endpoint_serving``). An outage, a fresh worker that has seen
  no success yet, a rate limit (429), backpressure (the server is busy with this very key), an
  unreachable idempotency cache and requests that never left are free, however long they last.
* A refund takes back the claim's attempt; it is given only when no request carried the row to the
  server's idempotency layer, so a first attempt stays batchable. A row whose batch went out is
  never refunded (a second batch could skip its key and lose it).
* 401/404: nobody's fault but the configuration; due again at once (the breaker paces retries).
* A row this worker cannot send (encrypted, no master key) waits alone; the others go on.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field

from .delivery import (
    BACKPRESSURE,
    NO_MASTER_KEY,
    SERVICE_UNAVAILABLE,
    Outcome,
    failure_of,
)
from .drivers import ClaimedRow, Failure, Recording
from .retry import RetryPolicy
from .sockudo.errors import EndpointUnavailable, PublishFailed

#: The message stored on a row that waits for a master key (and the variable to set).
NO_MASTER_KEY_MESSAGE = (
    "not sent: this worker has no encryption master key (set SOCKUDO_ENCRYPTION_MASTER_KEY_BASE64)"
)


@dataclass(frozen=True)
class Note:
    """A line for the worker's log: ``message % args`` at ``level``."""

    level: int
    message: str
    args: tuple[object, ...] = ()


@dataclass
class Plan(Recording):
    """The writes that record one claim's outcome (a :class:`Recording`, which the worker's
    driver writes as it stands) and the lines worth logging about it."""

    notes: list[Note] = field(default_factory=list)

    @property
    def retried(self) -> int:
        return len(self.retry) + len(self.retry_refund)


def plan_outcome(
    outcome: Outcome,
    claimed: Sequence[ClaimedRow] = (),
    *,
    policy: RetryPolicy,
    endpoint_serving: bool,
    now: dt.datetime,
    unsendable_retry: float,
    park_dead_heads: bool = True,
) -> Plan:
    """The plan for ``outcome`` of the rows ``claimed``. ``endpoint_serving``: the endpoint's last
    answer before this outcome was a success and the breaker was closed. ``now`` is the time the
    row ages count to. ``park_dead_heads``: a keyed row that goes dead parks its key (else the
    key goes on)."""
    plan = Plan(published=list(outcome.published))
    plan_failures(plan, outcome, policy, endpoint_serving, now, unsendable_retry)
    if park_dead_heads:
        keyed = {row.id for row in outcome.rows_with_keys()}
        plan.park = [f.id for f in plan.buried if f.id in keyed]
    gone = {a.id for a in plan.published} | {f.id for f in plan.buried}
    plan.heads_gone = keys_of(claimed, gone)
    plan.messages_gone = messages_of(claimed, gone)
    return plan


def keys_of(rows: Iterable[ClaimedRow], ids: Container[int]) -> list[str]:
    """The ordering keys of the rows ``ids`` (each once): the keys whose head leaves the table."""
    return sorted({r.ordering_key for r in rows if r.id in ids and r.ordering_key is not None})


def messages_of(rows: Iterable[ClaimedRow], ids: Container[int]) -> list[tuple[uuid.UUID, str]]:
    """(event id, channel) of the rows ``ids`` that publish a message (not mutations): the
    messages whose waiting mutations become due."""
    return [
        (r.event_id, r.channel)
        for r in rows
        if r.id in ids and r.operation is None and r.event_id is not None
    ]


def plan_failures(
    plan: Plan,
    outcome: Outcome,
    policy: RetryPolicy,
    endpoint_serving: bool,
    now: dt.datetime,
    unsendable_retry: float,
) -> None:
    """The retries, burials and give-backs of ``outcome``, added to ``plan``."""
    for row, exc in outcome.refused:
        plan.notes.append(
            Note(
                logging.WARNING,
                "event %s (row %d, channel %s, idempotency key %s) refused, dead-lettered: %s",
                (row.event_id, row.id, row.channel, row.idempotency_key, exc),
            )
        )
        plan.buried.append(failure_of(row, exc, charged=True))
    failed = [(row, exc, False) for row, exc in outcome.retry]
    failed += [(row, exc, True) for row, exc in outcome.retry_refund]
    for row, exc, refund in failed:
        _plan_endpoint_failure(plan, row, exc, refund, policy, endpoint_serving, now)
    for row, exc in outcome.misconfigured:
        # Refused by authentication, before any key was claimed: due again at once. A row a
        # request of this claim carried keeps its attempt (see Outcome.carried).
        target = plan.retry if row.id in outcome.carried else plan.retry_refund
        target.append(failure_of(row, exc))
    if outcome.unsendable:
        first = outcome.unsendable[0][0]
        plan.notes.append(
            Note(
                logging.ERROR,
                "%d row(s) for encrypted channels (first: row %d, %s) cannot be sent: this worker "
                "has no encryption master key; set SOCKUDO_ENCRYPTION_MASTER_KEY_BASE64. They wait "
                "(tried again every %g s); the other rows go on",
                (len(outcome.unsendable), first.id, first.channel, unsendable_retry),
            )
        )
        for row, _exc in outcome.unsendable:
            plan.retry_refund.append(
                Failure(row.id, None, NO_MASTER_KEY, NO_MASTER_KEY_MESSAGE, delay=unsendable_retry)
            )
    for row in outcome.unsent:
        (plan.give_back if row.id in outcome.carried else plan.give_back_refund).append(row.id)


def _plan_endpoint_failure(
    plan: Plan,
    row: ClaimedRow,
    exc: PublishFailed,
    refund: bool,
    policy: RetryPolicy,
    endpoint_serving: bool,
    now: dt.datetime,
) -> None:
    charged = endpoint_serving and not refund and not is_free(exc)
    if charged:
        age = (now - row.queued_at).total_seconds()
        reason = policy.give_up_reason(row.failures + 1, age)
        if reason is not None:
            plan.notes.append(
                Note(
                    logging.WARNING,
                    "event %s (row %d, idempotency key %s) dead-lettered, %s: %s",
                    (row.event_id, row.id, row.idempotency_key, reason, exc),
                )
            )
            plan.buried.append(failure_of(row, exc, prefix=f"{reason}; last error: ", charged=True))
            return
    retry_after = exc.retry_after if isinstance(exc, EndpointUnavailable) else None
    delay = policy.delay(row.attempts, retry_after)
    alone = "" if refund and row.first_attempt else "alone "
    plan.notes.append(
        Note(
            logging.WARNING,
            "event %s (row %d, idempotency key %s) will be retried %sin %.1f s: %s",
            (row.event_id, row.id, row.idempotency_key, alone, delay, exc),
        )
    )
    failure = failure_of(row, exc, delay=delay, charged=charged)
    (plan.retry_refund if refund else plan.retry).append(failure)


def is_free(exc: PublishFailed) -> bool:
    """Failures that are never the event's own, whatever the endpoint's state."""
    return exc.status == 429 or exc.code in (BACKPRESSURE, SERVICE_UNAVAILABLE)


@dataclass(frozen=True)
class EndpointVerdict:
    """What one outcome says about the endpoint, for the worker-wide breaker."""

    #: The endpoint refused this worker's credentials (401/404): pause for a fixed time.
    misconfigured: PublishFailed | None = None
    #: Each failed request (backpressure excluded: that is the key, not the endpoint).
    failures: tuple[EndpointUnavailable, ...] = ()
    #: The endpoint answered an event (published, or refused it): it is serving.
    served: bool = False


def endpoint_verdict(outcome: Outcome) -> EndpointVerdict:
    if outcome.misconfigured:
        return EndpointVerdict(misconfigured=outcome.misconfigured[0][1])
    return EndpointVerdict(
        failures=tuple(outcome.endpoint_errors),
        served=bool(outcome.published or outcome.refused),
    )

"""The pure decisions: what an outcome means for each row, and for the endpoint breaker.

Plain values and an injected clock: no database, no server. The worker only applies these.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import replace
from typing import Any

import pytest

from outbox.delivery import Outcome
from outbox.drivers import Ack, ClaimedRow
from outbox.plan import NO_MASTER_KEY_MESSAGE, endpoint_verdict, plan_outcome
from outbox.retry import EndpointBreaker, RetryPolicy
from outbox.sockudo.errors import ClientMisconfigured, EndpointUnavailable, EventRefused
from outbox.worker import database_pause

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
POLICY = RetryPolicy(min_delay=1.0, max_delay=60.0, max_attempts=3, max_age=3600.0)


def event_id_of(row_id: int) -> uuid.UUID:
    return uuid.UUID(int=row_id)


def row(row_id: int = 1, attempts: int = 1, failures: int = 0, age: float = 10.0) -> ClaimedRow:
    return ClaimedRow(
        id=row_id,
        event_id=event_id_of(row_id),
        idempotency_key=f"k{row_id}",
        channel="c",
        event="e",
        data="{}",
        socket_id=None,
        info=None,
        tags=None,
        extras=None,
        encryption_nonce=None,
        attempts=attempts,
        failures=failures,
        queued_at=NOW - dt.timedelta(seconds=age),
    )


def plan(outcome: Outcome, serving: bool = True) -> Any:
    return plan_outcome(
        outcome, policy=POLICY, endpoint_serving=serving, now=NOW, unsendable_retry=30.0
    )


def server_error(status: int = 500, code: str = "internal_error", **kw: Any) -> EndpointUnavailable:
    return EndpointUnavailable("boom", status=status, code=code, **kw)


# -- what is charged ------------------------------------------------------------------------------


def test_a_refusal_is_dead_at_once_and_charged():
    p = plan(Outcome(refused=[(row(), EventRefused("too big", status=413, code="x"))]))
    assert [(f.id, f.status, f.charged) for f in p.buried] == [(1, 413, True)]
    assert not p.retry and not p.retry_refund


@pytest.mark.parametrize(
    ("outcome", "says"),
    [
        (Outcome(refused=[(row(7), EventRefused("too big", status=413))]), "refused, dead"),
        (Outcome(retry=[(row(7), server_error())]), "will be retried"),
        (Outcome(retry=[(row(7, failures=2), server_error())]), "dead-lettered, gave up"),
    ],
    ids=["refused", "retried", "gave up"],
)
def test_log_lines_name_the_event_by_its_id_and_say_which_uuid_is_the_key(outcome, says):
    """The line starts with the event id (what enqueue returned, what `outbox replay` takes);
    the row's idempotency key, another UUID, is labelled as such."""
    (note,) = plan(outcome).notes
    line = note.message % note.args
    assert line.startswith(f"event {event_id_of(7)} (row 7, "), line
    assert "idempotency key k7" in line and says in line


def test_endpoint_trouble_while_serving_is_charged_and_ends_the_budget():
    p = plan(
        Outcome(retry=[(row(failures=0), server_error()), (row(2, failures=2), server_error())])
    )
    assert [(f.id, f.charged) for f in p.retry] == [(1, True)]
    assert [f.id for f in p.buried] == [2]
    assert "gave up after 3 attempts" in p.buried[0].message


@pytest.mark.parametrize(
    "error",
    [
        server_error(429, "rate_limited"),
        server_error(503, "backpressure"),
        server_error(503, "service_unavailable"),
    ],
    ids=["429", "backpressure", "cache unreachable"],
)
def test_answers_that_are_never_the_events_fault_are_free(error):
    p = plan(Outcome(retry=[(row(failures=2, age=99999), error)]))
    assert [(f.id, f.charged) for f in p.retry] == [(1, False)]
    assert not p.buried  # neither the budget nor the age limit ends it


def test_nothing_is_charged_while_the_endpoint_is_not_serving():
    p = plan(Outcome(retry=[(row(failures=2, age=99999), server_error())]), serving=False)
    assert [(f.id, f.charged) for f in p.retry] == [(1, False)] and not p.buried


def test_the_age_limit_counts_from_the_queue_time_and_only_for_charged_failures():
    young = row(1, age=10.0)
    old = row(2, age=3601.0)
    p = plan(Outcome(retry=[(young, server_error()), (old, server_error())]))
    assert [f.id for f in p.retry] == [1]
    assert [f.id for f in p.buried] == [2] and "max age" in p.buried[0].message


def test_a_refund_keeps_the_row_batchable_and_is_free():
    never_sent = EndpointUnavailable("connect refused", maybe_delivered=False)
    p = plan(Outcome(retry_refund=[(row(failures=2), never_sent)]))
    assert [(f.id, f.charged) for f in p.retry_refund] == [(1, False)]


def test_retry_after_sets_the_shortest_delay():
    p = plan(Outcome(retry=[(row(), server_error(503, "backpressure", retry_after=7.0))]))
    assert p.retry[0].delay >= 7.0


# -- misconfiguration, unsendable rows, shutdown --------------------------------------------------


def test_a_401_refunds_only_rows_no_request_carried():
    refused = ClientMisconfigured("bad signature", status=401, code="auth_failed")
    outcome = Outcome(misconfigured=[(row(1), refused), (row(2), refused)], carried={2})
    p = plan(outcome)
    assert [f.id for f in p.retry_refund] == [1]
    assert [f.id for f in p.retry] == [2]  # its batch went out: it stays a retry
    assert all(f.delay == 0 and not f.charged for f in p.retry + p.retry_refund)


def test_a_row_without_a_master_key_waits_alone_with_a_true_reason(caplog):
    missing = ClientMisconfigured("no key", code="no_master_key")
    p = plan(Outcome(unsendable=[(row(), missing)], published=[Ack(5)]))
    (wait,) = p.retry_refund
    assert (wait.code, wait.message, wait.delay) == ("no_master_key", NO_MASTER_KEY_MESSAGE, 30.0)
    assert [n.level for n in p.notes] == [logging.ERROR]
    assert "SOCKUDO_ENCRYPTION_MASTER_KEY_BASE64" in p.notes[0].message
    assert p.published == [Ack(5)]


def test_rows_not_sent_at_shutdown_go_back_with_or_without_a_refund():
    p = plan(Outcome(unsent=[row(1), row(2)], carried={2}))
    assert (p.give_back_refund, p.give_back) == ([1], [2])


# -- the endpoint verdict and the breaker, on an injected clock --------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_verdict_of_an_outcome():
    assert endpoint_verdict(Outcome(published=[Ack(1)])).served
    error = server_error()
    verdict = endpoint_verdict(Outcome(endpoint_errors=[error], published=[Ack(1)]))
    assert verdict.failures == (error,)
    refused = ClientMisconfigured("no", status=401)
    assert endpoint_verdict(Outcome(misconfigured=[(row(), refused)])).misconfigured is refused


def test_the_breaker_opens_after_the_threshold_probes_then_closes():
    clock = Clock()
    breaker = EndpointBreaker(POLICY, threshold=3, clock=clock)
    assert not breaker.serving  # a fresh worker has seen no success
    assert breaker.observe([("down", None), ("down", None)], served=False) is None
    assert not breaker.tripped
    pause = breaker.observe([("down", None)], served=False)
    assert pause is not None and breaker.is_open and breaker.tripped
    assert breaker.reason == "down"
    # Failures of requests already in flight when it opened do not stretch the pause.
    assert breaker.observe([("down", None)] * 5, served=False) is None
    clock.now += pause + 0.01
    assert not breaker.is_open and breaker.tripped  # probing
    second = breaker.observe([("still down", None)], served=False)
    assert second is not None and second >= 2.0  # the next opening waits longer
    clock.now += second + 0.01
    assert breaker.observe([], served=True) is None
    assert not breaker.tripped and breaker.serving


def test_retry_after_stretches_the_pause_and_a_misconfiguration_pauses_for_a_fixed_time():
    clock = Clock()
    breaker = EndpointBreaker(POLICY, threshold=1, clock=clock)
    assert breaker.observe([("429", 40.0)], served=False) >= 40.0
    breaker.observe([], served=True)
    breaker.pause_for(30.0, "bad secret")
    assert breaker.is_open and not breaker.serving
    clock.now += 29.9
    assert breaker.is_open
    clock.now += 0.2
    assert not breaker.is_open


def test_the_breaker_says_the_endpoint_is_failing_from_the_first_failure_until_a_success():
    """What a --once run reports: one failure is enough (a claim sends its rows' requests
    until the first endpoint error, so a run often sees fewer than the threshold)."""
    breaker = EndpointBreaker(POLICY, threshold=3, clock=Clock())
    assert not breaker.failing  # nothing asked yet
    breaker.observe([("down", None)], served=False)
    assert breaker.failing and not breaker.tripped
    breaker.observe([], served=False)  # backpressure only: says nothing about the endpoint
    assert breaker.failing
    breaker.observe([], served=True)
    assert not breaker.failing
    breaker.pause_for(30.0, "bad secret")
    assert breaker.failing and breaker.reason == "bad secret"


def test_the_database_pause_grows_with_errors_in_a_row_and_is_capped():
    pauses = [database_pause(n, 0.5) for n in range(1, 9)]
    assert pauses[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert pauses[5:] == [16.0] * 3 and max(pauses) <= 30.0


def test_a_keyed_row_that_goes_dead_parks_its_key_unless_the_policy_skips():
    """Dead by refusal or by its budget: the key parks (the default); unkeyed dead rows and
    keyed rows that only wait for a retry park nothing; with ``park_dead_heads=False`` none do."""
    refused = replace(row(1), ordering_key="a")
    spent = replace(row(2, failures=POLICY.max_attempts - 1), ordering_key="b")
    retrying = replace(row(3), ordering_key="c")
    loose = row(4)
    outcome = Outcome(
        refused=[
            (refused, EventRefused("bad", status=413)),
            (loose, EventRefused("x", status=413)),
        ],
        retry=[(spent, server_error()), (retrying, EndpointUnavailable("slow", status=None))],
    )
    parked = plan(outcome)
    assert {f.id for f in parked.buried} == {1, 2, 4}
    assert sorted(parked.park) == [1, 2]
    skipped = plan_outcome(
        outcome,
        policy=POLICY,
        endpoint_serving=True,
        now=NOW,
        unsendable_retry=30.0,
        park_dead_heads=False,
    )
    assert {f.id for f in skipped.buried} == {1, 2, 4} and skipped.park == []


def test_the_plan_names_the_keys_and_messages_its_rows_take_out_of_the_table():
    """What leaves the table (published or dead) frees its key's next row and wakes the
    mutations waiting for its message; a row that stays (a retry, a give-back) frees nothing,
    and a mutation that leaves is no message anyone waits for."""
    published = replace(row(1), ordering_key="a")
    refused = replace(row(2), ordering_key="b")
    retrying = replace(row(3), ordering_key="c")
    given_back = replace(row(4), ordering_key="d")
    mutation = replace(row(5), ordering_key="e", operation="update")
    claimed = [published, refused, retrying, given_back, mutation]
    outcome = Outcome(
        published=[Ack(1), Ack(5)],
        refused=[(refused, EventRefused("bad", status=413))],
        retry=[(retrying, server_error())],
        unsent=[given_back],
    )
    planned = plan_outcome(
        outcome, claimed, policy=POLICY, endpoint_serving=True, now=NOW, unsendable_retry=30.0
    )
    assert planned.heads_gone == ["a", "b", "e"]
    assert planned.messages_gone == [(event_id_of(1), "c"), (event_id_of(2), "c")]
    assert planned.give_back_refund == [4] and [f.id for f in planned.retry] == [3]

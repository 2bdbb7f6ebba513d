"""What a worker counts and measures, for Prometheus (``OUTBOX_METRICS_PORT``, the metrics extra).

The worker calls the hooks of a :class:`Recorder`; the base class does nothing, so a worker
without a metrics port pays a method call per batch and imports nothing. :class:`PrometheusRecorder`
keeps the counters and histograms in a registry of its own (never the global one: two workers in
one process, or a test, do not share numbers) and adds the queue gauges read at scrape time
through :func:`outbox.admin.snapshot`, the same function ``outbox status`` reads.

Labels stay low-cardinality: ``table``, and fixed sets of outcomes, endpoints, result classes
and states. No event id, key or channel name is ever a label.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .settings import SettingsError
from .sockudo.errors import request_result

if TYPE_CHECKING:
    from .admin import StatusReport
    from .drivers import ClaimedRow
    from .plan import Plan

#: Commit-to-acknowledgement latency buckets (seconds): sub-second detail where a healthy
#: outbox lives, then the minutes and hours of a backlog.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    1800.0,
    3600.0,
)
#: Database statements and publish requests (seconds).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Rows per claim.
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def ack_latencies(plan: Plan, rows: Sequence[ClaimedRow], now: dt.datetime) -> Iterator[float]:
    """Seconds from each published row's entry in the queue (its commit) to its acknowledgement.

    Measured against the database's clock at insert; a worker whose clock runs behind would see
    negative values, reported as 0.
    """
    queued = {row.id: row.queued_at for row in rows}
    for ack in plan.published:
        entered = queued.get(ack.id)
        if entered is not None:
            yield max(0.0, (now - entered).total_seconds())


class Recorder:
    """The worker's hooks. This base records nothing (no metrics port)."""

    def claimed(self, rows: int, seconds: float) -> None:
        """A claim statement ran for ``seconds`` and took ``rows`` rows (0: nothing was due)."""

    def request(self, endpoint: str, exc: BaseException | None, seconds: float) -> None:
        """One publish request to ``endpoint`` (``events``/``batch_events``) ended."""

    def recorded(self, plan: Plan, rows: Sequence[ClaimedRow], acked: int, seconds: float) -> None:
        """A claim's outcome was written in ``seconds``; ``acked`` of its published rows counted."""

    def reclaimed(self, rows: int) -> None:
        """Rows taken back from expired leases (a stopped worker's)."""

    def paused(self, reason: str) -> None:
        """Publishing paused: ``endpoint`` (the breaker opened) or ``misconfigured`` (401/404)."""

    def exposition(self) -> tuple[bytes, str]:
        """The metrics page and its content type (nothing here)."""
        return b"", "text/plain; charset=utf-8"


class PrometheusRecorder(Recorder):
    """The hooks as Prometheus metrics, plus gauges read at scrape time.

    ``queue`` returns the last :class:`~outbox.admin.StatusReport` of the unsent states (None when
    the database did not answer); ``breaker`` returns 0 (closed), 1 (open: paused) or 2 (probing);
    ``in_flight`` the batches being published.
    """

    def __init__(
        self,
        table: str,
        *,
        queue: Callable[[], StatusReport | None],
        breaker: Callable[[], int],
        in_flight: Callable[[], int],
    ) -> None:
        try:
            import prometheus_client as prom
        except ModuleNotFoundError:
            raise SettingsError(
                "OUTBOX_METRICS_PORT needs prometheus_client: pip install 'sockudo-outbox[metrics]'"
            ) from None
        self.registry = prom.CollectorRegistry(auto_describe=True)
        self.table = table
        r, t = self.registry, ("table",)
        self.events = prom.Counter("outbox_events", "Rows by outcome.", [*t, "outcome"], registry=r)
        self.requests = prom.Counter(
            "outbox_publish_requests",
            "Publish requests by endpoint and result class.",
            [*t, "endpoint", "result"],
            registry=r,
        )
        self.request_seconds = prom.Histogram(
            "outbox_publish_request_duration_seconds",
            "Publish request durations.",
            [*t, "endpoint"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.batch_size = prom.Histogram(
            "outbox_claim_batch_size", "Rows per claim.", t, buckets=BATCH_BUCKETS, registry=r
        )
        self.latency = prom.Histogram(
            "outbox_commit_to_ack_seconds",
            "From a row entering the queue (commit or replay) to the server's acknowledgement.",
            t,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.claim_seconds = prom.Histogram(
            "outbox_claim_duration_seconds",
            "Claim statements.",
            t,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ack_seconds = prom.Histogram(
            "outbox_ack_duration_seconds",
            "Transactions recording a claim's outcome.",
            t,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.leases = prom.Counter(
            "outbox_leases",
            "Leases lost (expired before the ack) or taken over (expired, reclaimed).",
            [*t, "event"],
            registry=r,
        )
        self.pauses = prom.Counter(
            "outbox_pauses", "Times publishing paused, by reason.", [*t, "reason"], registry=r
        )
        # Every label value shows from the start (at 0): a rate() over a series that appears
        # only with its first event misses that event.
        for outcome in ("published", "retried", "dead"):
            self.events.labels(table, outcome)
        for event in ("lost", "taken_over"):
            self.leases.labels(table, event)
        for reason in ("endpoint", "misconfigured"):
            self.pauses.labels(table, reason)
        r.register(_StateCollector(table, queue, breaker, in_flight))
        # The children the hot path updates, looked up once (a labels() call costs about as
        # much as the update itself).
        self._published = self.events.labels(table, "published")
        self._retried = self.events.labels(table, "retried")
        self._dead = self.events.labels(table, "dead")
        self._latency = self.latency.labels(table)
        self._claim_seconds = self.claim_seconds.labels(table)
        self._batch_size = self.batch_size.labels(table)
        self._ack_seconds = self.ack_seconds.labels(table)

    def claimed(self, rows: int, seconds: float) -> None:
        self._claim_seconds.observe(seconds)
        if rows:
            self._batch_size.observe(rows)

    def request(self, endpoint: str, exc: BaseException | None, seconds: float) -> None:
        self.requests.labels(self.table, endpoint, request_result(exc)).inc()
        self.request_seconds.labels(self.table, endpoint).observe(seconds)

    def recorded(self, plan: Plan, rows: Sequence[ClaimedRow], acked: int, seconds: float) -> None:
        self._ack_seconds.observe(seconds)
        self._published.inc(acked)
        self._retried.inc(plan.retried)
        self._dead.inc(len(plan.buried))
        if acked < len(plan.published):
            self.leases.labels(self.table, "lost").inc(len(plan.published) - acked)
        for seconds_to_ack in ack_latencies(plan, rows, dt.datetime.now(dt.UTC)):
            self._latency.observe(seconds_to_ack)

    def reclaimed(self, rows: int) -> None:
        self.leases.labels(self.table, "taken_over").inc(rows)

    def paused(self, reason: str) -> None:
        self.pauses.labels(self.table, reason).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The metrics page and its content type."""
        import prometheus_client as prom

        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST


# eq=False: the registry keys its collectors by identity, as before this was a dataclass.
@dataclass(frozen=True, eq=False)
class _StateCollector:
    """Gauges read when scraped: the queue (from the worker's last snapshot) and the breaker.
    Its fields are :class:`PrometheusRecorder`'s sources, as the recorder was given them."""

    table: str
    queue: Callable[[], StatusReport | None]
    breaker: Callable[[], int]
    in_flight: Callable[[], int]

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        t = self.table
        breaker = GaugeMetricFamily(
            "outbox_breaker_state",
            "Publishing breaker: 0 closed, 1 open (paused), 2 probing.",
            labels=["table"],
        )
        breaker.add_metric([t], self.breaker())
        yield breaker
        batches = GaugeMetricFamily(
            "outbox_batches_in_flight", "Claimed batches being published.", labels=["table"]
        )
        batches.add_metric([t], self.in_flight())
        yield batches
        report = self.queue()
        up = GaugeMetricFamily(
            "outbox_database_up",
            "1 if the last read of the queue gauges succeeded (else they are left out).",
            labels=["table"],
        )
        up.add_metric([t], 0 if report is None else 1)
        yield up
        if report is None:
            return
        rows = GaugeMetricFamily(
            "outbox_rows", "Rows not published, by state.", labels=["table", "state"]
        )
        ages = GaugeMetricFamily(
            "outbox_oldest_age_seconds",
            "Age of the oldest row in each state not published (0 when it is empty).",
            labels=["table", "state"],
        )
        for state, count in report.counts.items():
            rows.add_metric([t, state], count)
            ages.add_metric([t, state], report.oldest_age_seconds.get(state) or 0.0)
        yield rows
        yield ages
        oldest = GaugeMetricFamily(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest event not yet published (pending or in flight; 0 when none).",
            labels=["table"],
        )
        oldest.add_metric([t], report.oldest_pending_age_seconds or 0.0)
        yield oldest
        parked = GaugeMetricFamily(
            "outbox_parked_keys",
            "Ordering keys waiting behind a dead head (outbox keys lists them).",
            labels=["table"],
        )
        parked.add_metric([t], report.parked_keys)
        yield parked

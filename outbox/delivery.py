"""The delivery strategy: how one claimed set of rows goes out, and what each answer means.

Rules (from Sockudo's idempotency behaviour, see docs):

* A row on its **first attempt** goes in one ``/batch_events`` request with the others.
* A batch is **never sent twice**: Sockudo skips an item whose key it has seen (even a key left
  "processing" by a failed publish) and still answers 200, so a re-sent batch can lose events.
  Every later attempt of a row goes **alone** through ``/events``, where a repeat is answered from
  the server's cache (already published) or with ``503 backpressure`` (try later), never dropped.
* A refused batch does not say which item was bad: its rows are re-sent alone at once, so the bad
  one is dead-lettered with its own reason and the others are delivered.

This module decides and sends; it does not touch the database. The worker applies the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .drivers import Ack, ClaimedRow, Failure, FoundSerial, Target, UnknownSerial
from .schema import SERIAL_MAX, Operation
from .sockudo import AsyncSockudo, PreparedRequest
from .sockudo.bodies import batch_body, dump_body, event_item
from .sockudo.crypto import seal_for_channel
from .sockudo.errors import (
    ClientMisconfigured,
    EndpointUnavailable,
    EventRefused,
    InvalidEvent,
    NotAllowed,
    PublishFailed,
)
from .sockudo.params import ANNOTATION_KEPT_FIELDS
from .sockudo.responses import ChannelAck, Result
from .tracing import PublishSpans

BACKPRESSURE = "backpressure"
#: The two publish endpoints, as the metrics name them.
BATCH_ENDPOINT = "batch_events"
EVENTS_ENDPOINT = "events"
#: Mutations and annotations of published messages, as the metrics name their requests.
MESSAGES_ENDPOINT = "messages"
#: Seconds of clock difference between the database and Sockudo allowed when an annotation
#: retry looks for an earlier attempt's annotation, or a mutation for its message in history.
ANNOTATION_CLOCK_ALLOWANCE = 5.0
#: History pages a serial lookup reads at most (100 messages each) before it gives up.
HISTORY_SCAN_PAGES = 100

#: Called after every publish request: (endpoint, the exception it raised or None, seconds).
RequestHook = Callable[[str, BaseException | None, float], None]
SERVICE_UNAVAILABLE = "service_unavailable"
NO_MASTER_KEY = "no_master_key"


@dataclass
class Outcome:
    """What happened to each row of one claim. Every row lands in exactly one list."""

    published: list[Ack] = field(default_factory=list)
    #: Endpoint trouble: try again later (the worker picks the delay and applies the budget).
    retry: list[tuple[ClaimedRow, PublishFailed]] = field(default_factory=list)
    #: Endpoint trouble that claimed nothing on the server (connection refused, rate limit,
    #: idempotency cache down): try again later, and take the attempt back, so a first attempt
    #: stays batchable after an outage.
    retry_refund: list[tuple[ClaimedRow, PublishFailed]] = field(default_factory=list)
    #: The server refused the event itself: dead-letter with its reason.
    refused: list[tuple[ClaimedRow, PublishFailed]] = field(default_factory=list)
    #: The server refused our credentials: no event is at fault; keep the rows pending.
    misconfigured: list[tuple[ClaimedRow, PublishFailed]] = field(default_factory=list)
    #: This worker cannot send the row (an encrypted channel, no master key): the row waits,
    #: the worker goes on with the others.
    unsendable: list[tuple[ClaimedRow, PublishFailed]] = field(default_factory=list)
    #: Never sent (the worker is stopping): give the rows back untouched.
    unsent: list[ClaimedRow] = field(default_factory=list)
    #: Rows a request of this claim carried (first attempts whose batch went out): their
    #: attempt can never be taken back, or they would be batched again.
    carried: set[int] = field(default_factory=set)
    #: The endpoint-level errors seen, for the worker-wide breaker (backpressure excluded).
    endpoint_errors: list[EndpointUnavailable] = field(default_factory=list)
    #: The refusal of this claim's batch request, if it was refused (see ``_publish_alone``).
    batch_refusal: EventRefused | None = None
    #: Serials of messages published without a receipt, found in history by a mutation's
    #: lookup: the worker stores them with the message's log row.
    found_serials: list[FoundSerial] = field(default_factory=list)
    requests: int = 0
    sent_as_batch: int = 0
    sent_alone: int = 0

    def rows_with_keys(self) -> list[ClaimedRow]:
        """The rows that failed and have an ordering key (a dead one may park its key)."""
        failed = [*self.refused, *self.retry, *self.retry_refund]
        return [row for row, _exc in failed if row.ordering_key is not None]


def row_item(row: ClaimedRow, master_key: bytes | None) -> dict[str, Any]:
    """The JSON object of one row: identical on every attempt (stored data, stored nonce)."""
    data = row.data
    if row.encryption_nonce is not None:
        data = seal_for_channel(
            row.channel, data, master_key, row.idempotency_key, row.encryption_nonce
        )
    return event_item(
        [row.channel],
        row.event,
        data,
        socket_id=row.socket_id,
        info=row.info,
        idempotency_key=row.idempotency_key,
        message_id=row.idempotency_key,
        tags=json.loads(row.tags) if row.tags else None,
        extras=json.loads(row.extras) if row.extras else None,
    )


class Deliverer:
    """Sends claimed rows with the batch-once rule; one instance per worker."""

    def __init__(
        self,
        client: AsyncSockudo,
        *,
        master_key: bytes | None,
        alone_concurrency: int = 8,
        stopping: Callable[[], bool] = lambda: False,
        paused: Callable[[], bool] = lambda: False,
        on_request: RequestHook = lambda endpoint, exc, seconds: None,
        spans: PublishSpans | None = None,
    ) -> None:
        self._client = client
        self._spans = spans
        self._on_request = on_request
        self._master_key = master_key
        self._alone = asyncio.Semaphore(alone_concurrency)
        self._stopping = stopping
        self._paused = paused

    async def deliver(
        self, rows: Sequence[ClaimedRow], targets: Mapping[int, Target] | None = None
    ) -> Outcome:
        """Send ``rows``; ``targets`` gives each mutation row (by id) the serial of its message,
        or why it has none, for those that name their message by an outbox event."""
        outcome = Outcome()
        mutations = [r for r in rows if r.operation is not None]
        if mutations:
            rows = [r for r in rows if r.operation is None]
        items: dict[int, dict[str, Any]] = {}
        for row in rows:
            try:
                items[row.id] = row_item(row, self._master_key)
            except InvalidEvent as exc:
                # Only an encrypted row without a configured master key gets here: the
                # worker's settings are at fault, not the event, and not the other rows.
                outcome.unsendable.append((row, ClientMisconfigured(str(exc), code=NO_MASTER_KEY)))
        first = [r for r in rows if r.id in items and r.first_attempt]
        again = [r for r in rows if r.id in items and not r.first_attempt]
        alone_now: list[ClaimedRow] = []
        if first:
            alone_now = await self._publish_batch(first, items, outcome)
        await asyncio.gather(
            *(self._publish_alone(r, items[r.id], outcome) for r in again),
            *(
                self._publish_alone(r, items[r.id], outcome, after_refusal=outcome.batch_refusal)
                for r in alone_now
            ),
            *(self._mutate(r, (targets or {}).get(r.id), outcome) for r in mutations),
        )
        return outcome

    async def _publish_batch(
        self, rows: list[ClaimedRow], items: dict[int, dict[str, Any]], outcome: Outcome
    ) -> list[ClaimedRow]:
        """Send first attempts as one batch; returns the rows to send alone right away."""
        if self._stopping():
            outcome.unsent.extend(rows)
            return []
        if len(rows) == 1:  # a batch of one buys nothing; /events answers with its ack id
            return rows
        body = batch_body([items[r.id] for r in rows], self._client.limits)
        outcome.requests += 1
        outcome.sent_as_batch += len(rows)
        try:
            result = await self._send(BATCH_ENDPOINT, self._client.prepare_batch_body(body), rows)
        except EventRefused as exc:
            # Which item was bad is not said, and the items before it were published: re-send
            # each alone (their repeats are answered from the server's cache).
            outcome.carried.update(r.id for r in rows)
            outcome.batch_refusal = exc
            return rows
        except ClientMisconfigured as exc:
            # Refused by authentication, before any key was claimed: nothing was carried.
            outcome.misconfigured.extend((r, exc) for r in rows)
            return []
        except EndpointUnavailable as exc:
            if nothing_claimed(exc):
                outcome.retry_refund.extend((r, exc) for r in rows)
            else:
                outcome.carried.update(r.id for r in rows)
                outcome.retry.extend((r, exc) for r in rows)
            outcome.endpoint_errors.append(exc)
            return []
        acks = result.batch
        for index, row in enumerate(rows):
            ack = acks[index] if index < len(acks) else ChannelAck()
            outcome.published.append(_ack(row, ack))
        return []

    async def _publish_alone(
        self,
        row: ClaimedRow,
        item: dict[str, Any],
        outcome: Outcome,
        after_refusal: EventRefused | None = None,
    ) -> None:
        """Send one row through ``/events``. ``after_refusal``: the refusal of the batch this
        row (on its first attempt) was just sent in."""
        request = self._client.prepare_events_body(dump_body(item))
        result = await self._send_alone(row, EVENTS_ENDPOINT, request, outcome, after_refusal)
        if result is not None:
            outcome.published.append(_ack(row, result.channels.get(row.channel, ChannelAck())))

    async def _mutate(self, row: ClaimedRow, resolved: Target | None, outcome: Outcome) -> None:
        """Send one mutation or annotation row to its message, as stored.

        Its message's serial is the one it was enqueued with, else ``resolved`` (from its target
        event's acknowledgement, or looked up in the channel's history when that had none). A
        missing message, a feature the server has off, or a policy refusal is the row's end
        (dead with the reason), never a reason to pause the worker.
        """
        serial: str | EventRefused | None = row.target_serial
        if serial is None and isinstance(resolved, UnknownSerial):
            try:
                serial = await self._find_serial(row, resolved, outcome)
            except _LookupFailed:
                return  # the failed lookup put the row where its failure says
        elif serial is None:
            serial = resolved
        if not isinstance(serial, str):
            outcome.refused.append((row, serial or _NO_TARGET))
            return
        if row.operation == Operation.ANNOTATE and not row.first_attempt:
            # No idempotency on the server: an earlier attempt may have been applied.
            try:
                found = await self._find_annotation(row, serial, outcome)
            except _LookupFailed:
                return  # the failed lookup put the row where its failure says
            if found is not None:
                outcome.published.append(
                    Ack(row.id, acknowledgement_id=found, message_serial=serial)
                )
                return
        request = self._client.prepare_message_request(row.operation, row.channel, serial, row.data)
        result = await self._send_alone(row, MESSAGES_ENDPOINT, request, outcome, mutation=True)
        if result is not None:
            body = result.body if isinstance(result.body, dict) else {}
            answer = body.get("version_serial") or body.get("annotationSerial")
            outcome.published.append(
                Ack(row.id, acknowledgement_id=_text(answer), message_serial=serial)
            )

    async def _find_serial(
        self, row: ClaimedRow, unknown: UnknownSerial, outcome: Outcome
    ) -> str | EventRefused:
        """The serial of ``row``'s message, found in the channel's history by its ``message_id``
        (newest first, between the times it was published), or why it is not there. Raises
        :class:`_LookupFailed` if a request failed (the row is then in ``outcome``)."""
        allowance = ANNOTATION_CLOCK_ALLOWANCE
        start_ms = int((unknown.sent_after.timestamp() - allowance) * 1000)
        end_ms = int((unknown.sent_before.timestamp() + allowance) * 1000)
        cursor: str | None = None
        for _page in range(HISTORY_SCAN_PAGES):
            request = self._client.prepare_history_scan(row.channel, start_ms, end_ms, cursor)
            result = await self._send_alone(row, MESSAGES_ENDPOINT, request, outcome, mutation=True)
            if result is None:
                raise _LookupFailed
            page = result.body if isinstance(result.body, dict) else {}
            for item in page.get("items") or ():
                if isinstance(item, dict) and item.get("message_id") == unknown.message_id:
                    message = item.get("message")
                    serial = message.get("message_serial") if isinstance(message, dict) else None
                    if not serial:
                        return _NO_TARGET
                    if len(str(serial)) > SERIAL_MAX:  # (Sockudo refuses it in a request too)
                        return EventRefused(
                            f"the serial of the message this mutation names is longer than "
                            f"{SERIAL_MAX} characters",
                            code="target_not_found",
                        )
                    assert row.target_event_id is not None
                    found = FoundSerial(row.target_event_id, row.channel, str(serial))
                    outcome.found_serials.append(found)
                    return found.message_serial
            cursor = page.get("next_cursor")
            if not page.get("has_more") or not isinstance(cursor, str) or not cursor:
                break
        return EventRefused(
            f"the message this mutation names was published without a receipt, and its "
            f"message_id {unknown.message_id} is not in the channel's history between "
            f"{unknown.sent_after.isoformat()} and {unknown.sent_before.isoformat()} "
            "(history trimmed, or reset since?)",
            code="target_not_found",
        )

    async def _find_annotation(self, row: ClaimedRow, serial: str, outcome: Outcome) -> str | None:
        """The serial of an annotation the same as ``row``'s in all the server keeps of one
        (``ANNOTATION_KEPT_FIELDS``) created since it was queued (with a few seconds for the
        clocks of the database and the server), if the server has one.
        Raises :class:`_LookupFailed` if a lookup request failed (the row is then in ``outcome``)."""
        wanted = json.loads(row.data)
        since_ms = (row.queued_at.timestamp() - ANNOTATION_CLOCK_ALLOWANCE) * 1000
        cursor: str | None = None
        while True:
            request = self._client.prepare_annotation_lookup(
                row.channel, serial, wanted["type"], cursor
            )
            result = await self._send_alone(row, MESSAGES_ENDPOINT, request, outcome, mutation=True)
            if result is None:
                raise _LookupFailed
            page = result.body if isinstance(result.body, dict) else {}
            for item in page.get("items") or ():
                if (
                    item.get("action") == "annotation.create"
                    and (item.get("timestamp") or 0) >= since_ms
                    # What the server keeps, each the same or absent on both sides: a field it
                    # drops (stored by an older version) must not hide the earlier attempt.
                    and all(item.get(k) == wanted.get(k) for k in ANNOTATION_KEPT_FIELDS)
                ):
                    return _text(item.get("serial"))
            cursor = page.get("nextCursor")
            if not page.get("hasMore") or not cursor:
                return None

    async def _send_alone(
        self,
        row: ClaimedRow,
        endpoint: str,
        request: PreparedRequest,
        outcome: Outcome,
        after_refusal: EventRefused | None = None,
        *,
        mutation: bool = False,
    ) -> Result | None:
        """Send one row's request; its answer, or None with the row put where its failure says.

        ``mutation``: a server setting that forbids the operation (feature off, policy) ends the
        row instead of pausing the worker as a credentials problem would.
        """
        async with self._alone:
            if self._stopping():
                # Not sent yet: given back, whatever attempt it is on. A row its batch carried
                # keeps its attempt (the worker releases it without a refund).
                outcome.unsent.append(row)
                return None
            carried = row.id in outcome.carried
            if outcome.endpoint_errors or self._paused():
                # The endpoint just failed (in this claim, or the worker paused for another
                # claim's failures): the rest of the rows would only fail too, or burst into a
                # rate limit. They wait for the backoff without a request.
                exc = outcome.endpoint_errors[-1] if outcome.endpoint_errors else _PAUSED
                (outcome.retry if carried else outcome.retry_refund).append((row, exc))
                return None
            outcome.requests += 1
            outcome.sent_alone += 1
            try:
                return await self._send(endpoint, request, [row])
            except EventRefused as exc:
                outcome.refused.append((row, exc))
                return None
            except NotAllowed as exc:
                if mutation:
                    outcome.refused.append((row, exc))
                else:
                    outcome.misconfigured.append((row, exc))
                return None
            except ClientMisconfigured as exc:
                # Refused by authentication; the worker takes the attempt back unless the row
                # is in ``carried`` (see there).
                outcome.misconfigured.append((row, exc))
                return None
            except EndpointUnavailable as exc:
                if exc.code == BACKPRESSURE and after_refusal is not None:
                    # Sockudo validates a batch item after claiming its key and stops at the
                    # first bad item, so after a refused batch exactly one of its first-attempt
                    # keys is left "processing": the refused item's. Items before it answer from
                    # the cache, items after it were never touched and publish now; only the bad
                    # one meets backpressure. Dead-letter it now with the server's own reason,
                    # instead of retrying it (at ~1 req/s, outside the attempt budget) for the
                    # whole idempotency TTL and then burying it under "backpressure".
                    # Relies on first-attempt keys being new to the server: true for enqueued
                    # rows and fresh-key replays (kept-key replays are put back as already
                    # tried, so they never go in a batch).
                    outcome.refused.append((row, after_refusal))
                    return None
                # A refund is safe only if no request ever carried the row: a first attempt
                # whose batch went out must never become batchable again. A mutation has no
                # publish idempotency layer in front: only a request that never arrived, or
                # the rate limiter's answer, provably changed nothing.
                if mutation:
                    refund = exc.status == 429 or (exc.status is None and not exc.maybe_delivered)
                else:
                    refund = nothing_claimed(exc) and not carried
                (outcome.retry_refund if refund else outcome.retry).append((row, exc))
                if exc.code != BACKPRESSURE:
                    outcome.endpoint_errors.append(exc)
                return None

    async def _send(
        self, endpoint: str, request: PreparedRequest, rows: Sequence[ClaimedRow]
    ) -> Result:
        """One publish request, reported to ``on_request`` (the worker's metrics) as it ends."""
        span = self._spans.request(endpoint, rows) if self._spans else contextlib.nullcontext()
        started = time.perf_counter()
        with span:
            try:
                result = await self._client.send(request)
            except BaseException as exc:
                self._on_request(endpoint, exc, time.perf_counter() - started)
                raise
        self._on_request(endpoint, None, time.perf_counter() - started)
        return result


class _LookupFailed(Exception):
    """An annotation lookup's own request failed (see :meth:`Deliverer._find_annotation`)."""


_NO_TARGET = EventRefused(
    "the message this mutation names has no message_serial: its event was published without "
    "one (versioned messages or history off for the channel, or a serial too long to store, "
    "logged when it was acknowledged), or its log row was trimmed",
    code="target_not_found",
)

_PAUSED = EndpointUnavailable(
    "not sent: publishing is paused after endpoint failures", maybe_delivered=False
)


def nothing_claimed(exc: EndpointUnavailable) -> bool:
    """True when the server provably claimed none of the request's idempotency keys.

    The connection never opened; or Sockudo answered before its idempotency layer ran: its rate
    limiter (429) sits in front of everything, and an unreachable idempotency cache
    (``503 service_unavailable``) refuses to publish without a claim. A row refused this way may
    go in a batch again. (401/404 come from authentication, also before any claim; they are
    :class:`ClientMisconfigured`, handled apart.)
    """
    if exc.status is None:
        return not exc.maybe_delivered
    return exc.status == 429 or (exc.status == 503 and exc.code == SERVICE_UNAVAILABLE)


def _ack(row: ClaimedRow, ack: ChannelAck) -> Ack:
    return Ack(
        id=row.id,
        acknowledgement_id=ack.acknowledgement_id,
        message_serial=_text(ack.message_serial),
        history_serial=_text(ack.history_serial),
    )


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def failure_of(
    row: ClaimedRow,
    exc: PublishFailed,
    delay: float = 0.0,
    prefix: str = "",
    charged: bool = False,
) -> Failure:
    return Failure(
        id=row.id,
        status=exc.status,
        code=exc.code,
        message=f"{prefix}{exc.message}",
        delay=delay,
        charged=charged,
    )

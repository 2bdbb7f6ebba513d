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
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .dialects import Ack, ClaimedRow, Failure
from .sockudo import AsyncSockudo
from .sockudo.errors import (
    ClientMisconfigured,
    EndpointUnavailable,
    EventRefused,
    InvalidEvent,
    PublishFailed,
)
from .sockudo.events import batch_body, dump_body, event_item, seal_for_channel
from .sockudo.responses import ChannelAck

BACKPRESSURE = "backpressure"


@dataclass
class Outcome:
    """What happened to each row of one claim. Every row lands in exactly one list."""

    published: list[Ack] = field(default_factory=list)
    #: Endpoint trouble: try again later (the worker picks the delay and applies the budget).
    retry: list[tuple[ClaimedRow, PublishFailed]] = field(default_factory=list)
    #: Endpoint trouble before a byte left (connection refused): try again later, and take the
    #: attempt back, so a first attempt stays batchable after an outage.
    retry_unsent: list[tuple[ClaimedRow, PublishFailed]] = field(default_factory=list)
    #: The server refused the event itself: dead-letter with its reason.
    refused: list[tuple[ClaimedRow, PublishFailed]] = field(default_factory=list)
    #: The server refused our credentials: no event is at fault; keep the rows pending.
    misconfigured: list[tuple[ClaimedRow, PublishFailed]] = field(default_factory=list)
    #: Never sent (the worker is stopping): give the rows back untouched.
    unsent: list[ClaimedRow] = field(default_factory=list)
    #: The endpoint-level errors seen, for the worker-wide breaker (backpressure excluded).
    endpoint_errors: list[EndpointUnavailable] = field(default_factory=list)
    #: The refusal of this claim's batch request, if it was refused (see ``_publish_alone``).
    batch_refusal: EventRefused | None = None
    requests: int = 0
    sent_as_batch: int = 0
    sent_alone: int = 0


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
    ) -> None:
        self._client = client
        self._master_key = master_key
        self._alone = asyncio.Semaphore(alone_concurrency)
        self._stopping = stopping
        self._paused = paused

    async def deliver(self, rows: Sequence[ClaimedRow]) -> Outcome:
        outcome = Outcome()
        items: dict[int, dict[str, Any]] = {}
        for row in rows:
            try:
                items[row.id] = row_item(row, self._master_key)
            except InvalidEvent as exc:
                # Only an encrypted row without a configured master key gets here: the
                # worker's settings are at fault, not the event.
                outcome.misconfigured.append(
                    (row, ClientMisconfigured(str(exc), code="no_master_key"))
                )
        first = [r for r in rows if r.id in items and r.first_attempt]
        again = [r for r in rows if r.id in items and not r.first_attempt]
        alone_now: list[ClaimedRow] = []
        batch_sent = False
        if first:
            alone_now, batch_sent = await self._publish_batch(first, items, outcome)
        await asyncio.gather(
            *(self._publish_alone(r, items[r.id], outcome, may_skip=False) for r in again),
            *(
                self._publish_alone(
                    r, items[r.id], outcome, not batch_sent, after_refusal=outcome.batch_refusal
                )
                for r in alone_now
            ),
        )
        return outcome

    async def _publish_batch(
        self, rows: list[ClaimedRow], items: dict[int, dict[str, Any]], outcome: Outcome
    ) -> tuple[list[ClaimedRow], bool]:
        """Send first attempts as one batch.

        Returns the rows to send alone right away, and whether a batch request carried them.
        """
        if self._stopping():
            outcome.unsent.extend(rows)
            return [], False
        if len(rows) == 1:  # a batch of one buys nothing; /events answers with its ack id
            return rows, False
        body = batch_body([items[r.id] for r in rows], self._client.limits)
        outcome.requests += 1
        outcome.sent_as_batch += len(rows)
        try:
            result = await self._client.send(self._client.prepare_batch_body(body))
        except EventRefused as exc:
            # Which item was bad is not said, and the items before it were published: re-send
            # each alone (their repeats are answered from the server's cache).
            outcome.batch_refusal = exc
            return rows, True
        except ClientMisconfigured as exc:
            outcome.misconfigured.extend((r, exc) for r in rows)
            return [], True
        except EndpointUnavailable as exc:
            retry = outcome.retry_unsent if never_sent(exc) else outcome.retry
            retry.extend((r, exc) for r in rows)
            outcome.endpoint_errors.append(exc)
            return [], True
        acks = result.batch
        for index, row in enumerate(rows):
            ack = acks[index] if index < len(acks) else ChannelAck()
            outcome.published.append(_ack(row, ack))
        return [], True

    async def _publish_alone(
        self,
        row: ClaimedRow,
        item: dict[str, Any],
        outcome: Outcome,
        may_skip: bool,
        after_refusal: EventRefused | None = None,
    ) -> None:
        """Send one row through ``/events``. ``may_skip``: no request ever carried this row, so a
        stopping worker may give it back instead of sending it. ``after_refusal``: the refusal
        of the batch this row (on its first attempt) was just sent in."""
        async with self._alone:
            if may_skip and self._stopping():
                outcome.unsent.append(row)
                return
            if outcome.endpoint_errors or self._paused():
                # The endpoint just failed (in this claim, or the worker paused for another
                # claim's failures): the rest of the rows would only fail too, or burst into a
                # rate limit. They wait for the backoff without a request.
                exc = outcome.endpoint_errors[-1] if outcome.endpoint_errors else _PAUSED
                (
                    outcome.retry_unsent if may_skip or not row.first_attempt else outcome.retry
                ).append((row, exc))
                return
            outcome.requests += 1
            outcome.sent_alone += 1
            try:
                result = await self._client.send(self._client.prepare_events_body(dump_body(item)))
            except EventRefused as exc:
                outcome.refused.append((row, exc))
                return
            except ClientMisconfigured as exc:
                outcome.misconfigured.append((row, exc))
                return
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
                    return
                # A refund is safe only if no request ever carried the row: a first attempt
                # whose batch went out must never become batchable again.
                refund = never_sent(exc) and (may_skip or not row.first_attempt)
                (outcome.retry_unsent if refund else outcome.retry).append((row, exc))
                if exc.code != BACKPRESSURE:
                    outcome.endpoint_errors.append(exc)
                return
        outcome.published.append(_ack(row, result.channels.get(row.channel, ChannelAck())))


_PAUSED = EndpointUnavailable(
    "not sent: publishing is paused after endpoint failures", maybe_delivered=False
)


def never_sent(exc: EndpointUnavailable) -> bool:
    """True when the request provably did not reach the server (the connection never opened)."""
    return exc.status is None and not exc.maybe_delivered


def _ack(row: ClaimedRow, ack: ChannelAck) -> Ack:
    return Ack(
        id=row.id,
        acknowledgement_id=ack.acknowledgement_id,
        message_serial=_text(ack.message_serial),
        history_serial=_text(ack.history_serial),
    )


def _text(value: object) -> str | None:
    return None if value is None else str(value)[:64]


def failure_of(
    row: ClaimedRow, exc: PublishFailed, delay: float = 0.0, prefix: str = ""
) -> Failure:
    return Failure(
        id=row.id,
        status=exc.status,
        code=exc.code,
        message=f"{prefix}{exc.message}",
        delay=delay,
    )

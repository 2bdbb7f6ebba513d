"""The values that cross the driver seam: a claimed row, what the server acknowledged, why a row
failed, what a claim's outcome writes (:class:`Recording`), and what a mutation's message is.

They carry no SQL and do no I/O: the planner builds them, every driver writes them.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..schema import ACK_ID_MAX, ERROR_CODE_MAX, ERROR_MESSAGE_MAX, SERIAL_MAX
from ..sockudo.errors import EventRefused

log = logging.getLogger("outbox.worker")


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    """What a worker needs to publish one row, as it was written."""

    id: int
    idempotency_key: str
    channel: str
    event: str
    data: str
    socket_id: str | None
    info: str | None
    tags: str | None
    extras: str | None
    encryption_nonce: bytes | None
    attempts: int
    failures: int
    queued_at: dt.datetime
    #: The enqueuing transaction's trace context (W3C traceparent), if it had one.
    traceparent: str | None = None
    #: Rows of one key go out one after another (the claim returns only a key's head).
    ordering_key: str | None = None
    #: None for a publish; else the mutation (:class:`~outbox.schema.Operation`) ``data`` carries.
    operation: str | None = None
    #: A mutation's message: an outbox event (published by now) or a known serial.
    target_event_id: uuid.UUID | None = None
    target_serial: str | None = None
    #: The event's id (what enqueue returned; shared by its channels' rows): what the worker's
    #: log names an event by, and ``outbox replay`` finds it by.
    event_id: uuid.UUID | None = None
    #: The row was leased by another claim whose lease expired (a killed or stalled worker's).
    taken_over: bool = False

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any], taken_over: bool = False) -> ClaimedRow:
        """Build from a SQLAlchemy result row by column name. (PostgreSQL's driver builds
        by position from its RETURNING, which lists :data:`CLAIM_COLUMNS` in this order.)"""
        return cls(**{name: row[name] for name in CLAIM_COLUMNS}, taken_over=taken_over)

    @property
    def first_attempt(self) -> bool:
        """True if no earlier claim of this row could have sent it (routing: batch vs alone)."""
        return self.attempts == 1


#: The columns a claim returns, in the order its SQL lists them.
CLAIM_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ClaimedRow) if f.name != "taken_over")


@dataclass(frozen=True, slots=True)
class Ack:
    """What the server acknowledged for one row, each value whole or not at all.

    A value longer than its column is left out and logged, never stored cut: a cut serial names
    no message, so every mutation of it would be refused. The row is still recorded published
    (it was). The columns hold 255 characters, and Sockudo takes no serial over 128 bytes in a
    request, so a serial left out could not have named its message anyway.
    """

    id: int
    acknowledgement_id: str | None = None
    message_serial: str | None = None
    history_serial: str | None = None

    def __post_init__(self) -> None:
        for name, width in (
            ("acknowledgement_id", ACK_ID_MAX),
            ("message_serial", SERIAL_MAX),
            ("history_serial", SERIAL_MAX),
        ):
            value = getattr(self, name)
            if value is None:
                continue
            value = str(value)
            if len(value) > width:
                log.warning(
                    "row %d: the server's %s is %d characters, more than the %d its column "
                    "holds; recorded published without it (a mutation naming this event ends "
                    "target_not_found): %.1000s",
                    self.id,
                    name,
                    len(value),
                    width,
                    value,
                )
                value = None
            object.__setattr__(self, name, value)


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a row did not publish; ``delay`` is seconds until its next attempt (reschedule only).

    ``charged`` adds one to the row's failures (its budget): only failures that are the event's
    own are charged. Values are bounded to their columns at construction, so storing whatever a
    server answered can never fail the transaction that records a whole claim's outcome.
    """

    id: int
    status: int | None
    code: str | None
    message: str
    delay: float = 0.0
    charged: bool = False

    def __post_init__(self) -> None:
        status, message = self.status, self.message
        if status is not None and not 100 <= status <= 999:
            message = f"(status {status}) {message}"
            status = None
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "code", None if self.code is None else self.code[:ERROR_CODE_MAX])
        object.__setattr__(self, "message", message[:ERROR_MESSAGE_MAX])


@dataclass(frozen=True, slots=True)
class UnknownSerial:
    """A mutation's message was published, but the answer that said so carried no receipt: its
    serial is in the channel's history, under its ``message_id``, published between the two
    times (the database's clock, which the lookup allows some seconds of difference from)."""

    message_id: str
    sent_after: dt.datetime
    sent_before: dt.datetime


@dataclass(frozen=True, slots=True)
class FoundSerial:
    """The serial of an outbox event's message on one channel, found in the channel's history."""

    event_id: uuid.UUID
    channel: str
    message_serial: str


#: What :meth:`Driver.targets_resolve` says of a mutation's message: its serial, where to look
#: for it, or why it has none.
Target = str | UnknownSerial | EventRefused

#: Called by a listener for each notification that new rows were committed.
OnNotify = Callable[[], None]


@dataclass
class Recording:
    """What one claim's outcome writes, in one transaction guarded by the claim's token.

    One word per idea, from the planner (:class:`outbox.plan.Plan` is a Recording with log
    lines) to the driver's statements, which take their names from these fields: rows are
    *published*, *retried*, *buried* or *given back*; a *refund* takes the claim's attempt
    back; a buried head may *park* its key; a key whose head left has its next row *promoted*;
    a message that left *wakes* the mutations waiting for it.
    """

    #: Moved to the published log with what the server acknowledged ("publish").
    published: list[Ack] = field(default_factory=list)
    #: Back to pending after a delay, the attempt kept: the row goes alone next time ("retry").
    retry: list[Failure] = field(default_factory=list)
    #: The same, the attempt refunded: no request carried the row to the server's idempotency
    #: layer, so a first attempt stays batchable.
    retry_refund: list[Failure] = field(default_factory=list)
    #: Moved to the dead table with the reason ("bury").
    buried: list[Failure] = field(default_factory=list)
    #: Rows of ``buried`` whose ordering key parks (the "park" policy): the rest of the key waits.
    park: list[int] = field(default_factory=list)
    #: The ordering keys of rows this recording takes out of the table (published or buried):
    #: the next row of each becomes due, unless its key is parked ("promote").
    heads_gone: list[str] = field(default_factory=list)
    #: (event id, channel) of the messages this recording takes out of the table (published or
    #: buried): the mutations waiting for them become due ("wake").
    messages_gone: list[tuple[uuid.UUID, str]] = field(default_factory=list)
    #: Not sent (the worker is stopping): back to pending at once, the attempt kept (a request
    #: of this claim carried the row: it must go alone next time) ("give back") ...
    give_back: list[int] = field(default_factory=list)
    #: ... or refunded (nothing carried it).
    give_back_refund: list[int] = field(default_factory=list)

    @property
    def leaving(self) -> list[int]:
        """The rows this recording takes out of the hot table (published or buried)."""
        return [a.id for a in self.published] + [f.id for f in self.buried]

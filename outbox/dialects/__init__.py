"""The database seam: the handful of statements the worker needs, one module per database.

Each statement does one whole step of the flow (claim a batch, ack a batch, reschedule, bury,
release, reclaim) in a single round trip, guarded by the lease token where it acts on a claim.
The worker calls these inside short transactions and never holds one open across HTTP.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import sqlalchemy as sa

from ..schema import ACK_ID_MAX, ERROR_CODE_MAX, ERROR_MESSAGE_MAX, SERIAL_MAX


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

    @property
    def first_attempt(self) -> bool:
        """True if no earlier claim of this row could have sent it (routing: batch vs alone)."""
        return self.attempts == 1


@dataclass(frozen=True, slots=True)
class Ack:
    """What the server acknowledged for one row, bounded to its columns (see :class:`Failure`)."""

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
            if value is not None:
                object.__setattr__(self, name, str(value)[:width])


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


CLAIM_COLUMNS = (
    "id, idempotency_key, channel, event, data, socket_id, info, tags, extras, "
    "encryption_nonce, attempts, failures, queued_at"
)


class Dialect(Protocol):
    """What one database must provide. Implementations: :mod:`.postgresql`, :mod:`.sqlite`."""

    name: str

    def claim_batch(
        self,
        conn: sa.Connection,
        table: sa.Table,
        limit: int,
        lease_seconds: float,
        token: uuid.UUID,
    ) -> list[ClaimedRow]:
        """Lease up to ``limit`` due rows (pending and due, oldest first) under ``token``."""

    def ack_published(
        self, conn: sa.Connection, table: sa.Table, token: uuid.UUID, acks: Sequence[Ack]
    ) -> int:
        """Mark leased rows published with their acknowledgements; returns rows changed."""

    def reschedule(
        self,
        conn: sa.Connection,
        table: sa.Table,
        token: uuid.UUID,
        failures: Sequence[Failure],
        refund_attempt: bool = False,
    ) -> int:
        """Put leased rows back to pending, due after each failure's delay, with the error kept.

        ``refund_attempt`` takes back the attempt counted at claim (the request provably never
        reached the publish path, e.g. refused by authentication), so the row may go in a batch again.
        """

    def mark_dead(
        self, conn: sa.Connection, table: sa.Table, token: uuid.UUID, failures: Sequence[Failure]
    ) -> int:
        """Dead-letter leased rows with the reason."""

    def release(
        self,
        conn: sa.Connection,
        table: sa.Table,
        token: uuid.UUID,
        ids: Sequence[int],
        refund_attempt: bool = True,
    ) -> int:
        """Give back leased rows not sent by this claim (shutdown): pending and due now.

        ``refund_attempt`` takes back the claim's attempt; not for a row an earlier request of
        the claim carried (its batch went out), which must stay a retry and go alone.
        """

    def extend_lease(
        self, conn: sa.Connection, table: sa.Table, token: uuid.UUID, lease_seconds: float
    ) -> int:
        """Push the expiry of every row still leased under ``token`` to now + ``lease_seconds``."""

    def reclaim_expired(self, conn: sa.Connection, table: sa.Table) -> int:
        """Return rows whose lease expired to pending; they keep their attempt count (sent alone)."""

    def delete_published_before(
        self, conn: sa.Connection, table: sa.Table, cutoff: dt.datetime, limit: int
    ) -> int:
        """Delete up to ``limit`` rows published before ``cutoff``; returns how many.

        The status is re-checked on the row itself, after any wait for its lock: a row that
        ``replay --published`` just put back is not published any more and must survive.
        """


class FailureStatements:
    """``reschedule`` and ``mark_dead`` are one statement with two outcomes: each dialect writes
    that statement once, as ``_finish_failed``."""

    def reschedule(
        self,
        conn: sa.Connection,
        table: sa.Table,
        token: uuid.UUID,
        failures: Sequence[Failure],
        refund_attempt: bool = False,
    ) -> int:
        return self._finish_failed(conn, table, token, failures, "pending", refund_attempt)

    def mark_dead(
        self, conn: sa.Connection, table: sa.Table, token: uuid.UUID, failures: Sequence[Failure]
    ) -> int:
        return self._finish_failed(conn, table, token, failures, "dead", False)

    def _finish_failed(
        self,
        conn: sa.Connection,
        table: sa.Table,
        token: uuid.UUID,
        failures: Sequence[Failure],
        status: str,
        refund_attempt: bool,
    ) -> int:
        raise NotImplementedError


def dialect_for(bind: sa.Engine | sa.Connection) -> Dialect:
    name = bind.dialect.name
    if name == "postgresql":
        from .postgresql import PostgresDialect

        return PostgresDialect()
    if name == "sqlite":
        from .sqlite import SQLiteDialect

        return SQLiteDialect()
    raise NotImplementedError(
        f"the outbox supports PostgreSQL and SQLite; {name!r} is not supported yet"
    )


def quoted(conn: sa.Connection | sa.Engine, table: sa.Table) -> str:
    """The table's name as safe SQL text (schema-qualified and quoted where needed)."""
    return conn.dialect.identifier_preparer.format_table(table)

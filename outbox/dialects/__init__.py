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

from ..schema import ERROR_MESSAGE_MAX


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
    created_at: dt.datetime

    @property
    def first_attempt(self) -> bool:
        """True if no earlier claim of this row could have sent it (routing: batch vs alone)."""
        return self.attempts == 1


@dataclass(frozen=True, slots=True)
class Ack:
    id: int
    acknowledgement_id: str | None = None
    message_serial: str | None = None
    history_serial: str | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a row did not publish; ``delay`` is seconds until its next attempt (reschedule only)."""

    id: int
    status: int | None
    code: str | None
    message: str
    delay: float = 0.0

    def bounded_message(self) -> str:
        return self.message[:ERROR_MESSAGE_MAX]


CLAIM_COLUMNS = (
    "id, idempotency_key, channel, event, data, socket_id, info, tags, extras, "
    "encryption_nonce, attempts, created_at"
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
        self, conn: sa.Connection, table: sa.Table, token: uuid.UUID, ids: Sequence[int]
    ) -> int:
        """Give back leased rows that were never sent (shutdown): pending, due now, attempt refunded."""

    def extend_lease(
        self, conn: sa.Connection, table: sa.Table, token: uuid.UUID, lease_seconds: float
    ) -> int:
        """Push the expiry of every row still leased under ``token`` to now + ``lease_seconds``."""

    def reclaim_expired(self, conn: sa.Connection, table: sa.Table) -> int:
        """Return rows whose lease expired to pending; they keep their attempt count (sent alone)."""


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

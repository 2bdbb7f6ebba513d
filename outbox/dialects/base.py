"""The database seam: what every database must provide, and the values that cross it.

Each statement does one whole step of the flow (claim a batch, ack a batch, reschedule, bury,
release, renew, reclaim, trim) in a single round trip, guarded by the lease token where it acts on
a claim. The worker calls them inside short transactions and never holds one open across HTTP.
A database module (:mod:`.postgresql`, :mod:`.mysql`, :mod:`.sqlite`) subclasses :class:`Dialect` and writes
only these statements; ``tests/test_dialects.py`` runs each of them against every database.
"""

from __future__ import annotations

import abc
import asyncio
import datetime as dt
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import sqlalchemy as sa

from ..schema import (
    ACK_ID_MAX,
    ERROR_CODE_MAX,
    ERROR_MESSAGE_MAX,
    SERIAL_MAX,
    Status,
    UTCDateTime,
    utc_now,
)


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

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> ClaimedRow:
        """Build from a result row by column name (never by position)."""
        return cls(**{name: row[name] for name in CLAIM_COLUMNS})

    @property
    def first_attempt(self) -> bool:
        """True if no earlier claim of this row could have sent it (routing: batch vs alone)."""
        return self.attempts == 1


#: The columns a claim returns, in the order its SQL lists them.
CLAIM_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ClaimedRow))


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


#: Bind parameters shared by the statements: the lease token and a cutoff time.
TOKEN = sa.bindparam("token", type_=sa.Uuid(as_uuid=True))
CUTOFF = sa.bindparam("cutoff", type_=UTCDateTime())

#: Called by a listener for each notification that new rows were committed.
OnNotify = Callable[[], None]


class Dialect(abc.ABC):
    """The statements one database provides. Implementations: :mod:`.postgresql`, :mod:`.mysql`,
    :mod:`.sqlite`.

    Hot-path statements are written per database; the operator statements at the end are portable
    SQLAlchemy Core, shared by every database.
    """

    name: ClassVar[str]

    #: ``create_engine`` options these statements rely on (defaults: a caller's own win).
    engine_options: ClassVar[Mapping[str, Any]] = {}

    # -- the claim ----------------------------------------------------------------------------

    @abc.abstractmethod
    def claim_batch(
        self,
        conn: sa.Connection,
        table: sa.Table,
        limit: int,
        lease_seconds: float,
        token: uuid.UUID,
    ) -> list[ClaimedRow]:
        """Lease up to ``limit`` due rows (pending and due, oldest first) under ``token``.

        Each claimed row counts one more attempt; the lease expires ``lease_seconds`` from now
        by the database clock. Rows come back in id order.
        """

    @abc.abstractmethod
    def extend_lease(
        self, conn: sa.Connection, table: sa.Table, token: uuid.UUID, lease_seconds: float
    ) -> int:
        """Push the expiry of every row still leased under ``token`` to now + ``lease_seconds``."""

    # -- the outcome of a claim (every statement is guarded by the claim's token) -------------

    @abc.abstractmethod
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
        refund: bool = False,
    ) -> int:
        """Put leased rows back to pending, due after each failure's delay, with the error kept.

        ``refund`` takes back the attempt counted at claim (no request carried the row to the
        server's idempotency layer), so a first attempt may go in a batch again.
        """
        return self._finish(conn, table, token, failures, Status.PENDING, refund)

    def mark_dead(
        self, conn: sa.Connection, table: sa.Table, token: uuid.UUID, failures: Sequence[Failure]
    ) -> int:
        """Dead-letter leased rows with the reason."""
        return self._finish(conn, table, token, failures, Status.DEAD, False)

    @abc.abstractmethod
    def _finish(
        self,
        conn: sa.Connection,
        table: sa.Table,
        token: uuid.UUID,
        failures: Sequence[Failure],
        status: Status,
        refund: bool,
    ) -> int:
        """The one statement behind :meth:`reschedule` and :meth:`mark_dead`."""

    @abc.abstractmethod
    def release(
        self,
        conn: sa.Connection,
        table: sa.Table,
        token: uuid.UUID,
        ids: Sequence[int],
        refund: bool = True,
    ) -> int:
        """Give back leased rows this claim did not send (shutdown): pending and due now.

        ``refund`` takes back the claim's attempt; not for a row an earlier request of the
        claim carried (its batch went out), which must stay a retry and go alone.
        """

    # -- upkeep -------------------------------------------------------------------------------

    @abc.abstractmethod
    def reclaim_expired(self, conn: sa.Connection, table: sa.Table) -> int:
        """Return rows whose lease expired to pending; they keep their attempt count (sent alone)."""

    def delete_published_before(
        self, conn: sa.Connection, table: sa.Table, cutoff: dt.datetime, limit: int
    ) -> int:
        """Delete up to ``limit`` rows published before ``cutoff``; returns how many.

        The status is re-checked on the row itself, after any wait for its lock: a row that
        ``replay --published`` just put back is not published any more and must survive.
        """
        # Under READ COMMITTED a DELETE that waited for a row lock re-checks only its own WHERE
        # on the new row version, not the subquery's: hence the status test in both.
        t = quoted(conn, table)
        published = literal(Status.PUBLISHED)
        stmt = sa.text(
            f"""
            DELETE FROM {t}
            WHERE id IN (
                SELECT id FROM {t}
                WHERE status = {published} AND published_at < :cutoff
                LIMIT :limit
            )
            AND status = {published} AND published_at < :cutoff
            """
        ).bindparams(CUTOFF)
        return conn.execute(stmt, {"cutoff": cutoff, "limit": limit}).rowcount

    #: Whether :meth:`listen` can wake a worker on commit (else workers only poll).
    notifies: ClassVar[bool] = False

    async def listen(self, engine: sa.Engine, table: sa.Table, on_notify: OnNotify) -> None:
        """Call ``on_notify`` whenever rows are committed, until cancelled.

        Databases without notifications never call it: the worker polls them.
        """
        await asyncio.Event().wait()

    # -- operator statements (portable) -------------------------------------------------------

    def replay(
        self,
        conn: sa.Connection,
        table: sa.Table,
        ids: Sequence[int],
        statuses: Sequence[str],
        new_keys: Sequence[str] | None,
    ) -> int:
        """Put rows back to pending as a new delivery: a fresh budget, age limit and error state.

        ``new_keys`` (one per id) replaces each row's idempotency key; None keeps the keys, and
        then each row counts one attempt already, so it goes alone (a batch could skip a key
        the server still knows and answer 200 without delivering). A row whose status is no
        longer one of ``statuses`` is left alone.
        """
        t = table
        values: dict[str, Any] = {
            "status": Status.PENDING.value,
            "attempts": 0 if new_keys is not None else 1,
            "failures": 0,
            "queued_at": utc_now(),
            "next_attempt_at": utc_now(),
            "lease_token": None,
            "lease_expires_at": None,
            "published_at": None,
            "acknowledgement_id": None,
            "message_serial": None,
            "history_serial": None,
            "last_error_status": None,
            "last_error_code": None,
            "last_error_message": None,
            "last_error_at": None,
        }
        # One statement executed per row (executemany): an IN list would be an "expanding"
        # parameter, which executemany refuses.
        guard = sa.and_(
            t.c.id == sa.bindparam("row_id"), sa.or_(*(t.c.status == str(s) for s in statuses))
        )
        if new_keys is None:
            stmt = sa.update(t).where(guard).values(**values)
            params = [{"row_id": i} for i in ids]
        else:
            stmt = sa.update(t).where(guard).values(**values, idempotency_key=sa.bindparam("key"))
            params = [{"row_id": i, "key": k} for i, k in zip(ids, new_keys, strict=True)]
        if not params:
            return 0
        result = conn.execute(stmt, params)
        return result.rowcount if result.rowcount >= 0 else len(params)

    def release_leases(self, conn: sa.Connection, table: sa.Table, expired_only: bool) -> int:
        """Put leased rows back to pending, due now; they keep their attempt count."""
        t = table
        where = [t.c.status == Status.IN_FLIGHT.value]
        if expired_only:
            where.append(t.c.lease_expires_at <= utc_now())
        stmt = (
            sa.update(t)
            .where(*where)
            .values(
                status=Status.PENDING.value,
                next_attempt_at=utc_now(),
                lease_token=None,
                lease_expires_at=None,
            )
        )
        return conn.execute(stmt).rowcount


def literal(status: Status) -> str:
    """A status as an SQL string literal, for statements that a partial index must match."""
    return f"'{status.value}'"


def quoted(conn: sa.Connection | sa.Engine, table: sa.Table) -> str:
    """The table's name as safe SQL text (schema-qualified and quoted where needed)."""
    return conn.dialect.identifier_preparer.format_table(table)


def claim_columns(prefix: str = "") -> str:
    """The claim's RETURNING list (``prefix`` qualifies each column, e.g. ``"o."``)."""
    return ", ".join(prefix + name for name in CLAIM_COLUMNS)


def claimed_rows(result: sa.CursorResult[Any]) -> list[ClaimedRow]:
    """The rows a claim statement returned, by column name, in id order."""
    return sorted((ClaimedRow.from_mapping(r._mapping) for r in result), key=lambda r: r.id)

"""The worker's side of the seam: its three hot calls (claim, renew, record) as coroutines.

The worker calls only these, once per claimed batch. By default each runs the database module's
synchronous statements in one short transaction on a thread (:class:`ThreadedHotPath`); a module
may provide its own, as PostgreSQL does with psycopg's asyncio connections, so the hot path runs
without a thread hand-off or SQLAlchemy's per-transaction work (a third of the worker's CPU when
measured). Either way a database failure surfaces as SQLAlchemy's ``DBAPIError``, which the
worker retries.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import sqlalchemy as sa

from ..connections import in_transaction
from .base import Ack, ClaimedRow, Failure

if TYPE_CHECKING:
    from .base import Dialect


@dataclass
class Recording:
    """The outcome of one claim, written in one transaction guarded by the claim's token.

    The worker's planner (:class:`outbox.plan.Plan`, a Recording with log lines) fills it;
    the hot path writes it as it stands.
    """

    published: list[Ack] = field(default_factory=list)
    #: Back to pending after a delay, keeping the attempt (the row goes alone next time).
    retry: list[Failure] = field(default_factory=list)
    #: Back to pending after a delay, the attempt refunded (no request carried the row, so a
    #: first attempt stays batchable).
    retry_refund: list[Failure] = field(default_factory=list)
    dead: list[Failure] = field(default_factory=list)
    #: Rows of ``dead`` whose ordering key parks (the "park" policy): the rest of the key waits.
    park: list[int] = field(default_factory=list)
    #: The ordering keys of rows this recording takes out of the table (published or dead):
    #: the next row of each becomes due, unless its key parks.
    heads_gone: list[str] = field(default_factory=list)
    #: (event id, channel) of the messages this recording takes out of the table (published
    #: or dead): the mutations waiting for them become due (see ``Dialect.wake_mutations``).
    messages_gone: list[tuple[uuid.UUID, str]] = field(default_factory=list)
    #: Not sent (the worker is stopping): back to pending at once, the attempt refunded ...
    give_back: list[int] = field(default_factory=list)
    #: ... or kept (a request of this claim carried the row: it must go alone next time).
    give_back_carried: list[int] = field(default_factory=list)


class HotPath(Protocol):
    async def start(self) -> None:
        """Check, before the worker claims anything, that the hot path can run as the engine's
        connections do (:class:`~outbox.connections.UnfollowableEngine` if not); a database error
        is a ``DBAPIError``, as for the other calls."""
        ...

    async def claim(self, limit: int, lease_seconds: float, token: uuid.UUID) -> list[ClaimedRow]:
        """Lease up to ``limit`` due rows (see :meth:`Dialect.claim_batch`); committed on return."""
        ...

    async def extend_lease(self, token: uuid.UUID, lease_seconds: float, ids: Sequence[int]) -> int:
        """Renew the lease of the rows ``ids`` still held under ``token``."""
        ...

    async def record(self, token: uuid.UUID, recording: Recording) -> int:
        """Write a claim's outcome in one transaction; returns the rows this ack published."""
        ...

    async def aclose(self) -> None:
        """Release what the hot path holds (connections); it is not used afterwards."""
        ...


def write_recording(
    dialect: Dialect, conn: sa.Connection, table: sa.Table, token: uuid.UUID, r: Recording
) -> int:
    """The statements of :meth:`HotPath.record`, in the caller's transaction."""
    if r.heads_gone:  # keyed rows leave: lock them before any row is deleted (see the method)
        leaving = [a.id for a in r.published] + [f.id for f in r.dead]
        dialect.lock_leaving_rows(conn, table, token, leaving)
    acked = dialect.ack_published(conn, table, token, r.published)
    dialect.reschedule(conn, table, token, r.retry)
    dialect.reschedule(conn, table, token, r.retry_refund, refund=True)
    dialect.mark_dead(conn, table, token, r.dead)
    dialect.park_keys(conn, table, r.park)
    dialect.promote_heads(conn, table, r.heads_gone)
    dialect.wake_mutations(conn, table, r.messages_gone)
    dialect.release(conn, table, token, r.give_back)
    dialect.release(conn, table, token, r.give_back_carried, refund=False)
    return acked


class ThreadedHotPath:
    """The database module's statements, each call a short transaction on a thread."""

    def __init__(self, engine: sa.Engine, dialect: Dialect, table: sa.Table) -> None:
        self.engine, self.dialect, self.table = engine, dialect, table

    async def start(self) -> None:
        pass  # the engine's own connections: nothing to follow

    async def claim(self, limit: int, lease_seconds: float, token: uuid.UUID) -> list[ClaimedRow]:
        return await in_transaction(
            self.engine,
            lambda conn: self.dialect.claim_batch(conn, self.table, limit, lease_seconds, token),
        )

    async def extend_lease(self, token: uuid.UUID, lease_seconds: float, ids: Sequence[int]) -> int:
        return await in_transaction(
            self.engine,
            lambda conn: self.dialect.extend_lease(conn, self.table, token, lease_seconds, ids),
        )

    async def record(self, token: uuid.UUID, recording: Recording) -> int:
        return await in_transaction(
            self.engine,
            lambda conn: write_recording(self.dialect, conn, self.table, token, recording),
        )

    async def aclose(self) -> None:
        pass

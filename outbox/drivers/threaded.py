"""Synchronous SQL behind the async driver interface: SQLite's and MariaDB's drivers.

Each of the worker's operations is one short transaction of the engine's, run on a thread, its
statements written as synchronous methods here (one per step of a recording, named as the
recording names it). A subclass writes the per-database ones: the claim, the lease renewal, and
the steps that publish, retry, bury and give back rows; parking, promotion and waking default to
the portable statements.
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Sequence

import sqlalchemy as sa

from . import portable
from .base import Driver
from .values import Ack, ClaimedRow, Failure, Recording


class ThreadedDriver(Driver):
    """A driver whose worker operations run synchronous statements in a transaction on a
    thread."""

    async def events_claim(
        self, limit: int, lease_seconds: float, token: uuid.UUID
    ) -> list[ClaimedRow]:
        return await self.transaction(lambda c: self.claim(c, limit, lease_seconds, token))

    async def events_extend_lease(
        self, token: uuid.UUID, lease_seconds: float, ids: Sequence[int]
    ) -> int:
        return await self.transaction(lambda c: self.extend_lease(c, token, lease_seconds, ids))

    async def events_record(self, token: uuid.UUID, recording: Recording) -> int:
        return await self.transaction(lambda c: self.record(c, token, recording))

    def record(self, conn: sa.Connection, token: uuid.UUID, r: Recording) -> int:
        """The statements of :meth:`events_record`, in the caller's transaction."""
        published = self.publish(conn, token, r.published) if r.published else 0
        if r.retry:
            self.retry(conn, token, r.retry, refund=False)
        if r.retry_refund:
            self.retry(conn, token, r.retry_refund, refund=True)
        if r.buried:
            self.bury(conn, token, r.buried)
        if r.park:
            self.park(conn, r.park)
        if r.heads_gone:
            self.promote(conn, r.heads_gone)
        if r.messages_gone:
            self.wake(conn, r.messages_gone)
        if r.give_back:
            self.give_back(conn, token, r.give_back, refund=False)
        if r.give_back_refund:
            self.give_back(conn, token, r.give_back_refund, refund=True)
        return published

    # -- the database's own statements --------------------------------------------------------

    @abc.abstractmethod
    def claim(
        self, conn: sa.Connection, limit: int, lease_seconds: float, token: uuid.UUID
    ) -> list[ClaimedRow]:
        """See :meth:`Driver.events_claim`."""

    @abc.abstractmethod
    def extend_lease(
        self, conn: sa.Connection, token: uuid.UUID, lease_seconds: float, ids: Sequence[int]
    ) -> int:
        """See :meth:`Driver.events_extend_lease`."""

    @abc.abstractmethod
    def publish(self, conn: sa.Connection, token: uuid.UUID, acks: Sequence[Ack]) -> int:
        """Move leased rows to the published log with their acknowledgements; returns how many."""

    @abc.abstractmethod
    def retry(
        self, conn: sa.Connection, token: uuid.UUID, failures: Sequence[Failure], refund: bool
    ) -> int:
        """Give leased rows back to the queue, due after each failure's delay, the error kept
        (and the failure charged where ``Failure.charged``); ``refund`` takes the claim's
        attempt back."""

    @abc.abstractmethod
    def bury(self, conn: sa.Connection, token: uuid.UUID, failures: Sequence[Failure]) -> int:
        """Move leased rows to the dead table with the reason; returns how many."""

    @abc.abstractmethod
    def give_back(
        self, conn: sa.Connection, token: uuid.UUID, ids: Sequence[int], refund: bool
    ) -> int:
        """Give back leased rows this claim did not send: pending and due now; ``refund`` takes
        the claim's attempt back."""

    # -- the portable ones, unless the database has its own ------------------------------------

    def park(self, conn: sa.Connection, ids: Sequence[int]) -> int:
        return portable.keys_park(conn, self.table, ids)

    def promote(self, conn: sa.Connection, keys: Sequence[str]) -> int:
        return portable.keys_promote(conn, self.table, keys)

    def wake(self, conn: sa.Connection, messages: Sequence[tuple[uuid.UUID, str]]) -> int:
        return portable.mutations_wake(conn, self.table, messages)

"""The driver seam: every operation the outbox needs from a database, named for what it does.

One :class:`Driver` per database (:mod:`.postgresql`, :mod:`.sqlite`, :mod:`.mysql`), bound to
one outbox table and the engine that reaches it, and the same object everywhere: producers insert
through it, the worker claims, renews and records through it, its upkeep runs through it, and
``tests/test_drivers.py`` runs every operation of it against every database. A new database is a
new driver and a green conformance suite.

Operations are named ``<what>_<verb>``, River-style: ``events_*`` act on rows of the hot table,
``keys_*`` on ordering keys, ``mutations_*`` on rows that change a message, ``targets_*`` on the
messages mutations name, ``published_*`` on the published log. Two faces:

* **In the caller's transaction** (synchronous, on the caller's ``Connection``): ``keys_lock``,
  ``events_insert``, ``events_insert_keyed``. Enqueue and replay run them inside a transaction
  someone else owns, so they can be neither asynchronous nor transactions of their own.
* **The worker's** (coroutines, each one short transaction of the driver's own, committed on
  return; a database failure surfaces as SQLAlchemy's ``DBAPIError``, which the worker
  retries): ``events_claim``, ``events_extend_lease``, ``events_record``, and the upkeep.

PostgreSQL's driver runs the hot three on psycopg's asyncio connections; SQLite's and MariaDB's
run synchronous SQL on a thread (:class:`.threaded.ThreadedDriver`). What every database runs the
same lives in :mod:`.portable`; operator statements (replay, unpark, releasing leases) are not
the driver's: they live with the operator commands in :mod:`outbox.admin`.
"""

from __future__ import annotations

import abc
import asyncio
import datetime as dt
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import sqlalchemy as sa

from ..connections import in_transaction
from ..sockudo.errors import InvalidEvent
from . import portable
from .values import ClaimedRow, FoundSerial, OnNotify, Recording, Target

T = TypeVar("T")


class Driver(abc.ABC):
    """One database's operations on one outbox ``table``, reached through ``engine``."""

    name: ClassVar[str]
    #: ``create_engine`` options these statements rely on (defaults: a caller's own win).
    engine_options: ClassVar[Mapping[str, Any]] = {}
    #: SQL that ``outbox.database.create_engine`` runs on each new connection (the worker's and
    #: the CLI's sessions), or None.
    session_setup: ClassVar[str | None] = None
    #: Whether :meth:`listen` can wake a worker on commit (else workers only poll).
    notifies: ClassVar[bool] = False

    def __init__(self, engine: sa.Engine, table: sa.Table) -> None:
        self.engine, self.table = engine, table

    # -- in the caller's transaction ----------------------------------------------------------

    def keys_lock(self, conn: sa.Connection, keys: Sequence[str]) -> Collection[str] | None:
        """Before keyed rows are inserted: make the producers of one key commit in id order.

        Per key the claim goes by id, so a transaction that took a smaller id must not commit
        after one that took a larger: each database serializes the transactions that enqueue on
        a key until they end. Returns the keys whose newest row this transaction now holds (new
        rows of those wait behind it), or None where the insert can ask the table itself. This
        default refuses ordering keys and mutations: a database that cannot serialize its
        producers so (MariaDB and MySQL, for now) must not pretend to keep their order.
        """
        raise InvalidEvent(
            f"ordering keys and message mutations need PostgreSQL or SQLite (not {self.name})",
            field="ordering_key",
        )

    def events_insert(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
        """Insert enqueued rows without ordering keys or targets (all with the same keys)."""
        portable.events_insert(conn, self.table, rows)

    def events_insert_keyed(
        self, conn: sa.Connection, rows: list[dict[str, Any]], held: Collection[str] | None
    ) -> None:
        """Insert rows some of which have an ordering key or a target, after :meth:`keys_lock`
        (whose answer ``held`` is): see :func:`.portable.events_insert_keyed`."""
        portable.events_insert_keyed(conn, self.table, rows, held)

    # -- the worker's: the claim, its lease, its outcome --------------------------------------

    async def start(self) -> None:
        """Check, before the worker claims anything, that the driver can run as the engine's
        connections do (:class:`~outbox.connections.UnfollowableEngine` if not). Nothing to
        check for a driver that runs on the engine's own connections."""
        return None

    async def aclose(self) -> None:
        """Release what the driver holds of its own (connections); it is not used afterwards."""
        return None

    @abc.abstractmethod
    async def events_claim(
        self, limit: int, lease_seconds: float, token: uuid.UUID
    ) -> list[ClaimedRow]:
        """Lease up to ``limit`` due rows (due, not leased or lease expired; oldest first).

        A keyed row is claimable only as its key's head, its key not parked, and a mutation of
        an outbox event only once that event left the table. Each claimed row counts one more
        attempt; the lease expires ``lease_seconds`` from now by the database clock. Rows come
        back in id order, each saying whether it was ``taken_over`` from an expired lease.
        """

    @abc.abstractmethod
    async def events_extend_lease(
        self, token: uuid.UUID, lease_seconds: float, ids: Sequence[int]
    ) -> int:
        """Push the expiry of the rows ``ids`` still leased under ``token`` to now +
        ``lease_seconds``; returns how many."""

    @abc.abstractmethod
    async def events_record(self, token: uuid.UUID, recording: Recording) -> int:
        """Write a claim's outcome in one transaction, every statement guarded by ``token`` (a
        stale worker's recording changes nothing); returns the rows it published.

        In this order: lock the keyed rows leaving (where producers can hold them), publish,
        retry, bury, park, promote, wake, give back (see :class:`~.values.Recording`).
        """

    # -- the worker's: upkeep (the portable statements, on a thread, unless a driver has its own)

    async def events_reclaim_expired(self) -> int:
        """Clear leases that expired: see :func:`.portable.events_reclaim_expired`."""
        return await self.transaction(lambda c: portable.events_reclaim_expired(c, self.table))

    async def published_delete_before(self, cutoff: dt.datetime, limit: int) -> int:
        """Trim the published log: see :func:`.portable.published_delete_before`."""
        return await self.transaction(
            lambda c: portable.published_delete_before(c, self.table, cutoff, limit)
        )

    async def mutations_wake_stranded(self) -> int:
        """Wake mutations whose message left unseen: see
        :func:`.portable.mutations_wake_stranded`."""
        return await self.transaction(lambda c: portable.mutations_wake_stranded(c, self.table))

    async def targets_resolve(self, rows: Sequence[ClaimedRow]) -> dict[int, Target]:
        """The serial of each mutation's message: see :func:`.portable.targets_resolve`."""
        return await self.transaction(lambda c: portable.targets_resolve(c, self.table, rows))

    async def targets_remember(self, found: Sequence[FoundSerial]) -> int:
        """Keep serials found in history: see :func:`.portable.targets_remember`."""
        return await self.transaction(lambda c: portable.targets_remember(c, self.table, found))

    async def listen(self, on_notify: OnNotify) -> None:
        """Call ``on_notify`` whenever rows are committed, until cancelled.

        Databases without notifications never call it: the worker polls them.
        """
        await asyncio.Event().wait()

    async def transaction(self, work: Callable[[sa.Connection], T]) -> T:
        """Run ``work`` in one transaction of the engine's, on a thread."""
        return await in_transaction(self.engine, work)

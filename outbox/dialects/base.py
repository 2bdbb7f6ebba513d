"""The database seam: what every database must provide, and the values that cross it.

Each statement does one whole step of the flow (claim a batch, ack a batch, reschedule, bury,
release, renew, reclaim, trim) in as few round trips as the database allows, guarded by the lease
token where it acts on a claim. The hot table holds only what is still to be sent: an ack moves
its rows to the published log and a burial to the dead table, in the same statement or
transaction, so the claim never has to step over history. The worker calls them inside short transactions and never holds one open across HTTP.
A database module (:mod:`.postgresql`, :mod:`.mysql`, :mod:`.sqlite`) subclasses :class:`Dialect` and writes
only these statements; ``tests/test_dialects.py`` runs each of them against every database.
"""

from __future__ import annotations

import abc
import asyncio
import datetime as dt
import json
import logging
import uuid
from collections.abc import Callable, Collection, Container, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import sqlalchemy as sa

from ..schema import (
    ACK_ID_MAX,
    ERROR_CODE_MAX,
    ERROR_MESSAGE_MAX,
    EVENT_COLUMNS,
    SERIAL_MAX,
    WAITING_FOR_KEY,
    Operation,
    Status,
    UTCDateTime,
    dead_table,
    parked_table,
    published_table,
    utc_now,
)
from ..sockudo.bodies import dump_body
from ..sockudo.errors import EventRefused, InvalidEvent

if TYPE_CHECKING:
    from .hotpath import HotPath

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
        """Build from a SQLAlchemy result row by column name. (PostgreSQL's hot path builds
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


#: What :meth:`Dialect.resolve_targets` says of a mutation's message: its serial, where to look
#: for it, or why it has none.
Target = str | UnknownSerial | EventRefused


def message_lookup(log: sa.Table) -> sa.ColumnElement[bool]:
    """:data:`~outbox.schema.MESSAGE_LOOKUP` of the published log, as its index states it (a
    query must state it so for the partial index to serve it)."""
    return sa.or_(log.c.message_serial.is_not(None), log.c.acknowledgement_id.is_(None))


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
    #: SQL that ``outbox.database.create_engine`` runs on each new connection (the worker's and
    #: the CLI's sessions), or None.
    session_setup: ClassVar[str | None] = None

    # -- enqueue (inside the caller's transaction) ---------------------------------------------

    def insert_many(self, conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        """Insert enqueued rows in the caller's transaction (all with the same keys).

        One INSERT with every row as a parameter set: the driver sends them as one executemany,
        and SQLAlchemy compiles the statement once per table.
        """
        conn.execute(table.insert(), rows)

    def lock_ordering_keys(
        self, conn: sa.Connection, table: sa.Table, keys: Sequence[str]
    ) -> Collection[str] | None:
        """Before keyed rows are inserted: make the producers of one key commit in id order.

        Per key the claim goes by id, so a transaction that took a smaller id must not commit
        after one that took a larger: each database serializes the transactions that enqueue
        on a key until they end. Returns the keys whose newest row this transaction now holds
        (new rows of those wait behind it), or None where the insert can ask the table itself.
        This default refuses ordering keys and mutations: a database that cannot serialize its
        producers so (MariaDB and MySQL, for now) must not pretend to keep their order.
        """
        raise InvalidEvent(
            f"ordering keys and message mutations need PostgreSQL or SQLite (not {self.name})",
            field="ordering_key",
        )

    def insert_keyed(
        self,
        conn: sa.Connection,
        table: sa.Table,
        rows: list[dict[str, Any]],
        held: Collection[str] | None,
    ) -> None:
        """Insert rows some of which have an ordering key (after :meth:`lock_ordering_keys`,
        whose answer ``held`` is).

        A row that cannot go yet is inserted waiting (``WAITING_FOR_KEY``), not due, out of the
        claim's way: a keyed row behind an earlier row of its key (the first of a key in this
        call waits if its key is ``held``, with None: if the table has a row of the key; the
        others of that key in this call wait anyway), and a mutation whose message's event is
        still in the table (the transaction that takes that event out makes it due: see
        :meth:`wake_mutations`). The first ones go in first, so each key's ids follow the order
        given.
        """
        queued = self._queued_targets(conn, table, rows)
        seen: set[str] = set()
        first: list[dict[str, Any]] = []
        waiting: list[dict[str, Any]] = []
        for row in rows:
            key = row.get("ordering_key")
            behind = key is not None and (key in seen or (held is not None and key in held))
            if behind or (row.get("target_event_id"), row.get("channel")) in queued:
                waiting.append({**row, "next_attempt_at": WAITING_FOR_KEY})
            else:
                first.append(row)
            if key is not None:
                seen.add(key)
        if first:
            stmt = table.insert()
            if held is None:
                first = [{**row, "wait_key": row.get("ordering_key")} for row in first]
                earlier = table.alias("earlier")
                behind = sa.exists().where(earlier.c.ordering_key == sa.bindparam("wait_key"))
                wait = sa.literal(WAITING_FOR_KEY, UTCDateTime())
                stmt = stmt.values(next_attempt_at=sa.case((behind, wait), else_=utc_now()))
            conn.execute(stmt, first)
        # After the first of each key: a row waiting here always has its key's head before it
        # (or its message's event, still in the table).
        if waiting:
            conn.execute(table.insert(), waiting)

    @staticmethod
    def _queued_targets(
        conn: sa.Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]]
    ) -> set[tuple[uuid.UUID, str]]:
        """The (event id, channel) of the messages these mutation rows name that are still in
        the hot table (not published yet), this transaction's own rows included."""
        targets = {r["target_event_id"] for r in rows if r.get("target_event_id") is not None}
        if not targets:
            return set()
        found = conn.execute(
            sa.select(table.c.event_id, table.c.channel).where(table.c.event_id.in_(targets))
        )
        return {(event_id, channel) for event_id, channel in found}

    def promote_heads(self, conn: sa.Connection, table: sa.Table, keys: Sequence[str]) -> int:
        """Make the new head of each key due (its head just left the table); parked keys wait.

        Runs in the transaction that took the head out, so it sees the head gone and every row
        committed behind it (a producer of the key commits before, or waits: see
        :meth:`lock_ordering_keys`).
        """
        if not keys:
            return 0
        hot, parked = table, parked_table(table)
        heads = (
            sa.select(sa.func.min(hot.c.id))
            .where(hot.c.ordering_key.in_(sorted(set(keys))))
            .group_by(hot.c.ordering_key)
        )
        stmt = (
            sa.update(hot)
            .where(
                hot.c.id.in_(heads.scalar_subquery()),
                hot.c.next_attempt_at == WAITING_FOR_KEY,
                hot.c.ordering_key.not_in(sa.select(parked.c.ordering_key).scalar_subquery()),
            )
            .values(next_attempt_at=utc_now())
        )
        return conn.execute(stmt).rowcount

    def wake_mutations(
        self, conn: sa.Connection, table: sa.Table, messages: Sequence[tuple[uuid.UUID, str]]
    ) -> int:
        """Make due the mutations waiting for these messages (``(event id, channel)`` of rows
        this transaction just took out of the table, published or dead), each where it is its
        key's head and its key is not parked. Runs after the rows left, in a statement of its
        own, so it sees a mutation committed while the ack waited."""
        if not messages:
            return 0
        hot, parked = table, parked_table(table)
        earlier = hot.alias("earlier")
        stmt = (
            sa.update(hot)
            .where(
                sa.tuple_(hot.c.target_event_id, hot.c.channel).in_(sorted(set(messages))),
                *_waiting_head(hot, earlier, parked),
            )
            .values(next_attempt_at=utc_now())
        )
        return conn.execute(stmt).rowcount

    def wake_stranded_mutations(self, conn: sa.Connection, table: sa.Table) -> int:
        """Make due the waiting mutations whose message left the table without waking them.

        A producer decides that a mutation waits when its message's event is still in the table;
        if that event's ack commits before the producer does, the ack's
        :meth:`wake_mutations` cannot see the mutation yet. The worker's upkeep calls this
        every few seconds (it reads only waiting mutation rows, by their own index)."""
        hot, parked = table, parked_table(table)
        earlier, target = hot.alias("earlier"), hot.alias("target")
        message_queued = sa.exists().where(
            target.c.event_id == hot.c.target_event_id, target.c.channel == hot.c.channel
        )
        stmt = (
            sa.update(hot)
            .where(
                hot.c.target_event_id.is_not(None),
                ~message_queued,
                *_waiting_head(hot, earlier, parked),
            )
            .values(next_attempt_at=utc_now())
        )
        return conn.execute(stmt).rowcount

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
        """Lease up to ``limit`` due rows (due, not leased or lease expired; oldest first).

        Each claimed row counts one more attempt; the lease expires ``lease_seconds`` from now
        by the database clock. Rows come back in id order, each saying whether it was
        ``taken_over`` from an expired lease.
        """

    @abc.abstractmethod
    def extend_lease(
        self,
        conn: sa.Connection,
        table: sa.Table,
        token: uuid.UUID,
        lease_seconds: float,
        ids: Sequence[int],
    ) -> int:
        """Push the expiry of the rows ``ids`` still leased under ``token`` to now + ``lease_seconds``."""

    # -- the outcome of a claim (every statement is guarded by the claim's token) -------------

    def lock_leaving_rows(
        self, conn: sa.Connection, table: sa.Table, token: uuid.UUID, ids: Sequence[int]
    ) -> None:
        """First in a recording whose ack or burial takes keyed rows out (``ids``: the rows it
        takes out): where a producer can hold a key's newest row until it commits (PostgreSQL),
        wait for it here, before anything is deleted, so the recording never deadlocks with a
        producer. Elsewhere nothing can hold them: the default does nothing."""
        return None

    @abc.abstractmethod
    def ack_published(
        self, conn: sa.Connection, table: sa.Table, token: uuid.UUID, acks: Sequence[Ack]
    ) -> int:
        """Move leased rows to the published log with their acknowledgements; returns how many."""

    @abc.abstractmethod
    def reschedule(
        self,
        conn: sa.Connection,
        table: sa.Table,
        token: uuid.UUID,
        failures: Sequence[Failure],
        refund: bool = False,
    ) -> int:
        """Give leased rows back to the queue, due after each failure's delay, with the error kept.

        ``refund`` takes back the attempt counted at claim (no request carried the row to the
        server's idempotency layer), so a first attempt may go in a batch again.
        """

    @abc.abstractmethod
    def mark_dead(
        self, conn: sa.Connection, table: sa.Table, token: uuid.UUID, failures: Sequence[Failure]
    ) -> int:
        """Move leased rows to the dead table with the reason; returns how many."""

    def park_keys(self, conn: sa.Connection, table: sa.Table, ids: Sequence[int]) -> int:
        """Park the ordering keys of rows ``ids`` just buried (in the same transaction).

        Only rows that reached the dead table park their key (a stale worker's burial moved
        nothing); a key parked already stays parked by its first dead head.
        """
        if not ids:
            return 0
        dead, parked = dead_table(table), parked_table(table)
        taken = sa.select(parked.c.ordering_key)
        heads = sa.select(dead.c.ordering_key, dead.c.id, utc_now()).where(
            dead.c.id.in_(list(ids)),
            dead.c.ordering_key.is_not(None),
            dead.c.ordering_key.not_in(taken.scalar_subquery()),
        )
        stmt = sa.insert(parked).from_select(["ordering_key", "row_id", "parked_at"], heads)
        return conn.execute(stmt).rowcount

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

    # -- upkeep (portable) --------------------------------------------------------------------

    def reclaim_expired(self, conn: sa.Connection, table: sa.Table) -> int:
        """Clear leases that expired (a killed worker's); returns how many.

        The claim already takes rows whose lease expired; this makes them read as pending
        again for operators and counts the takeovers. They keep their attempt count, so they
        go alone next time (they may have been sent).
        """
        t = table
        stmt = (
            sa.update(t)
            .where(t.c.lease_expires_at <= utc_now())
            .values(lease_token=None, lease_expires_at=None)
        )
        return conn.execute(stmt).rowcount

    def delete_published_before(
        self, conn: sa.Connection, table: sa.Table, cutoff: dt.datetime, limit: int
    ) -> int:
        """Delete up to ``limit`` rows of the published log published before ``cutoff``.

        Only the log is touched: a row ``replay --published`` put back lives in the hot table,
        out of retention's reach.
        """
        log = published_table(table)
        page = sa.select(log.c.id).where(log.c.published_at < cutoff).limit(limit)
        stmt = sa.delete(log).where(log.c.id.in_(page.scalar_subquery()))
        return conn.execute(stmt).rowcount

    def resolve_targets(
        self, conn: sa.Connection, table: sa.Table, rows: Sequence[ClaimedRow]
    ) -> dict[int, Target]:
        """For each mutation row naming its message by an outbox event: that event's
        ``message_serial`` on the row's channel, from the published log; or where to look for it
        (:class:`UnknownSerial`: it was published, but the answer that said so had no receipt);
        or why it has none (dead). A row absent from the answer has no published event here
        (its log row was trimmed)."""
        log, dead = published_table(table), dead_table(table)
        event_ids = list({r.target_event_id for r in rows})
        answers: dict[tuple[Any, str], Target] = {}
        for found in conn.execute(
            sa.select(
                log.c.event_id,
                log.c.channel,
                log.c.message_serial,
                log.c.idempotency_key,
                log.c.queued_at,
                log.c.published_at,
            ).where(log.c.event_id.in_(event_ids), message_lookup(log))
        ):
            # Without a serial, its answer had no receipt: the repeat of a publish a batch made
            # (Sockudo's cache holds "1" for a batch item, not its answer), or a retry that
            # reached a node of another region. Its serial, if any, is in the channel's history.
            answers[(found.event_id, found.channel)] = found.message_serial or UnknownSerial(
                message_id=found.idempotency_key,
                sent_after=found.queued_at,
                sent_before=found.published_at,
            )
        for found in conn.execute(
            sa.select(dead.c.event_id, dead.c.channel, dead.c.last_error_message).where(
                dead.c.event_id.in_(event_ids)
            )
        ):
            answers.setdefault(
                (found.event_id, found.channel),
                EventRefused(
                    f"the event this mutation acts on is dead ({found.last_error_message})",
                    code="target_dead",
                ),
            )
        return {
            row.id: answers[(row.target_event_id, row.channel)]
            for row in rows
            if (row.target_event_id, row.channel) in answers
        }

    def remember_serials(
        self, conn: sa.Connection, table: sa.Table, found: Sequence[FoundSerial]
    ) -> int:
        """Store the serials found in history on the log rows published without a receipt (the
        next mutation of each message finds it there, without a lookup)."""
        log = published_table(table)
        stored = 0
        for item in found:
            stmt = (
                sa.update(log)
                .where(
                    log.c.event_id == item.event_id,
                    log.c.channel == item.channel,
                    message_lookup(log),  # (as the index states it: the row is found by it)
                    log.c.message_serial.is_(None),
                )
                .values(
                    message_serial=item.message_serial,
                    acknowledgement_id=sa.func.coalesce(
                        log.c.acknowledgement_id, item.message_serial
                    ),
                )
            )
            stored += conn.execute(stmt).rowcount
        return stored

    def hot_path(self, engine: sa.Engine, table: sa.Table) -> HotPath:
        """The worker's claim, renewal and recording for ``table`` (see :mod:`.hotpath`)."""
        from .hotpath import ThreadedHotPath

        return ThreadedHotPath(engine, self, table)

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
        """Move rows back to the hot table as a new delivery: a fresh budget, age and error state.

        Rows are taken from the dead table and/or the published log, as ``statuses`` names them;
        a row no longer there (replayed or trimmed meanwhile) is left alone. ``new_keys`` (one
        per id) replaces each row's idempotency key; None keeps the keys, and then each row
        counts one attempt already, so it goes alone (a batch could skip a key the server still
        knows and answer 200 without delivering). Returns how many rows moved.

        Where a replayed event goes in its key's order: the head a key is parked behind resumes
        its place in front of the key; any other keyed row is queued again at the back of its
        key (with a new row id), after every event of the key still queued.
        """
        keys = dict(zip(ids, new_keys, strict=True)) if new_keys is not None else None
        parked = parked_table(table)
        heads = set(
            conn.execute(sa.select(parked.c.row_id).where(parked.c.row_id.in_(list(ids)))).scalars()
        )
        moved = 0
        for source in _sources(table, statuses):
            rows = [
                dict(r._mapping)
                for r in conn.execute(
                    sa.select(source)
                    .where(source.c.id.in_(list(ids)))
                    .order_by(source.c.id)
                    .with_for_update()
                )
            ]
            if not rows:
                continue
            now = dt.datetime.now(dt.UTC)
            for row in rows:
                row.update(_REPLAYED, attempts=0 if keys is not None else 1)
                row.update(queued_at=now, next_attempt_at=now)
                if keys is not None:
                    row["idempotency_key"] = keys[row["id"]]
                    row["data"] = with_new_op_id(row["operation"], row["data"], keys[row["id"]])
            conn.execute(sa.delete(source).where(source.c.id.in_([r["id"] for r in rows])))
            # A key's parked head takes its place in front of its key again (its id, due now):
            # the rows the key held back go on behind it. Any other keyed row joins the back of
            # its key's line (a new id, waiting behind the key's rows still queued), exactly as
            # if it were enqueued now: never beside an event of its key already in flight.
            front = [r for r in rows if r["ordering_key"] is None or r["id"] in heads]
            back = [{k: v for k, v in r.items() if k != "id"} for r in rows if r not in front]
            if front:
                conn.execute(sa.insert(table), front)
            if back:
                line = [r["ordering_key"] for r in back]
                self.insert_keyed(conn, table, back, self.lock_ordering_keys(conn, table, line))
            moved += len(rows)
        conn.execute(sa.delete(parked).where(parked.c.row_id.in_(heads)))
        return moved

    def unpark(self, conn: sa.Connection, table: sa.Table, keys: Sequence[str] | None) -> int:
        """Let parked keys go on without their dead head (None: every parked key)."""
        parked = parked_table(table)
        if keys is None:
            keys = list(conn.execute(sa.select(parked.c.ordering_key)).scalars())
        unparked = conn.execute(
            sa.delete(parked).where(parked.c.ordering_key.in_(list(keys)))
        ).rowcount
        self.promote_heads(conn, table, keys)
        return unparked

    def release_leases(self, conn: sa.Connection, table: sa.Table, expired_only: bool) -> int:
        """Clear leases (only expired ones, or all), due now; rows keep their attempt count."""
        t = table
        where = [t.c.lease_expires_at.is_not(None)]
        if expired_only:
            where.append(t.c.lease_expires_at <= utc_now())
        stmt = (
            sa.update(t)
            .where(*where)
            .values(next_attempt_at=utc_now(), lease_token=None, lease_expires_at=None)
        )
        return conn.execute(stmt).rowcount


#: What a replay resets: the row starts over as a new delivery.
_REPLAYED: dict[str, Any] = {
    "failures": 0,
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


def with_new_op_id(operation: str | None, data: str, key: str) -> str:
    """A mutation row's stored body with the ``op_id`` of a fresh-key replay (other rows'
    data unchanged): Sockudo would answer the old one as a duplicate and apply nothing."""
    if operation not in _OP_ID_OPERATIONS:
        return data
    body = json.loads(data)
    body["op_id"] = key
    return dump_body(body).decode()


_OP_ID_OPERATIONS = (Operation.UPDATE.value, Operation.DELETE.value, Operation.APPEND.value)


def _sources(table: sa.Table, statuses: Sequence[str]) -> list[sa.Table]:
    """The tables holding rows in ``statuses`` that a replay may take from."""
    sources = {Status.DEAD.value: dead_table(table), Status.PUBLISHED.value: published_table(table)}
    return [sources[s] for s in sources if s in statuses]


def _waiting_head(
    hot: sa.Table, earlier: sa.Alias, parked: sa.Table
) -> tuple[sa.ColumnElement[bool], ...]:
    """A hot row waiting (out of the due order) that is its key's head, its key not parked."""
    return (
        hot.c.next_attempt_at == WAITING_FOR_KEY,
        ~sa.exists().where(earlier.c.ordering_key == hot.c.ordering_key, earlier.c.id < hot.c.id),
        hot.c.ordering_key.not_in(sa.select(parked.c.ordering_key)),
    )


def claimable_in_order(row: str, hot: str, parked: str) -> str:
    """SQL: whether the hot row aliased ``row`` may go now as far as order is concerned.

    A keyed row goes only as the head of its key (no row of the key with a smaller id is still
    in the hot table, whether pending, leased or waiting for a retry) and while its key is not
    parked; a mutation of an outbox event only once that event left the hot table. Ids follow
    commit order within a key: enqueue serializes the producers of one key (see
    ``Dialect.lock_ordering_keys``).

    Each test is a scalar subquery with ``LIMIT 1``, not ``NOT EXISTS``: PostgreSQL may turn an
    EXISTS into a hash of the whole hot table (it did, for a table without statistics, and the
    claim over 100,000 rows then cost 50 ms and a JIT compilation), while a scalar subquery is
    run per candidate row, one probe of an index: the claim's cost follows its batch, never the
    backlog. The head test asks for the key's first row in the order of the key's index
    ``(ordering_key, id)``. The key is bounded above and below rather than compared for
    equality: with an equality PostgreSQL may read the key's rows in id order by the primary
    key instead, filtering every row of the table until one of the key comes (a rare key at the
    end of a long backlog), because the equality makes both orders the same to it.
    """
    # COALESCE(..., false): a NULL (a key's first row not found) is not claimable, and the
    # planner estimates the whole as one opaque test. Estimated term by term, its subqueries
    # made it expect almost no row to pass, and it sorted every due row instead of reading
    # the due index in order up to the batch (120 ms instead of 0.3 over 100,000 rows).
    return f"""COALESCE(
        ({row}.ordering_key IS NULL OR (
            (SELECT h.id FROM {hot} AS h
             WHERE h.ordering_key IS NOT NULL
               AND h.ordering_key >= {row}.ordering_key AND h.ordering_key <= {row}.ordering_key
             ORDER BY h.ordering_key, h.id LIMIT 1) = {row}.id
            AND (SELECT 1 FROM {parked} AS k
                 WHERE k.ordering_key = {row}.ordering_key LIMIT 1) IS NULL))
        AND ({row}.target_event_id IS NULL OR (
            SELECT 1 FROM {hot} AS t
            WHERE t.event_id = {row}.target_event_id AND t.channel = {row}.channel
            LIMIT 1) IS NULL), false)"""


def moved_columns(overrides: Mapping[str, str], prefix: str = "") -> str:
    """The SELECT list of an INSERT ... SELECT that moves a row to another of the outbox's
    tables: every column (``prefix`` qualifies it, e.g. ``"o."``), some replaced by SQL."""
    return ", ".join(overrides.get(c, prefix + c) for c in EVENT_COLUMNS)


def quoted(conn: sa.Connection | sa.Engine, table: sa.Table) -> str:
    """The table's name as safe SQL text (schema-qualified and quoted where needed)."""
    return conn.dialect.identifier_preparer.format_table(table)


def claim_columns(prefix: str = "") -> str:
    """The claim's RETURNING list (``prefix`` qualifies each column, e.g. ``"o."``)."""
    return ", ".join(prefix + name for name in CLAIM_COLUMNS)


def claimed_rows(result: sa.CursorResult[Any], taken_over: Container[int] = ()) -> list[ClaimedRow]:
    """The rows a claim statement returned, by column name, in id order."""
    rows = (ClaimedRow.from_mapping(r._mapping, r.id in taken_over) for r in result)
    return sorted(rows, key=lambda r: r.id)

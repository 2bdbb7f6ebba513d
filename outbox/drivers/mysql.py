"""MariaDB's (>= 10.6) and MySQL's (>= 8.0.13) driver: ``SKIP LOCKED`` claims, ``JSON_TABLE``
batch updates, and polling (there is no LISTEN/NOTIFY).

**Isolation: READ COMMITTED on the worker's connections** (:attr:`MySQLDriver.engine_options`,
applied by :func:`outbox.database.create_engine` once per connection). InnoDB's default,
REPEATABLE READ, makes every locking read and every searched UPDATE/DELETE take *next-key locks*:
the rows it scanned plus the gaps before them. A claim that reaches the end of the pending rows
locks the gap where every new row lands, so each producer's INSERT (an insert-intention lock)
waits until the claim commits (tests/test_mariadb_locking.py shows it, to the lock wait
timeout). Under READ COMMITTED InnoDB takes record locks only (gaps are locked just for
duplicate-key checks) and releases at once the rows a statement read but did not match. The
statements below need nothing stronger: each one either locks exactly the rows it changes, or
changes rows this worker holds a lease on (the token guard re-checked on the locked row). The
application's own transactions (``enqueue``) keep whatever isolation the application chose: an
INSERT takes no gap lock at either level.

**Who waits for whom.** Two rules keep producers, workers and their upkeep from deadlocking:
(1) a statement that scans an index either does not lock (a consistent read) or locks with
``SKIP LOCKED``: it never waits while holding rows it scanned; (2) a statement that may wait for
a row lock visits its rows by primary key in ascending id order (a JSON list driving the join,
see :func:`_listed`), so two of them never wait for each other in a circle. The stress test in
tests/test_mariadb_locking.py met both deadlocks these rules remove: a lease renewal searching
the lease index against another worker's ack, and a retention DELETE searching the published
rows against an ack and reschedule.

With binary logging on, READ COMMITTED needs ``binlog_format`` ROW or MIXED (the defaults of
MySQL 8 and MariaDB); STATEMENT is refused by InnoDB at that level.

**Index.** The hot table holds only unsent rows, so the claim reads its ``(next_attempt_at, id)``
index in order and stops after one batch, however long the published history (which lives in
the published log). ``FORCE INDEX`` pins it (like SQLite's ``INDEXED BY``): a claim that sorted
instead would read, and under ``FOR UPDATE`` lock, every due row before its ``LIMIT``.

**Round trips.** Neither has ``UPDATE ... RETURNING``: the claim is a locking SELECT of the
columns the worker needs, then one UPDATE by primary key (the rows are ours meanwhile): two
statements, one transaction. The outcome statements send the whole batch as one JSON array,
joined with ``JSON_TABLE`` (both databases have it), one statement whatever the batch size. An
ack or a burial moves rows to another table in three: lock the rows still leased under the token
(by primary key, in id order), copy them (``INSERT ... SELECT``, which reads the source without
locks under READ COMMITTED: hence the lock first, so the copy and the delete see the same rows),
delete them. Reclaim and retention take two (find with a plain read, then change by primary key
with the condition re-checked; rule 1). Times come from ``UTC_TIMESTAMP(6)``,
the database clock, fixed for the duration of a statement.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import sqlalchemy as sa

from ..schema import EVENT_COLUMNS, UTCDateTime, dead_table, published_table
from .sql import (
    CUTOFF,
    TOKEN,
    buried_columns,
    claim_columns,
    index_name,
    published_columns,
    quoted,
)
from .threaded import ThreadedDriver
from .values import Ack, ClaimedRow, Failure

NOW = "UTC_TIMESTAMP(6)"


def _listed(t: str) -> str:
    """Table references that visit the rows whose ids are in ``:ids`` (a JSON array, see
    :func:`_ids`) by primary key, in the array's order, as ``o``.

    Not ``WHERE id IN (...)``, and the index named: on a small table (a new or well-drained
    outbox) the optimizer prefers to scan it, locking its way through rows that are not in the
    list and waiting for every one another transaction holds (measured: a reclaim waiting for
    an unrelated ack). STRAIGHT_JOIN makes the list drive the join; FORCE INDEX (PRIMARY) makes
    each visit a primary-key lookup (``eq_ref``) whatever the table's size.
    """
    return (
        f"JSON_TABLE(:ids, '$[*]' COLUMNS (id BIGINT PATH '$')) AS k "
        f"STRAIGHT_JOIN {t} AS o FORCE INDEX (PRIMARY) ON o.id = k.id"
    )


def _ids(ids: Sequence[int]) -> str:
    """The ids for :func:`_listed`, ascending: every statement here that may wait for a row lock
    takes its rows in id order, so two of them never wait for each other in a circle."""
    return json.dumps(sorted(ids))


def _microseconds(seconds: float) -> int:
    """A duration for ``INTERVAL n MICROSECOND`` (MySQL has no fractional-second interval)."""
    return round(float(seconds) * 1_000_000)


#: The failures of a batch as rows, joined by id (see :meth:`MySQLDriver.retry`).
_FAILURES = """JSON_TABLE(:payload, '$[*]' COLUMNS (
                   id BIGINT PATH '$[0]',
                   delay_us BIGINT PATH '$[1]',
                   status INT PATH '$[2]',
                   code VARCHAR(64) PATH '$[3]',
                   message VARCHAR(500) PATH '$[4]',
                   charge INT PATH '$[5]')) AS f"""

#: The acknowledgements of a batch as rows, joined by id. The widths are the columns' own
#: (``schema.ACK_ID_MAX``, ``schema.SERIAL_MAX``): a narrower one would cut what ``Ack`` kept.
_ACKS = """JSON_TABLE(:payload, '$[*]' COLUMNS (
               id BIGINT PATH '$[0]',
               ack VARCHAR(255) PATH '$[1]',
               message_serial VARCHAR(255) PATH '$[2]',
               history_serial VARCHAR(255) PATH '$[3]')) AS f"""


class MySQLDriver(ThreadedDriver):
    """Every statement of the claim, its lease, its outcome and the upkeep written for InnoDB's
    locking (the rules above). Ordering keys and mutations are refused at enqueue (the default
    :meth:`~.base.Driver.keys_lock`), so nothing here parks, promotes or wakes."""

    name = "mysql"
    engine_options: ClassVar[Mapping[str, Any]] = {"isolation_level": "READ COMMITTED"}

    # -- mutations: refused at enqueue here ----------------------------------------------------

    def wake(self, conn: sa.Connection, messages: Sequence[tuple[uuid.UUID, str]]) -> int:
        """Nothing waits for a message here: MariaDB and MySQL refuse mutations at enqueue."""
        return 0

    async def mutations_wake_stranded(self) -> int:
        """Nothing waits for a message here: MariaDB and MySQL refuse mutations at enqueue."""
        return 0

    # -- the claim: a locking read, then one UPDATE of the rows it locked ---------------------

    def claim(
        self, conn: sa.Connection, limit: int, lease_seconds: float, token: uuid.UUID
    ) -> list[ClaimedRow]:
        due = self._lock_due(conn, limit)
        if due:
            self._lease(conn, [r.id for r in due], lease_seconds, token)
        # The UPDATE counted the attempt; the rows read before it did not see it.
        return [dataclasses.replace(r, attempts=r.attempts + 1) for r in due]

    def _lock_due(self, conn: sa.Connection, limit: int) -> list[ClaimedRow]:
        # SKIP LOCKED: concurrent workers take disjoint batches without waiting for each other,
        # and a producer's uncommitted row (locked by its INSERT) is passed over, never waited
        # for. The scan reads the due index in order and stops at LIMIT; READ COMMITTED keeps
        # only the rows returned locked (record locks, no gaps, nothing for producers to wait
        # on). A due row still holding a token holds an expired one: it is taken over.
        t, due_index = quoted(conn, self.table), index_name(conn, self.table, "due")
        stmt = sa.text(
            f"""
            SELECT {claim_columns()}, lease_token IS NOT NULL AS taken_over
            FROM {t} FORCE INDEX ({due_index})
            WHERE next_attempt_at <= {NOW}
              AND (lease_expires_at IS NULL OR lease_expires_at <= {NOW})
            ORDER BY next_attempt_at, id
            LIMIT :limit
            FOR UPDATE SKIP LOCKED
            """
        ).columns(
            queued_at=UTCDateTime(),
            event_id=sa.Uuid(as_uuid=True),
            target_event_id=sa.Uuid(as_uuid=True),
        )
        rows = conn.execute(stmt, {"limit": limit})
        claimed = (ClaimedRow.from_mapping(r._mapping, bool(r.taken_over)) for r in rows)
        return sorted(claimed, key=lambda r: r.id)

    def _lease(
        self, conn: sa.Connection, ids: list[int], lease_seconds: float, token: uuid.UUID
    ) -> None:
        # By primary key, on rows this transaction holds locked since _lock_due: nothing to
        # re-check and nothing else to lock.
        t = quoted(conn, self.table)
        stmt = sa.text(
            f"""
            UPDATE {_listed(t)}
            SET o.lease_token = :token,
                o.lease_expires_at = {NOW} + INTERVAL :lease_us MICROSECOND,
                o.attempts = o.attempts + 1
            """
        ).bindparams(TOKEN)
        params = {"ids": _ids(ids), "token": token, "lease_us": _microseconds(lease_seconds)}
        conn.execute(stmt, params)

    def extend_lease(
        self, conn: sa.Connection, token: uuid.UUID, lease_seconds: float, ids: Sequence[int]
    ) -> int:
        # By primary key, in id order like every statement here that may wait for a row lock;
        # the token guard is re-checked on the locked row (a lease taken over meanwhile stays
        # with its new holder).
        t = quoted(conn, self.table)
        stmt = sa.text(
            f"""
            UPDATE {_listed(t)}
            SET o.lease_expires_at = {NOW} + INTERVAL :lease_us MICROSECOND
            WHERE o.lease_token = :token
            """
        ).bindparams(TOKEN)
        params = {"ids": _ids(ids), "token": token, "lease_us": _microseconds(lease_seconds)}
        return conn.execute(stmt, params).rowcount

    # -- the outcome of a claim: the batch as a JSON array, rows by primary key ---------------

    def publish(self, conn: sa.Connection, token: uuid.UUID, acks: Sequence[Ack]) -> int:
        payload = json.dumps(
            [
                [a.id, a.acknowledgement_id, a.message_serial, a.history_serial]
                for a in sorted(acks, key=lambda a: a.id)
            ]
        )
        columns = published_columns(NOW, "f.ack", "f.message_serial", "f.history_serial")
        return self._move(conn, published_table(self.table), token, _ACKS, payload, columns)

    def retry(
        self, conn: sa.Connection, token: uuid.UUID, failures: Sequence[Failure], refund: bool
    ) -> int:
        # JSON rows first, in id order; outbox rows by primary key, under the token guard.
        t = quoted(conn, self.table)
        stmt = sa.text(
            f"""
            UPDATE {_FAILURES}
            STRAIGHT_JOIN {t} AS o FORCE INDEX (PRIMARY) ON o.id = f.id
            SET o.next_attempt_at = {NOW} + INTERVAL f.delay_us MICROSECOND,
                o.attempts = o.attempts - :refund,
                o.failures = o.failures + f.charge,
                o.lease_token = NULL,
                o.lease_expires_at = NULL,
                o.last_error_status = f.status,
                o.last_error_code = f.code,
                o.last_error_message = f.message,
                o.last_error_at = {NOW}
            WHERE o.lease_token = :token
            """
        ).bindparams(TOKEN)
        params = {"refund": int(refund), "payload": _failures(failures), "token": token}
        return conn.execute(stmt, params).rowcount

    def bury(self, conn: sa.Connection, token: uuid.UUID, failures: Sequence[Failure]) -> int:
        columns = buried_columns(NOW, "f.charge", "f.status", "f.code", "f.message")
        return self._move(
            conn, dead_table(self.table), token, _FAILURES, _failures(failures), columns
        )

    def _move(
        self,
        conn: sa.Connection,
        target: sa.Table,
        token: uuid.UUID,
        rows: str,
        payload: str,
        columns: str,
    ) -> int:
        """Move the rows ``payload`` names, still leased under ``token``, into ``target``
        (``columns``: the SELECT list of :func:`~.sql.published_columns` or
        :func:`~.sql.buried_columns`)."""
        t, into = quoted(conn, self.table), quoted(conn, target)
        ids = [row[0] for row in json.loads(payload)]
        # Lock first, by primary key in id order: the INSERT ... SELECT below reads its source
        # without locks (READ COMMITTED), so the rows must be ours before they are copied.
        lock = sa.text(
            f"SELECT o.id FROM {_listed(t)} WHERE o.lease_token = :token FOR UPDATE"
        ).bindparams(TOKEN)
        held = list(conn.execute(lock, {"ids": _ids(ids), "token": token}).scalars())
        if not held:
            return 0
        copy = sa.text(
            f"""
            INSERT INTO {into} ({", ".join(EVENT_COLUMNS)})
            SELECT {columns}
            FROM {rows} STRAIGHT_JOIN {t} AS o FORCE INDEX (PRIMARY) ON o.id = f.id
            WHERE o.lease_token = :token
            """
        ).bindparams(TOKEN)
        moved = conn.execute(copy, {"payload": payload, "token": token}).rowcount
        delete = sa.text(f"DELETE o FROM {_listed(t)} WHERE o.lease_token = :token").bindparams(
            TOKEN
        )
        conn.execute(delete, {"ids": _ids(held), "token": token})
        return moved

    def give_back(
        self, conn: sa.Connection, token: uuid.UUID, ids: Sequence[int], refund: bool
    ) -> int:
        # One UPDATE by primary key, under the token guard.
        t = quoted(conn, self.table)
        stmt = sa.text(
            f"""
            UPDATE {_listed(t)}
            SET o.attempts = o.attempts - :refund,
                o.next_attempt_at = {NOW}, o.lease_token = NULL, o.lease_expires_at = NULL
            WHERE o.lease_token = :token
            """
        ).bindparams(TOKEN)
        params = {"ids": _ids(ids), "token": token, "refund": int(refund)}
        return conn.execute(stmt, params).rowcount

    # -- upkeep ---------------------------------------------------------------------------------

    async def events_reclaim_expired(self) -> int:
        return await self.transaction(self.reclaim_expired)

    def reclaim_expired(self, conn: sa.Connection) -> int:
        # SKIP LOCKED rather than a searched UPDATE: a row locked right now is being acked or
        # rescheduled by a late worker, so it is not ours to clear (the next round looks again
        # if it is still expired). Never waiting, the reclaim can never be one side of a
        # deadlock (rule 1); READ COMMITTED keeps only the matching rows locked. Then one UPDATE
        # by primary key of the rows it holds.
        t = quoted(conn, self.table)
        find = sa.text(f"SELECT id FROM {t} WHERE lease_expires_at <= {NOW} FOR UPDATE SKIP LOCKED")
        expired = list(conn.execute(find).scalars())
        if not expired:
            return 0
        stmt = sa.text(f"UPDATE {_listed(t)} SET o.lease_token = NULL, o.lease_expires_at = NULL")
        return conn.execute(stmt, {"ids": _ids(expired)}).rowcount

    async def published_delete_before(self, cutoff: dt.datetime, limit: int) -> int:
        return await self.transaction(
            lambda conn: self.delete_published_before(conn, cutoff, limit)
        )

    def delete_published_before(self, conn: sa.Connection, cutoff: dt.datetime, limit: int) -> int:
        # SKIP LOCKED, not a searched DELETE: a DELETE that waits for a row (one replay is
        # moving back to the outbox) while holding the rows it already took could close a
        # circle with that transaction. A row locked right now is left for a later page; one
        # that replay moved out is gone by then. The log is in id order, oldest first, and the
        # scan stops after a page. (MySQL refuses LIMIT inside an IN subquery, so the portable
        # statement cannot be used.)
        log = quoted(conn, published_table(self.table))
        page = sa.text(
            f"""
            SELECT id FROM {log} WHERE published_at < :cutoff
            ORDER BY id LIMIT :limit
            FOR UPDATE SKIP LOCKED
            """
        ).bindparams(CUTOFF)
        ids = list(conn.execute(page, {"cutoff": cutoff, "limit": limit}).scalars())
        if not ids:
            return 0
        # By primary key, rows this transaction holds since the page was read.
        delete = sa.text(f"DELETE o FROM {_listed(log)}")
        return conn.execute(delete, {"ids": _ids(ids)}).rowcount


def _failures(failures: Sequence[Failure]) -> str:
    return json.dumps(
        [
            [f.id, _microseconds(f.delay), f.status, f.code, f.message, int(f.charged)]
            for f in sorted(failures, key=lambda f: f.id)
        ]
    )

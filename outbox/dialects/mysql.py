"""MariaDB (>= 10.6) and MySQL (>= 8.0.13) statements: ``SKIP LOCKED`` claims, ``JSON_TABLE``
batch updates, and polling (there is no LISTEN/NOTIFY).

**Isolation: READ COMMITTED on the worker's connections** (:attr:`MySQLDialect.engine_options`,
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

**Index.** Neither database has partial indexes, so the pending index leads with ``status``
(``(status, next_attempt_at, id)``, see :data:`outbox.schema.MYSQL_PENDING_INDEX`): the due rows
are read in order and the scan stops after one batch, however long the published history.
``FORCE INDEX`` pins it (like SQLite's ``INDEXED BY``): a claim that sorted instead would read,
and under ``FOR UPDATE`` lock, every pending row before its ``LIMIT``. Only leased rows have a
``lease_expires_at``; NULLs sit apart at the start of that index, so it serves as the in-flight
index as it is.

**Round trips.** Neither has ``UPDATE ... RETURNING``: the claim is a locking SELECT of the
columns the worker needs, then one UPDATE by primary key (the rows are ours meanwhile): two
statements, one transaction. The outcome statements send the whole batch as one JSON array,
joined with ``JSON_TABLE`` (both databases have it), one statement whatever the batch size.
Lease renewal, reclaim and retention take two (find, then change by primary key; rule 1). Times come from ``UTC_TIMESTAMP(6)``,
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

from ..schema import Status, UTCDateTime
from .base import (
    CUTOFF,
    TOKEN,
    Ack,
    ClaimedRow,
    Dialect,
    Failure,
    claim_columns,
    claimed_rows,
    literal,
    quoted,
)

PENDING, IN_FLIGHT, PUBLISHED = (
    literal(s) for s in (Status.PENDING, Status.IN_FLIGHT, Status.PUBLISHED)
)
NOW = "UTC_TIMESTAMP(6)"


def _listed(t: str) -> str:
    """Table references that visit the rows whose ids are in ``:ids`` (a JSON array, see
    :func:`_ids`) by primary key, in the array's order, as ``o``.

    Not ``WHERE id IN (...)``, and the index named: on a small table (a new or well-trimmed
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


def _index(conn: sa.Connection, table: sa.Table, suffix: str) -> str:
    return conn.dialect.identifier_preparer.quote(f"ix_{table.name}_{suffix}")


class MySQLDialect(Dialect):
    name = "mysql"
    engine_options: ClassVar[Mapping[str, Any]] = {"isolation_level": "READ COMMITTED"}

    # -- the claim: a locking read, then one UPDATE of the rows it locked ---------------------

    def claim_batch(
        self,
        conn: sa.Connection,
        table: sa.Table,
        limit: int,
        lease_seconds: float,
        token: uuid.UUID,
    ) -> list[ClaimedRow]:
        due = self._lock_due(conn, table, limit)
        if due:
            self._lease(conn, table, [r.id for r in due], lease_seconds, token)
        # The UPDATE counted the attempt; the rows read before it did not see it.
        return [dataclasses.replace(r, attempts=r.attempts + 1) for r in due]

    def _lock_due(self, conn: sa.Connection, table: sa.Table, limit: int) -> list[ClaimedRow]:
        # SKIP LOCKED: concurrent workers take disjoint batches without waiting for each other,
        # and a producer's uncommitted row (locked by its INSERT) is passed over, never waited
        # for. The scan reads the pending index in order and stops at LIMIT, so only the rows
        # returned are locked (READ COMMITTED: record locks, no gaps, nothing for producers to
        # wait on).
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            SELECT {claim_columns()} FROM {t} FORCE INDEX ({_index(conn, table, "pending")})
            WHERE status = {PENDING} AND next_attempt_at <= {NOW}
            ORDER BY next_attempt_at, id
            LIMIT :limit
            FOR UPDATE SKIP LOCKED
            """
        ).columns(queued_at=UTCDateTime())
        return claimed_rows(conn.execute(stmt, {"limit": limit}))

    def _lease(
        self,
        conn: sa.Connection,
        table: sa.Table,
        ids: list[int],
        lease_seconds: float,
        token: uuid.UUID,
    ) -> None:
        # By primary key, on rows this transaction holds locked since _lock_due: nothing to
        # re-check and nothing else to lock.
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            UPDATE {_listed(t)}
            SET o.status = {IN_FLIGHT},
                o.lease_token = :token,
                o.lease_expires_at = {NOW} + INTERVAL :lease_us MICROSECOND,
                o.attempts = o.attempts + 1
            """
        ).bindparams(TOKEN)
        params = {"ids": _ids(ids), "token": token, "lease_us": _microseconds(lease_seconds)}
        conn.execute(stmt, params)

    def extend_lease(
        self, conn: sa.Connection, table: sa.Table, token: uuid.UUID, lease_seconds: float
    ) -> int:
        ids = self._leased_by(conn, table, token)
        return self._push_expiry(conn, table, token, ids, lease_seconds) if ids else 0

    def _leased_by(self, conn: sa.Connection, table: sa.Table, token: uuid.UUID) -> list[int]:
        # A plain (consistent, non-locking) read: lease_token has no index, and a searched
        # UPDATE through the lease index would have to lock each other worker's row to read its
        # token, waiting for (and deadlocking with) their acks. The lease index holds exactly the
        # rows in flight (IS NOT NULL skips everyone else's NULL).
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            SELECT id FROM {t} FORCE INDEX ({_index(conn, table, "in_flight")})
            WHERE lease_expires_at IS NOT NULL AND lease_token = :token
            """
        ).bindparams(TOKEN)
        return list(conn.execute(stmt, {"token": token}).scalars())

    def _push_expiry(
        self,
        conn: sa.Connection,
        table: sa.Table,
        token: uuid.UUID,
        ids: list[int],
        lease_seconds: float,
    ) -> int:
        # By primary key, in id order like every statement here that may wait for a row lock;
        # the token guard is re-checked on the locked row (a lease taken over meanwhile stays
        # with its new holder).
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            UPDATE {_listed(t)}
            SET o.lease_expires_at = {NOW} + INTERVAL :lease_us MICROSECOND
            WHERE o.lease_token = :token AND o.status = {IN_FLIGHT}
            """
        ).bindparams(TOKEN)
        params = {"ids": _ids(ids), "token": token, "lease_us": _microseconds(lease_seconds)}
        return conn.execute(stmt, params).rowcount

    # -- the outcome of a claim: one statement per kind, the batch as a JSON array -------------

    def ack_published(
        self, conn: sa.Connection, table: sa.Table, token: uuid.UUID, acks: Sequence[Ack]
    ) -> int:
        if not acks:
            return 0
        # The JSON rows drive the join (as in _listed), so each outbox row is found and locked by
        # primary key, in the array's order: sorted by id, the order every statement here that
        # may wait takes its locks in, so two of them never wait for each other in a circle.
        # The token guard makes a stale worker's ack change nothing.
        t = quoted(conn, table)
        payload = json.dumps(
            [
                [a.id, a.acknowledgement_id, a.message_serial, a.history_serial]
                for a in sorted(acks, key=lambda a: a.id)
            ]
        )
        stmt = sa.text(
            f"""
            UPDATE JSON_TABLE(:payload, '$[*]' COLUMNS (
                       id BIGINT PATH '$[0]',
                       ack VARCHAR(200) PATH '$[1]',
                       message_serial VARCHAR(64) PATH '$[2]',
                       history_serial VARCHAR(64) PATH '$[3]')) AS a
            STRAIGHT_JOIN {t} AS o FORCE INDEX (PRIMARY) ON o.id = a.id
            SET o.status = {PUBLISHED},
                o.published_at = {NOW},
                o.acknowledgement_id = a.ack,
                o.message_serial = a.message_serial,
                o.history_serial = a.history_serial,
                o.lease_token = NULL,
                o.lease_expires_at = NULL
            WHERE o.lease_token = :token AND o.status = {IN_FLIGHT}
            """
        ).bindparams(TOKEN)
        return conn.execute(stmt, {"payload": payload, "token": token}).rowcount

    def _finish(
        self,
        conn: sa.Connection,
        table: sa.Table,
        token: uuid.UUID,
        failures: Sequence[Failure],
        status: Status,
        refund: bool,
    ) -> int:
        if not failures:
            return 0
        # As ack_published: JSON rows first, in id order; outbox rows by primary key, under the
        # token guard.
        t = quoted(conn, table)
        payload = json.dumps(
            [
                [f.id, _microseconds(f.delay), f.status, f.code, f.message, int(f.charged)]
                for f in sorted(failures, key=lambda f: f.id)
            ]
        )
        stmt = sa.text(
            f"""
            UPDATE JSON_TABLE(:payload, '$[*]' COLUMNS (
                       id BIGINT PATH '$[0]',
                       delay_us BIGINT PATH '$[1]',
                       status INT PATH '$[2]',
                       code VARCHAR(64) PATH '$[3]',
                       message VARCHAR(500) PATH '$[4]',
                       charge INT PATH '$[5]')) AS f
            STRAIGHT_JOIN {t} AS o FORCE INDEX (PRIMARY) ON o.id = f.id
            SET o.status = :status,
                o.next_attempt_at = {NOW} + INTERVAL f.delay_us MICROSECOND,
                o.attempts = o.attempts - :refund,
                o.failures = o.failures + f.charge,
                o.lease_token = NULL,
                o.lease_expires_at = NULL,
                o.last_error_status = f.status,
                o.last_error_code = f.code,
                o.last_error_message = f.message,
                o.last_error_at = {NOW}
            WHERE o.lease_token = :token AND o.status = {IN_FLIGHT}
            """
        ).bindparams(TOKEN)
        params = {"status": status.value, "refund": int(refund), "payload": payload, "token": token}
        return conn.execute(stmt, params).rowcount

    def release(
        self,
        conn: sa.Connection,
        table: sa.Table,
        token: uuid.UUID,
        ids: Sequence[int],
        refund: bool = True,
    ) -> int:
        if not ids:
            return 0
        # One UPDATE by primary key, under the token guard.
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            UPDATE {_listed(t)}
            SET o.status = {PENDING}, o.attempts = o.attempts - :refund,
                o.next_attempt_at = {NOW}, o.lease_token = NULL, o.lease_expires_at = NULL
            WHERE o.lease_token = :token AND o.status = {IN_FLIGHT}
            """
        ).bindparams(TOKEN)
        params = {"ids": _ids(ids), "token": token, "refund": int(refund)}
        return conn.execute(stmt, params).rowcount

    # -- upkeep ---------------------------------------------------------------------------------

    def reclaim_expired(self, conn: sa.Connection, table: sa.Table) -> int:
        expired = self._lock_expired(conn, table)
        return self._requeue(conn, table, expired) if expired else 0

    def _lock_expired(self, conn: sa.Connection, table: sa.Table) -> list[int]:
        # SKIP LOCKED rather than a searched UPDATE: a row locked right now is being acked or
        # rescheduled by a late worker, so it is not ours to take back (the next round looks
        # again if it is still expired). Never waiting, the reclaim can never be one side of a
        # deadlock with an ack that locks the same rows in another order. The rows are the
        # expired leases: bounded by what workers had in flight.
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            SELECT id FROM {t} FORCE INDEX ({_index(conn, table, "in_flight")})
            WHERE lease_expires_at <= {NOW} AND status = {IN_FLIGHT}
            FOR UPDATE SKIP LOCKED
            """
        )
        return list(conn.execute(stmt).scalars())

    def _requeue(self, conn: sa.Connection, table: sa.Table, ids: list[int]) -> int:
        # The row keeps its attempt count: it may have been sent, so it goes alone next time.
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            UPDATE {_listed(t)}
            SET o.status = {PENDING}, o.next_attempt_at = {NOW},
                o.lease_token = NULL, o.lease_expires_at = NULL
            """
        )
        return conn.execute(stmt, {"ids": _ids(ids)}).rowcount

    def delete_published_before(
        self, conn: sa.Connection, table: sa.Table, cutoff: dt.datetime, limit: int
    ) -> int:
        ids = self._lock_published_before(conn, table, cutoff, limit)
        return self._delete(conn, table, ids) if ids else 0

    def _lock_published_before(
        self, conn: sa.Connection, table: sa.Table, cutoff: dt.datetime, limit: int
    ) -> list[int]:
        # SKIP LOCKED, not a searched DELETE: a DELETE that waits for a row (one being acked,
        # or put back by replay) while holding the rows it already took can close a circle with
        # that transaction (measured: tests/test_mariadb_locking.py). A row locked right now is
        # left for the next page; a row replay put back and committed is re-read as pending and
        # not taken. The (status, created_at) index in order: the scan stops after a page.
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            SELECT id FROM {t} FORCE INDEX ({_index(conn, table, "status_created")})
            WHERE status = {PUBLISHED} AND published_at < :cutoff
            ORDER BY created_at, id
            LIMIT :limit
            FOR UPDATE SKIP LOCKED
            """
        ).bindparams(CUTOFF)
        return list(conn.execute(stmt, {"cutoff": cutoff, "limit": limit}).scalars())

    def _delete(self, conn: sa.Connection, table: sa.Table, ids: list[int]) -> int:
        # By primary key, rows this transaction holds since _lock_published_before.
        t = quoted(conn, table)
        stmt = sa.text(f"DELETE o FROM {_listed(t)}")
        return conn.execute(stmt, {"ids": _ids(ids)}).rowcount

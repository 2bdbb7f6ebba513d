"""MariaDB (>= 10.6) and MySQL (>= 8.0.13) statements: ``SKIP LOCKED`` claims, ``JSON_TABLE``
batch updates, and polling (there is no LISTEN/NOTIFY).

**Isolation: READ COMMITTED on the worker's connections** (:attr:`MySQLDialect.engine_options`,
applied by :func:`outbox.database.create_engine` once per connection). InnoDB's default,
REPEATABLE READ, makes every locking read and every searched UPDATE/DELETE take *next-key locks*:
the rows it scanned plus the gaps before them. The claim scans the tail of the pending index,
where every new row lands, so its gap lock would make each producer's INSERT wait (insert
intention vs gap lock) until the claim commits, and two workers taking gap locks in different
orders deadlock. Under READ COMMITTED InnoDB takes record locks only (gaps are locked just for
duplicate-key checks), releases at once the rows a statement read but did not match, and an
UPDATE that meets a locked row first looks at its last committed version ("semi-consistent
read") and waits only if that version matches. The statements below need nothing stronger: each
one either locks exactly the rows it changes, or changes rows this worker already holds a lease
on (the token guard). The application's own transactions (``enqueue``) keep whatever isolation
the application chose: an INSERT takes no gap lock at either level.

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
columns the worker needs, then one UPDATE by primary key (the rows are ours meanwhile). The
outcome statements send the whole batch as one JSON array, joined with ``JSON_TABLE`` (both
databases have it), one statement whatever the batch size. Times come from ``UTC_TIMESTAMP(6)``,
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
IDS = sa.bindparam("ids", expanding=True)


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
            UPDATE {t}
            SET status = {IN_FLIGHT},
                lease_token = :token,
                lease_expires_at = {NOW} + INTERVAL :lease_us MICROSECOND,
                attempts = attempts + 1
            WHERE id IN :ids
            """
        ).bindparams(TOKEN, IDS)
        params = {"ids": ids, "token": token, "lease_us": _microseconds(lease_seconds)}
        conn.execute(stmt, params)

    def extend_lease(
        self, conn: sa.Connection, table: sa.Table, token: uuid.UUID, lease_seconds: float
    ) -> int:
        # lease_token has no index of its own; the lease index holds exactly the rows in
        # flight (IS NOT NULL skips the NULLs of every other row). Rows of other workers that
        # are locked are judged on their committed version and not waited for.
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            UPDATE {t} FORCE INDEX ({_index(conn, table, "in_flight")})
            SET lease_expires_at = {NOW} + INTERVAL :lease_us MICROSECOND
            WHERE lease_expires_at IS NOT NULL AND lease_token = :token
              AND status = {IN_FLIGHT}
            """
        ).bindparams(TOKEN)
        params = {"token": token, "lease_us": _microseconds(lease_seconds)}
        return conn.execute(stmt, params).rowcount

    # -- the outcome of a claim: one statement per kind, the batch as a JSON array -------------

    def ack_published(
        self, conn: sa.Connection, table: sa.Table, token: uuid.UUID, acks: Sequence[Ack]
    ) -> int:
        if not acks:
            return 0
        # STRAIGHT_JOIN makes the JSON rows drive the join, so each outbox row is found (and
        # locked) by primary key; left to itself the optimizer may scan the table first and lock
        # its way through it. The token guard makes a stale worker's ack change nothing.
        t = quoted(conn, table)
        payload = json.dumps(
            [[a.id, a.acknowledgement_id, a.message_serial, a.history_serial] for a in acks]
        )
        stmt = sa.text(
            f"""
            UPDATE JSON_TABLE(:payload, '$[*]' COLUMNS (
                       id BIGINT PATH '$[0]',
                       ack VARCHAR(200) PATH '$[1]',
                       message_serial VARCHAR(64) PATH '$[2]',
                       history_serial VARCHAR(64) PATH '$[3]')) AS a
            STRAIGHT_JOIN {t} AS o ON o.id = a.id
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
        # As ack_published: JSON rows first, outbox rows by primary key, under the token guard.
        t = quoted(conn, table)
        payload = json.dumps(
            [
                [f.id, _microseconds(f.delay), f.status, f.code, f.message, int(f.charged)]
                for f in failures
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
            STRAIGHT_JOIN {t} AS o ON o.id = f.id
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
        # One UPDATE by primary key (an IN list), under the token guard.
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            UPDATE {t}
            SET status = {PENDING}, attempts = attempts - :refund, next_attempt_at = {NOW},
                lease_token = NULL, lease_expires_at = NULL
            WHERE id IN :ids AND lease_token = :token AND status = {IN_FLIGHT}
            """
        ).bindparams(TOKEN, IDS)
        return conn.execute(
            stmt, {"ids": list(ids), "token": token, "refund": int(refund)}
        ).rowcount

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
            UPDATE {t}
            SET status = {PENDING}, next_attempt_at = {NOW},
                lease_token = NULL, lease_expires_at = NULL
            WHERE id IN :ids
            """
        ).bindparams(IDS)
        return conn.execute(stmt, {"ids": ids}).rowcount

    def delete_published_before(
        self, conn: sa.Connection, table: sa.Table, cutoff: dt.datetime, limit: int
    ) -> int:
        # Neither database takes LIMIT inside an IN subquery, but both take ORDER BY and LIMIT on
        # a single-table DELETE. The WHERE is on the row itself, re-read after any lock wait, so
        # a row that replay just put back to pending is not deleted. ORDER BY follows the
        # (status, created_at) index, so the scan walks the oldest published rows and stops.
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            DELETE FROM {t}
            WHERE status = {PUBLISHED} AND published_at < :cutoff
            ORDER BY created_at, id
            LIMIT :limit
            """
        ).bindparams(CUTOFF)
        return conn.execute(stmt, {"cutoff": cutoff, "limit": limit}).rowcount

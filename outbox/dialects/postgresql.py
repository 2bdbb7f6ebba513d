"""PostgreSQL statements: ``SKIP LOCKED`` claims, array-driven batch updates, LISTEN/NOTIFY.

Times come from ``statement_timestamp()`` (the database clock, shared by every worker), so leases
and backoff do not depend on the clocks of the hosts running workers. Status values are written
into the SQL as literals (from :class:`~outbox.schema.Status`) rather than bound: the planner can
only use a partial index (``WHERE status = 'pending'``) when it sees the literal.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence

import sqlalchemy as sa

from .. import schema
from ..database import libpq_conninfo
from ..schema import Status
from .base import (
    TOKEN,
    Ack,
    ClaimedRow,
    Dialect,
    Failure,
    OnNotify,
    claim_columns,
    claimed_rows,
    literal,
    quoted,
)

log = logging.getLogger("outbox.worker")

PENDING, IN_FLIGHT, PUBLISHED = (
    literal(s) for s in (Status.PENDING, Status.IN_FLIGHT, Status.PUBLISHED)
)
#: Seconds between attempts to re-open a lost LISTEN connection (the worker polls meanwhile).
LISTEN_RETRY = 1.0


def notify_channel(table: sa.Table) -> str:
    """The LISTEN/NOTIFY channel of one outbox table (its INSERT trigger, migration 0002)."""
    return schema.notify_channel(table.name)


class PostgresDialect(Dialect):
    name = "postgresql"
    notifies = True

    def claim_batch(
        self,
        conn: sa.Connection,
        table: sa.Table,
        limit: int,
        lease_seconds: float,
        token: uuid.UUID,
    ) -> list[ClaimedRow]:
        # SKIP LOCKED lets concurrent workers take disjoint batches without waiting on each
        # other; the CTE and the UPDATE are one statement, so a claim is atomic.
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            WITH due AS (
                SELECT id FROM {t}
                WHERE status = {PENDING} AND next_attempt_at <= statement_timestamp()
                ORDER BY next_attempt_at, id
                LIMIT :limit
                FOR UPDATE SKIP LOCKED
            )
            UPDATE {t} AS o
            SET status = {IN_FLIGHT},
                lease_token = :token,
                lease_expires_at = statement_timestamp() + make_interval(secs => :lease),
                attempts = o.attempts + 1
            FROM due
            WHERE o.id = due.id
            RETURNING {claim_columns("o.")}
            """
        ).bindparams(TOKEN)
        stmt = stmt.columns(queued_at=schema.UTCDateTime())
        params = {"limit": limit, "token": token, "lease": float(lease_seconds)}
        return claimed_rows(conn.execute(stmt, params))

    def extend_lease(
        self, conn: sa.Connection, table: sa.Table, token: uuid.UUID, lease_seconds: float
    ) -> int:
        # Reads the small in-flight partial index; a lease already taken over is not touched.
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            UPDATE {t}
            SET lease_expires_at = statement_timestamp() + make_interval(secs => :lease)
            WHERE status = {IN_FLIGHT} AND lease_token = :token
            """
        ).bindparams(TOKEN)
        return conn.execute(stmt, {"token": token, "lease": float(lease_seconds)}).rowcount

    def ack_published(
        self, conn: sa.Connection, table: sa.Table, token: uuid.UUID, acks: Sequence[Ack]
    ) -> int:
        if not acks:
            return 0
        # One statement for the whole batch: parallel arrays unnested into rows. The token
        # guard makes a stale worker's ack (its lease expired and was re-taken) change nothing.
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            UPDATE {t} AS o
            SET status = {PUBLISHED},
                published_at = statement_timestamp(),
                acknowledgement_id = a.ack,
                message_serial = a.message_serial,
                history_serial = a.history_serial,
                lease_token = NULL,
                lease_expires_at = NULL
            FROM unnest(CAST(:ids AS bigint[]), CAST(:acks AS text[]),
                        CAST(:message_serials AS text[]), CAST(:history_serials AS text[]))
                 AS a(id, ack, message_serial, history_serial)
            WHERE o.id = a.id AND o.lease_token = :token AND o.status = {IN_FLIGHT}
            """
        ).bindparams(TOKEN)
        params = {
            "ids": [a.id for a in acks],
            "acks": [a.acknowledgement_id for a in acks],
            "message_serials": [a.message_serial for a in acks],
            "history_serials": [a.history_serial for a in acks],
            "token": token,
        }
        return conn.execute(stmt, params).rowcount

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
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            UPDATE {t} AS o
            SET status = :status,
                next_attempt_at = statement_timestamp() + make_interval(secs => f.delay),
                attempts = o.attempts - :refund,
                failures = o.failures + f.charge,
                lease_token = NULL,
                lease_expires_at = NULL,
                last_error_status = f.status,
                last_error_code = f.code,
                last_error_message = f.message,
                last_error_at = statement_timestamp()
            FROM unnest(CAST(:ids AS bigint[]), CAST(:delays AS float8[]),
                        CAST(:statuses AS integer[]), CAST(:codes AS text[]),
                        CAST(:messages AS text[]), CAST(:charges AS integer[]))
                 AS f(id, delay, status, code, message, charge)
            WHERE o.id = f.id AND o.lease_token = :token AND o.status = {IN_FLIGHT}
            """
        ).bindparams(TOKEN)
        params = {
            "status": status.value,
            "refund": int(refund),
            "ids": [f.id for f in failures],
            "delays": [float(f.delay) for f in failures],
            "statuses": [f.status for f in failures],
            "codes": [f.code for f in failures],
            "messages": [f.message for f in failures],
            "charges": [int(f.charged) for f in failures],
            "token": token,
        }
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
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            UPDATE {t}
            SET status = {PENDING}, attempts = attempts - :refund,
                next_attempt_at = statement_timestamp(),
                lease_token = NULL, lease_expires_at = NULL
            WHERE id = ANY(CAST(:ids AS bigint[])) AND lease_token = :token
              AND status = {IN_FLIGHT}
            """
        ).bindparams(TOKEN)
        params = {"ids": list(ids), "token": token, "refund": int(refund)}
        return conn.execute(stmt, params).rowcount

    def reclaim_expired(self, conn: sa.Connection, table: sa.Table) -> int:
        # The row keeps its attempt count: it may have been sent, so it goes alone next time.
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            UPDATE {t}
            SET status = {PENDING}, next_attempt_at = statement_timestamp(),
                lease_token = NULL, lease_expires_at = NULL
            WHERE status = {IN_FLIGHT} AND lease_expires_at <= statement_timestamp()
            """
        )
        return conn.execute(stmt).rowcount

    async def listen(self, engine: sa.Engine, table: sa.Table, on_notify: OnNotify) -> None:
        """LISTEN on the table's channel with an asyncio psycopg connection of its own.

        A lost connection is re-opened after a pause; the worker polls meanwhile, so a gap only
        costs latency, never an event. Each (re)connection calls ``on_notify`` once for whatever
        was committed while nobody listened.
        """
        import psycopg
        from psycopg import sql

        conninfo = libpq_conninfo(engine.url)
        listen = sql.SQL("LISTEN {}").format(sql.Identifier(notify_channel(table)))
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    conninfo, autocommit=True, connect_timeout=5
                ) as pg:
                    await pg.execute(listen)
                    on_notify()
                    async for _notification in pg.notifies():
                        on_notify()
            except psycopg.Error as exc:
                log.debug("LISTEN connection lost (%s); polling until it is back", exc)
                await asyncio.sleep(LISTEN_RETRY)

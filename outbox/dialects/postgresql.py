"""PostgreSQL statements: ``FOR UPDATE SKIP LOCKED`` claims, array-driven batch updates, LISTEN/NOTIFY.

Times come from ``statement_timestamp()`` (the database clock, shared by every worker), so leases
and backoff do not depend on the clocks of the hosts running workers.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Callable, Sequence

import sqlalchemy as sa

from .. import schema
from ..schema import UTCDateTime
from . import CLAIM_COLUMNS, Ack, ClaimedRow, Failure, FailureStatements, quoted

_TOKEN = sa.bindparam("token", type_=sa.Uuid(as_uuid=True))


def notify_channel(table: sa.Table) -> str:
    """The LISTEN/NOTIFY channel of one outbox table (its INSERT trigger, migration 0002)."""
    return schema.notify_channel(table.name)


class PostgresDialect(FailureStatements):
    name = "postgresql"

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
                WHERE status = 'pending' AND next_attempt_at <= statement_timestamp()
                ORDER BY next_attempt_at, id
                LIMIT :limit
                FOR UPDATE SKIP LOCKED
            )
            UPDATE {t} AS o
            SET status = 'in_flight',
                lease_token = :token,
                lease_expires_at = statement_timestamp() + make_interval(secs => :lease),
                attempts = o.attempts + 1
            FROM due
            WHERE o.id = due.id
            RETURNING {", ".join("o." + c.strip() for c in CLAIM_COLUMNS.split(","))}
            """
        ).bindparams(_TOKEN)
        stmt = stmt.columns(queued_at=UTCDateTime())
        rows = conn.execute(stmt, {"limit": limit, "token": token, "lease": float(lease_seconds)})
        return sorted((ClaimedRow(*r) for r in rows), key=lambda r: r.id)

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
            SET status = 'published',
                published_at = statement_timestamp(),
                acknowledgement_id = a.ack,
                message_serial = a.message_serial,
                history_serial = a.history_serial,
                lease_token = NULL,
                lease_expires_at = NULL
            FROM unnest(CAST(:ids AS bigint[]), CAST(:acks AS text[]),
                        CAST(:message_serials AS text[]), CAST(:history_serials AS text[]))
                 AS a(id, ack, message_serial, history_serial)
            WHERE o.id = a.id AND o.lease_token = :token AND o.status = 'in_flight'
            """
        ).bindparams(_TOKEN)
        result = conn.execute(
            stmt,
            {
                "ids": [a.id for a in acks],
                "acks": [a.acknowledgement_id for a in acks],
                "message_serials": [a.message_serial for a in acks],
                "history_serials": [a.history_serial for a in acks],
                "token": token,
            },
        )
        return result.rowcount

    def _finish_failed(
        self,
        conn: sa.Connection,
        table: sa.Table,
        token: uuid.UUID,
        failures: Sequence[Failure],
        status: str,
        refund_attempt: bool,
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
            WHERE o.id = f.id AND o.lease_token = :token AND o.status = 'in_flight'
            """
        ).bindparams(_TOKEN)
        result = conn.execute(
            stmt,
            {
                "status": status,
                "refund": 1 if refund_attempt else 0,
                "ids": [f.id for f in failures],
                "delays": [float(f.delay) for f in failures],
                "statuses": [f.status for f in failures],
                "codes": [f.code for f in failures],
                "messages": [f.message for f in failures],
                "charges": [int(f.charged) for f in failures],
                "token": token,
            },
        )
        return result.rowcount

    def release(
        self,
        conn: sa.Connection,
        table: sa.Table,
        token: uuid.UUID,
        ids: Sequence[int],
        refund_attempt: bool = True,
    ) -> int:
        if not ids:
            return 0
        t = quoted(conn, table)
        refund = 1 if refund_attempt else 0
        stmt = sa.text(
            f"""
            UPDATE {t}
            SET status = 'pending', attempts = attempts - {refund},
                next_attempt_at = statement_timestamp(),
                lease_token = NULL, lease_expires_at = NULL
            WHERE id = ANY(CAST(:ids AS bigint[])) AND lease_token = :token AND status = 'in_flight'
            """
        ).bindparams(_TOKEN)
        return conn.execute(stmt, {"ids": list(ids), "token": token}).rowcount

    def extend_lease(
        self, conn: sa.Connection, table: sa.Table, token: uuid.UUID, lease_seconds: float
    ) -> int:
        # Reads the small in-flight partial index; a lease already taken over is not touched.
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            UPDATE {t}
            SET lease_expires_at = statement_timestamp() + make_interval(secs => :lease)
            WHERE status = 'in_flight' AND lease_token = :token
            """
        ).bindparams(_TOKEN)
        return conn.execute(stmt, {"token": token, "lease": float(lease_seconds)}).rowcount

    def reclaim_expired(self, conn: sa.Connection, table: sa.Table) -> int:
        # The row keeps its attempt count: it may have been sent, so it goes alone next time.
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            UPDATE {t}
            SET status = 'pending', next_attempt_at = statement_timestamp(),
                lease_token = NULL, lease_expires_at = NULL
            WHERE status = 'in_flight' AND lease_expires_at <= statement_timestamp()
            """
        )
        return conn.execute(stmt).rowcount

    def delete_published_before(
        self, conn: sa.Connection, table: sa.Table, cutoff: dt.datetime, limit: int
    ) -> int:
        # The status test is repeated outside the subquery: under READ COMMITTED, a DELETE that
        # waited for a row lock re-checks only its own WHERE on the new row version, so a row
        # replayed meanwhile is skipped instead of deleted.
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            DELETE FROM {t}
            WHERE id IN (
                SELECT id FROM {t}
                WHERE status = 'published' AND published_at < :cutoff
                LIMIT :limit
            )
            AND status = 'published' AND published_at < :cutoff
            """
        ).bindparams(sa.bindparam("cutoff", type_=UTCDateTime()))
        return conn.execute(stmt, {"cutoff": cutoff, "limit": limit}).rowcount


def listen_forever(
    conninfo: str, channel: str, on_notify: Callable[[], None], stop: threading.Event
) -> None:
    """Call ``on_notify`` for each NOTIFY on ``channel`` until ``stop`` is set (run in a thread).

    A lost connection is re-opened after a pause; the worker polls anyway, so a gap only costs
    latency, never an event.
    """
    import psycopg
    from psycopg import sql

    while not stop.is_set():
        try:
            with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as pg:
                pg.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                on_notify()  # anything committed while we were not listening
                while not stop.is_set():
                    for _ in pg.notifies(timeout=1.0, stop_after=1):
                        on_notify()
        except psycopg.Error:
            stop.wait(1.0)

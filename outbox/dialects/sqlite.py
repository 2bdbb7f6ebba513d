"""SQLite statements: one ``UPDATE ... RETURNING`` claim, JSON-driven batch updates.

SQLite has a single writer: a write transaction excludes every other, so the claim needs no
``SKIP LOCKED`` to keep two workers off the same rows. Being embedded, its clock is this host's
clock; times are computed in SQL all the same, in the fixed-width text form the table stores.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence

import sqlalchemy as sa

from ..schema import Status, UTCDateTime
from .base import (
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
_NOW = "strftime('%Y-%m-%d %H:%M:%f000', 'now')"


def _now_plus(seconds_sql: str) -> str:
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now', printf('%+.6f seconds', {seconds_sql}))"


class SQLiteDialect(Dialect):
    name = "sqlite"

    def claim_batch(
        self,
        conn: sa.Connection,
        table: sa.Table,
        limit: int,
        lease_seconds: float,
        token: uuid.UUID,
    ) -> list[ClaimedRow]:
        t = quoted(conn, table)
        # Without statistics SQLite prefers the (status, created_at) index and sorts every
        # pending row on each claim (measured: 10 ms for 20,000 pending rows, growing with the
        # backlog). INDEXED BY pins the partial index, which yields due rows already in order:
        # one batch read per claim (1.4 ms), however long the backlog or the history.
        pending_index = conn.dialect.identifier_preparer.quote(f"ix_{table.name}_pending")
        stmt = sa.text(
            f"""
            UPDATE {t}
            SET status = {IN_FLIGHT},
                lease_token = :token,
                lease_expires_at = {_now_plus(":lease")},
                attempts = attempts + 1
            WHERE id IN (
                SELECT id FROM {t} INDEXED BY {pending_index}
                WHERE status = {PENDING} AND next_attempt_at <= {_NOW}
                ORDER BY next_attempt_at, id
                LIMIT :limit
            )
            RETURNING {claim_columns()}
            """
        ).bindparams(TOKEN)
        stmt = stmt.columns(queued_at=UTCDateTime())
        params = {"limit": limit, "token": token, "lease": float(lease_seconds)}
        return claimed_rows(conn.execute(stmt, params))

    def ack_published(
        self, conn: sa.Connection, table: sa.Table, token: uuid.UUID, acks: Sequence[Ack]
    ) -> int:
        if not acks:
            return 0
        # The batch travels as one JSON array parameter and is joined with json_each: one
        # statement whatever the batch size. The token guard ignores a stale worker's ack.
        # NOT INDEXED keeps SQLite from walking the (status, created_at) index and re-reading
        # the JSON for every row in flight; rows are then found by primary key (6 ms -> 1.6 ms
        # for 100 rows). The same holds for the other statements driven by a JSON list.
        t = quoted(conn, table)
        payload = json.dumps(
            [[a.id, a.acknowledgement_id, a.message_serial, a.history_serial] for a in acks]
        )
        stmt = sa.text(
            f"""
            UPDATE {t} NOT INDEXED
            SET status = {PUBLISHED},
                published_at = {_NOW},
                acknowledgement_id = json_extract(a.value, '$[1]'),
                message_serial = json_extract(a.value, '$[2]'),
                history_serial = json_extract(a.value, '$[3]'),
                lease_token = NULL,
                lease_expires_at = NULL
            FROM json_each(:payload) AS a
            WHERE {t}.id = json_extract(a.value, '$[0]')
              AND {t}.lease_token = :token AND {t}.status = {IN_FLIGHT}
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
        t = quoted(conn, table)
        payload = json.dumps(
            [[f.id, float(f.delay), f.status, f.code, f.message, int(f.charged)] for f in failures]
        )
        stmt = sa.text(
            f"""
            UPDATE {t} NOT INDEXED
            SET status = :status,
                next_attempt_at = {_now_plus("json_extract(f.value, '$[1]')")},
                attempts = attempts - :refund,
                failures = failures + json_extract(f.value, '$[5]'),
                lease_token = NULL,
                lease_expires_at = NULL,
                last_error_status = json_extract(f.value, '$[2]'),
                last_error_code = json_extract(f.value, '$[3]'),
                last_error_message = json_extract(f.value, '$[4]'),
                last_error_at = {_NOW}
            FROM json_each(:payload) AS f
            WHERE {t}.id = json_extract(f.value, '$[0]')
              AND {t}.lease_token = :token AND {t}.status = {IN_FLIGHT}
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
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            UPDATE {t} NOT INDEXED
            SET status = {PENDING}, attempts = attempts - :refund, next_attempt_at = {_NOW},
                lease_token = NULL, lease_expires_at = NULL
            WHERE id IN (SELECT value FROM json_each(:ids))
              AND lease_token = :token AND status = {IN_FLIGHT}
            """
        ).bindparams(TOKEN)
        params = {"ids": json.dumps(list(ids)), "token": token, "refund": int(refund)}
        return conn.execute(stmt, params).rowcount

    def extend_lease(
        self, conn: sa.Connection, table: sa.Table, token: uuid.UUID, lease_seconds: float
    ) -> int:
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            UPDATE {t}
            SET lease_expires_at = {_now_plus(":lease")}
            WHERE status = {IN_FLIGHT} AND lease_token = :token
            """
        ).bindparams(TOKEN)
        return conn.execute(stmt, {"token": token, "lease": float(lease_seconds)}).rowcount

    def reclaim_expired(self, conn: sa.Connection, table: sa.Table) -> int:
        t = quoted(conn, table)
        stmt = sa.text(
            f"""
            UPDATE {t}
            SET status = {PENDING}, next_attempt_at = {_NOW},
                lease_token = NULL, lease_expires_at = NULL
            WHERE status = {IN_FLIGHT} AND lease_expires_at <= {_NOW}
            """
        )
        return conn.execute(stmt).rowcount

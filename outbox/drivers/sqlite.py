"""SQLite's driver: one ``UPDATE ... RETURNING`` claim, JSON-driven batch statements.

SQLite has a single writer: a write transaction excludes every other, so the claim needs no
``SKIP LOCKED`` to keep two workers off the same rows, and moving rows to the published log or the
dead table takes two statements (an ``INSERT ... SELECT`` and a ``DELETE``) in one transaction
without any other writer seeing the gap. Being embedded, its clock is this host's clock; times
are computed in SQL all the same, in the fixed-width text form the tables store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import uuid
from collections.abc import Sequence

import sqlalchemy as sa

from ..schema import (
    EVENT_COLUMNS,
    WAITING_FOR_KEY,
    UTCDateTime,
    dead_table,
    parked_table,
    published_table,
)
from .sql import (
    TOKEN,
    buried_columns,
    claim_columns,
    claimable_in_order,
    claimed_rows,
    index_name,
    published_columns,
    quoted,
)
from .threaded import ThreadedDriver
from .values import Ack, ClaimedRow, Failure, OnNotify

log = logging.getLogger("outbox.worker")

_NOW = "strftime('%Y-%m-%d %H:%M:%f000', 'now')"
#: How often a worker looks whether another connection committed (``PRAGMA data_version``).
WATCH_INTERVAL = 0.01


def _now_plus(seconds_sql: str) -> str:
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now', printf('%+.6f seconds', {seconds_sql}))"


class SQLiteDriver(ThreadedDriver):
    """Statements written for SQLite where the portable ones would not do: the claim and the
    steps of a recording, the mutations' wake (by their index), and the watch that replaces
    notifications. Parking and promotion are the portable statements."""

    name = "sqlite"
    notifies = True

    def keys_lock(self, conn: sa.Connection, keys: Sequence[str]) -> None:
        """Nothing to lock: SQLite's single writer holds its lock from a transaction's first
        write to its commit, so ids are handed out in commit order already, and an insert that
        asks the table whether a key has rows cannot race a worker's ack (None: ask it)."""
        return None

    def claim(
        self, conn: sa.Connection, limit: int, lease_seconds: float, token: uuid.UUID
    ) -> list[ClaimedRow]:
        table = self.table
        t = quoted(conn, self.table)
        # INDEXED BY pins the due index, which yields due rows already in order: one batch read
        # per claim however long the backlog (without statistics SQLite may sort them all).
        due_index = index_name(conn, table, "due")
        in_order = claimable_in_order(t, t, quoted(conn, parked_table(table)))
        claimable = (
            f"next_attempt_at <= {_NOW} AND (lease_expires_at IS NULL OR lease_expires_at <= {_NOW})"
            f" AND {in_order}"
        )
        # SQLite's RETURNING shows only the new values: which candidates held an (expired) lease
        # is read first. The UPDATE re-checks that each is still claimable, so a row another
        # worker claimed in between is left to it.
        candidates = conn.execute(
            sa.text(
                f"""
                SELECT id, lease_token IS NOT NULL FROM {t} INDEXED BY {due_index}
                WHERE {claimable}
                ORDER BY next_attempt_at, id
                LIMIT :limit
                """
            ),
            {"limit": limit},
        ).all()
        if not candidates:
            return []
        stmt = sa.text(
            f"""
            UPDATE {t}
            SET lease_token = :token,
                lease_expires_at = {_now_plus(":lease")},
                attempts = attempts + 1
            WHERE id IN (SELECT value FROM json_each(:ids)) AND {claimable}
            RETURNING {claim_columns()}
            """
        ).bindparams(TOKEN)
        stmt = stmt.columns(
            queued_at=UTCDateTime(),
            event_id=sa.Uuid(as_uuid=True),
            target_event_id=sa.Uuid(as_uuid=True),
        )
        ids = json.dumps([row_id for row_id, _ in candidates])
        params = {"ids": ids, "token": token, "lease": float(lease_seconds)}
        taken_over = {row_id for row_id, held in candidates if held}
        return claimed_rows(conn.execute(stmt, params), taken_over)

    def extend_lease(
        self, conn: sa.Connection, token: uuid.UUID, lease_seconds: float, ids: Sequence[int]
    ) -> int:
        t = quoted(conn, self.table)
        stmt = sa.text(
            f"""
            UPDATE {t}
            SET lease_expires_at = {_now_plus(":lease")}
            WHERE id IN (SELECT value FROM json_each(:ids)) AND lease_token = :token
            """
        ).bindparams(TOKEN)
        params = {"ids": json.dumps(list(ids)), "token": token, "lease": float(lease_seconds)}
        return conn.execute(stmt, params).rowcount

    def publish(self, conn: sa.Connection, token: uuid.UUID, acks: Sequence[Ack]) -> int:
        # The batch travels as one JSON array parameter joined with json_each: one statement
        # whatever the batch size. The token guard ignores a stale worker's ack.
        payload = json.dumps(
            [[a.id, a.acknowledgement_id, a.message_serial, a.history_serial] for a in acks]
        )
        columns = published_columns(_NOW, *(_field(i) for i in (1, 2, 3)))
        return self._move(conn, published_table(self.table), token, payload, columns)

    def retry(
        self, conn: sa.Connection, token: uuid.UUID, failures: Sequence[Failure], refund: bool
    ) -> int:
        t = quoted(conn, self.table)
        # NOT INDEXED: rows are found by primary key, not by walking an index and re-reading
        # the JSON for every row (6 ms -> 1.6 ms for 100 rows).
        stmt = sa.text(
            f"""
            UPDATE {t} NOT INDEXED
            SET next_attempt_at = {_now_plus(_field(1))},
                attempts = attempts - :refund,
                failures = failures + {_field(5)},
                lease_token = NULL,
                lease_expires_at = NULL,
                last_error_status = {_field(2)},
                last_error_code = {_field(3)},
                last_error_message = {_field(4)},
                last_error_at = {_NOW}
            FROM json_each(:payload) AS a
            WHERE {t}.id = {_field(0)} AND {t}.lease_token = :token
            """
        ).bindparams(TOKEN)
        params = {"refund": int(refund), "payload": _failures(failures), "token": token}
        return conn.execute(stmt, params).rowcount

    def bury(self, conn: sa.Connection, token: uuid.UUID, failures: Sequence[Failure]) -> int:
        columns = buried_columns(_NOW, *(_field(i) for i in (5, 2, 3, 4)))
        return self._move(conn, dead_table(self.table), token, _failures(failures), columns)

    def _move(
        self,
        conn: sa.Connection,
        target: sa.Table,
        token: uuid.UUID,
        payload: str,
        columns: str,
    ) -> int:
        """Copy the leased rows ``payload`` names into ``target`` (``columns``: the SELECT list
        of :func:`~.sql.published_columns` or :func:`~.sql.buried_columns`), then delete them
        here."""
        t, into = quoted(conn, self.table), quoted(conn, target)
        copy = sa.text(
            f"""
            INSERT INTO {into} ({", ".join(EVENT_COLUMNS)})
            SELECT {columns}
            FROM json_each(:payload) AS a JOIN {t} AS o ON o.id = json_extract(a.value, '$[0]')
            WHERE o.lease_token = :token
            """
        ).bindparams(TOKEN)
        moved = conn.execute(copy, {"payload": payload, "token": token}).rowcount
        delete = sa.text(
            f"""
            DELETE FROM {t}
            WHERE id IN (SELECT json_extract(value, '$[0]') FROM json_each(:payload))
              AND lease_token = :token
            """
        ).bindparams(TOKEN)
        conn.execute(delete, {"payload": payload, "token": token})
        return moved

    def wake(self, conn: sa.Connection, messages: Sequence[tuple[uuid.UUID, str]]) -> int:
        in_messages = """(target_event_id, channel) IN (
                  SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]')
                  FROM json_each(:messages))"""
        payload = json.dumps([[event_id.hex, channel] for event_id, channel in set(messages)])
        return self._wake_mutations(conn, in_messages, {"messages": payload})

    async def mutations_wake_stranded(self) -> int:
        return await self.transaction(self._wake_stranded)

    def _wake_stranded(self, conn: sa.Connection) -> int:
        t = quoted(conn, self.table)
        message_gone = f"""NOT EXISTS (SELECT 1 FROM {t} AS m
                              WHERE m.event_id = {t}.target_event_id AND m.channel = {t}.channel)"""
        return self._wake_mutations(conn, message_gone, {})

    def _wake_mutations(self, conn: sa.Connection, which: str, params: dict[str, str]) -> int:
        """Make due the waiting mutation rows that ``which`` (SQL) picks, each where it heads
        its key and its key is not parked."""
        # INDEXED BY the index of mutation rows: without statistics SQLite would walk every
        # waiting row of the due index instead (those behind their keys included).
        table = self.table
        t, target = quoted(conn, table), index_name(conn, table, "target")
        stmt = sa.text(
            f"""
            UPDATE {t} INDEXED BY {target} SET next_attempt_at = {_NOW}
            WHERE target_event_id IS NOT NULL
              AND {which}
              AND {_waiting_head(t, quoted(conn, parked_table(table)))}
            """
        )
        return conn.execute(stmt, {**params, "waiting": _WAITING}).rowcount

    def give_back(
        self, conn: sa.Connection, token: uuid.UUID, ids: Sequence[int], refund: bool
    ) -> int:
        t = quoted(conn, self.table)
        stmt = sa.text(
            f"""
            UPDATE {t}
            SET attempts = attempts - :refund, next_attempt_at = {_NOW},
                lease_token = NULL, lease_expires_at = NULL
            WHERE id IN (SELECT value FROM json_each(:ids)) AND lease_token = :token
            """
        ).bindparams(TOKEN)
        params = {"ids": json.dumps(list(ids)), "token": token, "refund": int(refund)}
        return conn.execute(stmt, params).rowcount

    async def listen(self, on_notify: OnNotify) -> None:
        """Wake the worker when another connection commits to the database file.

        ``PRAGMA data_version`` changes whenever another connection commits and costs a few
        microseconds to read, so it is watched every 10 ms on a connection of its own: an
        enqueue is seen within milliseconds instead of at the next poll. ``on_notify`` is called
        once when the watch begins, for what was committed before. A database without a
        file (``:memory:``) has no other connection to watch; the worker then only polls.
        """
        database = self.engine.url.database
        if not database or database == ":memory:" or database.startswith("file::memory:"):
            await asyncio.Event().wait()
        # No busy timeout: a reading that meets a lock is skipped, never waited for on the loop.
        uri = database.startswith("file:")
        watcher = sqlite3.connect(database, timeout=0, check_same_thread=False, uri=uri)
        try:
            last: int | None = None
            while True:
                try:
                    version = _data_version(watcher)
                except sqlite3.Error as exc:
                    # Locked (a migration, an exclusive writer): read again at the next tick.
                    log.debug("cannot read data_version (%s); trying again", exc)
                    await asyncio.sleep(WATCH_INTERVAL)
                    continue
                if version != last:
                    # The first reading wakes the worker for what was committed before.
                    last = version
                    on_notify()
                await asyncio.sleep(WATCH_INTERVAL)
        finally:
            watcher.close()


#: ``WAITING_FOR_KEY`` as SQLite stores it (UTCDateTime's text form).
_WAITING = WAITING_FOR_KEY.strftime("%Y-%m-%d %H:%M:%S.%f")


def _waiting_head(t: str, parked: str) -> str:
    """SQL: the row of ``t`` waits out of the due order, heads its key, its key not parked."""
    return f"""{t}.next_attempt_at = :waiting
              AND NOT EXISTS (SELECT 1 FROM {t} AS h
                              WHERE h.ordering_key = {t}.ordering_key AND h.id < {t}.id)
              AND NOT EXISTS (SELECT 1 FROM {parked} AS p
                              WHERE p.ordering_key = {t}.ordering_key)"""


def _field(index: int) -> str:
    """SQL: field ``index`` of the JSON array ``a.value`` (one row of a batch's payload)."""
    return f"json_extract(a.value, '$[{index}]')"


def _data_version(connection: sqlite3.Connection) -> int:
    return int(connection.execute("PRAGMA data_version").fetchone()[0])


def _failures(failures: Sequence[Failure]) -> str:
    return json.dumps(
        [[f.id, float(f.delay), f.status, f.code, f.message, int(f.charged)] for f in failures]
    )

"""PostgreSQL's driver: ``SKIP LOCKED`` claims, array-driven batch statements, LISTEN/NOTIFY.

The worker's hot statements (claim, lease renewal, recording) run on psycopg asyncio connections
of the driver's own, prepared once per connection, with no thread hand-off and no SQLAlchemy
transaction around them: per row they cost a tuple, not a result-processing pass (measured:
SQLAlchemy on the hot path cost a third of the worker's CPU). Producers' statements run on the
caller's connection (advisory locks per key, COPY for large batches); the upkeep is the portable
statements on a thread. Times come from
``statement_timestamp()`` (the database clock, shared by every worker), so leases and backoff do
not depend on the clocks of the hosts running workers.

The shape that keeps PostgreSQL's share small (see docs/performance.md): the claim changes only
columns no index holds, so it is a HOT update on a table with free space in each page
(``fillfactor`` 50); the ack and the burial are one ``DELETE ... RETURNING`` feeding an
``INSERT`` into the published log or the dead table, which writes no entry in the hot table's
indexes. A lost claim is never a problem: an expired lease is claimable as it stands.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Sequence
from functools import cache, cached_property
from typing import Any

import sqlalchemy as sa

from .. import schema
from ..connections import UnfollowableEngine, engine_conninfo
from ..schema import EVENT_COLUMNS, WAITING_FOR_KEY, dead_table, parked_table, published_table
from .base import Driver
from .sql import buried_columns, claim_columns, claimable_in_order, published_columns, quoted
from .values import Ack, ClaimedRow, Failure, OnNotify, Recording

log = logging.getLogger("outbox.worker")

#: From this many rows on, enqueue_many streams them with COPY: one round trip and no per-row
#: statement (measured: 3-4x the rows per second of executemany's pipelined INSERTs).
COPY_FROM_ROWS = 8

#: Seconds between attempts to re-open a lost LISTEN connection (the worker polls meanwhile).
LISTEN_RETRY = 1.0
_NOW = "statement_timestamp()"
#: Every session of the worker's own: no JIT. PostgreSQL's defaults compile a statement whose
#: estimate passes ``jit_above_cost``, and an estimate over a large backlog of a table without
#: fresh statistics passed it: 20-400 ms of compiling a claim that runs in under 5. A SET, not a
#: connection option: ``options=`` would replace what the URL or ``PGOPTIONS`` already set.
WORKER_SESSION = "SET jit = off"


def notify_channel(table: sa.Table) -> str:
    """The LISTEN/NOTIFY channel of one outbox table (its INSERT trigger, migration 0002)."""
    return schema.notify_channel(table.name)


@cache
def _statements(hot: str, published: str, dead: str, parked: str) -> dict[str, str]:
    """The hot statements of one table, as psycopg SQL (prepared once per connection), named
    as the steps of a recording (:class:`~.values.Recording`) name them."""
    lease = f"{_NOW} + make_interval(secs => %(lease)s)"
    errors = """unnest(%(ids)s::bigint[], %(delays)s::float8[], %(statuses)s::integer[],
                       %(codes)s::text[], %(messages)s::text[], %(charges)s::integer[])
                AS f(id, delay, status, code, message, charge)"""
    return {
        # SKIP LOCKED lets concurrent workers take disjoint batches without waiting on each
        # other. After the row lock, READ COMMITTED re-checks the lease test on the newest
        # version, so a row another worker just claimed is passed over, not claimed twice.
        # A due row still holding a token holds an expired one (every outcome clears it).
        # The rows are updated by their ids (``= ANY``): with its LIMIT unknown, the prepared
        # form's generic plan would otherwise join the batch to the whole table by a hash.
        "claim": f"""
            WITH due AS (
                SELECT id, lease_token IS NOT NULL AS taken_over FROM {hot} AS c
                WHERE next_attempt_at <= {_NOW}
                  AND (lease_expires_at IS NULL OR lease_expires_at <= {_NOW})
                  AND {claimable_in_order("c", hot, parked)}
                ORDER BY next_attempt_at, id
                LIMIT %(limit)s
                FOR NO KEY UPDATE SKIP LOCKED
            )
            UPDATE {hot} AS o
            SET lease_token = %(token)s, lease_expires_at = {lease}, attempts = o.attempts + 1
            FROM due
            WHERE o.id = due.id AND o.id = ANY(ARRAY(SELECT id FROM due))
            RETURNING {claim_columns("o.")}, due.taken_over
        """,
        "extend_lease": f"""
            UPDATE {hot} SET lease_expires_at = {lease}
            WHERE id = ANY(%(ids)s::bigint[]) AND lease_token = %(token)s
        """,
        # First in a recording that takes keyed rows out (ack or burial), before anything is
        # deleted: a producer of a key holds the key's newest row (KEY SHARE, see
        # lock_ordering_keys) and the deletion must wait for it. Waiting here, the recording has
        # changed nothing a producer could wait for; once it holds these locks it waits for no
        # producer. (Waiting inside the DELETE instead, after deleting other rows, it could
        # deadlock with a producer re-enqueuing the idempotency key of a row already deleted.)
        # Unkeyed rows are not locked: no producer ever holds one.
        "lock_leaving": f"""
            SELECT id FROM {hot}
            WHERE id = ANY(%(ids)s::bigint[]) AND lease_token = %(token)s
              AND ordering_key IS NOT NULL
            ORDER BY id
            FOR UPDATE
        """,
        # The token guard makes a stale worker's ack (its lease expired and was re-taken)
        # change nothing: the DELETE finds no row, so nothing reaches the log either.
        "publish": f"""
            WITH a AS (
                SELECT * FROM unnest(%(ids)s::bigint[], %(acks)s::text[],
                                     %(message_serials)s::text[], %(history_serials)s::text[])
                    AS a(id, ack, message_serial, history_serial)
            ), done AS (
                DELETE FROM {hot} AS o USING a
                WHERE o.id = a.id AND o.lease_token = %(token)s
                RETURNING o.*, a.ack AS a_ack, a.message_serial AS a_message_serial,
                          a.history_serial AS a_history_serial
            )
            INSERT INTO {published} ({", ".join(EVENT_COLUMNS)})
            SELECT {published_columns(_NOW, "o.a_ack", "o.a_message_serial", "o.a_history_serial")}
            FROM done AS o
        """,
        "retry": f"""
            UPDATE {hot} AS o
            SET next_attempt_at = {_NOW} + make_interval(secs => f.delay),
                attempts = o.attempts - %(refund)s,
                failures = o.failures + f.charge,
                lease_token = NULL,
                lease_expires_at = NULL,
                last_error_status = f.status,
                last_error_code = f.code,
                last_error_message = f.message,
                last_error_at = {_NOW}
            FROM {errors}
            WHERE o.id = f.id AND o.lease_token = %(token)s
        """,
        "bury": f"""
            WITH done AS (
                DELETE FROM {hot} AS o USING {errors}
                WHERE o.id = f.id AND o.lease_token = %(token)s
                RETURNING o.*, f.status AS f_status, f.code AS f_code, f.message AS f_message,
                          f.charge AS f_charge
            )
            INSERT INTO {dead} ({", ".join(EVENT_COLUMNS)})
            SELECT {buried_columns(_NOW, "o.f_charge", "o.f_status", "o.f_code", "o.f_message")}
            FROM done AS o
        """,
        # After an ack or a burial: the next row of each key whose head left becomes due.
        # Both find their rows first (the head of each key by the ordering index, as the claim's
        # head test does; the mutations of each message by the target index) and update them by
        # id. Written as joins, the planner could read the rows waiting for their key instead,
        # all at one time in the due index: tens of thousands walked per ack after an overload
        # (3 ms an event), with no statistics or with them (tests/test_plans.py). For the same
        # reason the waiting test is IS NOT DISTINCT FROM (the same here: the column is never
        # NULL), which no index answers: "=" let the planner AND the due index's entries at that
        # time into the lookup by id.
        "promote": f"""
            UPDATE {hot} AS o SET next_attempt_at = {_NOW}
            WHERE o.id = ANY(ARRAY(
                    SELECT (SELECT h.id FROM {hot} AS h
                            WHERE h.ordering_key >= k.name AND h.ordering_key <= k.name
                            ORDER BY h.ordering_key, h.id LIMIT 1)
                    FROM unnest(%(keys)s::text[]) AS k(name)))
              AND o.next_attempt_at IS NOT DISTINCT FROM %(waiting)s
              AND NOT EXISTS (SELECT 1 FROM {parked} AS p WHERE p.ordering_key = o.ordering_key)
        """,
        # After an ack or a burial: the mutations waiting for a message that left become due,
        # each where it heads its key (see portable.mutations_wake). Found by the hot table's
        # index of mutation rows, empty but for them: a probe per message, nothing per backlog.
        "wake": f"""
            UPDATE {hot} AS o SET next_attempt_at = {_NOW}
            WHERE o.id = ANY(ARRAY(
                    SELECT t.id
                    FROM unnest(%(event_ids)s::uuid[], %(channels)s::text[])
                        AS g(event_id, channel)
                    JOIN {hot} AS t ON t.target_event_id = g.event_id AND t.channel = g.channel
                    WHERE t.target_event_id IS NOT NULL))
              AND o.next_attempt_at IS NOT DISTINCT FROM %(waiting)s
              AND NOT EXISTS (SELECT 1 FROM {hot} AS h
                              WHERE h.ordering_key = o.ordering_key AND h.id < o.id)
              AND NOT EXISTS (SELECT 1 FROM {parked} AS p WHERE p.ordering_key = o.ordering_key)
        """,
        # Parks the key of each buried row just moved to the dead table (none for a stale ack).
        "park": f"""
            INSERT INTO {parked} (ordering_key, row_id, parked_at)
            SELECT ordering_key, id, {_NOW} FROM {dead}
            WHERE id = ANY(%(ids)s::bigint[]) AND ordering_key IS NOT NULL
            ON CONFLICT (ordering_key) DO NOTHING
        """,
        "give_back": f"""
            UPDATE {hot}
            SET attempts = attempts - %(refund)s, next_attempt_at = {_NOW},
                lease_token = NULL, lease_expires_at = NULL
            WHERE id = ANY(%(ids)s::bigint[]) AND lease_token = %(token)s
        """,
    }


class PostgresDriver(Driver):
    """PostgreSQL's operations on one outbox table.

    The worker's claim, renewal and recording run on psycopg asyncio connections of the
    driver's own, opened on demand, one per concurrent call, and kept for reuse; a broken one is
    dropped and the next call opens another. They run in autocommit: a claim or a renewal is one
    statement and commits at once (synchronously: a claim lost in a crash after its batch went
    out would let the row be batched again), a recording is one explicit transaction.

    Each connection is made as the engine makes its own, with the parameters of one of the
    engine's connections (:func:`~outbox.connections.engine_conninfo`); :meth:`start` checks that
    they see what the engine's connections see.
    """

    name = "postgresql"
    notifies = True
    session_setup = WORKER_SESSION

    def __init__(self, engine: sa.Engine, table: sa.Table) -> None:
        super().__init__(engine, table)
        self._idle: list[Any] = []

    @cached_property
    def _names(self) -> list[str]:
        """The outbox's four tables as the statements name them (quoted, schema-qualified)."""
        return [quoted(self.engine, t) for t in _tables(self.table)]

    @cached_property
    def statements(self) -> dict[str, str]:
        # psycopg reads % as a placeholder: a table name holding one must be escaped.
        return _statements(*(name.replace("%", "%%") for name in self._names))

    # -- in the caller's transaction ----------------------------------------------------------

    def keys_lock(self, conn: sa.Connection, keys: Sequence[str]) -> set[str]:
        """One transaction-scoped advisory lock per key (a 64-bit hash of the key mixed with the
        table's OID), taken in a fixed order: a second producer of the key waits for the first
        to end, so ids of one key are handed out in commit order. A hash collision only
        serializes two keys.

        Then each key's newest row, if it has one, is held until commit (KEY SHARE): returns the
        keys held. An ack or a burial taking out a held row waits for this transaction, so its
        promotion sees the rows inserted here; claims, renewals and retries (NO KEY UPDATE) do
        not wait. A newest row already locked by an ack or a burial is not waited for: the rows
        of that key are then inserted due, which costs the claim a look, never the order.

        The two never deadlock: a recording takes these locks on the keyed rows it takes out
        before it deletes anything (the "lock_leaving" statement), so when it waits for a
        producer it has changed nothing the producer could wait for, and once it holds them it
        waits for no producer. The one wait the other way: a producer's insert of an idempotency
        key whose row a recording has deleted, not yet committed, waits on the unique index for
        that transaction to end.
        """
        hashes = sorted({_key_hash(key) for key in keys})
        if not hashes:
            return set()
        hot = quoted(conn, self.table)
        # Mixed with the table itself, its OID, found from its name as the INSERT will find it:
        # producers reaching one table by any search_path, or through a schema-qualified Table,
        # share a key's lock; two outboxes of one database never do. (Not the schema first in
        # the search_path, nor the Table's own name: both differ between such producers.) In
        # the order of the array: every producer takes a table's keys in the same order.
        locks = sa.text(
            "SELECT pg_advisory_xact_lock("
            "k # hashint8extended(CAST(:table AS regclass)::oid::bigint, 0))"
            " FROM unnest(:keys) AS k"
        )
        typed = sa.bindparam("keys", type_=sa.ARRAY(sa.BigInteger()))
        conn.execute(locks.bindparams(typed), {"keys": hashes, "table": hot})
        newest = sa.text(
            f"""
            SELECT k.name FROM unnest(:names) AS k(name), LATERAL (
                SELECT id FROM {hot}
                WHERE id = (SELECT max(id) FROM {hot} WHERE ordering_key = k.name)
                FOR KEY SHARE SKIP LOCKED
            ) AS n
            """
        )
        names = sa.bindparam("names", type_=sa.ARRAY(sa.String()))
        held = conn.execute(newest.bindparams(names), {"names": sorted(set(keys))}).scalars()
        return set(held)

    def events_insert(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
        """COPY for many rows, on the caller's connection and in its transaction.

        COPY fires the table's NOTIFY trigger like an INSERT, and a unique violation is raised as
        SQLAlchemy's ``IntegrityError``, as the INSERT would raise it.
        """
        if len(rows) < COPY_FROM_ROWS:
            super().events_insert(conn, rows)
            return
        import psycopg
        from psycopg import sql

        table, names = self.table, list(rows[0])
        target = sql.Identifier(*([table.schema] if table.schema else []), table.name)
        copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(
            target, sql.SQL(", ").join(sql.Identifier(n) for n in names)
        )
        values = [tuple(row[n] for n in names) for row in rows]
        if not conn.in_transaction():
            conn.begin()  # so that the caller's commit() commits the copied rows
        pooled = conn.connection.dbapi_connection
        pg = conn.connection.driver_connection
        try:
            if isinstance(pg, psycopg.Connection):
                _copy(pg, copy_sql, values)
            else:  # psycopg's AsyncConnection, under SQLAlchemy's asyncio adaptation
                pooled.run_async(lambda pg: _copy_async(pg, copy_sql, values))  # type: ignore[union-attr]
        except psycopg.Error as exc:
            raise sa.exc.DBAPIError.instance(
                str(copy_sql.as_string(pg)), None, exc, psycopg.Error
            ) from exc

    # -- the worker's: the claim, its lease, its outcome on psycopg's asyncio connections ------

    async def start(self) -> None:
        """Refuse (:class:`~outbox.connections.UnfollowableEngine`) an engine whose connections
        see another database, user or outbox table than connections made with their
        parameters: what a connect event's SQL changes (``SET search_path``) is not a parameter.
        """
        import psycopg

        engine_side = await asyncio.to_thread(self._seen_by_engine)
        try:
            pg = await self.connect()
            try:
                cursor = await pg.execute(_SEEN, (self._names,))
                own_side = _seen(await cursor.fetchone())
            finally:
                await pg.close()
        except psycopg.Error as exc:
            raise sa.exc.DBAPIError.instance(_SEEN, None, exc, psycopg.Error) from exc
        refusal = _refusal(self._names, engine_side, own_side)
        if refusal is not None:
            raise UnfollowableEngine(refusal)

    def _seen_by_engine(self) -> tuple[str | None, ...]:
        with self.engine.connect() as conn:
            return _seen(conn.exec_driver_sql(_SEEN, (self._names,)).one())

    async def connect(self) -> Any:
        import psycopg

        conninfo = await asyncio.to_thread(engine_conninfo, self.engine)
        pg = await psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=10)
        try:
            await pg.execute(WORKER_SESSION)
        except BaseException:
            await pg.close()
            raise
        return pg

    async def events_claim(
        self, limit: int, lease_seconds: float, token: uuid.UUID
    ) -> list[ClaimedRow]:
        params = {"limit": limit, "token": token, "lease": float(lease_seconds)}
        rows = await self._execute([("claim", params)], fetch=True)
        return sorted((ClaimedRow(*values) for values in rows), key=lambda r: r.id)

    async def events_extend_lease(
        self, token: uuid.UUID, lease_seconds: float, ids: Sequence[int]
    ) -> int:
        params = {"ids": list(ids), "token": token, "lease": float(lease_seconds)}
        return await self._execute([("extend_lease", params)])

    async def events_record(self, token: uuid.UUID, recording: Recording) -> int:
        r = recording
        steps: list[tuple[str, dict[str, Any]]] = []
        if r.heads_gone and r.leaving:  # keyed rows leave (see "lock_leaving")
            steps.append(("lock_leaving", {"ids": r.leaving, "token": token}))
        published = len(steps)
        if r.published:
            steps.append(("publish", _publish_params(token, r.published)))
        for name, failures, refund in (
            ("retry", r.retry, False),
            ("retry", r.retry_refund, True),
            ("bury", r.buried, False),
        ):
            if failures:
                steps.append((name, _failure_params(token, failures, refund)))
        if r.park:
            steps.append(("park", {"ids": list(r.park)}))
        if r.heads_gone:
            steps.append(("promote", _promote_params(r.heads_gone)))
        if r.messages_gone:
            steps.append(("wake", _wake_params(r.messages_gone)))
        for ids, refund in ((r.give_back, False), (r.give_back_refund, True)):
            if ids:
                params = {"ids": list(ids), "token": token, "refund": int(refund)}
                steps.append(("give_back", params))
        if not steps:
            return 0
        acked = await self._execute(steps, transaction=True, counted=published)
        return acked if r.published else 0

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for pg in idle:
            await pg.close()

    async def _execute(
        self,
        steps: list[tuple[str, dict[str, Any]]],
        *,
        fetch: bool = False,
        transaction: bool = False,
        counted: int = 0,
    ) -> Any:
        """Run ``steps`` on one connection; the rows (``fetch``) or row count of the step at
        index ``counted``."""
        import psycopg

        sql = self.statements[steps[0][0]]
        pg = None
        try:
            pg = self._idle.pop() if self._idle else await self.connect()
            async with pg.transaction() if transaction else contextlib.nullcontext():
                result = None
                for index, (name, params) in enumerate(steps):
                    sql = self.statements[name]
                    cursor = await pg.execute(sql, params, prepare=True)
                    if index == counted:
                        result = await cursor.fetchall() if fetch else int(cursor.rowcount)
        except psycopg.Error as exc:
            if pg is not None and not pg.broken:
                self._idle.append(pg)
            elif pg is not None:
                await pg.close()
            raise sa.exc.DBAPIError.instance(sql, None, exc, psycopg.Error) from exc
        except BaseException:
            # Cancelled mid-statement: the connection's state is unknown, so it is not reused.
            if pg is not None:
                await pg.close()
            raise
        self._idle.append(pg)
        return result

    async def listen(self, on_notify: OnNotify) -> None:
        """LISTEN on the table's channel with an asyncio psycopg connection of its own.

        A lost connection is re-opened after a pause; the worker polls meanwhile, so a gap only
        costs latency, never an event. Each (re)connection calls ``on_notify`` once for whatever
        was committed while nobody listened. Connections are made as the engine makes its own
        (:func:`~outbox.connections.engine_conninfo`).
        """
        import psycopg
        from psycopg import sql

        listen = sql.SQL("LISTEN {}").format(sql.Identifier(notify_channel(self.table)))
        while True:
            try:
                conninfo = await asyncio.to_thread(engine_conninfo, self.engine)
                async with await psycopg.AsyncConnection.connect(
                    conninfo, autocommit=True, connect_timeout=5
                ) as pg:
                    await pg.execute(listen)
                    on_notify()
                    async for _notification in pg.notifies():
                        on_notify()
            except (psycopg.Error, sa.exc.DBAPIError) as exc:
                log.debug("LISTEN connection lost (%s); polling until it is back", exc)
                await asyncio.sleep(LISTEN_RETRY)


#: What a connection sees: its database, its user, and which table each name (the outbox's four,
#: quoted as the statements name them) is, schema-qualified, or NULL where there is none.
_SEEN = """
    SELECT current_database(), current_user, array(
        SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
        FROM unnest(%s::text[]) WITH ORDINALITY AS t(name, place)
        LEFT JOIN pg_class AS c ON c.oid = to_regclass(t.name)
        LEFT JOIN pg_namespace AS n ON n.oid = c.relnamespace
        ORDER BY t.place)
"""


def _seen(row: Any) -> tuple[str | None, ...]:
    """A row of :data:`_SEEN` as one tuple: database, user, then each table."""
    database, user, tables = row
    return (database, user, *tables)


def _refusal(
    names: Sequence[str], engine_side: tuple[str | None, ...], own_side: tuple[str | None, ...]
) -> str | None:
    """Why the worker refuses an engine, in one line: what its own connection sees otherwise
    than the engine's (:data:`_SEEN` of each, for the tables ``names``); None if nothing."""
    differences = [
        f"{what} {mine} for the engine, {theirs} for the worker's own"
        for what, mine, theirs in zip(
            ("database", "user"), engine_side[:2], own_side[:2], strict=True
        )
        if mine != theirs
    ]
    tables = [
        f"table {name} is {mine or 'missing'} for the engine, {theirs or 'missing'} for the "
        "worker's own"
        for name, mine, theirs in zip(names, engine_side[2:], own_side[2:], strict=True)
        if mine != theirs
    ]
    if tables:  # the first says it; the outbox's other tables most likely differ alike
        more = len(tables) - 1
        differences.append(tables[0] + (f" (and {more} more of its tables)" if more else ""))
    if not differences:
        return None
    hot = engine_side[2]
    example = (
        f"?options=-csearch_path={hot.rpartition('.')[0]}"
        if tables and hot
        else "?options=-c<name>=<value>"
    )
    return (
        "the worker's own PostgreSQL connections, made with the engine's connection "
        f"parameters, would not see what the engine's connections see: {'; '.join(differences)}."
        " SQL run on the engine's connections after they connect (a connect event?) changes "
        "them, and the worker cannot repeat it: make it a connection parameter instead, in "
        f"the database URL (e.g. {example}) or in connect_args"
    )


def _wake_params(messages: Sequence[tuple[uuid.UUID, str]]) -> dict[str, Any]:
    ordered = sorted(set(messages))
    return {
        "event_ids": [event_id for event_id, _ in ordered],
        "channels": [channel for _, channel in ordered],
        "waiting": WAITING_FOR_KEY,
    }


def _promote_params(keys: Sequence[str]) -> dict[str, Any]:
    return {"keys": sorted(set(keys)), "waiting": WAITING_FOR_KEY}


def _key_hash(key: str) -> int:
    """The hash of one ordering key (signed 64 bits), mixed with its table's in the lock id."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _publish_params(token: uuid.UUID, acks: Sequence[Ack]) -> dict[str, Any]:
    return {
        "ids": [a.id for a in acks],
        "acks": [a.acknowledgement_id for a in acks],
        "message_serials": [a.message_serial for a in acks],
        "history_serials": [a.history_serial for a in acks],
        "token": token,
    }


def _copy(pg: Any, copy_sql: Any, values: list[tuple[Any, ...]]) -> None:
    with pg.cursor() as cursor, cursor.copy(copy_sql) as copy:
        for row in values:
            copy.write_row(row)


async def _copy_async(pg: Any, copy_sql: Any, values: list[tuple[Any, ...]]) -> None:
    async with pg.cursor() as cursor, cursor.copy(copy_sql) as copy:
        for row in values:
            await copy.write_row(row)


def _tables(hot: sa.Table) -> tuple[sa.Table, sa.Table, sa.Table, sa.Table]:
    return hot, published_table(hot), dead_table(hot), parked_table(hot)


def _failure_params(token: uuid.UUID, failures: Sequence[Failure], refund: bool) -> dict[str, Any]:
    return {
        "ids": [f.id for f in failures],
        "delays": [float(f.delay) for f in failures],
        "statuses": [f.status for f in failures],
        "codes": [f.code for f in failures],
        "messages": [f.message for f in failures],
        "charges": [int(f.charged) for f in failures],
        "refund": int(refund),
        "token": token,
    }

"""SQL pieces the drivers share: how a statement names a table, lists the claim's columns, tests
a row's turn in its key's order, and moves a row between the outbox's tables."""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Any

import sqlalchemy as sa

from ..schema import EVENT_COLUMNS, UTCDateTime
from .values import CLAIM_COLUMNS, ClaimedRow

#: Bind parameters shared by the statements: the lease token and a cutoff time.
TOKEN = sa.bindparam("token", type_=sa.Uuid(as_uuid=True))
CUTOFF = sa.bindparam("cutoff", type_=UTCDateTime())


def quoted(bind: sa.Connection | sa.Engine, table: sa.Table) -> str:
    """The table's name as safe SQL text (schema-qualified and quoted where needed)."""
    return bind.dialect.identifier_preparer.format_table(table)


def index_name(bind: sa.Connection | sa.Engine, table: sa.Table, suffix: str) -> str:
    """One of the hot table's indexes (``ix_<table>_<suffix>``), quoted, for index hints."""
    return bind.dialect.identifier_preparer.quote(f"ix_{table.name}_{suffix}")


def message_lookup(log: sa.Table) -> sa.ColumnElement[bool]:
    """:data:`~outbox.schema.MESSAGE_LOOKUP` of the published log, as its index states it (a
    query must state it so for the partial index to serve it)."""
    return sa.or_(log.c.message_serial.is_not(None), log.c.acknowledgement_id.is_(None))


def claim_columns(prefix: str = "") -> str:
    """The claim's RETURNING list (``prefix`` qualifies each column, e.g. ``"o."``)."""
    return ", ".join(prefix + name for name in CLAIM_COLUMNS)


def claimed_rows(result: sa.CursorResult[Any], taken_over: Container[int] = ()) -> list[ClaimedRow]:
    """The rows a claim statement returned, by column name, in id order."""
    rows = (ClaimedRow.from_mapping(r._mapping, r.id in taken_over) for r in result)
    return sorted(rows, key=lambda r: r.id)


def moved_columns(overrides: Mapping[str, str], prefix: str = "") -> str:
    """The SELECT list of an INSERT ... SELECT that moves a row to another of the outbox's
    tables: every column (``prefix`` qualifies it, e.g. ``"o."``), some replaced by SQL."""
    return ", ".join(overrides.get(c, prefix + c) for c in EVENT_COLUMNS)


#: A row moved out of the hot table no longer holds a lease.
LEASE_CLEARED = {"lease_token": "NULL", "lease_expires_at": "NULL"}


def published_columns(now: str, ack: str, message_serial: str, history_serial: str) -> str:
    """The SELECT list of a row moved to the published log (``"o."``-qualified): what the
    server acknowledged and when, each given as the driver's SQL for it."""
    published = {
        **LEASE_CLEARED,
        "published_at": now,
        "acknowledgement_id": ack,
        "message_serial": message_serial,
        "history_serial": history_serial,
    }
    return moved_columns(published, "o.")


def buried_columns(now: str, charge: str, status: str, code: str, message: str) -> str:
    """The SELECT list of a row moved to the dead table (``"o."``-qualified): the failure that
    buried it, charged or not, each given as the driver's SQL for it."""
    buried = {
        **LEASE_CLEARED,
        "failures": f"o.failures + {charge}",
        "last_error_status": status,
        "last_error_code": code,
        "last_error_message": message,
        "last_error_at": now,
    }
    return moved_columns(buried, "o.")


def claimable_in_order(row: str, hot: str, parked: str) -> str:
    """SQL: whether the hot row aliased ``row`` may go now as far as order is concerned.

    A keyed row goes only as the head of its key (no row of the key with a smaller id is still
    in the hot table, whether pending, leased or waiting for a retry) and while its key is not
    parked; a mutation of an outbox event only once that event left the hot table. Ids follow
    commit order within a key: enqueue serializes the producers of one key (see
    ``Driver.keys_lock``).

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

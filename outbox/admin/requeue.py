"""The statement behind ``outbox replay``: rows moved from the dead table or the published log
back into the hot table as new deliveries, each in its right place in its key's order.

Portable SQLAlchemy Core, the same on every database; its keyed rows go in through the driver's
``keys_lock`` and ``events_insert_keyed``, as an enqueue's do.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from ..drivers import driver_for
from ..schema import Operation, Status, dead_table, parked_table, published_table
from ..sockudo.bodies import dump_body


def requeue(
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
        # A key's parked head takes its place in front of its key again (its id, due now): the
        # rows the key held back go on behind it. Any other keyed row joins the back of its
        # key's line (a new id, waiting behind the key's rows still queued), exactly as if it
        # were enqueued now: never beside an event of its key already in flight.
        front = [r for r in rows if r["ordering_key"] is None or r["id"] in heads]
        back = [{k: v for k, v in r.items() if k != "id"} for r in rows if r not in front]
        if front:
            conn.execute(sa.insert(table), front)
        if back:
            driver = driver_for(conn, table)
            line = [r["ordering_key"] for r in back]
            driver.events_insert_keyed(conn, back, driver.keys_lock(conn, line))
        moved += len(rows)
    conn.execute(sa.delete(parked).where(parked.c.row_id.in_(heads)))
    return moved


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

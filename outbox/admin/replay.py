"""Putting dead or published events back in line (``replay``) and deleting dead ones
(``delete-dead``), a page at a time so memory and locks stay small however many match."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import sqlalchemy as sa

from ..schema import (
    Status,
    dead_table,
    parked_table,
)
from .events import events, jsonable
from .keys import skip_parked
from .requeue import requeue
from .selection import ReplayFilter, select_matching

#: How a replayed event is identified to the server (see :func:`replay`).
KEY_FRESH = "fresh"


KEY_KEEP = "keep"


#: Replay works through its selection in pages of this many rows, one short transaction each.
REPLAY_PAGE = 1_000


_REPLAY_COLUMNS = (
    "id",
    "event_id",
    "idempotency_key",
    "channel",
    "event",
    "status",
    "attempts",
    "last_error_status",
    "last_error_code",
    "last_error_message",
    "created_at",
)


def count_for_replay(conn: sa.Connection, table: sa.Table, selection: ReplayFilter) -> int:
    """How many rows ``selection`` matches (``limit`` included), without loading them."""
    ev = events(table)
    matching = sa.select(ev.c.id).where(*selection.where(ev))
    if selection.limit is not None:
        matching = matching.limit(selection.limit)
    return conn.execute(sa.select(sa.func.count()).select_from(matching.subquery())).scalar_one()


def count_elsewhere(
    conn: sa.Connection, table: sa.Table, selection: ReplayFilter
) -> dict[str, int]:
    """How many rows ``selection`` would match in each of the other states (its ``limit``
    aside): why a replay of dead rows found nothing, when the rows are pending or published."""
    others = [s.value for s in Status if s.value not in selection.statuses]
    if not others:
        return {}
    ev = events(table)
    anywhere = replace(selection, statuses=others, limit=None)
    query = sa.select(ev.c.status, sa.func.count()).where(*anywhere.where(ev)).group_by(ev.c.status)
    found = {status: int(n) for status, n in conn.execute(query)}
    return {status: found[status] for status in others if found.get(status)}


def select_for_replay(
    conn: sa.Connection,
    table: sa.Table,
    selection: ReplayFilter,
    limit: int | None = None,
    after_id: int = 0,
) -> list[dict[str, Any]]:
    """The selected rows with an id above ``after_id``, oldest first, at most ``limit`` of them."""
    ev = events(table)
    columns = [ev.c[name] for name in _REPLAY_COLUMNS]
    query = select_matching(ev, selection, columns, limit, after_id)
    return [jsonable(dict(r._mapping)) for r in conn.execute(query)]


def replay(
    conn: sa.Connection,
    table: sa.Table,
    selection: ReplayFilter,
    key: str = KEY_FRESH,
    page: int = REPLAY_PAGE,
) -> int:
    """Move the selected events back to pending with a fresh attempt budget; returns how many.

    With ``key="fresh"`` (the default) each event gets a new idempotency key and message_id, so the
    server publishes it even inside its deduplication window: a published event replayed with its
    old key would be answered from the server's cache and not delivered, and a failed one would get
    ``503 backpressure`` until the window ends. ``key="keep"`` keeps the key, for replays meant to be
    deduplicated against an earlier delivery.

    Rows are read and updated a page at a time, so memory stays flat however many match. All of
    it happens in the caller's transaction; :func:`replay_in_pages` commits page by page.
    """
    return sum(_replay_pages(lambda: contextlib.nullcontext(conn), table, selection, key, page))


def replay_in_pages(
    engine: sa.Engine,
    table: sa.Table,
    selection: ReplayFilter,
    key: str = KEY_FRESH,
    page: int = REPLAY_PAGE,
) -> Iterator[int]:
    """Replay in one short transaction per page; yields the count of each committed page.

    For replays after a long outage (millions of rows): no lock is held for long, memory stays
    flat, and an interrupted replay has committed what it reports (run it again to finish).
    """
    return _replay_pages(engine.begin, table, selection, key, page)


def _replay_pages(
    transaction: Callable[[], contextlib.AbstractContextManager[sa.Connection]],
    table: sa.Table,
    selection: ReplayFilter,
    key: str,
    page: int,
) -> Iterator[int]:
    return _act_in_pages(
        transaction,
        table,
        selection,
        page,
        lambda conn, ids: _replay_ids(conn, table, selection, key, ids),
    )


def _act_in_pages(
    transaction: Callable[[], contextlib.AbstractContextManager[sa.Connection]],
    table: sa.Table,
    selection: ReplayFilter,
    page: int,
    act: Callable[[sa.Connection, list[int]], int],
) -> Iterator[int]:
    """Walk the rows ``selection`` matches (at most its ``limit``), oldest first, a page of ids
    at a time: ``act`` on each page in a transaction of its own, yielding its count. Replay and
    deletion page alike (by id, so rows they move or remove never shift the next page)."""
    after_id = 0
    remaining = selection.limit
    while remaining is None or remaining > 0:
        size = page if remaining is None else min(page, remaining)
        with transaction() as conn:
            ids = _page_ids(conn, table, selection, size, after_id)
            if not ids:
                return
            changed = act(conn, ids)
        yield changed
        after_id = ids[-1]
        if remaining is not None:
            remaining -= len(ids)
        if len(ids) < size:
            return


def _page_ids(
    conn: sa.Connection, table: sa.Table, selection: ReplayFilter, size: int, after_id: int
) -> list[int]:
    ev = events(table)
    return list(conn.execute(select_matching(ev, selection, [ev.c.id], size, after_id)).scalars())


def _replay_ids(
    conn: sa.Connection, table: sa.Table, selection: ReplayFilter, key: str, ids: list[int]
) -> int:
    new_keys = None if key == KEY_KEEP else [str(uuid.uuid4()) for _ in ids]
    return requeue(conn, table, ids, selection.statuses, new_keys)


def parked_heads_among(conn: sa.Connection, table: sa.Table, selection: ReplayFilter) -> int:
    """How many of the dead rows ``selection`` matches (its ``limit`` included) are the heads
    parked keys wait behind: deleting them lets those keys go on (see :func:`delete_dead`)."""
    _only_dead(selection)
    ev, parked = events(table), parked_table(table)
    # A join, not IN: MariaDB refuses a LIMIT inside an IN subquery.
    matching = select_matching(ev, selection, [ev.c.id]).subquery("matching")
    return conn.execute(
        sa.select(sa.func.count()).select_from(
            parked.join(matching, matching.c.id == parked.c.row_id)
        )
    ).scalar_one()


def delete_dead(
    conn: sa.Connection, table: sa.Table, selection: ReplayFilter, page: int = REPLAY_PAGE
) -> int:
    """Delete the dead events ``selection`` matches (at most its ``limit``, oldest first), for
    good; returns how many. All of it in the caller's transaction, a page at a time (flat
    memory); :func:`delete_dead_in_pages` commits page by page.

    A deleted row that is the head a parked key waits behind can never be replayed, so its key
    goes on without it, as ``outbox keys --skip`` would let it.
    """
    return sum(_delete_pages(lambda: contextlib.nullcontext(conn), table, selection, page))


def delete_dead_in_pages(
    engine: sa.Engine, table: sa.Table, selection: ReplayFilter, page: int = REPLAY_PAGE
) -> Iterator[int]:
    """:func:`delete_dead` in one short transaction per page; yields the count of each
    committed page (interrupted, it has deleted what it reported: run it again for the rest)."""
    return _delete_pages(engine.begin, table, selection, page)


def _only_dead(selection: ReplayFilter) -> None:
    if list(selection.statuses) != [Status.DEAD.value]:
        raise ValueError(f"only dead events are deleted, not {list(selection.statuses)}")


def _delete_pages(
    transaction: Callable[[], contextlib.AbstractContextManager[sa.Connection]],
    table: sa.Table,
    selection: ReplayFilter,
    page: int,
) -> Iterator[int]:
    _only_dead(selection)
    dead, parked = dead_table(table), parked_table(table)

    def delete_page(conn: sa.Connection, ids: list[int]) -> int:
        heads = conn.execute(
            sa.select(parked.c.ordering_key).where(parked.c.row_id.in_(ids))
        ).scalars()
        keys = list(heads)
        if keys:
            skip_parked(conn, table, keys)
        return int(conn.execute(sa.delete(dead).where(dead.c.id.in_(ids))).rowcount)

    yield from _act_in_pages(transaction, table, selection, page, delete_page)

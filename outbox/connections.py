"""What runs on a database connection: psycopg connections made as an engine makes its own, and
short transactions off the event loop.

Below the per-database modules (:mod:`outbox.drivers`), which use these, and beside
:mod:`outbox.database`, which makes the engines from URLs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import URL

T = TypeVar("T")


class UnfollowableEngine(RuntimeError):
    """The worker's own connections (PostgreSQL's hot path and LISTEN) would not see what the
    engine's connections see (its setup ran SQL no connection parameter repeats): the worker
    refuses to start. The message is one line saying what differs and what to do."""


def libpq_conninfo(url: URL) -> str:
    """A libpq connection string for psycopg's own connections (LISTEN and the worker's hot
    path run outside SQLAlchemy's pool), with the URL's parameters as SQLAlchemy reads them.

    Keyword form, not a URI: a URI rendered by SQLAlchemy writes a space in a query value as
    ``+``, which libpq does not decode (``options=-csearch_path=x -cwork_mem=64MB`` would set
    the search path to ``x+-cwork_mem=64MB`` on these connections only).
    """
    from psycopg.conninfo import make_conninfo

    params: dict[str, object] = {
        "host": url.host,
        "port": url.port,
        "user": url.username,
        "password": url.password,
        "dbname": url.database,
    }
    for name, value in url.query.items():
        params[name] = value if isinstance(value, str) else value[-1]
    return make_conninfo(**{k: v for k, v in params.items() if v is not None})


def engine_conninfo(engine: sa.Engine) -> str:
    """A libpq connection string for a connection made as ``engine`` makes its own: the
    parameters of one of its connections (see :func:`connection_conninfo`)."""
    with engine.connect() as conn:
        return connection_conninfo(conn)


def connection_conninfo(conn: sa.Connection) -> str:
    """A libpq connection string for a new connection made as ``conn`` was, for psycopg's own
    connections (LISTEN and the worker's hot path run outside SQLAlchemy's pool).

    The parameters libpq reports for ``conn`` (psycopg's ``info.get_parameters()``), whatever
    set them: the URL, ``connect_args``, a ``creator``, a ``do_connect`` handler or ``PG*``
    variables. With the password, which that report leaves out. SQL run on the connection
    afterwards (a connect event's ``SET``) is not a parameter and is not in it. A driver that
    reports no parameters (not psycopg 3) gets the URL's.
    """
    from psycopg.conninfo import make_conninfo

    info = getattr(conn.connection.driver_connection, "info", None)
    if not hasattr(info, "get_parameters"):
        return libpq_conninfo(conn.engine.url)
    params = info.get_parameters()
    if info.password:
        params["password"] = info.password
    return make_conninfo(**params)


async def in_transaction(engine: sa.Engine, work: Callable[[sa.Connection], T]) -> T:
    """Run ``work`` in one short transaction on a thread (the SQL seam is synchronous)."""

    def run() -> T:
        with engine.begin() as conn:
            return work(conn)

    return await asyncio.to_thread(run)

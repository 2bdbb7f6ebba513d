"""``Worker(settings, engine=...)`` on PostgreSQL: the worker's own psycopg connections (its hot
path and LISTEN) are made as the engine makes its connections, or the worker refuses to start.

Each test has two migrated schemas, A and B, each with an outbox holding rows. The engine's URL
names A, but the engine's connections are made to see B (``connect_args``, a ``creator``, or a
connect event running ``SET search_path``). The worker must drain exactly the outbox its engine
sees, B, or refuse to start, leaving both untouched; before the fix it published A's rows.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from outbox import enqueue
from outbox.cli import main
from outbox.connections import UnfollowableEngine, libpq_conninfo
from outbox.database import create_engine, normalize_url
from outbox.drivers.postgresql import _refusal
from outbox.settings import ENVIRONMENT
from outbox.testing.server import TestServer
from outbox.worker import Worker
from tests.plugins.databases import POSTGRES_URL, make_database
from tests.test_worker import fast_settings, table_rows

#: Runs in the full tier (see tests/plugins/tiers.py).
pytestmark = pytest.mark.postgres


def schema_of(url: str) -> str:
    """The schema a test database URL selects (``?options=-csearch_path=...``)."""
    return str(make_url(url).query["options"]).removeprefix("-csearch_path=")


def put_rows(url: str, channel: str, n: int) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for i in range(n):
                enqueue(conn, channel, "step", {"n": i})
    finally:
        engine.dispose()


def statuses(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        return [row.status for row in table_rows(engine)]
    finally:
        engine.dispose()


def sessions(app: str, query_prefix: str) -> int:
    """Backends of application ``app`` whose last statement starts with ``query_prefix``."""
    engine = create_engine(POSTGRES_URL)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE application_name = :app AND query LIKE :prefix"
                    ),
                    {"app": app, "prefix": query_prefix + "%"},
                ).scalar_one()
            )
    finally:
        engine.dispose()


@pytest.fixture
def schemas(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, str]:
    """Two migrated schemas, as test URLs: A with 3 rows on channel "a", B with 3 on "b"."""
    a = make_database("postgresql", tmp_path, request, migrated=True)
    b = make_database("postgresql", tmp_path, request, migrated=True)
    put_rows(a, "a", 3)
    put_rows(b, "b", 3)
    return a, b


async def until(done: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def engine_seeing(b: str, url: str, how: str, app: str) -> sa.Engine:
    """An engine over ``url`` whose connections see schema ``b`` (and carry ``app``)."""
    options = {"options": f"-csearch_path={schema_of(b)}", "application_name": app}
    if how == "connect_args":
        return create_engine(url, connect_args=options)
    if how == "do_connect":
        engine = create_engine(url)

        @sa.event.listens_for(engine, "do_connect")
        def add_options(_dialect: Any, _record: Any, _args: Any, params: dict[str, Any]) -> None:
            params.update(options)

        return engine
    # A creator: the URL is not used to connect at all.
    conninfo = psycopg.conninfo.make_conninfo(libpq_conninfo(normalize_url(b)), **options)
    return create_engine(url, creator=lambda: psycopg.connect(conninfo))


@pytest.mark.parametrize("how", ["connect_args", "do_connect", "creator"])
async def test_the_worker_drains_the_outbox_its_engine_sees(schemas, sockudo_server, how):
    """The engine's URL names schema A; its connections are made to see B, through
    ``connect_args``, a ``do_connect`` handler or a ``creator``. The worker publishes B's rows and none of A's, and its
    LISTEN connection is made with the engine's parameters (it carries their application_name).
    Before the fix the hot path connected with the URL alone and published A's rows."""
    a, b = schemas
    app = f"outbox-test-{uuid.uuid4().hex[:8]}"
    engine = engine_seeing(b, a, how, app)
    worker = Worker(fast_settings(a, sockudo_server.url), engine=engine)
    task = asyncio.create_task(worker.run())
    try:
        await until(
            lambda: (
                task.done()
                or sockudo_server.delivered_count("a") > 0
                or sockudo_server.delivered_count("b") == 3
            ),
            "B's rows (or A's)",
        )
        assert sockudo_server.delivered_count("a") == 0, "the worker published A's outbox"
        await until(lambda: task.done() or sessions(app, "LISTEN") == 1, "the LISTEN connection")
        assert not task.done()
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
        engine.dispose()
    assert sockudo_server.delivered_count("a") == 0
    assert sockudo_server.delivered_count("b") == 3
    assert statuses(a) == ["pending"] * 3
    assert statuses(b) == ["published"] * 3


def set_search_path_on_connect(engine: sa.Engine, schema: str) -> None:
    """The way SQLAlchemy's documentation sets a search_path: SQL in a connect event."""

    @sa.event.listens_for(engine, "connect", insert=True)
    def set_search_path(dbapi_connection: Any, _record: Any) -> None:
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f'SET SESSION search_path = "{schema}"')
        dbapi_connection.autocommit = autocommit


async def test_an_engine_whose_connect_event_sets_the_search_path_is_refused_at_start(
    schemas, sockudo_server
):
    """A connect event runs ``SET search_path`` (B) on the engine's connections: no connection
    parameter repeats that, so the worker's own connections would see A. ``Worker.run`` refuses
    to start with one line naming both tables and the fix, and touches neither outbox. Before the
    fix the worker started and published A's rows."""
    a, b = schemas
    engine = create_engine(a)
    set_search_path_on_connect(engine, schema_of(b))
    try:
        worker = Worker(fast_settings(a, sockudo_server.url), engine=engine)
        with pytest.raises(UnfollowableEngine) as refused:
            await asyncio.wait_for(worker.run(once=True), 30)
    finally:
        engine.dispose()
    message = str(refused.value)
    assert "\n" not in message
    assert f"{schema_of(b)}.outbox_events for the engine" in message
    assert f"{schema_of(a)}.outbox_events for the worker's own" in message
    assert f"?options=-csearch_path={schema_of(b)}" in message
    assert sockudo_server.delivered_count() == 0
    assert statuses(a) == statuses(b) == ["pending"] * 3


def test_outbox_worker_reports_an_engine_it_cannot_follow_in_one_line(
    schemas, sockudo_server: TestServer, capsys, monkeypatch
):
    """``outbox worker`` (and ``python worker.py``, which runs it) exits 2 with the refusal as
    its one error line. The CLI makes its engine from the URL; here it gets the connect event."""
    a, b = schemas
    for variable, _ in ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("OUTBOX_DATABASE_URL", a)
    monkeypatch.setenv("SOCKUDO_URL", sockudo_server.url)

    def engine_with_connect_event(url: Any, **options: Any) -> sa.Engine:
        engine = create_engine(url, **options)
        set_search_path_on_connect(engine, schema_of(b))
        return engine

    monkeypatch.setattr("outbox.cli.create_engine", engine_with_connect_event)
    code = main(["worker", "--once"])
    _out, err = capsys.readouterr()
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("outbox: error: the worker's own PostgreSQL connections")
    assert f"?options=-csearch_path={schema_of(b)}" in line
    assert sockudo_server.delivered_count() == 0
    assert statuses(a) == statuses(b) == ["pending"] * 3


async def test_a_database_not_reachable_at_start_is_waited_for(schemas, sockudo_server, caplog):
    """The start check needs the database: while the engine cannot connect (its creator
    refuses) the worker waits and tries again, as its claim loop would, instead of exiting; once
    the database answers, it starts and drains B."""
    a, b = schemas
    conninfo = libpq_conninfo(normalize_url(b))
    down = True

    def connect() -> psycopg.Connection[Any]:
        if down:
            raise psycopg.OperationalError("the database is starting up")
        return psycopg.connect(conninfo)

    engine = create_engine(a, creator=connect)
    worker = Worker(fast_settings(a, sockudo_server.url), engine=engine)
    task = asyncio.create_task(worker.run())
    try:
        await until(lambda: task.done() or worker.stats.database_errors >= 2, "two failed starts")
        assert not task.done()
        assert "database error during start (the database is starting up)" in caplog.text
        down = False
        await until(lambda: task.done() or sockudo_server.delivered_count("b") == 3, "B drained")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
        engine.dispose()
    assert sockudo_server.delivered_count() == 3
    assert statuses(b) == ["published"] * 3


def test_the_refusal_names_what_differs_and_nothing_else():
    """A connect event running ``SET ROLE``: the tables are the same, the user is not. The line
    names the user and suggests a connection option, not a search_path."""
    names = ["outbox_events", "outbox_events_published", "outbox_events_dead", "p"]
    tables = ("s.outbox_events", "s.outbox_events_published", "s.outbox_events_dead", "s.p")
    same = _refusal(names, ("test", "postgres", *tables), ("test", "postgres", *tables))
    assert same is None
    refusal = _refusal(names, ("test", "tenant", *tables), ("test", "postgres", *tables))
    assert refusal is not None
    assert (
        "would not see what the engine's connections see: user tenant for the engine, "
        "postgres for the worker's own. "
    ) in refusal
    assert "table" not in refusal and "(e.g. ?options=-c<name>=<value>)" in refusal

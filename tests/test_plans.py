"""The worker's statements cost the same over any backlog, at PostgreSQL's default settings.

PostgreSQL's defaults JIT-compile any statement whose estimate passes ``jit_above_cost``
(100,000), and a claim over a large backlog of a table without fresh statistics (a new table, a
burst that outran auto-analyze) was estimated above it: compiled on every execution, 20-400 ms
where the claim itself takes under 5. This file asserts, without timing anything, that every
statement the worker runs over its hot table is planned as intended whatever the backlog and
whatever the statistics: ``EXPLAIN (FORMAT JSON)`` of each, on a connection of the worker's own
(its session settings) and in its prepared form (a generic plan, as PostgreSQL switches to after
five executions) as well as with its values, shows no JIT and reaches the hot table through an
index, never a scan or a hash of the whole table.

The backlogs: 100,000 and 300,000 unsent rows, half of them keyed on 20 ordering keys (each
key's head due, the rest waiting behind it), with a mutation waiting for every hundredth row's
publish; with no statistics (autovacuum kept off the table) and after ``ANALYZE``.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from psycopg import sql

from outbox import outbox_table
from outbox.database import create_engine
from outbox.drivers import Ack, Failure
from outbox.drivers.postgresql import (
    PostgresDriver,
    _failure_params,
    _promote_params,
    _publish_params,
    _wake_params,
)
from outbox.schema import WAITING_FOR_KEY
from tests.plugins.databases import make_database

pytestmark = pytest.mark.postgres

T = outbox_table()
KEYS = 20


@pytest.fixture(scope="module", params=[100_000, 300_000], ids=["100k", "300k"])
def backlog(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[sa.Engine, int]]:
    """A migrated schema holding ``param`` unsent rows, half keyed, never analyzed."""
    url = make_database("postgresql", tmp_path_factory.mktemp("plans"), request, migrated=True)
    engine = create_engine(url)
    n = request.param
    with engine.begin() as conn:
        # Statistics only when a test takes them: auto-analyze must not run behind its back.
        conn.execute(sa.text("ALTER TABLE outbox_events SET (autovacuum_enabled = false)"))
        conn.execute(
            sa.text(
                """
                INSERT INTO outbox_events (event_id, idempotency_key, channel, event, data,
                                           ordering_key, next_attempt_at, target_event_id)
                SELECT gen_random_uuid(), 'k' || g, 'orders', 'e', '{}',
                       CASE WHEN g % 2 = 0 THEN 'key-' || (g % :keys) END,
                       CASE WHEN g % 2 = 0 AND g > 2 * :keys THEN :waiting ELSE now() END,
                       CASE WHEN g % 100 = 1 THEN gen_random_uuid() END
                FROM generate_series(1, :n) AS g
                """
            ),
            {"n": n, "keys": KEYS, "waiting": WAITING_FOR_KEY},
        )
    yield engine, n
    engine.dispose()


@pytest.fixture(params=["no statistics", "analyzed"])
def statistics(request: pytest.FixtureRequest, backlog: tuple[sa.Engine, int]) -> str:
    engine, _n = backlog
    with engine.begin() as conn:
        if request.param == "analyzed":
            conn.execute(sa.text("ANALYZE outbox_events"))
        else:
            # pg_statistic is written by ANALYZE only: a table never analyzed has none, and
            # one analyzed by an earlier test of the module is reset to none.
            conn.execute(
                sa.text("DELETE FROM pg_statistic WHERE starelid = 'outbox_events'::regclass")
            )
            conn.execute(
                sa.text("UPDATE pg_class SET reltuples = -1 WHERE oid = 'outbox_events'::regclass")
            )
    return str(request.param)


def statement_params(engine: sa.Engine) -> dict[str, dict[str, Any]]:
    """Parameters as the worker passes them: a claim's 100 rows, their token and keys."""
    with engine.connect() as conn:
        sample = conn.execute(
            sa.text("SELECT id, event_id, ordering_key FROM outbox_events ORDER BY id LIMIT 100")
        ).all()
    ids = [r.id for r in sample]
    token = uuid.uuid4()
    failures = [Failure(i, 503, "internal_error", "x", delay=1.0) for i in ids]
    keys = sorted({r.ordering_key for r in sample if r.ordering_key})
    return {
        "claim": {"limit": 100, "token": token, "lease": 60.0},
        "extend_lease": {"ids": ids, "token": token, "lease": 60.0},
        "lock_leaving": {"ids": ids, "token": token},
        "publish": _publish_params(token, [Ack(i, "a", "s", "1") for i in ids]),
        "retry": _failure_params(token, failures, False),
        "bury": _failure_params(token, failures, False),
        "promote": _promote_params(keys),
        "wake": _wake_params([(r.event_id, "orders") for r in sample]),
        "park": {"ids": ids},
        "give_back": {"ids": ids, "token": token, "refund": 1},
    }


def explain(hot: PostgresDriver, name: str, params: dict[str, Any], generic: bool) -> Any:
    """The JSON plan of one hot statement on a connection of the hot path's own; ``generic``:
    its prepared form's generic plan (``plan_cache_mode = force_generic_plan``)."""

    async def run() -> Any:
        pg = await hot.connect()
        try:
            statement = hot.statements[name]
            if not generic:
                cursor = await pg.execute("EXPLAIN (FORMAT JSON) " + statement, params)
                return (await cursor.fetchone())[0]
            names: list[str] = []

            def placeholder(match: re.Match[str]) -> str:
                if match.group(1) not in names:
                    names.append(match.group(1))
                return f"${names.index(match.group(1)) + 1}"

            prepared = re.sub(r"%\((\w+)\)s", placeholder, statement).replace("%%", "%")
            await pg.execute("SET plan_cache_mode = force_generic_plan")
            await pg.execute(f"PREPARE plan_check AS {prepared}")
            # EXECUTE takes its values as literals (a utility statement has no parameters).
            values = sql.SQL(", ").join(sql.Literal(params[n]) for n in names)
            query = sql.SQL("EXPLAIN (FORMAT JSON) EXECUTE plan_check({})").format(values)
            cursor = await pg.execute(query)
            return (await cursor.fetchone())[0]
        finally:
            await pg.close()

    return asyncio.run(run())


def nodes(plan: Any) -> Iterator[dict[str, Any]]:
    """Every node of a plan tree (subplans and CTEs included)."""
    stack = [plan[0]["Plan"]]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.get("Plans", ()))


HOT = "outbox_events"


@pytest.mark.parametrize("generic", [False, True], ids=["with its values", "prepared, generic"])
def test_every_hot_statement_is_planned_by_index_and_never_compiled(
    backlog: tuple[sa.Engine, int], statistics: str, generic: bool
) -> None:
    engine, n = backlog
    hot = PostgresDriver(engine, T)
    params = statement_params(engine)
    problems = []
    for name, values in params.items():
        plan = explain(hot, name, values, generic)
        if "JIT" in plan[0]:
            problems.append(f"{name}: JIT-compiled (estimate {plan[0]['Plan']['Total Cost']:.0f})")
        for node in nodes(plan):
            on_hot = node.get("Relation Name") == HOT
            if on_hot and node["Node Type"] == "Seq Scan":
                problems.append(f"{name}: {node['Node Type']} on the hot table")
            if node["Node Type"] == "Hash" and any(
                child.get("Relation Name") == HOT and child["Node Type"] == "Seq Scan"
                for child in node.get("Plans", ())
            ):
                problems.append(f"{name}: hashes the whole hot table")
        indexes = {nd["Index Name"] for nd in nodes(plan) if "Index Name" in nd}
        if name == "claim":
            if f"ix_{HOT}_due" not in indexes:
                problems.append(f"the claim does not read the due index: {json.dumps(plan)[:2000]}")
        elif f"ix_{HOT}_due" in indexes:
            # Every other statement finds its rows by id, key or message. Through the due index
            # it would walk every row of a time, such as the rows waiting behind their key
            # (all at WAITING_FOR_KEY): found when the wake of mutations took 3 ms an event
            # after an overload, a backlog of waiting keyed rows and no mutation at all.
            problems.append(f"{name}: reads the due index")
        if name in INTENDED and INTENDED[name] not in indexes:
            problems.append(
                f"{name}: does not read {INTENDED[name]} (reads {sorted(map(str, indexes))})"
            )
    assert not problems, f"{n} rows, {statistics}: " + "; ".join(problems)


#: The index each of these statements finds its rows by (after that, by primary key).
INTENDED = {"promote": f"ix_{HOT}_ordering", "wake": f"ix_{HOT}_target"}


def test_the_worker_turns_jit_off_for_its_own_sessions(postgres_url: str) -> None:
    """Whatever the server's default, the hot path's connections run with ``jit = off``: a
    plan's estimate must never decide whether the claim is compiled."""
    engine = create_engine(postgres_url)
    try:
        hot = PostgresDriver(engine, T)

        async def setting() -> str:
            pg = await hot.connect()
            try:
                cursor = await pg.execute("SHOW jit")
                return str((await cursor.fetchone())[0])
            finally:
                await pg.close()

        assert asyncio.run(setting()) == "off"
        with engine.connect() as conn:  # the worker's engine (outbox.database.create_engine)
            assert conn.execute(sa.text("SHOW jit")).scalar_one() == "off"
    finally:
        engine.dispose()

"""The helpers the tests and the benchmark share do what the tests rely on them for: a wait that
returns what it waited for or fails naming it, a producer thread that counts, stops and reports,
and scratch databases of their own, gone afterwards."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from outbox.database import create_engine
from outbox.testing.databases import DatabaseServer, scratch_database
from tests.helpers.producers import DEADLOCK, Producer
from tests.helpers.waiting import WaitTimeout, wait_until
from tests.plugins.databases import SERVER_FIXTURES

# -- waiting ------------------------------------------------------------------------------------


def test_wait_until_returns_what_came_true() -> None:
    answers = iter([None, [], ["found"]])
    assert wait_until(lambda: next(answers), "a third answer", interval=0.01) == ["found"]


def test_wait_until_fails_naming_what_it_waited_for_and_the_last_value() -> None:
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as timeout:
        wait_until(lambda: 0, "a number above zero", timeout=0.2, interval=0.01)
    assert time.monotonic() - started >= 0.2
    assert str(timeout.value) == "timed out after 0.2 s waiting for a number above zero (last: 0)"
    assert isinstance(timeout.value, AssertionError)  # a failed test, not an error


# -- producers ----------------------------------------------------------------------------------


def test_a_producer_commits_its_transactions_in_order_and_ends() -> None:
    numbers: list[int] = []
    producer = Producer(numbers.append, transactions=3)
    producer.start()
    producer.join(timeout=10)
    assert not producer.is_alive()
    assert numbers == [0, 1, 2] and producer.committed == 3 and not producer.errors


def test_a_producer_without_a_count_runs_until_stopped() -> None:
    producer = Producer(lambda number: None, pause=0.01)
    producer.start()
    wait_until(lambda: producer.committed >= 3, "three transactions", timeout=10)
    producer.stop()
    assert not producer.is_alive() and not producer.errors


class Deadlocked(Exception):
    """What the driver raises for PostgreSQL's deadlock_detected (``orig`` of the error)."""

    sqlstate = DEADLOCK


def test_a_producer_runs_a_deadlocked_transaction_again_and_keeps_other_errors() -> None:
    attempts = itertools.count()

    def transaction(number: int) -> None:
        if number == 0 and next(attempts) < 2:
            raise sa.exc.OperationalError("COMMIT", {}, Deadlocked())
        if number == 1:
            raise ValueError("not a deadlock")

    producer = Producer(transaction, transactions=3, deadlock_retries=2)
    producer.start()
    producer.join(timeout=10)
    assert producer.deadlocks == 2 and producer.committed == 1
    [error] = producer.errors
    assert isinstance(error, ValueError)


def test_a_producer_gives_up_on_a_transaction_deadlocked_too_often() -> None:
    def transaction(number: int) -> None:
        raise sa.exc.OperationalError("COMMIT", {}, Deadlocked())

    producer = Producer(transaction, transactions=1, deadlock_retries=1)
    producer.start()
    producer.join(timeout=10)
    assert producer.deadlocks == 1 and producer.committed == 0
    [error] = producer.errors
    assert isinstance(error, sa.exc.OperationalError)


# -- scratch databases --------------------------------------------------------------------------


def outbox_tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return {name for name in sa.inspect(engine).get_table_names() if "outbox" in name}
    finally:
        engine.dispose()


def test_a_scratch_sqlite_database_is_a_file_of_its_own_removed_with_its_wal(
    tmp_path: Path,
) -> None:
    with (
        scratch_database("sqlite", tmp_path, prefix="t", migrated=True) as first,
        scratch_database("sqlite", tmp_path, prefix="t") as second,
    ):
        assert first != second
        assert "outbox_events" in outbox_tables(first)
        assert outbox_tables(second) == set()  # not migrated
        assert {path.name.split("-")[0] for path in tmp_path.iterdir()} == {"t"}
    assert list(tmp_path.iterdir()) == []  # the databases, their -wal and -shm files


def scratch_name(url: str) -> str:
    """The schema (PostgreSQL) or database (MariaDB) a scratch database's URL selects."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        return str(parsed.query["options"]).removeprefix("-csearch_path=")
    return str(parsed.database)


def exists(server: DatabaseServer, name: str) -> bool:
    """Whether ``server`` has the schema (MariaDB: the database) ``name``."""
    query = sa.text("SELECT count(*) FROM information_schema.schemata WHERE schema_name = :name")
    with server.engine.connect() as conn:
        return bool(conn.execute(query, {"name": name}).scalar_one())


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_a_scratch_database_on_a_server_is_its_own_and_dropped_after(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    server: DatabaseServer = request.getfixturevalue(SERVER_FIXTURES[backend])
    with (
        scratch_database(backend, tmp_path, server, prefix="t", migrated=True) as first,
        scratch_database(backend, tmp_path, server, prefix="t") as second,
    ):
        names = [scratch_name(first), scratch_name(second)]
        assert names[0] != names[1] and all(name.startswith("t_") for name in names)
        assert all(exists(server, name) for name in names)
        assert "outbox_events" in outbox_tables(first)
        assert outbox_tables(second) == set()  # not migrated, and not the first one's tables
    assert not any(exists(server, name) for name in names)

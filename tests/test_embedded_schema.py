"""The worker creates or upgrades the schema itself on SQLite (any ``sqlite://`` URL), and only there.

On PostgreSQL and MariaDB the schema is a deploy step: the worker refuses an unmigrated database with exit 2
and says to run ``outbox migrate``. On SQLite it refuses what an upgrade would break: a table made
by someone else's migrations, and a schema from a newer release.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from outbox import metadata_for, migrate
from outbox.cli import main
from outbox.database import create_engine
from outbox.migrate import VERSION_TABLE, owned_tables
from outbox.settings import ENVIRONMENT
from outbox.testing.server import TestServer
from tests.plugins.databases import make_database

REPO = Path(__file__).resolve().parents[1]
OUTBOX = Path(sys.executable).with_name("outbox")
HEAD = migrate.head_revision()
TABLE = "outbox_events"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable, _ in ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)


@contextlib.contextmanager
def opened(url: str) -> Iterator[sa.Engine]:
    engine = create_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def revision(url: str) -> str | None:
    with opened(url) as engine:
        return migrate.current_revision(engine)


def table_names(url: str) -> set[str]:
    with opened(url) as engine:
        return set(sa.inspect(engine).get_table_names())


def run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in dict(ENVIRONMENT.values())}
    return subprocess.run(
        command, cwd=cwd, env={**environ, **env}, capture_output=True, text=True, timeout=60
    )


def quick_start_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Quick start") :]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block is not None
    return [line.split("#")[0].strip() for line in block[1].splitlines()]


def test_python_worker_py_creates_the_default_database_and_then_publishes(
    tmp_path: Path, sockudo_server: TestServer
) -> None:
    """The README's quick start: no OUTBOX_DATABASE_URL, no `outbox migrate`."""
    assert quick_start_commands() == [
        "python3 -m venv .venv && . .venv/bin/activate",
        'pip install -e ".[dev]"',
        "python worker.py",
        "pytest",
        "bash .ci/run",
    ]
    worker = [sys.executable, str(REPO / "worker.py"), "--once"]
    first = run(worker, tmp_path, SOCKUDO_URL=sockudo_server.url)
    assert first.returncode == 0, first.stderr
    assert f"sqlite:///outbox.db: schema upgraded empty -> {HEAD}" in first.stderr
    assert revision(f"sqlite:///{tmp_path / 'outbox.db'}") == HEAD

    enqueued = run([str(OUTBOX), "enqueue", "orders", "created", '{"id":1}'], tmp_path)
    assert enqueued.returncode == 0, enqueued.stderr
    again = run(worker, tmp_path, SOCKUDO_URL=sockudo_server.url)
    assert again.returncode == 0, again.stderr
    assert "schema upgraded" not in again.stderr  # already at the latest: nothing to say
    [delivery] = sockudo_server.deliveries("orders")
    assert delivery.data == '{"id":1}'


def test_outbox_worker_upgrades_any_sqlite_database_from_an_older_revision(
    tmp_path: Path, sockudo_server: TestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere' / 'app.db'}"
    (tmp_path / "elsewhere").mkdir()
    with opened(url) as engine:
        migrate.upgrade(engine, "0001")
    assert revision(url) == "0001" != HEAD

    code = main(["--database-url", url, "worker", "--once", "--sockudo-url", sockudo_server.url])
    assert code == 0, capsys.readouterr().err
    assert revision(url) == HEAD


@pytest.mark.parametrize("server", ["postgresql", "mariadb"])
@pytest.mark.parametrize("start", [None, "0001"], ids=["empty", "older"])
def test_the_worker_refuses_an_unmigrated_server_database(
    tmp_path: Path, request: pytest.FixtureRequest, start: str | None, server: str
) -> None:
    url = make_database(server, tmp_path, request)
    if start is not None:
        with opened(url) as engine:
            migrate.upgrade(engine, start)
    before = table_names(url)

    done = run([str(OUTBOX), "worker", "--once"], tmp_path, OUTBOX_DATABASE_URL=url)

    assert done.returncode == 2
    state = "has no outbox schema" if start is None else f"is at schema {start}"
    assert done.stderr.endswith(
        f"{state}, expected {HEAD}: run `outbox migrate` "
        "(the worker does it by itself on SQLite only)\n"
    )
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert table_names(url) == before and revision(url) == start


def test_the_worker_leaves_a_sqlite_table_made_by_other_migrations_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    with opened(url) as engine:
        metadata_for(TABLE).create_all(engine)  # the app's own migrations made it

    assert main(["--database-url", url, "worker", "--once"]) == 2
    err = capsys.readouterr().err
    assert f"the table {TABLE} exists without {VERSION_TABLE}" in err and "docs/alembic.md" in err
    assert table_names(url) == owned_tables() - {VERSION_TABLE}


def test_the_worker_refuses_a_sqlite_schema_from_a_newer_release(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    with opened(url) as engine:
        migrate.upgrade(engine)
        with engine.begin() as conn:
            conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = 'f00dfeed'"))

    assert main(["--database-url", url, "worker", "--once"]) == 2
    err = capsys.readouterr().err
    assert "cannot upgrade the outbox schema from f00dfeed" in err
    assert "migrated by a newer sockudo-outbox?" in err and err.count("\n") == 1
    assert revision(url) == "f00dfeed"


def test_upgrades_started_together_on_sqlite_run_once(tmp_path: Path) -> None:
    """Two workers starting at the same moment on a new database: both start, one creates it.

    A third connection holds the write lock while both upgrades start, so both read the version
    table before either can write: without the lock taken first, both would create the tables
    and the second would fail ("table already exists").
    """
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    holder = create_engine(url)
    engines = [create_engine(url), create_engine(url)]
    results: list[tuple[str | None, str | None] | BaseException] = []

    def start(engine: sa.Engine) -> None:
        try:
            results.append(migrate.ensure_latest(engine))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=start, args=(e,)) for e in engines]
    try:
        with holder.connect() as lock:
            lock.exec_driver_sql("BEGIN IMMEDIATE")
            for thread in threads:
                thread.start()
            # Both upgrades are now waiting on the lock (a margin, not a race: they wait for
            # up to the 30 s busy timeout, and the outcome must be the same however late).
            threading.Event().wait(0.5)
            lock.exec_driver_sql("COMMIT")
        for thread in threads:
            thread.join(timeout=40)
            assert not thread.is_alive()
    finally:
        for engine in (holder, *engines):
            engine.dispose()

    assert not [r for r in results if isinstance(r, BaseException)], results
    assert sorted(results, key=str) == [(None, HEAD), (None, HEAD)]
    assert revision(url) == HEAD
    assert table_names(url) == owned_tables()

"""The `outbox` command: enqueue, status, replay, worker; exit codes 0/1/2/3/4; one-line errors."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from outbox import (
    OutboxEvent,
    admin,
    derive_channel_key,
    enqueue,
    enqueue_many,
    outbox_table,
    status_view,
)
from outbox.cli import main
from outbox.database import create_engine
from outbox.progress import Progress
from outbox.settings import ENVIRONMENT
from outbox.testing.server import TestServer
from tests.outbox_rows import EV, TABLE_OF, move_where, set_row

T = outbox_table()
OUTBOX = Path(sys.executable).with_name("outbox")
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable, _ in ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("OUTBOX_DATABASE_URL", database_url)
    return {**os.environ}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OUTBOX, *args], env=env, capture_output=True, text=True, timeout=60)


def rows(engine: sa.Engine) -> dict[int, Any]:
    with engine.connect() as conn:
        return {r.id: r for r in conn.execute(sa.select(EV).order_by(EV.c.id))}


def add(engine: sa.Engine, channel: str = "orders", event: str = "created", **row: Any) -> int:
    """One row, enqueued normally, then put in the state given (status, errors, times...)."""
    with engine.begin() as conn:
        event_id = enqueue(conn, channel, event, {"c": channel, "e": event})
        row_id = conn.execute(sa.select(T.c.id).where(T.c.event_id == event_id)).scalar_one()
    if row:
        set_row(engine, row_id, **row)
    return row_id


def dead(engine: sa.Engine, channel: str = "orders", event: str = "created", **row: Any) -> int:
    values = {
        "status": "dead",
        "attempts": 3,
        "last_error_status": 413,
        "last_error_code": "payload_too_large",
        "last_error_message": "payload too large",
        "last_error_at": NOW,
    }
    return add(engine, channel, event, **{**values, **row})


# -- enqueue --------------------------------------------------------------------------------


def test_enqueue_prints_the_event_id_and_writes_the_row(env, engine, capsys):
    code, out, err = cli(capsys, "enqueue", "orders", "created", '{"id": 1}')
    assert code == 0, err
    event_id = uuid.UUID(out.strip())
    (row,) = rows(engine).values()
    assert (row.event_id, row.channel, row.event, row.data) == (
        event_id,
        "orders",
        "created",
        '{"id": 1}',
    )
    assert row.idempotency_key == derive_channel_key(str(event_id), "orders")

    code, out, err = cli(capsys, "enqueue", "orders", "created", '"x"', "--idempotency-key", "k-1")
    assert code == 0, err
    assert rows(engine)[2].idempotency_key == derive_channel_key("k-1", "orders")
    # the same key again: refused as bad input, in one line
    code, out, err = cli(capsys, "enqueue", "orders", "created", '"x"', "--idempotency-key", "k-1")
    assert code == 2
    assert out == "" and err.startswith("outbox: error: not enqueued:") and err.count("\n") == 1
    assert len(rows(engine)) == 2


def test_enqueue_bad_channel_is_exit_2_with_one_line(env, engine, capsys):
    code, out, err = cli(capsys, "enqueue", "bad channel", "created", "{}")
    assert code == 2
    assert out == ""
    assert err.startswith("outbox: error: invalid channel name 'bad channel'")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert rows(engine) == {}


def test_enqueue_subprocess_exit_codes(env, engine, backend):
    ok = run(env, "enqueue", "orders", "created", '"hello"')
    assert ok.returncode == 0, ok.stderr
    assert rows(engine)[1].event_id == uuid.UUID(ok.stdout.strip())
    bad = run(env, "enqueue", "bad channel", "created", "{}")
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.startswith("outbox: error: invalid channel name")
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


# -- status ---------------------------------------------------------------------------------


@pytest.fixture
def populated(engine: sa.Engine) -> dict[str, int]:
    """One row in each status (two dead), with known ages and errors.

    Times come from the clock now, not from the module's import: the full tier reaches these
    tests many minutes after the import, when a lease from then has expired (the row would be
    pending) and a publish from then is no longer in the last minute.
    """
    now = dt.datetime.now(dt.UTC)
    return {
        "pending": add(engine, created_at=now - dt.timedelta(hours=1)),
        "in_flight": add(
            engine,
            status="in_flight",
            attempts=1,
            lease_token=uuid.uuid4(),
            lease_expires_at=now + dt.timedelta(hours=1),
        ),
        "published": add(engine, status="published", attempts=1, published_at=now),
        "dead_old": dead(
            engine,
            last_error_status=400,
            last_error_code="invalid_input",
            last_error_message="bad name",
            last_error_at=now - dt.timedelta(minutes=5),
        ),
        "dead_new": dead(engine, last_error_message="too big", last_error_at=now),
    }


def test_status_json_reports_counts_age_dead_and_errors(env, populated, capsys):
    code, out, err = cli(capsys, "status", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["counts"] == {"pending": 1, "in_flight": 1, "published": 1, "dead": 2}
    assert report["dead"] == 2
    assert 3600 <= report["oldest_pending_age_seconds"] < 3600 + 120
    errors = report["last_errors"]
    assert [e["id"] for e in errors] == [populated["dead_new"], populated["dead_old"]]
    assert errors[0]["last_error_status"] == 413
    assert errors[0]["last_error_code"] == "payload_too_large"
    assert errors[0]["last_error_message"] == "too big"
    assert errors[1]["last_error_message"] == "bad name"

    code, out, _ = cli(capsys, "status", "--json", "--errors", "1")
    assert [e["id"] for e in json.loads(out)["last_errors"]] == [populated["dead_new"]]


def test_status_text(env, populated, capsys):
    code, out, err = cli(capsys, "status")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "status       count   oldest"
    # Each state's count and the age of its oldest row (the pending one was created 1 h ago).
    assert any(line.startswith("pending          1   60.") for line in lines)
    assert any(line.startswith("in_flight        1   ") for line in lines)
    assert any(line.startswith("published        1   ") for line in lines)
    assert any(line.startswith("dead             2   ") for line in lines)
    assert any(line.startswith("oldest pending: 60.") and line.endswith(" min") for line in lines)
    assert "published in the last minute: 1 (0.0/s)" in lines
    assert "last errors:" in lines
    assert any("413 payload_too_large] too big" in line for line in lines)
    assert any("400 invalid_input] bad name" in line for line in lines)


def test_status_of_an_empty_outbox(env, capsys):
    code, out, _ = cli(capsys, "status", "--json", "--check")
    assert code == 0
    assert json.loads(out) == {
        "counts": {"pending": 0, "in_flight": 0, "published": 0, "dead": 0},
        "oldest_pending_age_seconds": None,
        "dead": 0,
        "last_errors": [],
        "oldest_age_seconds": {"pending": None, "in_flight": None, "published": None, "dead": None},
        "published_last_minute": 0,
        "parked_keys": 0,
        "waiting_mutations": 0,
        "waiting_for_key": 0,
    }


def test_status_lists_no_old_error_of_a_published_row(env, engine, capsys):
    """A row that failed, was retried and then published keeps its last error in the table;
    it is history, not a problem: "last errors" shows only rows not published."""
    retried_then_published = add(
        engine,
        status="published",
        attempts=2,
        published_at=NOW,
        last_error_status=503,
        last_error_code="backpressure",
        last_error_message="busy",
        last_error_at=NOW,
    )
    dead_row = dead(engine, last_error_at=NOW - dt.timedelta(minutes=1))
    _, out, _ = cli(capsys, "status", "--json")
    assert [e["id"] for e in json.loads(out)["last_errors"]] == [dead_row]
    set_row(engine, dead_row, status="published")
    _, out, _ = cli(capsys, "status")
    assert "last errors:" not in out and "busy" not in out
    assert retried_then_published  # the row is there, counted as published
    assert json.loads(cli(capsys, "status", "--json")[1])["counts"]["published"] == 2


def test_status_json_reports_each_states_lag_and_the_last_minute(env, populated, capsys):
    report = json.loads(cli(capsys, "status", "--json")[1])
    ages = report["oldest_age_seconds"]
    assert 3600 <= ages["pending"] < 3600 + 120
    assert 0 <= ages["in_flight"] < 120 and 0 <= ages["dead"] < 120
    # The published row was published NOW (in the last minute).
    assert report["published_last_minute"] == 1


def test_status_check_max_age_exit_codes(env, engine, capsys):
    """--check --max-age N: 4 once the oldest unsent event is older than N s; dead rows (3) win."""
    assert cli(capsys, "status", "--check", "--max-age", "60")[0] == 0  # empty: nothing is old
    row_id = add(engine, created_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=600))
    assert cli(capsys, "status", "--check", "--max-age", "3600")[0] == 0
    assert cli(capsys, "status", "--check", "--max-age", "300")[0] == 4
    assert cli(capsys, "status", "--check")[0] == 0  # no threshold: age alone is no failure
    # An in-flight row is not yet sent either: it counts.
    set_row(engine, row_id, status="in_flight", lease_expires_at=NOW)
    assert cli(capsys, "status", "--check", "--max-age", "300")[0] == 4
    dead(engine)
    assert cli(capsys, "status", "--check", "--max-age", "300")[0] == 3
    set_row(engine, row_id, status="published", published_at=NOW)
    code, _, err = cli(capsys, "status", "--check", "--max-age", "300")
    assert code == 3, err


def test_status_max_age_needs_check_and_watch_refuses_check(env, capsys):
    code, _, err = cli(capsys, "status", "--max-age", "5")
    assert code == 2 and err == "outbox: error: --max-age goes with --check\n"
    code, _, err = cli(capsys, "status", "--watch", "--check")
    assert code == 2 and "--watch is a view" in err and err.count("\n") == 1


@pytest.mark.parametrize("flag", ["--interval", "--max-age"])
@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0"])
def test_status_seconds_must_be_finite_and_positive(capsys, flag, value):
    # --watch --interval inf would sleep forever between two frames.
    with pytest.raises(SystemExit) as exit_info:
        main(["status", "--check", flag, f"{value}"])
    assert exit_info.value.code == 2
    assert f"argument {flag}: must be a positive number, got {value}" in capsys.readouterr().err


def test_status_check_exits_3_when_dead_rows_exist(env, engine, capsys):
    add(engine)
    assert cli(capsys, "status", "--check")[0] == 0
    row_id = dead(engine)
    assert cli(capsys, "status", "--check")[0] == 3
    assert cli(capsys, "status")[0] == 0  # without --check, dead rows are no failure
    set_row(engine, row_id, status="published")
    assert cli(capsys, "status", "--check")[0] == 0


def test_status_check_subprocess(env, engine, backend):
    dead(engine)
    done = run(env, "status", "--check")
    assert done.returncode == 3, done.stderr
    assert "dead             1   " in done.stdout
    done = run(env, "status", "--check", "--max-age", "0.5")
    assert done.returncode == 3, done.stderr
    with engine.begin() as conn:
        for table in {*TABLE_OF.values()}:
            conn.execute(sa.delete(table))
    add(engine, created_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=10))
    done = run(env, "status", "--check", "--max-age", "5")
    assert done.returncode == 4, done.stderr
    assert run(env, "status", "--check", "--max-age", "300").returncode == 0


# -- unmigrated database --------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["enqueue", "orders", "created", "{}"],
        ["replay", "--all"],
        ["replay", "--dry-run"],
        # (the worker migrates SQLite itself: tests/test_embedded_schema.py)
    ],
    ids=lambda a: " ".join(a),
)
def test_commands_on_an_unmigrated_database_say_run_migrate(
    empty_database_url, monkeypatch, capsys, args
):
    monkeypatch.setenv("OUTBOX_DATABASE_URL", empty_database_url)
    code, out, err = cli(capsys, *args)
    assert code == 2 and out == ""
    assert "has no outbox schema" in err and "run `outbox migrate`" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    engine = create_engine(empty_database_url)
    try:
        assert sa.inspect(engine).get_table_names() == []  # nothing was created on the way
    finally:
        engine.dispose()


def test_unmigrated_database_subprocess(empty_database_url):
    env = {**os.environ, "OUTBOX_DATABASE_URL": empty_database_url}
    done = run(env, "status")
    assert done.returncode == 2
    assert "run `outbox migrate`" in done.stderr and "Traceback" not in done.stderr


# -- replay ---------------------------------------------------------------------------------


def assert_replayed(before: Any, after: Any, keep_key: bool = False) -> None:
    assert after.status == "pending"
    # A kept key may still be known to the server, so such a row is put back as already tried
    # (sent alone, never in a batch); a fresh key starts from zero.
    assert after.attempts == (1 if keep_key else 0)
    assert after.last_error_status is None and after.last_error_message is None
    assert after.lease_token is None and after.published_at is None
    assert after.event_id == before.event_id and after.data == before.data
    if keep_key:
        assert after.idempotency_key == before.idempotency_key
    else:
        assert after.idempotency_key != before.idempotency_key
        uuid.UUID(after.idempotency_key)


def assert_untouched(before: Any, after: Any) -> None:
    assert after == before


def test_replay_dry_run_shows_count_and_sample_and_changes_nothing(env, engine, capsys):
    ids = [dead(engine, event=f"e{i}") for i in range(12)]
    add(engine)
    before = rows(engine)
    code, out, err = cli(capsys, "replay", "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "would replay 12 event(s)"
    assert lines[1].startswith(f"  row {ids[0]} orders e0 dead [413 payload_too_large]")
    assert len([line for line in lines if line.startswith("  row ")]) == 10
    assert lines[-1] == "  ... and 2 more"

    code, out, _ = cli(capsys, "replay", "--dry-run", "--json", "--event", "e3")
    report = json.loads(out)
    assert (report["matched"], report["dry_run"]) == (1, True)
    assert [r["id"] for r in report["sample"]] == [ids[3]]
    assert rows(engine) == before


def test_replay_by_ids_moves_dead_rows_back_with_a_new_key(env, engine, capsys):
    a, b, c = dead(engine), dead(engine), dead(engine)
    published = add(engine, status="published")
    before = rows(engine)
    code, out, err = cli(capsys, "replay", str(a), str(before[c].event_id), str(published))
    assert code == 0, err
    assert out.splitlines()[0] == "replayed 2 of 2 event(s)"
    after = rows(engine)
    assert_replayed(before[a], after[a])
    assert_replayed(before[c], after[c])
    assert_untouched(before[b], after[b])
    assert_untouched(before[published], after[published])  # not dead: not selected
    assert after[a].idempotency_key != after[c].idempotency_key


def test_replay_finds_an_event_by_row_id_event_id_or_idempotency_key(env, engine, capsys):
    target, other = dead(engine), dead(engine)
    before = rows(engine)
    names = {
        "row id": str(target),
        "event id": str(before[target].event_id),
        "event id in capitals": str(before[target].event_id).upper(),
        "idempotency key": before[target].idempotency_key,
    }
    for how, name in names.items():
        code, out, err = cli(capsys, "replay", "--dry-run", "--json", name)
        assert code == 0, (how, err)
        assert [r["id"] for r in json.loads(out)["sample"]] == [target], how
    code, out, err = cli(capsys, "replay", before[target].idempotency_key)
    assert code == 0 and out.splitlines()[0] == "replayed 1 of 1 event(s)", err
    assert rows(engine)[target].status == "pending"
    assert_untouched(before[other], rows(engine)[other])


def test_a_replay_that_matches_nothing_exits_6_and_says_where_the_events_are(env, engine, capsys):
    pending, published = add(engine), add(engine, status="published", published_at=NOW)
    dead_row = dead(engine)
    before = rows(engine)
    for args in (["not-an-id"], ["--dry-run", str(uuid.uuid4())], ["--channel", "nope"]):
        code, out, err = cli(capsys, "replay", *args)
        assert (code, out) == (6, ""), args
        assert err == "outbox: error: nothing to replay: no dead event matches\n", args
    # The events named exist, elsewhere: the message says where, and what would replay them.
    code, _, err = cli(capsys, "replay", str(pending), str(published))
    assert code == 6
    assert err.startswith(
        "outbox: error: nothing to replay: no dead event matches (1 pending, 1 published do); "
        "pending and in-flight events are still the worker's to send; "
        "--published replays published events"
    ), err
    code, out, err = cli(capsys, "replay", "--published", "--dry-run", "--json", str(dead_row))
    assert code == 6 and json.loads(out)["matched"] == 0
    assert "(1 dead does); without --published, dead events are replayed" in err
    assert rows(engine) == before


def _days_ago(arg: str) -> str:
    """A flag's value as a test id: a time in whole days before NOW."""
    try:
        when = dt.datetime.fromisoformat(arg)
    except ValueError:
        return arg
    when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    return f"now-{round((NOW - when) / dt.timedelta(days=1))}d"


@pytest.mark.parametrize(
    ("args", "selected"),
    [
        (["--channel", "billing"], {"billing"}),
        (["--event", "refunded"], {"refund"}),
        (["--error-code", "invalid_input"], {"invalid"}),
        (["--error-code", "400"], {"invalid"}),
        (["--error-code", "413"], {"orders", "billing", "refund", "old"}),
        (
            ["--since", (NOW - dt.timedelta(days=2)).isoformat()],
            {"orders", "billing", "refund", "invalid"},
        ),
        (["--until", (NOW - dt.timedelta(days=2)).isoformat()], {"old"}),
        (
            [
                "--since",
                (NOW - dt.timedelta(days=11)).strftime("%Y-%m-%dT%H:%M:%S"),
                "--until",
                (NOW - dt.timedelta(days=9)).isoformat(),
            ],
            {"old"},
        ),
        (["--channel", "orders", "--event", "created"], {"orders"}),
        (["--all"], {"orders", "billing", "refund", "invalid", "old"}),
    ],
    # Flags with their times in days ago, not the times themselves: a test's id must be the same
    # in every process that collects it (pytest-xdist compares them).
    ids=lambda v: " ".join(_days_ago(a) for a in v) if isinstance(v, list) else None,
)
def test_replay_filters_select_the_right_dead_rows(env, engine, capsys, args, selected):
    named = {
        "orders": dead(engine, "orders", "created"),
        "billing": dead(engine, "billing", "created"),
        "refund": dead(engine, "orders", "refunded"),
        "invalid": dead(
            engine,
            "audit",
            "created",
            last_error_status=400,
            last_error_code="invalid_input",
            last_error_message="x",
        ),
        "old": dead(engine, "archive", "created", created_at=NOW - dt.timedelta(days=10)),
        "pending": add(engine, "billing", "refunded"),
    }
    before = rows(engine)
    code, out, err = cli(capsys, "replay", *args)
    assert code == 0, err
    assert out.splitlines()[0] == f"replayed {len(selected)} of {len(selected)} event(s)"
    after = rows(engine)
    for name, row_id in named.items():
        if name in selected:
            assert_replayed(before[row_id], after[row_id])
        else:
            assert_untouched(before[row_id], after[row_id])


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--error-code", "²", "an HTTP status is 100 to 999 in ASCII digits, got '²'"),
        ("--error-code", "9" * 20, "an HTTP status is 100 to 999"),
        ("--error-code", "x" * 65, "an error code is 1 to 64 printable characters"),
        ("--since", "0001-01-01T00:00+01:00", "a time from 1970 to 9999 (in UTC) is expected"),
        ("--until", "9999-12-31T23:30-01:00", "a time from 1970 to 9999 (in UTC) is expected"),
    ],
)
def test_replay_filters_no_database_could_compare_are_usage_errors(capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["replay", "--dry-run", flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_replay_keep_key_keeps_the_idempotency_key(env, engine, capsys):
    row_id = dead(engine)
    before = rows(engine)
    code, out, err = cli(capsys, "replay", "--keep-key", "--json", str(row_id))
    assert code == 0, err
    report = json.loads(out)
    assert (report["replayed"], report["keys"], report["dry_run"]) == (1, "keep", False)
    assert_replayed(before[row_id], rows(engine)[row_id], keep_key=True)


def test_replay_published_selects_published_rows(env, engine, capsys):
    published = add(engine, status="published", attempts=1, published_at=NOW)
    other = add(engine, "billing", status="published", attempts=1, published_at=NOW)
    dead_row = dead(engine)
    before = rows(engine)
    code, out, err = cli(capsys, "replay", "--published", "--channel", "orders")
    assert code == 0, err
    assert out.splitlines()[0] == "replayed 1 of 1 event(s)"
    after = rows(engine)
    assert_replayed(before[published], after[published])
    assert_untouched(before[other], after[other])
    assert_untouched(before[dead_row], after[dead_row])


def test_replay_without_a_filter_is_refused(env, engine, capsys):
    dead(engine)
    before = rows(engine)
    code, out, err = cli(capsys, "replay")
    assert code == 2
    assert out == ""
    assert "refusing to replay every event without a filter" in err and "--all" in err
    assert err.count("\n") == 1
    assert rows(engine) == before
    code, out, err = cli(capsys, "replay", "--published")
    assert code == 2 and rows(engine) == before


def test_replay_refusal_subprocess(env, engine, backend):
    dead(engine)
    done = run(env, "replay")
    assert done.returncode == 2
    assert "refusing to replay" in done.stderr and "Traceback" not in done.stderr
    assert rows(engine)[1].status == "dead"
    done = run(env, "replay", "--all")
    assert done.returncode == 0, done.stderr
    assert rows(engine)[1].status == "pending"


def test_replay_help_explains_the_key_decision(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["replay", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "gets a NEW idempotency key" in text
    assert "answered from the server's cache and NOT delivered" in text
    assert "503 backpressure" in text
    assert "--keep-key keeps the old key" in text
    assert "--dry-run" in text


# -- worker ---------------------------------------------------------------------------------


def test_a_replayed_dead_event_is_delivered_by_the_worker(
    env, engine, capsys, sockudo_server, monkeypatch
):
    code, out, err = cli(capsys, "enqueue", "orders", "created", '{"id":42}')
    assert code == 0, err
    event_id = uuid.UUID(out.strip())
    (row_id,) = rows(engine)
    set_row(
        engine,
        row_id,
        status="dead",
        attempts=25,
        last_error_status=503,
        last_error_code="backpressure",
        last_error_message="gave up",
        last_error_at=NOW,
    )
    monkeypatch.setenv("SOCKUDO_URL", sockudo_server.url)
    monkeypatch.setenv("OUTBOX_POLL_INTERVAL", "0.05")

    # dead: the worker has nothing to do
    assert cli(capsys, "worker", "--once")[0] == 0
    assert sockudo_server.deliveries("orders") == []

    code, out, err = cli(capsys, "replay", str(event_id))
    assert code == 0, err
    code, out, err = cli(capsys, "worker", "--once")
    assert code == 0, err

    (delivery,) = sockudo_server.deliveries("orders")
    assert (delivery.name, delivery.data) == ("created", '{"id":42}')
    row = rows(engine)[row_id]
    assert row.status == "published"
    assert row.attempts == 1
    assert row.published_at is not None


def test_the_workers_log_names_the_event_id_and_replay_finds_it_by_any_named_id(env, engine):
    """A newcomer's first hour, as users run it: an event the server refuses is logged by its
    event id (what enqueue printed), with its row and idempotency key labelled; `outbox replay`
    finds it by each of the three."""
    with TestServer(max_payload_kb=1) as server:  # 2,000 characters are too many for it
        env = {**env, "SOCKUDO_URL": server.url}
        enqueued = run(env, "enqueue", "orders", "created", json.dumps({"blob": "x" * 2000}))
        event_id = enqueued.stdout.strip()
        done = run(env, "worker", "--once")
    assert done.returncode == 0, done.stderr  # the server answered: a refusal is not an outage
    [line] = [line for line in done.stderr.splitlines() if "refused, dead-lettered" in line]
    logged = re.search(r"event (\S+) \(row (\d+), channel orders, idempotency key (\S+)\)", line)
    assert logged is not None, line
    assert logged.group(1) == event_id, line
    (row_id,) = rows(engine)
    assert (
        logged.group(2) == str(row_id) and logged.group(3) == rows(engine)[row_id].idempotency_key
    )
    for name in logged.groups():
        found = run(env, "replay", "--dry-run", name)
        assert found.returncode == 0, found.stderr
        assert found.stdout.startswith("would replay 1 event(s)\n"), found.stdout


def test_worker_once_exits_5_while_the_endpoint_is_down_then_0_once_it_is_back(env, engine):
    with TestServer() as server:
        env = {**env, "SOCKUDO_URL": server.url, "OUTBOX_BACKOFF_MIN": "0.1"}
        for n in range(3):
            assert run(env, "enqueue", "orders", "created", json.dumps({"n": n})).returncode == 0
        server.go_down()  # connection refused
        down = run(env, "worker", "--once")
        assert down.returncode == 5, down.stderr
        last = down.stderr.splitlines()[-1]
        assert last.startswith("outbox: error: publishing stopped: endpoint unavailable: "), last
        assert last.endswith("; what is due waits for the next run"), last
        assert {r.status for r in rows(engine).values()} == {"pending"}

        server.come_up()
        time.sleep(1.0)  # well past the rows' backoff (0.1 s, and as much jitter at most)
        up = run(env, "worker", "--once")
        assert up.returncode == 0, up.stderr
        assert {r.status for r in rows(engine).values()} == {"published"}
        assert server.delivered_count("orders") == 3


def test_worker_once_exits_5_when_the_credentials_are_refused(env, engine):
    secret = "wr0ng-s3cret-never-shown"
    with TestServer() as server:
        wrong = server.url.replace(":app-secret@", f":{secret}@")
        assert secret in wrong
        env = {**env, "SOCKUDO_URL": wrong}
        assert run(env, "enqueue", "orders", "created", "{}").returncode == 0
        done = run(env, "worker", "--once")
    assert done.returncode == 5, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith(
        "outbox: error: publishing stopped: the server refused this worker's credentials ([401"
    ), last
    assert "check SOCKUDO_URL" in last and last.endswith("what is due waits for the next run")
    assert secret not in done.stderr
    assert {r.status for r in rows(engine).values()} == {"pending"}


def test_worker_with_a_malformed_sockudo_url_exits_2_without_the_secret(env, capsys):
    secret = "s3cr3t-do-not-print"
    for url in (
        f"http://app-key:{secret}@127.0.0.1:6001/wrong/app-id",
        f"http://app-key:{secret}@127.0.0.1:6001/apps/app-id/extra",
        f"http://app-key:{secret}@127.0.0.1:notaport/apps/app-id",
        f"ftp://app-key:{secret}@127.0.0.1:6001/apps/app-id",
    ):
        code, out, err = cli(capsys, "worker", "--once", "--sockudo-url", url)
        assert code == 2, url
        assert err.startswith("outbox: error: SOCKUDO_URL:"), err
        assert err.count("\n") == 1
        assert secret not in err and secret not in out


def test_worker_malformed_sockudo_url_subprocess(env):
    secret = "s3cr3t-do-not-print"
    env = {**env, "SOCKUDO_URL": f"http://app-key:{secret}@127.0.0.1:6001/not-apps/app-id"}
    done = run(env, "worker", "--once")
    assert done.returncode == 2
    assert "SOCKUDO_URL" in done.stderr and "/apps/APP_ID" in done.stderr
    assert secret not in done.stderr and secret not in done.stdout
    assert "Traceback" not in done.stderr


# -- database URLs --------------------------------------------------------------------------


def test_bare_postgresql_urls_work(postgres_url, capsys):
    """`postgresql://` and `postgres://` (no driver) are given psycopg."""
    assert postgres_url.startswith("postgresql://")
    env = {**os.environ, "OUTBOX_DATABASE_URL": postgres_url}
    done = run(env, "enqueue", "orders", "created", '"bare"')
    assert done.returncode == 0, done.stderr
    heroku_style = "postgres://" + postgres_url.removeprefix("postgresql://")
    code, out, err = cli(capsys, "--database-url", heroku_style, "status", "--json")
    assert code == 0, err
    assert json.loads(out)["counts"]["pending"] == 1


def test_bare_mysql_and_mariadb_urls_work(mariadb_url, capsys):
    """`mysql://` and `mariadb://` (no driver) are given PyMySQL; both reach the same table."""
    assert mariadb_url.startswith("mariadb://")
    env = {**os.environ, "OUTBOX_DATABASE_URL": mariadb_url}
    done = run(env, "enqueue", "orders", "created", '"bare"')
    assert done.returncode == 0, done.stderr
    mysql_style = "mysql://" + mariadb_url.removeprefix("mariadb://")
    code, out, err = cli(capsys, "--database-url", mysql_style, "enqueue", "orders", "again", '"x"')
    assert code == 0, err
    code, out, err = cli(capsys, "--database-url", mysql_style, "status", "--json")
    assert code == 0, err
    assert json.loads(out)["counts"]["pending"] == 2


@pytest.mark.parametrize(
    ("url", "sync_driver", "async_driver"),
    [
        ("mysql://u:p@db/app", "mysql+pymysql", "mysql+aiomysql"),
        ("mariadb://u@db/app", "mariadb+pymysql", "mariadb+aiomysql"),
        ("mysql+mysqldb://u@db/app", "mysql+mysqldb", "mysql+mysqldb"),  # chosen: left alone
        ("postgresql://u@db/app", "postgresql+psycopg", "postgresql+psycopg"),
        ("sqlite:///outbox.db", "sqlite", "sqlite+aiosqlite"),
    ],
)
def test_bare_urls_get_the_drivers_we_depend_on(url, sync_driver, async_driver):
    from outbox.database import normalize_url

    assert normalize_url(url).drivername == sync_driver
    assert normalize_url(url, asyncio=True).drivername == async_driver


def test_a_pool_error_is_logged_in_one_line():
    """A connection killed under the pool (MariaDB's KILL CONNECTION at the wrong moment) is
    logged by SQLAlchemy with a traceback; the CLI's logging makes it one line with the error."""
    from outbox.cli import PoolErrorsInOneLine

    try:
        raise OSError("(2013, 'Lost connection to MySQL server during query')\nmore")
    except OSError:
        record = logging.LogRecord(
            "sqlalchemy.pool.impl.QueuePool",
            logging.ERROR,
            __file__,
            1,
            "Exception during %s",
            ("reset or similar",),
            sys.exc_info(),
        )
    other = logging.LogRecord("outbox.worker", logging.ERROR, __file__, 1, "x", None, None)
    assert PoolErrorsInOneLine().filter(record) and PoolErrorsInOneLine().filter(other)
    text = logging.Formatter().format(record)
    assert text == (
        "Exception during reset or similar: (2013, 'Lost connection to MySQL server during query')"
    )


def test_unsupported_database_url_is_exit_2(capsys):
    code, out, err = cli(capsys, "--database-url", "mssql://root:hunter2@localhost/db", "status")
    assert code == 2 and out == ""
    assert "unsupported database 'mssql'" in err and "hunter2" not in err


def test_commands_that_never_publish_ignore_a_bad_sockudo_url(env, engine, capsys, monkeypatch):
    monkeypatch.setenv("SOCKUDO_URL", "http://app-key:secret@127.0.0.1:6001/nope")
    monkeypatch.setenv("OUTBOX_BATCH_SIZE", "lots")
    assert cli(capsys, "migrate")[0] == 0
    assert cli(capsys, "enqueue", "orders", "created", "{}")[0] == 0
    assert cli(capsys, "status")[0] == 0
    code, _, err = cli(capsys, "replay", "--all")
    assert code == 6 and "nothing to replay" in err  # it read the outbox: nothing is dead
    code, _, err = cli(capsys, "worker", "--once")
    assert code == 2 and "OUTBOX_BATCH_SIZE must be an integer" in err


@pytest.mark.parametrize("limit", ["-1", "0"])
def test_replay_limit_must_be_positive(env, engine, capsys, limit):
    dead(engine)
    before = rows(engine)
    with pytest.raises(SystemExit) as exit_info:
        main(["replay", "--limit", limit])
    assert exit_info.value.code == 2
    assert "--limit" in capsys.readouterr().err
    assert rows(engine) == before


def test_replay_and_its_dry_run_run_in_constant_memory(env, engine, capsys):
    """A replay after a long outage may select millions of rows: it must not load them all.

    Constant means the same peak for three times the rows; the bound is the ratio, not a
    number of bytes, which moves with the driver (PyMySQL builds a page's statement in memory).
    """
    import tracemalloc

    from outbox import OutboxEvent, enqueue_many

    def peaks(added: int) -> list[int]:
        with engine.begin() as conn:
            enqueue_many(conn, [OutboxEvent("orders", "created", "x" * 200) for _ in range(added)])
            move_where(conn, sa.true(), "dead", last_error_message="m" * 400)
        total = len(rows(engine))
        measured = []
        for args in (["replay", "--all", "--dry-run"], ["replay", "--all"]):
            tracemalloc.start()
            try:
                code, out, err = cli(capsys, *args)
                measured.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
            assert code == 0, err
            assert f" {total} event(s)" in out.splitlines()[0]
        assert {r.status for r in rows(engine).values()} == {"pending"}
        return measured

    small = peaks(10_000)
    large = peaks(20_000)  # 30,000 dead rows now: 18 MB of payload and errors alone
    for command, few, many in zip(("dry run", "replay"), small, large, strict=True):
        assert many < few * 1.3 + 256 * 1024, (
            f"{command}: peak {few} B for 10,000, {many} B for 30,000"
        )
        assert many < 9 * 1024 * 1024, f"{command}: peak {many / 1e6:.1f} MB"


def test_enqueue_to_an_encrypted_channel_needs_the_master_key(env, engine, capsys, monkeypatch):
    code, _, err = cli(capsys, "enqueue", "private-encrypted-orders", "created", "{}")
    assert code == 2
    assert "SOCKUDO_ENCRYPTION_MASTER_KEY_BASE64" in err
    assert rows(engine) == {}
    monkeypatch.setenv("SOCKUDO_ENCRYPTION_MASTER_KEY_BASE64", "A" * 43 + "=")
    code, _, err = cli(capsys, "enqueue", "private-encrypted-orders", "created", "{}")
    assert code == 0, err
    assert len(rows(engine)) == 1


# -- status --watch -------------------------------------------------------------------------


def _read_until(fd: int, needle: str, seen: list[str], timeout: float = 30.0) -> str:
    """Read a pseudo-terminal until everything read so far contains ``needle``."""
    deadline = time.monotonic() + timeout
    while needle not in "".join(seen):
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} never shown; screen so far:\n{''.join(seen)[-2000:]}"
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            seen.append(os.read(fd, 65536).decode("utf-8", "replace"))
    return "".join(seen)


def test_status_watch_refreshes_in_place_on_a_terminal(env, engine, tmp_path):
    """On a terminal each frame clears the screen and redraws: new rows show up in the next
    frame, and Ctrl-C leaves with exit 0."""
    primary, secondary = pty.openpty()
    errors = tmp_path / "stderr.txt"
    with open(errors, "wb") as stderr:
        process = subprocess.Popen(
            [OUTBOX, "status", "--watch", "--interval", "0.2"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=secondary,
            stderr=stderr,
        )
    os.close(secondary)
    seen: list[str] = []
    try:
        _read_until(primary, "pending          0   -", seen)
        for _ in range(3):
            add(engine)
        screen = _read_until(primary, "pending          3   ", seen)
        frames = screen.split(status_view.CLEAR)
        assert len(frames) >= 3  # (nothing before the first clear)
        # Each frame is drawn on a cleared screen: the new count replaces the old one.
        (latest,) = [f for f in frames if "pending          3   " in f][:1]
        assert "pending          0" not in latest
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0, errors.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(primary)


def test_status_watch_into_a_pipe_prints_frames_one_after_another(env, engine):
    out = io.StringIO()
    read_count = 0

    def read() -> Any:
        nonlocal read_count
        read_count += 1
        if read_count == 2:
            add(engine)
        with engine.connect() as conn:
            return admin.status(conn, T)

    status_view.watch(read, out, interval=0.01, title="t", frames=3, sleep=lambda s: None)
    text = out.getvalue()
    assert status_view.CLEAR not in text
    frames = text.split("\n\nt  ")
    assert len(frames) == 3 and text.count("status       count   oldest") == 3
    assert "pending          0   -" in frames[0] and "pending          1   " in frames[2]


def test_an_unknown_log_format_is_a_usage_error(env, monkeypatch, capsys):
    monkeypatch.setenv("OUTBOX_LOG_FORMAT", "xml")
    code, out, err = cli(capsys, "status")
    assert code == 2 and out == ""
    assert err == "outbox: error: OUTBOX_LOG_FORMAT must be one of text, json, got 'xml'\n"


# -- progress of long work ------------------------------------------------------------------


def test_a_replay_of_more_than_a_page_shows_its_progress(env, engine, capsys):
    rows_to_replay = admin.REPLAY_PAGE * 2 + 500
    with engine.begin() as conn:
        enqueue_many(conn, [OutboxEvent("orders", "created", i) for i in range(rows_to_replay)])
        move_where(conn, sa.true(), "dead", last_error_at=NOW)
    code, out, err = cli(capsys, "replay", "--all")
    assert code == 0, err
    assert out.startswith(f"replayed {rows_to_replay} of {rows_to_replay} event(s)")
    lines = err.splitlines()
    # Into a non-terminal: the first page, then (seconds later) more, and always the end.
    assert lines[0] == f"replayed 1,000 of {rows_to_replay:,} (40%)"
    assert lines[-1] == f"replayed {rows_to_replay:,} of {rows_to_replay:,} (100%)"
    # A replay of one page says nothing on stderr.
    with engine.begin() as conn:
        first = conn.execute(sa.select(T.c.id).order_by(T.c.id).limit(10)).scalars().all()
        move_where(conn, T.c.id.in_(first), "dead")
    code, out, err = cli(capsys, "replay", "--all")
    assert code == 0 and err == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_rewrites_its_line_on_a_terminal_and_thins_out_elsewhere():
    clock = iter([0.0, 0.5, 1.0, 2.5, 3.0])
    log = io.StringIO()
    progress = Progress("replayed", 5000, out=log, every=2.0, clock=lambda: next(clock))
    for done in (1000, 2000, 3000, 4000, 5000):
        progress.update(done)
    progress.done()
    assert log.getvalue().splitlines() == [
        "replayed 1,000 of 5,000 (20%)",
        "replayed 4,000 of 5,000 (80%)",  # 2.5 s after the first line
        "replayed 5,000 of 5,000 (100%)",  # the end, always
    ]
    screen = _Terminal()
    progress = Progress("replayed", 2, out=screen)
    progress.update(1)
    progress.update(2)
    progress.done()
    assert screen.getvalue() == (
        "\rreplayed 1 of 2 (50%)\rreplayed 2 of 2 (100%)\rreplayed 2 of 2 (100%)\n"
    )


# -- options before or after the command, help, ages (#21) ----------------------------------


def test_global_options_are_taken_before_or_after_the_command(
    database_url, engine, capsys, monkeypatch, tmp_path
):
    """`outbox web --database-url X` (as the README writes it) as well as `outbox
    --database-url X web`; a value given before the command is not undone by the command's
    own copy of the option, and one given after it wins."""
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the default database, were it used by mistake, lands here
    code, out, err = cli(capsys, "enqueue", "--database-url", database_url, "orders", "e", "1")
    assert code == 0, err
    code, out, err = cli(capsys, "--database-url", database_url, "enqueue", "orders", "e", "2")
    assert code == 0, err
    code, out, err = cli(
        capsys, "--database-url", "mssql://nowhere/x", "status", "--json", "--database-url",
        database_url,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["counts"]["pending"] == 2
    assert [r.data for r in rows(engine).values()] == ["1", "2"]
    assert not (elsewhere / "outbox.db").exists()
    # The table and the log options too.
    for args in (
        ["--table", "x" * 41, "status", "--database-url", database_url],
        ["status", "--database-url", database_url, "--table", "x" * 41],
    ):
        code, out, err = cli(capsys, *args)
        assert code == 2 and "OUTBOX_TABLE must be 1 to 40 characters" in err, args
    code, out, err = cli(capsys, "status", "--log-format", "xml")
    assert code == 2 and "OUTBOX_LOG_FORMAT must be one of text, json, got 'xml'" in err
    # The dashboard's options and the global ones, in any order (refused only for its address).
    code, out, err = cli(capsys, "web", "--database-url", database_url, "--host", "0.0.0.0")
    assert code == 2 and err.startswith("outbox: error: refusing to serve the dashboard on 0.0.0.0")


def test_the_worker_takes_global_options_after_its_name(env, engine, sockudo_server):
    done = run(env, "enqueue", "orders", "created", "{}")
    assert done.returncode == 0, done.stderr
    url = env.pop("OUTBOX_DATABASE_URL")
    done = run(
        env, "worker", "--once", "--database-url", url, "--sockudo-url", sockudo_server.url,
        "--log-level", "warning",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "batch of" not in done.stderr  # --log-level reached the logging set-up
    assert {r.status for r in rows(engine).values()} == {"published"}


def test_worker_help_shows_every_settings_default(capsys, monkeypatch):
    from outbox.cli import WORKER_FLAGS

    monkeypatch.setenv("COLUMNS", "400")  # no line wrapped (argparse breaks at hyphens)

    with pytest.raises(SystemExit) as exit_info:
        main(["worker", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for spec in WORKER_FLAGS:
        assert re.search(rf"{spec.flag} \S+ .*?\(env {spec.variable}, default [^)]", text), spec
    for shown in (
        "(env OUTBOX_IN_FLIGHT, default 4)",
        "(env OUTBOX_LEASE_SECONDS, default 60)",
        "(env OUTBOX_BATCH_SIZE, default the server's batch limit)",
        "(env OUTBOX_METRICS_PORT, default off)",
        "(env OUTBOX_DEAD_HEAD, default park)",
        "(env OUTBOX_DATABASE_URL, default sqlite:///outbox.db)",
        "(env OUTBOX_TABLE, default outbox_events)",
        # The default URL's secret is the compose stack's; masked all the same.
        "(env SOCKUDO_URL, default http://app-key:***@127.0.0.1:6001/apps/app-id)",
    ):
        assert shown in text, shown
    assert "app-secret" not in text


def test_enqueue_refuses_data_that_is_not_json_unless_raw(env, engine, capsys):
    for data, problem in (
        ("hello", "Expecting value at line 1 column 1"),
        ('{"id": 1', "Expecting ',' delimiter at line 1 column 9"),
        ("{'id': 1}", "Expecting property name enclosed in double quotes"),
        ('{"n": NaN}', "NaN is not JSON"),
    ):
        code, out, err = cli(capsys, "enqueue", "orders", "created", data)
        assert (code, out) == (2, ""), data
        assert err.startswith(f"outbox: error: DATA is not valid JSON ({problem}"), err
        assert err.endswith("pass --raw to send it as a plain string\n") and err.count("\n") == 1
    assert rows(engine) == {}
    for data in ('{"id": 1}', "[1, 2]", '"text"', "42", "null"):
        code, out, err = cli(capsys, "enqueue", "orders", "created", data)
        assert code == 0, err
    code, out, err = cli(capsys, "enqueue", "orders", "created", "hello", "--raw")
    assert code == 0, err
    # Stored exactly as typed, JSON or not: the worker sends the text it was given.
    assert [r.data for r in rows(engine).values()] == [
        '{"id": 1}', "[1, 2]", '"text"', "42", "null", "hello"
    ]  # fmt: skip


def test_a_mysql_url_without_its_driver_says_which_extra_to_install(capsys, monkeypatch):
    # As if the mysql extra were not installed: an import of PyMySQL fails.
    monkeypatch.setitem(sys.modules, "pymysql", None)
    for url in ("mysql://ops:hunter2@db.internal/app", "mariadb://ops:hunter2@db.internal/app"):
        message = (
            f"{url.replace('hunter2', '***')} needs the pymysql driver (the mysql extra), "
            'which is not installed: pip install "sockudo-outbox[mysql]"'
        )
        for command in (["status"], ["enqueue", "orders", "e", "{}"], ["migrate"], ["web"]):
            code, out, err = cli(capsys, "--database-url", url, *command)
            assert (code, out) == (2, ""), command
            assert err == f"outbox: error: {message}\n", command
        # An application's own code gets the same sentence, as an error it can catch.
        from outbox.database import DatabaseURLError, DriverMissing

        with pytest.raises(DriverMissing) as raised:
            create_engine(url)
        assert isinstance(raised.value, DatabaseURLError) and str(raised.value) == message


@pytest.mark.parametrize(
    ("url", "missing"),
    [
        ("http://app-key@127.0.0.1:6001/apps/app-id", "has no secret"),
        ("http://app-key:@127.0.0.1:6001/apps/app-id", "has no secret"),
        ("http://:{secret}@127.0.0.1:6001/apps/app-id", "has no key"),
        ("http://127.0.0.1:6001/apps/app-id", "has no key and secret"),
        ("http://app-key:{secret}@127.0.0.1:6001/apps/", "has no app id"),
        ("http://app-key:{secret}@127.0.0.1:6001/app-id", "has no /apps/APP_ID path"),
        ("ws://app-key:{secret}@127.0.0.1:6001/apps/app-id", "does not start with http://"),
    ],
)
def test_a_sockudo_url_missing_a_part_says_which_without_the_secret(capsys, url, missing):
    secret = "s3cr3t-do-not-print"
    url = url.format(secret=secret)
    code, out, err = cli(capsys, "worker", "--once", "--sockudo-url", url)
    assert (code, out) == (2, "")
    assert err.startswith(f"outbox: error: SOCKUDO_URL: Sockudo URL {missing}"), err
    assert "http(s)://KEY:SECRET@HOST[:PORT]/apps/APP_ID" in err and err.count("\n") == 1
    assert secret not in err


def test_outbox_leases_shows_how_long_each_lease_has_left(env, engine, capsys):
    now = dt.datetime.now(dt.UTC)  # the database's clock is this machine's
    live = add(engine, status="in_flight", attempts=1, lease_expires_at=now + dt.timedelta(hours=1))
    stale = add(
        engine, status="in_flight", attempts=2, lease_expires_at=now - dt.timedelta(minutes=2)
    )
    code, out, err = cli(capsys, "leases")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "2 leased row(s), 1 expired"
    assert re.fullmatch(
        rf"  row {stale} orders created \(attempts 2\) lease EXPIRED 2 min \d+ s ago", lines[1]
    ), lines[1]
    assert re.fullmatch(
        rf"  row {live} orders created \(attempts 1\) lease expires in (59 min \d+ s|1 h 0 min)",
        lines[2],
    ), lines[2]
    assert not re.search(r"\d\d:\d\d:\d\d", out), out  # no clock time at all
    report = json.loads(cli(capsys, "leases", "--json")[1])
    assert (report["leased"], report["expired"]) == (2, 1)
    assert [(r["id"], r["expired"]) for r in report["leases"]] == [(stale, True), (live, False)]
    shown = dt.datetime.fromisoformat(report["leases"][1]["lease_expires_at"])
    assert abs(shown - (now + dt.timedelta(hours=1))) < dt.timedelta(milliseconds=1)


def test_the_workers_batch_line_counts_rows_and_requests_apart(env, engine):
    """A batch of four with one event the server refuses: the batch request is refused whole,
    its four rows are sent again alone. The line says so without contradicting itself."""
    with TestServer(max_payload_kb=1) as server:
        env = {**env, "SOCKUDO_URL": server.url}
        for data in ('{"n": 1}', '{"n": 2}', json.dumps({"blob": "x" * 2000}), '{"n": 3}'):
            assert run(env, "enqueue", "orders", "created", data).returncode == 0
        done = run(env, "worker", "--once")
    assert done.returncode == 0, done.stderr
    [line] = [line for line in done.stderr.splitlines() if "batch of" in line]
    assert re.search(
        r"batch of 4: 3 published, 0 to retry, 1 dead, 0 given back; "
        r"1 batch request \(4 rows\), 4 requests alone; in [\d.]+ ms$",
        line,
    ), line


# -- delete-dead ----------------------------------------------------------------------------


def test_delete_dead_dry_run_first_then_for_good(env, engine, capsys):
    orders = [dead(engine, "orders", event=f"e{i}") for i in range(12)]
    audit = dead(engine, "audit")
    pending, published = add(engine), add(engine, status="published", published_at=NOW)
    before = rows(engine)
    code, out, err = cli(capsys, "delete-dead", "--dry-run", "--channel", "orders")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "would delete 12 dead event(s)"
    assert lines[1].startswith(f"  row {orders[0]} orders e0 [413 payload_too_large]")
    assert lines[-1] == "  ... and 2 more"
    assert rows(engine) == before

    code, out, err = cli(capsys, "delete-dead", "--channel", "orders", "--limit", "10", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["matched"], report["deleted"], report["dry_run"]) == (10, 10, False)
    assert set(rows(engine)) == {*orders[10:], audit, pending, published}
    # By id, event id or key; only dead rows.
    code, out, err = cli(
        capsys, "delete-dead", str(orders[10]), str(before[orders[11]].event_id), str(pending)
    )
    assert code == 0 and out.splitlines()[0] == "deleted 2 of 2 dead event(s)", err
    assert set(rows(engine)) == {audit, pending, published}
    assert rows(engine)[pending] == before[pending]


def test_delete_dead_without_a_filter_is_refused_unless_all(env, engine, capsys):
    ids = [dead(engine) for _ in range(3)]
    code, out, err = cli(capsys, "delete-dead")
    assert (code, out) == (2, "")
    assert err.startswith("outbox: error: refusing to delete every dead event without a filter")
    assert "--all" in err and err.count("\n") == 1
    assert set(rows(engine)) == set(ids)
    code, out, _ = cli(capsys, "delete-dead", "--dry-run")  # a dry run needs no filter
    assert code == 0 and out.startswith("would delete 3 dead event(s)\n")
    code, out, err = cli(capsys, "delete-dead", "--all")
    assert code == 0 and out.startswith("deleted 3 of 3 dead event(s)\n"), err
    assert rows(engine) == {}


def test_delete_dead_that_matches_nothing_exits_6_and_says_where_the_events_are(
    env, engine, capsys
):
    pending = add(engine)
    dead(engine)
    code, out, err = cli(capsys, "delete-dead", "--channel", "nope")
    assert (code, out) == (6, "")
    assert err == "outbox: error: nothing to delete: no dead event matches\n"
    code, out, err = cli(capsys, "delete-dead", "--json", str(pending))
    assert code == 6 and json.loads(out)["matched"] == 0
    assert err == (
        "outbox: error: nothing to delete: no dead event matches (1 pending does); "
        "only dead events are deleted\n"
    )
    assert len(rows(engine)) == 2


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)  # MariaDB: no keys
def test_deleting_a_parked_head_says_its_key_goes_on(env, engine, capsys):
    from tests.helpers.drivers import park_in

    with engine.begin() as conn:
        for n in range(2):
            enqueue(conn, "orders", "step", {"n": n}, ordering_key="k")
        head = conn.execute(sa.select(sa.func.min(T.c.id))).scalar_one()
    set_row(engine, head, status="dead", last_error_code="payload_too_large")
    with engine.begin() as conn:
        park_in(conn, T, [head])
    code, out, _ = cli(capsys, "delete-dead", "--dry-run", str(head))
    assert out.splitlines()[-1] == (
        "1 of them is the dead head of a parked ordering key: deleting it lets its key go on "
        "(as outbox keys --skip)"
    )
    code, out, err = cli(capsys, "delete-dead", str(head))
    assert code == 0, err
    assert out.splitlines()[-1] == (
        "1 of them was the dead head of a parked ordering key: its key goes on"
    )
    assert cli(capsys, "keys")[1].startswith("0 parked key(s)")


def test_delete_dead_runs_in_constant_memory_and_shows_its_progress(env, engine, capsys):
    import tracemalloc

    n = admin.REPLAY_PAGE * 2 + 500
    with engine.begin() as conn:
        enqueue_many(conn, [OutboxEvent("orders", "created", "x" * 200) for _ in range(n)])
        move_where(conn, sa.true(), "dead", last_error_message="m" * 400)
    tracemalloc.start()
    try:
        code, out, err = cli(capsys, "delete-dead", "--all")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == 0, err
    assert out.startswith(f"deleted {n} of {n} dead event(s)")
    assert err.splitlines()[-1] == f"deleted {n:,} of {n:,} (100%)"
    assert peak < 8 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"
    assert rows(engine) == {}

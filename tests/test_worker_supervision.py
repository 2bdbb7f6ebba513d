"""The worker watches what runs beside its claim loop, and recovers its pace after database errors."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys

import pytest
import sqlalchemy as sa

from outbox.worker import SideTaskFailed, Worker
from tests.test_worker import enqueue_n, fast_settings, table_rows


async def test_a_side_task_that_dies_stops_the_worker_loudly(
    engine, database_url, sockudo_server, caplog, monkeypatch
):
    """Maintenance (lease reclaim, retention) dying must not leave a worker that silently stopped
    reclaiming: the worker stops and says why."""
    worker = Worker(fast_settings(database_url, sockudo_server.url), engine=engine)

    async def broken(stopping):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.2)
        raise RuntimeError("maintenance bug")

    monkeypatch.setattr(worker.maintenance, "run", broken)
    caplog.set_level(logging.CRITICAL, logger="outbox.worker")
    with pytest.raises(SideTaskFailed, match="maintenance bug"):
        await asyncio.wait_for(worker.run(), timeout=10)
    assert worker.stopping
    assert "the maintenance task died (maintenance bug); stopping the worker" in caplog.text


async def test_a_side_task_that_returns_is_a_failure_too(
    engine, database_url, sockudo_server, monkeypatch
):
    worker = Worker(fast_settings(database_url, sockudo_server.url), engine=engine)

    async def quits(stopping):  # type: ignore[no-untyped-def]
        return None

    monkeypatch.setattr(worker.maintenance, "run", quits)
    with pytest.raises(SideTaskFailed, match="the maintenance task ended"):
        await asyncio.wait_for(worker.run(), timeout=10)


async def test_the_database_backoff_resets_after_a_success(
    engine, database_url, sockudo_server, caplog, monkeypatch
):
    """Five claim errors in a row slow the worker down; one success, then one more error, and the
    pause is the short one again: errors long past do not keep slowing the worker down."""
    enqueue_n(engine, 1)
    worker = Worker(fast_settings(database_url, sockudo_server.url), engine=engine)
    real_claim = worker.driver.events_claim
    script = ["fail"] * 5 + ["real"] + ["fail"] + ["real"] * 1000

    async def claim(*args):  # type: ignore[no-untyped-def]
        step = script.pop(0)
        if step == "fail":
            raise sa.exc.OperationalError("SELECT", {}, Exception("connection lost"))
        return await real_claim(*args)

    monkeypatch.setattr(worker.driver, "events_claim", claim)
    caplog.set_level(logging.WARNING, logger="outbox.worker")
    task = asyncio.create_task(worker.run())
    try:
        for _ in range(400):
            if len(script) <= 1000 and table_rows(engine)[0].status == "published":
                break
            await asyncio.sleep(0.05)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
    pauses = [float(p) for p in re.findall(r"retrying in ([\d.]+) s", caplog.text)]
    assert len(pauses) == 6, caplog.text
    assert pauses[:5] == sorted(pauses[:5]) and pauses[4] > pauses[0]  # growing
    assert pauses[5] == pauses[0]  # reset by the success in between
    assert worker.stats.database_errors == 6


def test_the_cli_does_not_import_the_benchmark_or_the_test_tools():
    """The production command must not pull in the npm installer, the test server or the bench."""
    code = (
        "import sys, outbox.cli; "
        "print(sorted(m for m in sys.modules if m.startswith(('outbox.bench', 'outbox.testing'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"

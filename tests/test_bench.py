"""The benchmark harness loads and runs: a quick drain against the bundled test server.

Speed is never asserted here (docs/performance.md has the figures); this only proves the harness
works, so a broken bench is caught by ``pytest`` and not first by CI's smoke run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

#: Runs in the full tier (see tests/plugins/tiers.py).
pytestmark = [pytest.mark.postgres, pytest.mark.mariadb]


def run_bench(report: Path, *args: str, timeout: float = 300) -> dict[str, Any]:
    """``python -m outbox.bench --smoke --server test-server ARGS --json REPORT``: its JSON."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "outbox.bench",
            "--smoke",
            "--server",
            "test-server",
            *args,
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(report.read_text()))


def test_the_bench_drains_through_the_test_server(tmp_path: Path) -> None:
    written = run_bench(tmp_path / "bench.json", "--scenarios", "drain", "--events", "3000")
    results = written["results"]
    drains = [r for r in results if r["scenario"].startswith("outbox drain")]
    assert {r["backend"] for r in drains} == {"sqlite", "postgresql", "mariadb"}
    assert all(r["events"] > 0 and r["events_per_s"] > 0 for r in drains)
    # The ordered drain runs right after the one-worker drain where keys are taken (MariaDB
    # refuses them), with its ratio to that drain in the JSON and among the targets.
    ordered = [r for r in drains if "ordering_keys" in r]
    assert {r["backend"] for r in ordered} == {"sqlite", "postgresql"}
    for r in ordered:
        assert r["scenario"] == "outbox drain, 1 worker(s), 1,000 ordering keys"
        assert r["ordering_keys"] == 1000 and r["x_unordered"] > 0
        at = results.index(r)
        assert results[at - 1]["scenario"] == "outbox drain, 1 worker(s)"
        assert results[at - 1]["backend"] == r["backend"]
    targets = [t["target"] for t in written["targets"]]
    assert sum("ordered drain (1,000 keys) within 2x" in t for t in targets) == 2


def test_the_bench_prices_the_metrics_and_times_the_gauges(tmp_path: Path) -> None:
    written = run_bench(
        tmp_path / "bench.json",
        "--backends",
        "sqlite",
        "--scenarios",
        "metrics,gauges",
        "--events",
        "3000",
        "--gauge-history",
        "2000",
    )
    results = {r["scenario"]: r for r in written["results"]}
    off = results["metrics off: outbox drain, 1 worker"]
    on = results["metrics on, scraped every second: outbox drain, 1 worker"]
    assert off["events_per_s"] > 0 and on["events_per_s"] > 0
    assert "metrics_scrapes" in on and "metrics_scrapes" not in off
    gauges = results["queue gauges read, 2,000 published rows"]
    assert gauges["published_rows"] == 2000 and gauges["unsent_rows"] == 1000
    assert gauges["read_median_ms"] > 0
    assert "full status read (outbox status), 2,000 published rows" in results
    targets = [t["target"] for t in written["targets"]]
    assert any("within 5% of off" in t for t in targets)


def test_the_bench_drains_a_backlog_and_catches_up_after_an_overload(tmp_path: Path) -> None:
    """Issue 22's scenarios: a backlog met at once (unkeyed, then half keyed where the backend
    takes keys), and producers above the drain rate, then stopped; each is judged against the
    other in the targets. MariaDB refuses ordering keys: its runs are unkeyed only."""
    written = run_bench(
        tmp_path / "bench.json",
        "--backends",
        "sqlite,postgresql,mariadb",
        "--scenarios",
        "baseline,catch-up,overload",
        timeout=600,
    )
    results = written["results"]
    for backend in ("sqlite", "postgresql", "mariadb"):
        keys = backend != "mariadb"
        mine = {r["scenario"]: r for r in results if r["backend"] == backend}
        plain = mine["catch-up: 5,000-event backlog, 1 worker"]
        assert plain["backlog"] == 5000 and 0 < plain["events"] <= 5000
        assert plain["events_per_s"] > 0
        keyed = mine.get("catch-up: 5,000-event backlog, 1 worker, half keyed on 1,000 keys")
        assert (keyed is not None) == keys
        if keyed is not None:
            assert keyed["ordering_keys"] == 1000 and keyed["keyed_every"] == 2
        storms = [r for r in mine.values() if r["scenario"].startswith("overload:")]
        assert len(storms) == (2 if keys else 1)
        for storm in storms:
            # Every event produced was published (the bench raises otherwise), and the catch-up
            # is timed over the backlog left when the producers stopped.
            assert storm["produced"] >= 2 * 1000
            assert storm["backlog_peak"] >= storm["events"] > 0
            assert storm["events_per_s"] > 0
    targets = [t["target"] for t in written["targets"]]
    assert (
        "PostgreSQL catch-up of a 5,000-event backlog at default settings >= 30,000 events/s"
        in targets
    )
    assert "PostgreSQL catch-up >= 20x the per-event baseline" in targets
    assert sum("catch-up after overload" in t for t in targets) == 5

"""The benchmark harness loads and runs: a quick drain against the bundled test server.

Speed is never asserted here (docs/performance.md has the figures); this only proves the harness
works, so a broken bench is caught by ``pytest`` and not first by CI's smoke run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_the_bench_drains_through_the_test_server(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "outbox.bench",
            "--smoke",
            "--server",
            "test-server",
            "--scenarios",
            "drain",
            "--events",
            "3000",
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(report.read_text())["results"]
    drains = [r for r in results if r["scenario"].startswith("outbox drain")]
    assert {r["backend"] for r in drains} == {"sqlite", "postgresql", "mariadb"}
    assert all(r["events"] > 0 and r["events_per_s"] > 0 for r in drains)

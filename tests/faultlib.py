"""Helpers of the crash-and-fault suite (tests/test_faults.py).

Database snapshots, the server's request log read per key, and the results table that the
module prints at its end (waiting is tests/helpers/waiting.py). Worker processes are
:class:`outbox.testing.worker_process.WorkerProcess`: they report their own counts, so nothing
here parses a worker's log.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from outbox.testing.worker_process import WorkerProcess
from tests.outbox_rows import EV, counts

REPO = Path(__file__).resolve().parents[1]


# -- worker processes ------------------------------------------------------------------------


#: A worker under a fault campaign comes back quickly (short backoff, short polling), so a
#: campaign's seconds go to its faults rather than to waiting. A scenario's own settings win.
QUICK_RECOVERY: dict[str, object] = {
    "backoff_min_seconds": 0.2,
    "backoff_max_seconds": 2,
    "poll_interval": 0.2,
}


def worker_config(database_url: str, sockudo_url: str, **settings: object) -> dict[str, object]:
    """The settings of one worker process (Settings names), :data:`QUICK_RECOVERY` unless
    ``settings`` say otherwise: passed to ``spawn_worker``."""
    return {"database_url": database_url, "sockudo_url": sockudo_url, **QUICK_RECOVERY, **settings}


# -- database --------------------------------------------------------------------------------


def status_counts(engine: sa.Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(counts(conn))


def all_rows(engine: sa.Engine) -> list[sa.Row[Any]]:
    t = EV
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(
                    t.c.id,
                    t.c.idempotency_key,
                    t.c.channel,
                    t.c.event,
                    t.c.status,
                    t.c.attempts,
                    t.c.lease_token,
                    t.c.lease_expires_at,
                    t.c.published_at,
                    t.c.last_error_status,
                    t.c.last_error_code,
                    t.c.last_error_message,
                ).order_by(t.c.id)
            )
        )


def in_flight(engine: sa.Engine) -> dict[int, tuple[Any, Any]]:
    """Rows leased right now: id -> (lease token, lease expiry)."""
    t = EV
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.c.id, t.c.lease_token, t.c.lease_expires_at).where(
                t.c.status == "in_flight"
            )
        ).all()
    return {r.id: (r.lease_token, r.lease_expires_at) for r in rows}


def settled(engine: sa.Engine, expected: int | None = None) -> bool:
    """Nothing pending or in flight (and, if given, exactly ``expected`` rows exist)."""
    counts = status_counts(engine)
    if expected is not None and sum(counts.values()) != expected:
        return False
    return counts["pending"] == 0 and counts["in_flight"] == 0


# -- results ---------------------------------------------------------------------------------

COLUMNS = (
    ("scenario", 26),
    ("backend", 10),
    ("events", 7),
    ("kills", 6),
    ("lost", 5),
    ("duplicates", 10),
    ("dead", 5),
    ("duration_s", 10),
)


@dataclass
class Results:
    """One row per scenario run; printed as a table (and written as JSON) when the module ends."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, **row: Any) -> dict[str, Any]:
        row.setdefault("notes", "")
        self.rows.append(row)
        return row

    def record(
        self,
        scenario: str,
        backend: str,
        rows: list[Any],
        figures: Mapping[str, Any],
        started: float,
        kills: int = 0,
        notes: str = "",
    ) -> dict[str, Any]:
        """The row of one finished scenario: its audit figures, its time, what it tells."""
        return self.add(
            scenario=scenario,
            backend=backend,
            events=len(rows),
            kills=kills,
            lost=figures["lost"],
            duplicates=figures["duplicates"],
            dead=figures["dead"],
            duration_s=time.monotonic() - started,
            notes=notes,
        )

    def table(self) -> str:
        header = " ".join(f"{name:<{width}}" for name, width in COLUMNS) + " notes"
        lines = [header, "-" * len(header)]
        for row in self.rows:
            cells = []
            for name, width in COLUMNS:
                value = row.get(name, "")
                if isinstance(value, float):
                    value = f"{value:.1f}"
                cells.append(f"{value!s:<{width}}")
            lines.append(" ".join(cells) + " " + str(row.get("notes", "")))
        return "\n".join(lines)

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.rows, indent=2, default=str), encoding="utf-8")


def per_second(times: Iterable[float]) -> Counter[int]:
    return Counter(int(t) for t in times)


def retry_after_violations(requests: Iterable[dict[str, Any]], slack: float = 0.05) -> list[str]:
    """Requests that came back for a key sooner than the ``Retry-After`` its last answer asked.

    Read from the server's request log (each request's keys, arrival, answer time and
    Retry-After), so it checks what went over the wire, not what the worker says it did.
    """
    asked: dict[str, float] = {}  # key -> not before (server clock)
    problems = []
    for request in sorted(requests, key=lambda r: r["received"]):
        for key in request["keys"]:
            not_before = asked.pop(key, None)
            if not_before is not None and request["received"] < not_before - slack:
                early = not_before - request["received"]
                problems.append(f"{key}: back {early:.2f} s before its Retry-After")
        if request["retry_after"] is not None:
            for key in request["keys"]:
                asked[key] = request["time"] + request["retry_after"]
    return problems


def report_summary(request: Any, results: Results, title: str, filename: str, seed: int) -> None:
    """Write a module's ``results`` to ``.cache/<filename>`` (git-ignored, and unlike pytest's
    tmp dirs not rotated away by other runs) and print them as a table under ``title``."""
    path = REPO / ".cache" / filename
    results.write_json(path)
    text = (
        f"\n\n{title} (seed {seed}; JSON: {path})\n{results.table()}\n"
        if results.rows
        else f"\n\n{title}: no scenario finished\n"
    )
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(text)
    else:  # pragma: no cover (pytest without its terminal)
        print(text)


@contextlib.contextmanager
def spawning(tmp_path: Path, **defaults: Any) -> Iterator[Callable[..., WorkerProcess]]:
    """``start(config, name)`` starts a worker process (``defaults`` and ``config`` are its
    options; its log is ``<tmp_path>/<name>.log``), from any thread; every one still alive at
    the end is killed."""
    started: list[WorkerProcess] = []
    lock = threading.Lock()

    def start(config: dict[str, Any], name: str) -> WorkerProcess:
        worker = WorkerProcess(log_path=tmp_path / f"{name}.log", **{**defaults, **config})
        with lock:
            started.append(worker)
        return worker.start()

    try:
        yield start
    finally:
        for worker in started:
            worker.close()

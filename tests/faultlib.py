"""Helpers of the crash-and-fault suite (tests/test_faults.py).

Worker subprocesses (``python worker.py``, configured by environment) with their log in a file,
waits that always end, worker-log parsing, database snapshots and the results table that the
module prints at its end.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from outbox import outbox_table

REPO = Path(__file__).resolve().parents[1]
WORKER_SCRIPT = REPO / "worker.py"


class WaitTimeout(AssertionError):
    """A wait ran out of time; the message says what was awaited."""


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise WaitTimeout(
                f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})"
            )
        time.sleep(interval)


# -- worker processes ------------------------------------------------------------------------


def worker_env(database_url: str, sockudo_url: str, **settings: object) -> dict[str, str]:
    """The environment of one ``python worker.py``: OUTBOX_* variables from keyword arguments.

    ``lease_seconds=2`` becomes ``OUTBOX_LEASE_SECONDS=2`` and so on (names as in settings.py).
    """
    names = {
        "lease_seconds": "OUTBOX_LEASE_SECONDS",
        "request_timeout": "OUTBOX_REQUEST_TIMEOUT",
        "backoff_min": "OUTBOX_BACKOFF_MIN",
        "backoff_max": "OUTBOX_BACKOFF_MAX",
        "poll_interval": "OUTBOX_POLL_INTERVAL",
        "breaker_threshold": "OUTBOX_BREAKER_THRESHOLD",
        "batch_size": "OUTBOX_BATCH_SIZE",
        "in_flight": "OUTBOX_IN_FLIGHT",
        "alone_concurrency": "OUTBOX_ALONE_CONCURRENCY",
        "max_attempts": "OUTBOX_MAX_ATTEMPTS",
        "shutdown_timeout": "OUTBOX_SHUTDOWN_TIMEOUT",
        "retention_seconds": "OUTBOX_RETENTION_SECONDS",
    }
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("OUTBOX_") or k.startswith("SOCKUDO_"))
    }
    env |= {
        "OUTBOX_DATABASE_URL": database_url,
        "SOCKUDO_URL": sockudo_url,
        "OUTBOX_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    for name, value in settings.items():
        env[names[name]] = str(value)
    return env


class WorkerProcess:
    """One ``python worker.py`` child; stdout and stderr go to ``log_path``."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *args: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in close())
        self.started_at = time.time()
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER_SCRIPT), *args],
            env=dict(env),
            cwd=str(REPO),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.killed_at: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, needle: str, timeout: float) -> None:
        def seen() -> bool:
            if needle in self.log_text():
                return True
            if not self.alive:
                raise AssertionError(
                    f"worker {self.pid} exited with {self.process.returncode} before logging "
                    f"{needle!r}; log tail:\n{self.log_text()[-3000:]}"
                )
            return False

        wait_until(seen, timeout, f"worker {self.pid} to log {needle!r}", interval=0.02)

    def sigkill(self) -> None:
        """SIGKILL and reap (the process is gone when this returns)."""
        if self.alive:
            self.killed_at = time.time()
            os.kill(self.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.close()

    def sigterm(self, timeout: float = 45.0) -> int:
        """SIGTERM (drain and exit) and return the exit code; SIGKILL if it hangs."""
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.sigkill()
            raise AssertionError(
                f"worker {self.pid} did not exit within {timeout} s of SIGTERM"
            ) from None
        finally:
            self.close()

    def close(self) -> None:
        if not self._log.closed:
            self._log.close()

    def ensure_dead(self) -> None:
        """For ``finally`` blocks: never leave a worker behind."""
        if self.alive:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
        self.close()


# -- worker log ------------------------------------------------------------------------------

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) ([\w.]+): (.*)$")
_BATCH = re.compile(
    r"batch of (\d+): (\d+) published \((\d+) in a batch, (\d+) alone\), (\d+) to retry, "
    r"(\d+) dead, (\d+) given back"
)
_RETRY = re.compile(r"event (\S+) \(row (\d+)\) will be retried (?:alone )?in ([\d.]+) s: (.*)$")


@dataclass
class LogLine:
    time: float
    level: str
    logger: str
    message: str


def log_lines(text: str) -> list[LogLine]:
    lines = []
    for raw in text.splitlines():
        m = _STAMP.match(raw)
        if m:
            stamp = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            lines.append(LogLine(stamp, m.group(2), m.group(3), m.group(4)))
    return lines


@dataclass
class BatchLine:
    """One "batch of N: ..." line: one claim and what its requests did."""

    time: float
    rows: int
    published: int
    sent_as_batch: int
    sent_alone: int
    retry: int
    dead: int
    given_back: int

    @property
    def requests(self) -> int:
        """HTTP requests made for this claim: one batch request (if any) plus one per alone row."""
        return (1 if self.sent_as_batch else 0) + self.sent_alone


def batch_lines(text: str) -> list[BatchLine]:
    out = []
    for line in log_lines(text):
        m = _BATCH.search(line.message)
        if m:
            out.append(BatchLine(line.time, *(int(g) for g in m.groups())))
    return out


@dataclass
class RetryLine:
    time: float
    key: str
    row_id: int
    delay: float
    error: str


def retry_lines(text: str) -> list[RetryLine]:
    out = []
    for line in log_lines(text):
        m = _RETRY.search(line.message)
        if m:
            out.append(
                RetryLine(line.time, m.group(1), int(m.group(2)), float(m.group(3)), m.group(4))
            )
    return out


DATABASE_ERROR_MARKERS = (
    "database error during",
    "could not reclaim",
    "retention skipped",
    "could not record",
)


def database_errors(text: str) -> int:
    return sum(text.count(marker) for marker in DATABASE_ERROR_MARKERS)


# -- database --------------------------------------------------------------------------------


def status_counts(engine: sa.Engine) -> Counter[str]:
    t = outbox_table()
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.status, sa.func.count()).group_by(t.c.status)).all()
    return Counter({status: count for status, count in rows})


def all_rows(engine: sa.Engine) -> list[sa.Row[Any]]:
    t = outbox_table()
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
    t = outbox_table()
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

"""A worker as a real process (``python -m outbox worker``), for tests and benchmarks.

The worker is configured by environment only, as in production; its log goes to a file (never a
pipe nobody reads); it reports its own counts through ``--stats-file``, so a test reads numbers,
not log text.

>>> with WorkerProcess(database_url, sockudo_url, log_path, lease_seconds=3) as worker:
...     worker.wait_for_log("worker started")
...     ...
...     assert worker.terminate() == 0
...     print(worker.stats()["published"])
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..settings import environment_for

#: ``python -m outbox worker``: the installed package, wherever this runs.
MODULE_COMMAND = (sys.executable, "-m", "outbox", "worker")


class WorkerExited(AssertionError):
    """The worker process ended while a caller was waiting for something from it."""


class WorkerProcess:
    """One worker process. ``settings`` are :class:`~outbox.settings.Settings` names."""

    def __init__(
        self,
        database_url: str,
        sockudo_url: str,
        log_path: Path,
        *,
        command: Sequence[str] = MODULE_COMMAND,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        log_level: str = "INFO",
        **settings: object,
    ) -> None:
        self.log_path = Path(log_path)
        self.stats_path = self.log_path.with_suffix(".stats.json")
        base = dict(os.environ if env is None else env)
        # Only what this process is given: nothing inherited from the caller's outbox settings.
        environment = {k: v for k, v in base.items() if not k.startswith(("OUTBOX_", "SOCKUDO_"))}
        environment |= environment_for(
            database_url=database_url, sockudo_url=sockudo_url, **settings
        )
        environment |= {
            "OUTBOX_LOG_LEVEL": log_level,
            "OUTBOX_STATS_FILE": str(self.stats_path),
            "PYTHONUNBUFFERED": "1",
        }
        self.environment = environment
        self.command = [*command, *args]
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.killed_at: float | None = None
        self._log: Any = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> WorkerProcess:
        self.stats_path.unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in close())
        self.started_at = time.time()
        self.process = subprocess.Popen(
            self.command,
            env=self.environment,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        return self._running().pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def terminate(self, timeout: float = 45.0) -> int:
        """SIGTERM (drain and exit) and the exit code; SIGKILL and fail if it hangs."""
        process = self._running()
        if self.alive:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"worker {process.pid} did not exit within {timeout} s of SIGTERM"
            ) from None
        finally:
            self._close_log()

    def kill(self) -> None:
        """SIGKILL and reap: the process is gone when this returns (its leases stay)."""
        process = self._running()
        if self.alive:
            self.killed_at = time.time()
            process.kill()
        process.wait(timeout=30)
        self._close_log()

    def signal(self, signum: int) -> None:
        self._running().send_signal(signum)

    def wait(self, timeout: float = 45.0) -> int:
        """Wait for the process to end on its own; its exit code."""
        try:
            return self._running().wait(timeout=timeout)
        finally:
            self._close_log()

    def close(self) -> None:
        """Never leave a worker behind (for ``finally`` blocks and context managers)."""
        if self.alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.kill()
        self._close_log()

    # -- what it says -----------------------------------------------------------------------

    def check_alive(self) -> None:
        """Fail at once (with the log's tail) if the worker has exited."""
        if not self.alive:
            raise WorkerExited(
                f"worker exited ({self.returncode}); log tail:\n{self.log_text()[-3000:]}"
            )

    def log_text(self) -> str:
        if self._log is not None and not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, needle: str, timeout: float = 60.0) -> None:
        """Wait until the log contains ``needle``; fail at once if the worker exits first."""
        self._wait(lambda: needle in self.log_text(), f"{needle!r} in its log", timeout)

    def wait_until_started(self, timeout: float = 60.0) -> None:
        """Wait until the worker runs (its first stats are written as its loop starts)."""
        self._wait(lambda: bool(self.stats().get("running")), "it to start", timeout)

    def stats(self) -> dict[str, Any]:
        """The worker's own counts (claimed, published, retried, dead, requests, ...).

        Written every second while it runs and once more when it stops (``running`` false).
        """
        try:
            return dict(json.loads(self.stats_path.read_text()))
        except FileNotFoundError:
            return {}

    # -- internals --------------------------------------------------------------------------

    def _running(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise RuntimeError("the worker process was not started")
        return self.process

    def _wait(self, done: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"waited {timeout:.0f} s for {what}; worker log tail:\n"
                    f"{self.log_text()[-3000:]}"
                )
            time.sleep(0.02)

    def _close_log(self) -> None:
        if self._log is not None and not self._log.closed:
            self._log.close()

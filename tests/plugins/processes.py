"""Fixture: child processes a test runs as users do (a web app), always stopped.

A worker process is :class:`outbox.testing.worker_process.WorkerProcess` (it reports its own counts).
``spawn(name, command, env=..., cwd=...)`` starts one with its output in a log file (never a pipe
nobody reads); after the test every child still running gets SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import pytest

LOG_TAIL = 6000


class Child:
    """One child process and its log."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                list(command),
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def log(self) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return text if len(text) <= LOG_TAIL else "..." + text[-LOG_TAIL:]

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise AssertionError(f"{self.name} exited with code {code}; its log:\n{self.log}")

    def wait_for_http(self, url: str, timeout: float = 30.0) -> None:
        """Wait until ``GET url`` answers 200 (failing at once if the process dies)."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                response = httpx.get(url, timeout=2.0, trust_env=False)
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                last = repr(exc)
            time.sleep(0.05)
        raise AssertionError(
            f"{self.name}: {url} not ready after {timeout:.0f} s ({last}):\n{self.log}"
        )

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; the exit code."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        return self.process.returncode


Spawn = Callable[..., Child]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start child processes: ``spawn(name, command, env=None, cwd=None)`` returns a :class:`Child`."""
    children: list[Child] = []

    def start(
        name: str,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        child = Child(name, command, tmp_path / f"{name}.log", env, cwd)
        children.append(child)
        return child

    yield start
    for child in reversed(children):
        child.stop()


def child_environment(**values: str) -> dict[str, str]:
    """This process's environment without the outbox's settings (``OUTBOX_*``, ``SOCKUDO_URL``,
    the encryption key), plus ``values``: a child sees only what the test gives it."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("OUTBOX_")
        and name not in ("SOCKUDO_URL", "SOCKUDO_ENCRYPTION_MASTER_KEY_BASE64")
    }
    env.update(values)
    return env

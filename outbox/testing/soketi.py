"""A real Pusher-compatible server for tests: soketi 1.6.1 from npm, bound to loopback only.

Sockudo itself cannot run on the test machines (no Docker, no crates registry); soketi speaks the
same HTTP publish API and WebSocket protocol, so it proves that our request shapes are accepted and
reach real subscribers.

::

    from outbox.testing.soketi import SoketiServer

    with SoketiServer() as server:
        client = Sockudo.from_url(server.url)
        ...

Or in a terminal, on the port of the worker's default ``SOCKUDO_URL``, until Ctrl-C::

    python -m outbox.testing.soketi --port 6001

soketi is installed once into a cache directory outside the repository (see :func:`ensure_soketi`).
Its GitHub-hosted ``uWebSockets.js`` dependency cannot be fetched here, so package.json overrides it
with an npm-published build that ships a Node 20 binary.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

SOKETI_VERSION = "1.6.1"
#: The override that makes soketi installable from the npm registry alone.
UWS_OVERRIDE = "npm:@trufflesuite/uws-js-unofficial@20.30.0-unofficial.0"
#: Names the soketi cache directory itself (not a parent of it).
CACHE_ENV = "SOCKUDO_OUTBOX_CACHE"
LOOPBACK = "127.0.0.1"

_STAMP = ".sockudo-outbox-installed.json"
_OUTPUT_TAIL = 4000
# soketi colours its console output; error messages should be plain text.
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


class SoketiError(RuntimeError):
    """soketi could not be installed or started; the message carries the relevant output."""


class SoketiInstallError(SoketiError):
    """``npm install`` failed; ``output`` holds what npm printed."""

    def __init__(self, message: str, output: str) -> None:
        details = f"\n--- npm output (tail) ---\n{_tail(output)}" if output.strip() else ""
        super().__init__(message + details)
        self.output = output


def default_cache_dir() -> Path:
    """``$SOCKUDO_OUTBOX_CACHE`` or ``~/.cache/sockudo-outbox/soketi``: never inside the repo."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "sockudo-outbox" / "soketi"


def _package_json(version: str) -> dict[str, object]:
    return {
        "name": "sockudo-outbox-soketi",
        "private": True,
        "description": "soketi for the sockudo-outbox tests (installed by outbox.testing.soketi)",
        "dependencies": {"@soketi/soketi": version},
        "overrides": {"uWebSockets.js": UWS_OVERRIDE},
    }


def _server_js(cache_dir: Path) -> Path:
    return cache_dir / "node_modules" / "@soketi" / "soketi" / "bin" / "server.js"


def ensure_soketi(
    cache_dir: Path | None = None,
    *,
    version: str = SOKETI_VERSION,
    npm: str | None = None,
    timeout: float = 900.0,
) -> Path:
    """Install soketi into ``cache_dir`` unless already there; return the path of ``bin/server.js``.

    Idempotent and safe to call from several processes at once (pytest-xdist workers, parallel
    test runs): an exclusive ``flock`` on ``cache_dir/.install.lock`` serialises installers, and a
    stamp file written only after a successful install marks the directory as usable, so a killed
    install is redone rather than trusted. Raises :class:`SoketiInstallError` with npm's output.
    """
    cache_dir = (cache_dir or default_cache_dir()).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    wanted = _package_json(version)
    server_js = _server_js(cache_dir)
    stamp = cache_dir / _STAMP

    with open(cache_dir / ".install.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if server_js.is_file() and _read_json(stamp) == wanted:
                return server_js
            npm_path = npm or shutil.which("npm")
            if npm_path is None:
                raise SoketiInstallError("npm is not on PATH; soketi needs Node.js 20 and npm", "")
            stamp.unlink(missing_ok=True)
            (cache_dir / "package.json").write_text(json.dumps(wanted, indent=2) + "\n")
            command = [
                npm_path,
                "install",
                "--no-audit",
                "--no-fund",
                "--omit=dev",
                "--loglevel=warn",
            ]
            try:
                done = subprocess.run(
                    command,
                    cwd=cache_dir,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                output = exc.output if isinstance(exc.output, str) else ""
                raise SoketiInstallError(
                    f"npm install of soketi {version} timed out after {timeout:.0f} s in {cache_dir}",
                    output,
                ) from exc
            if done.returncode != 0:
                raise SoketiInstallError(
                    f"npm install of soketi {version} failed (exit {done.returncode}) in {cache_dir}",
                    done.stdout,
                )
            if not server_js.is_file():
                raise SoketiInstallError(
                    f"npm install succeeded but {server_js} does not exist", done.stdout
                )
            stamp.write_text(json.dumps(wanted))
            return server_js
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def free_port(
    kind: int = socket.SOCK_STREAM, avoid: set[int] | frozenset[int] = frozenset()
) -> int:
    """A loopback port the kernel reports free now (TCP by default; ``SOCK_DGRAM`` for UDP)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            return port
    raise SoketiError("could not find a free loopback port")


def _tail(text: str, limit: int = _OUTPUT_TAIL) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


class SoketiServer:
    """One soketi process with one app, every socket on 127.0.0.1. A context manager.

    ``port=None`` picks a free port; the cluster (UDP) and metrics ports are always picked free so
    that two servers (or two test runs) never collide and nothing is broadcast off the machine.
    ``max_event_size_kb`` and ``max_batch_size`` are soketi's ``SOKETI_EVENT_MAX_SIZE_IN_KB`` and
    ``SOKETI_EVENT_MAX_BATCH_SIZE``; ``extra_env`` is added last and wins.
    """

    def __init__(
        self,
        app_id: str = "app-id",
        key: str = "app-key",
        secret: str = "app-secret",
        port: int | None = None,
        max_batch_size: int = 100,
        max_event_size_kb: int | float = 100,
        extra_env: Mapping[str, str] | None = None,
        *,
        server_js: Path | None = None,
        cache_dir: Path | None = None,
        node: str | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        self.app_id = app_id
        self.key = key
        self.secret = secret
        self.max_batch_size = max_batch_size
        self.max_event_size_kb = max_event_size_kb
        self.extra_env = dict(extra_env or {})
        self.ready_timeout = ready_timeout
        self._requested_port = port
        self._server_js = server_js
        self._cache_dir = cache_dir
        self._node = node
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        #: The UDP cluster-discovery port and the TCP metrics (``/usage``) port of this run.
        self.cluster_port: int | None = None
        self.metrics_port: int | None = None
        #: Seconds the last :meth:`start` took until ``/ready`` answered.
        self.startup_seconds: float | None = None

    # -- addresses ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise SoketiError("soketi has not been started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        """``http://KEY:SECRET@127.0.0.1:PORT/apps/APP_ID``: the ``SOCKUDO_URL`` form."""
        return f"http://{self.key}:{self.secret}@{LOOPBACK}:{self.port}/apps/{self.app_id}"

    def ws_url(self, key: str | None = None) -> str:
        """The WebSocket URL a Pusher client of app ``key`` (ours by default) connects to."""
        return (
            f"ws://{LOOPBACK}:{self.port}/app/{key or self.key}?protocol=7&client=python&version=1"
        )

    @property
    def pid(self) -> int | None:
        """The soketi process id while it runs (tests inspect its sockets through /proc)."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle ------------------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """The environment soketi is started with (the current one plus our settings)."""
        port = self.port
        if self.cluster_port is None:
            self.cluster_port = free_port(socket.SOCK_DGRAM, avoid={port})
        if self.metrics_port is None:
            self.metrics_port = free_port(avoid={port, self.cluster_port})
        cluster_port, metrics_port = self.cluster_port, self.metrics_port
        env = dict(os.environ)
        env.update(
            {
                "SOKETI_HOST": LOOPBACK,
                "SOKETI_PORT": str(port),
                "SOKETI_DEFAULT_APP_ID": self.app_id,
                "SOKETI_DEFAULT_APP_KEY": self.key,
                "SOKETI_DEFAULT_APP_SECRET": self.secret,
                # send_to_user reaches only signed-in sockets (pusher:signin); with this on, soketi
                # drops sockets that do not sign in within the timeout, so make that timeout an hour
                # (subscribers of long end-to-end tests need not sign in).
                "SOKETI_DEFAULT_APP_USER_AUTHENTICATION": "true",
                "SOKETI_USER_AUTHENTICATION_TIMEOUT": "3600000",
                "SOKETI_EVENT_MAX_BATCH_SIZE": str(self.max_batch_size),
                "SOKETI_EVENT_MAX_SIZE_IN_KB": str(self.max_event_size_kb),
                # Without these soketi's cluster discovery broadcasts UDP to 255.255.255.255.
                "SOKETI_METRICS_HOST": LOOPBACK,
                "SOKETI_METRICS_SERVER_PORT": str(metrics_port),
                "SOKETI_CLUSTER_HOST": LOOPBACK,
                "SOKETI_CLUSTER_PORT": str(cluster_port),
                "SOKETI_CLUSTER_BROADCAST_ADDRESS": LOOPBACK,
                "SOKETI_CLUSTER_UNICAST_ADDRESSES": f"{LOOPBACK}:{cluster_port}",
                # Tests stop servers often: do not wait out the default grace period.
                "SOKETI_SHUTDOWN_GRACE_PERIOD": "0",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self) -> Self:
        """Start soketi and wait until ``GET /ready`` answers 200; raise :class:`SoketiError`."""
        if self.running:
            return self
        server_js = self._server_js or ensure_soketi(self._cache_dir)
        node = self._node or shutil.which("node")
        if node is None:
            raise SoketiError("node is not on PATH; soketi needs Node.js 20")
        self._port = self._requested_port or free_port()
        self.cluster_port = self.metrics_port = None
        env = self.environment()
        self._remove_workdir()
        self._workdir = Path(tempfile.mkdtemp(prefix="soketi-"))
        config = self._workdir / "soketi.json"
        # The UDP cluster socket binds to ``cluster.address`` (default 0.0.0.0), which no SOKETI_*
        # variable sets; only a config file reaches it.
        config.write_text(json.dumps({"cluster.address": LOOPBACK}))
        began = time.monotonic()
        # Output goes to a file, not a pipe: nobody drains a pipe while tests run, and a full pipe
        # would block soketi.
        with open(self._workdir / "soketi.log", "wb") as log:
            self._process = subprocess.Popen(
                [node, str(server_js), "start", f"--config={config}"],
                cwd=self._workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready(began)
        except BaseException:
            # The error already carries the output's tail; ``with`` never calls __exit__ when
            # __enter__ raises, so clean up here or the working directory leaks.
            self.close()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _wait_ready(self, began: float) -> None:
        assert self._process is not None
        url = f"{self.base_url}/ready"
        deadline = began + self.ready_timeout
        last_error = "no answer yet"
        while True:
            code = self._process.poll()
            if code is not None:
                raise SoketiError(
                    f"soketi exited with code {code} before it was ready on port {self.port}\n"
                    f"--- soketi output (tail) ---\n{self.output_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    if response.status == 200:
                        return
                    last_error = f"HTTP {response.status}"
            except (urllib.error.URLError, OSError) as exc:
                last_error = str(exc)
            if time.monotonic() >= deadline:
                raise SoketiError(
                    f"soketi was not ready on {url} after {self.ready_timeout:.0f} s "
                    f"(last error: {last_error})\n--- soketi output (tail) ---\n{self.output_tail()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds. Safe to call twice."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait(timeout=timeout)
        self._process = None

    def output(self) -> str:
        """Everything soketi printed so far (kept after :meth:`stop` for post-mortems)."""
        if self._workdir is None:
            return ""
        try:
            text = (self._workdir / "soketi.log").read_text(errors="replace")
        except OSError:
            return ""
        return _ANSI_RE.sub("", text)

    def output_tail(self, limit: int = _OUTPUT_TAIL) -> str:
        return _tail(self.output(), limit)

    def close(self) -> None:
        """Stop soketi and delete its working directory (log and config file)."""
        self.stop()
        self._remove_workdir()

    def _remove_workdir(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"port {self._port}" if self._port else "not started"
        return f"<SoketiServer app {self.app_id!r} {where}>"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m outbox.testing.soketi``: run one soketi in the foreground until SIGTERM/SIGINT.

    Prints ``READY <sockudo_url> <ws_url>`` once soketi answers; exits 1 if it cannot start or dies.
    """
    parser = argparse.ArgumentParser(
        prog="python -m outbox.testing.soketi",
        description=f"Run soketi {SOKETI_VERSION} (installed from npm on first use) on 127.0.0.1.",
    )
    parser.add_argument("--port", type=int, default=6001, help="HTTP and WebSocket port")
    parser.add_argument("--app-id", default="app-id")
    parser.add_argument("--key", default="app-key")
    parser.add_argument("--secret", default="app-secret")
    parser.add_argument("--max-batch-size", type=int, default=100)
    args = parser.parse_args(argv)
    if not _server_js(default_cache_dir()).is_file():
        print(
            f"installing soketi {SOKETI_VERSION} from npm into {default_cache_dir()} (once)",
            file=sys.stderr,
            flush=True,
        )
    server = SoketiServer(
        args.app_id, args.key, args.secret, args.port, max_batch_size=args.max_batch_size
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        server.start()
    except SoketiError as exc:
        print(f"soketi did not start: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"READY {server.url} {server.ws_url()}", flush=True)
        while not stop.wait(0.5):
            if not server.running:
                print(f"soketi exited\n{server.output_tail()}", file=sys.stderr)
                return 1
    finally:
        server.close()
    return 0


__all__ = [
    "CACHE_ENV",
    "SOKETI_VERSION",
    "UWS_OVERRIDE",
    "SoketiError",
    "SoketiInstallError",
    "SoketiServer",
    "default_cache_dir",
    "ensure_soketi",
    "free_port",
]


if __name__ == "__main__":
    sys.exit(main())

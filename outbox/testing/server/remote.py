"""Drive a test server in another process: the same methods as ``TestServer``, over ``/_test``.

A worker under test may be killed mid-publish; the server must outlive it, so crash tests run the
server as a subprocess (``TestServerProcess``) and talk to it through ``RemoteTestServer``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httpx

from .state import Delivery


class RemoteTestServer:
    """Inspection and fault methods of :class:`TestServer`, for a server known by its control URL."""

    __test__ = False

    def __init__(self, control_url: str, timeout: float = 10.0) -> None:
        self.control_url = control_url.rstrip("/")
        self._http = httpx.Client(timeout=timeout)
        config = self._get("config")
        self.config = config
        self.url: str = config["url"]
        split = urlsplit(self.url)
        self.port: int = split.port or 80
        self.base_url = f"{split.scheme}://{split.hostname}:{self.port}"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RemoteTestServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, route: str, **params: Any) -> Any:
        response = self._http.get(f"{self.control_url}/{route}", params=params)
        response.raise_for_status()
        return response.json()

    def _post(self, route: str, payload: dict[str, Any] | None = None) -> Any:
        response = self._http.post(f"{self.control_url}/{route}", json=payload or {})
        response.raise_for_status()
        return response.json()

    # ----------------------------------------------------------------- inspection
    def deliveries(self, channel: str | None = None) -> list[Delivery]:
        params = {} if channel is None else {"channel": channel}
        return [Delivery.from_dict(d) for d in self._get("deliveries", **params)["deliveries"]]

    def delivered_count(self, channel: str | None = None) -> int:
        return len(self.deliveries(channel))

    def duplicates(self) -> dict[tuple[str, ...], int]:
        return {tuple(d["identity"]): d["count"] for d in self._get("duplicates")["duplicates"]}

    def stats(self) -> dict[str, Any]:
        return self._get("stats")

    def request_count(self, endpoint: str | None = None, status: int | None = None) -> int:
        return sum(
            1
            for r in self.requests()
            if (endpoint is None or r["endpoint"] == endpoint)
            and (status is None or r["status"] == status)
        )

    def requests(self) -> list[dict[str, Any]]:
        return self._get("requests")["requests"]

    def idempotency_state(self, key: str) -> str | None:
        return self._get("idempotency", key=key)["state"]

    def faults(self) -> dict[str, Any]:
        return self._get("faults")

    @property
    def is_up(self) -> bool:
        return bool(self._get("config")["up"])

    # ----------------------------------------------------------------- control
    def reset(self, idempotency: bool = True) -> None:
        self._post("reset", {"idempotency": idempotency})

    def advance_clock(self, seconds: float) -> float:
        return self._post("clock", {"advance": seconds})["now"]

    def go_down(self, seconds: float | None = None) -> None:
        self._post("down", {"seconds": seconds})

    def come_up(self) -> None:
        self._post("up")

    def fail_next(
        self,
        count: int | None = 1,
        status: int = 500,
        code: str = "internal_error",
        message: str = "Internal server error",
        retry_after: int | None = None,
        stage: str = "claimed",
        endpoints: Iterable[str] = ("events", "batch_events"),
    ) -> None:
        self._post(
            "faults",
            {
                "fail_next": {
                    "count": count,
                    "status": status,
                    "code": code,
                    "message": message,
                    "retry_after": retry_after,
                    "stage": stage,
                    "endpoints": list(endpoints),
                }
            },
        )

    def add_latency(
        self,
        seconds: float,
        stage: str = "claimed",
        count: int | None = None,
        endpoints: Iterable[str] = ("events", "batch_events"),
    ) -> None:
        self._post(
            "faults",
            {
                "latency": {
                    "seconds": seconds,
                    "stage": stage,
                    "count": count,
                    "endpoints": list(endpoints),
                }
            },
        )

    def drop_next(
        self,
        count: int | None = 1,
        stage: str = "received",
        endpoints: Iterable[str] = ("events", "batch_events"),
    ) -> None:
        self._post(
            "faults", {"drop_next": {"count": count, "stage": stage, "endpoints": list(endpoints)}}
        )

    def fail_batch_item(
        self,
        index: int,
        status: int = 413,
        code: str = "payload_too_large",
        message: str = "Event payload size exceeds limit",
        count: int | None = 1,
    ) -> None:
        self._post(
            "faults",
            {
                "fail_batch_item": {
                    "index": index,
                    "status": status,
                    "code": code,
                    "message": message,
                    "count": count,
                }
            },
        )

    def rate_limit(self, per_second: int | None, retry_after: int = 1) -> None:
        self._post("faults", {"rate_limit": {"per_second": per_second, "retry_after": retry_after}})

    def clear_faults(self) -> None:
        self._http.delete(f"{self.control_url}/faults").raise_for_status()

    def set_features(self, **switches: bool) -> dict[str, bool]:
        return self._post("features", switches)

    def features(self) -> dict[str, bool]:
        return self._get("features")

    def set_limits(self, **limits: int) -> dict[str, int]:
        return self._post("limits", limits)

    def limits(self) -> dict[str, int]:
        return self._get("limits")

    def connect(
        self, channels: Iterable[str], user_id: str | None = None, user_info: Any = None
    ) -> str:
        payload = {"channels": list(channels), "user_id": user_id, "user_info": user_info}
        return self._post("connections", payload)["socket_id"]

    def disconnect(self, socket_id: str) -> None:
        self._http.delete(f"{self.control_url}/connections/{socket_id}").raise_for_status()

    def connections(self) -> list[dict[str, Any]]:
        return self._get("connections")["connections"]


class TestServerProcess:
    """Run ``python -m outbox.testing.server`` as a child process; yields a RemoteTestServer.

    >>> with TestServerProcess(idempotency_ttl=30) as server:
    ...     server.url, server.deliveries()
    """

    __test__ = False

    def __init__(
        self,
        startup_timeout: float = 15.0,
        stderr: str | os.PathLike[str] | None = None,
        *,
        python: str | os.PathLike[str] = sys.executable,
        cwd: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> None:
        self.options = options
        self.startup_timeout = startup_timeout
        #: Where the server's stderr goes (appended); None: inherited from this process.
        self.stderr = stderr
        #: The interpreter that runs the server (another virtualenv's, to test an installed copy).
        self.python = os.fspath(python)
        #: Its working directory: ``-m`` puts it first on ``sys.path``.
        self.cwd = cwd
        self._stderr_file: Any = None
        self.process: subprocess.Popen[str] | None = None
        self.remote: RemoteTestServer | None = None

    def command(self) -> list[str]:
        argv = [self.python, "-u", "-m", "outbox.testing.server"]
        for name, value in self.options.items():
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag if value else "--no-" + name.replace("_", "-"))
            elif isinstance(value, list | tuple | set | frozenset):
                argv.extend([flag, ",".join(value)])
            else:
                argv.extend([flag, str(value)])
        return argv

    def start(self) -> RemoteTestServer:
        if self.stderr is not None:
            self._stderr_file = open(self.stderr, "ab")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=self._stderr_file,
            text=True,
            cwd=self.cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.process.stdout is not None
        # readline blocks; a timer kills a child that never says READY so we cannot hang.
        timer = threading.Timer(self.startup_timeout, self.process.kill)
        timer.start()
        try:
            line = self.process.stdout.readline()
        finally:
            timer.cancel()
        parts = line.split()
        if len(parts) != 3 or parts[0] != "READY":
            self.kill()
            raise RuntimeError(f"test server did not start: {line!r}")
        self.remote = RemoteTestServer(parts[2])
        return self.remote

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within 5 s."""
        if self.remote is not None:
            self.remote.close()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        if self._stderr_file is not None:
            self._stderr_file.close()
            self._stderr_file = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> RemoteTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

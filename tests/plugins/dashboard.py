"""Fixture: the dashboard served as operators start it, ``outbox web`` in a process of its own.

``serve_dashboard(database_url, *flags, host=..., env=...)`` starts it on a free port with only the
environment given (the test's OUTBOX_* and SOCKUDO_* variables are not passed on), waits for its
health check and returns a :class:`Served`; the ``spawn`` fixture stops it after the test.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from outbox.testing.soketi import free_port
from tests.plugins.processes import Child, Spawn, child_environment

REPO = Path(__file__).resolve().parents[2]
OUTBOX = Path(sys.executable).with_name("outbox")
_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]*)">')


@dataclass(frozen=True)
class Served:
    url: str
    process: Child

    def client(self, **options: object) -> httpx.Client:
        """A client of the dashboard on 127.0.0.1 (no proxy from the environment)."""
        return httpx.Client(base_url=self.url, trust_env=False, timeout=10.0, **options)  # type: ignore[arg-type]

    def same_origin(self) -> dict[str, str]:
        """The headers a browser sends with a form posted from one of the dashboard's pages."""
        return {"origin": self.url, "sec-fetch-site": "same-origin"}


def csrf_token(page: httpx.Response) -> str:
    """The CSRF token a page carries (bound to the session cookie the client now holds)."""
    found = _CSRF.search(page.text)
    assert found and found.group(1), f"no CSRF token in the page ({page.status_code})"
    return found.group(1)


ServeDashboard = Callable[..., Served]


@pytest.fixture
def serve_dashboard(spawn: Spawn) -> ServeDashboard:
    def serve(
        database_url: str,
        *flags: str,
        host: str = "127.0.0.1",
        env: Mapping[str, str] | None = None,
    ) -> Served:
        port = free_port()
        command = [str(OUTBOX), "--database-url", database_url, "web", "--host", host]
        child = spawn(
            f"web-{port}",
            [*command, "--port", str(port), *flags],
            child_environment(**(env or {})),
            REPO,
        )
        url = f"http://127.0.0.1:{port}"
        child.wait_for_http(f"{url}/healthz")
        return Served(url, child)

    return serve

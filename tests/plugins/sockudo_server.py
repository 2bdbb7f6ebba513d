"""Fixtures: the Sockudo-faithful test server, in-process or as a subprocess that outlives a worker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from outbox.testing.server import RemoteTestServer, TestServer, TestServerProcess


@pytest.fixture
def sockudo_server() -> Iterator[TestServer]:
    """An in-process TestServer (app-id / app-key / app-secret) on a free port."""
    with TestServer() as server:
        yield server


@pytest.fixture
def sockudo_server_process() -> Iterator[RemoteTestServer]:
    """A TestServer in its own process, driven over its control API; killed after the test."""
    process = TestServerProcess()
    remote = process.start()
    try:
        yield remote
    finally:
        process.stop()

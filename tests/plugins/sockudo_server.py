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


#: Every feature of the non-publish API on (Sockudo's defaults have them all off).
ALL_FEATURES = {
    "history": True,
    "versioned_messages": True,
    "presence_history": True,
    "annotations": True,
    "app_annotations": True,
}


@pytest.fixture
def sockudo_server_all_features() -> Iterator[TestServer]:
    """An in-process TestServer with history, versions, presence history and annotations on."""
    with TestServer(**ALL_FEATURES) as server:
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

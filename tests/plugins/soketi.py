"""Fixtures: a real soketi server (npm), installed once per session into a cache directory.

Tests that use them are marked ``@pytest.mark.soketi``. An install failure fails the test with
npm's output: a silently skipped end-to-end suite would prove nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from outbox.testing.soketi import SoketiInstallError, SoketiServer, ensure_soketi

SoketiFactory = Callable[..., SoketiServer]


@pytest.fixture(scope="session")
def soketi_install() -> Path:
    """The path of soketi's ``bin/server.js``, installing it on first use."""
    try:
        return ensure_soketi()
    except SoketiInstallError as exc:
        failure = str(exc)
    # Outside the except block, so the report shows npm's output once, not a chained traceback.
    pytest.fail(f"soketi could not be installed: {failure}", pytrace=False)


@pytest.fixture
def soketi_factory(soketi_install: Path) -> Iterator[SoketiFactory]:
    """Start extra soketi servers with their own settings; all are stopped after the test.

    ``soketi_factory(max_batch_size=3, max_event_size_kb=1)`` returns a started server.
    """
    servers: list[SoketiServer] = []

    def start(**kwargs: Any) -> SoketiServer:
        server = SoketiServer(server_js=soketi_install, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def soketi(soketi_factory: SoketiFactory) -> SoketiServer:
    """A started soketi with the default app (``app-id`` / ``app-key`` / ``app-secret``)."""
    return soketi_factory()

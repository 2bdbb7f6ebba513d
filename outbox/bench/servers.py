"""The servers a benchmark publishes to, started on loopback for the length of a run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

SERVERS = ("soketi", "test-server", "test-server-keepalive")


@dataclass(frozen=True)
class Target:
    """A running server: its ``SOCKUDO_URL`` and the pid of its process (for CPU figures)."""

    url: str
    pid: int | None


@contextlib.contextmanager
def server(kind: str, batch: int) -> Iterator[Target]:
    """Start ``kind`` with a batch limit of at least ``batch``; stopped on exit.

    ``soketi`` answers every request with ``Connection: close``; so does ``test-server`` (the
    bundled Sockudo-faithful server, in its own process), unless ``test-server-keepalive``,
    which keeps connections open as Sockudo does.
    """
    if kind == "soketi":
        from ..testing.soketi import SoketiServer

        with SoketiServer(max_batch_size=max(batch, 100)) as soketi:
            yield Target(soketi.url, soketi.pid)
        return
    if kind not in SERVERS:
        raise SystemExit(f"unknown server {kind!r}: use one of {', '.join(SERVERS)}")
    from ..testing.server import TestServerProcess

    # Idempotency stays on (as on Sockudo); the key cache is bounded by the TTL.
    process = TestServerProcess(
        max_batch_size=max(batch, 100),
        idempotency_ttl=120,
        keep_alive=kind == "test-server-keepalive",
    )
    with process as remote:
        assert process.process is not None
        yield Target(remote.url, process.process.pid)

"""The README's and the client guide's examples run as they are.

Each ```python block of docs/client.md (the Sockudo client) runs against the test server with
every feature on, in its own namespace; the only change is the address (``127.0.0.1:6001``
becomes the test server's). The README's quick start runs as a newcomer runs it: the worker
first, then the Python snippet as written, then the worker again, which publishes its event.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from outbox.testing.server import TestServer

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
CLIENT_GUIDE = REPO / "docs" / "client.md"


def client_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", CLIENT_GUIDE.read_text(), flags=re.S)


def test_there_is_an_example_per_group() -> None:
    section_titles = re.findall(r"^## (.+)$", CLIENT_GUIDE.read_text(), flags=re.M)
    for title in (
        "Publishing",
        "Channel state",
        "Durable history",
        "Presence history",
        "Versioned messages",
        "Annotations",
        "Operator controls and users",
    ):
        assert title in section_titles
    assert len(client_examples()) >= 8


@pytest.mark.parametrize("index", range(len(client_examples())))
def test_readme_client_example_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    code = client_examples()[index]
    with TestServer(
        history=True,
        versioned_messages=True,
        presence_history=True,
        annotations=True,
        app_annotations=True,
    ) as server:
        server.connect(["presence-room"], "user-1")
        code = code.replace("127.0.0.1:6001", f"127.0.0.1:{server.port}")
        code = code.replace("port=6001", f"port={server.port}")
        namespace: dict[str, object] = {}
        if "await " in code:
            exec(
                compile(
                    "async def _example():\n" + textwrap.indent(code, "    "), "README", "exec"
                ),
                namespace,
            )
            asyncio.run(namespace["_example"]())  # type: ignore[arg-type]
        else:
            exec(compile(code, "README", "exec"), namespace)
    assert "Traceback" not in capsys.readouterr().err


def quick_start_snippet() -> str:
    text = README.read_text()
    section = text[text.index("## Quick start") : text.index("## Enqueue")]
    [snippet] = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return snippet


def test_the_quick_start_snippet_runs_as_written(
    tmp_path: Path, sockudo_server: TestServer
) -> None:
    """After ``python worker.py`` (which sets up ``outbox.db``), the snippet runs as written,
    twice (a newcomer runs it again), and each run's event is published; it leaves the example
    app's own ``orders`` table alone (it once wrote into it, and broke the example)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")},
        "SOCKUDO_URL": sockudo_server.url,
    }
    worker = [sys.executable, str(REPO / "worker.py"), "--once"]

    def run(command: list[str]) -> None:
        done = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr

    run(worker)
    for _ in range(2):
        run([sys.executable, "-c", quick_start_snippet()])
    run(worker)
    assert [d.data for d in sockudo_server.deliveries("orders")] == ['{"id":42}'] * 2
    with sqlite3.connect(tmp_path / "outbox.db") as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    assert "quickstart_orders" in tables and "orders" not in tables

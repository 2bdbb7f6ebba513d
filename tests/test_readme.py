"""The README's client examples run as they are, against the test server with every feature on.

Each ```python block of the "The Sockudo client" section runs in order, in its own namespace;
the only change is the address (``127.0.0.1:6001`` becomes the test server's).
"""

from __future__ import annotations

import asyncio
import re
import textwrap
from pathlib import Path

import pytest

from outbox.testing.server import TestServer

README = Path(__file__).resolve().parent.parent / "README.md"


def client_examples() -> list[str]:
    text = README.read_text()
    section = text[text.index("## The Sockudo client") : text.index("## The test server")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_there_is_an_example_per_group() -> None:
    section_titles = re.findall(r"^### (.+)$", README.read_text(), flags=re.M)
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

"""``outbox demo``: the whole path in one command, with nothing else running.

A SQLite database in a temporary folder, the bundled test server in this process (or the Sockudo
at ``SOCKUDO_URL``), a producer committing orders and their events in transactions (some rolled
back, some on an encrypted channel, one too big for the server), the worker draining them, a
live view of what happens, a replay of the refused event once the server's limit is raised, and
at the end what the run proved, each claim checked against what the server received.

``scenario`` plays the story, ``proof`` decides the claims (pure), ``view`` shows it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

from .proof import Claim, Facts, Refusal, Seen, Transaction, prove
from .scenario import DemoUnavailable, Outcome, Script, View, run
from .view import make_view

__all__ = [
    "Claim",
    "DemoUnavailable",
    "Facts",
    "Outcome",
    "Refusal",
    "Script",
    "Seen",
    "Transaction",
    "main",
    "prove",
    "run",
]


class _ToView(logging.Handler):
    """The worker's warnings and errors, as lines of the view (not raw on stderr under it)."""

    def __init__(self, view: View) -> None:
        super().__init__(logging.WARNING)
        self.view = view

    def emit(self, record: logging.LogRecord) -> None:
        self.view.note(f"{record.name}: {record.getMessage()}")


def main(directory: Path | None = None) -> int:
    """Run the demo on stdout; 0 when every claim held, 1 when one did not."""
    view = make_view(sys.stdout)
    logger = logging.getLogger("outbox")
    handler = _ToView(view)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with view:
            outcome = asyncio.run(
                run(view, sockudo_url=os.environ.get("SOCKUDO_URL") or None, directory=directory)
            )
            view.finish(outcome)
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    return 0 if outcome.proved else 1

"""An application writing while a test runs: a producer thread that commits transactions.

What a transaction writes is the test's (a callable given the transaction's number); the thread's
life is written here once: how many transactions and how far apart, stopping, a deadlock run
again as an application would, and errors kept for the test to report, never swallowed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import sqlalchemy as sa

#: PostgreSQL's deadlock_detected: the transaction was rolled back whole; an application runs it
#: again.
DEADLOCK = "40P01"


class Producer(threading.Thread):
    """Commits ``transaction(0)``, ``transaction(1)``, ... on a thread of its own (each call runs
    and commits one transaction of the application), ``transactions`` times or, without a count,
    until :meth:`stop`; ``pause`` seconds (or ``pause()``, drawn each time) after each.

    ``committed`` counts the transactions committed. A transaction PostgreSQL aborts as
    deadlocked is run again up to ``deadlock_retries`` times (counted in ``deadlocks``); any other
    error ends the thread and is kept in ``errors``.
    """

    def __init__(
        self,
        transaction: Callable[[int], object],
        *,
        transactions: int | None = None,
        pause: float | Callable[[], float] = 0.0,
        deadlock_retries: int = 0,
        name: str = "producer",
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.transaction = transaction
        self.transactions = transactions
        self.pause: Callable[[], float]
        if callable(pause):
            self.pause = pause
        else:
            seconds = pause
            self.pause = lambda: seconds
        self.deadlock_retries = deadlock_retries
        self.committed = 0
        self.deadlocks = 0
        self.errors: list[BaseException] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while self.transactions is None or self.committed < self.transactions:
            if self._halt.is_set():
                return
            try:
                self._run(self.committed)
            except BaseException as exc:  # reported by the test, never swallowed
                self.errors.append(exc)
                return
            self.committed += 1
            self._halt.wait(self.pause())

    def _run(self, number: int) -> None:
        """Transaction ``number``, run again while PostgreSQL aborts it as deadlocked."""
        for attempt in range(self.deadlock_retries + 1):
            try:
                self.transaction(number)
                return
            except sa.exc.OperationalError as exc:
                deadlocked = getattr(exc.orig, "sqlstate", None) == DEADLOCK
                if not deadlocked or attempt == self.deadlock_retries:
                    raise
                self.deadlocks += 1

    def stop(self) -> None:
        """No further transaction; wait for the one under way."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout=60)

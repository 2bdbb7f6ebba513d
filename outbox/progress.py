"""Progress of long work (a replay of many rows) on stderr, for the operator who started it.

On a terminal the line is rewritten in place; into a file or a pipe (a log), the first step, a
line every few seconds and the last are written, so a million-row replay does not become a
thousand-line log.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    """``replayed 12,000 of 1,000,000 (1%)``, updated by :meth:`update` and ended by :meth:`done`."""

    def __init__(
        self,
        verb: str,
        total: int,
        *,
        out: TextIO | None = None,
        every: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.verb = verb
        self.total = total
        self.out = sys.stderr if out is None else out
        self.every = every
        self.clock = clock
        self.in_place = self.out.isatty()
        self.count = 0
        self._last_written: float | None = None
        self._last_count: int | None = None

    def line(self) -> str:
        share = f" ({self.count / self.total:.0%})" if self.total else ""
        return f"{self.verb} {self.count:,} of {self.total:,}{share}"

    def update(self, count: int) -> None:
        self.count = count
        now = self.clock()
        if self.in_place:
            self.out.write("\r" + self.line())
        elif self._last_written is None or now - self._last_written >= self.every:
            self.out.write(self.line() + "\n")
        else:
            return
        self._last_written, self._last_count = now, count
        self.out.flush()

    def done(self) -> None:
        """The last figure, always shown (and the terminal line ended)."""
        if self.in_place:
            self.out.write("\r" + self.line() + "\n")
        elif self._last_count != self.count:
            self.out.write(self.line() + "\n")
        self.out.flush()

"""Waiting for something another thread or process does: poll until it is so, fail if it never is.

Every wait has a deadline, so a test that would hang fails instead, saying what it waited for and
the last value it saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: How long a wait may take unless the caller says otherwise (never reached when things work).
WAIT_SECONDS = 30.0
#: Often enough that a test does not idle long after the condition came true, seldom enough that
#: a check reading the database or a server does not load it.
POLL_SECONDS = 0.05


class WaitTimeout(AssertionError):
    """A wait ran out of time; the message says what was awaited and the last value seen."""


def wait_until(
    check: Callable[[], T],
    what: str,
    *,
    timeout: float = WAIT_SECONDS,
    interval: float = POLL_SECONDS,
) -> T:
    """Call ``check`` until it returns something truthy and return that; raise
    :class:`WaitTimeout` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")
        time.sleep(interval)

"""Retry policy: when a row is tried again, when it gives up, and when the whole worker pauses.

Per-row delays come from a ``tenacity`` wait strategy (exponential, jittered, capped), never shorter
than the server's ``Retry-After``. The :class:`EndpointBreaker` pauses the whole worker while the
endpoint is down, so an outage costs each event at most a few attempts instead of one per poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import tenacity

#: A Retry-After longer than this is treated as this (a server asking for hours is misbehaving).
MAX_RETRY_AFTER = 3600.0


@dataclass(frozen=True)
class RetryPolicy:
    min_delay: float = 1.0
    max_delay: float = 300.0
    max_attempts: int = 25
    max_age: float = 24 * 3600.0

    def __post_init__(self) -> None:
        if not 0 < self.min_delay <= self.max_delay:
            raise ValueError("backoff bounds must satisfy 0 < min <= max")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.max_age <= 0:
            raise ValueError("max_age must be positive")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds before attempt ``attempt + 1``, given that ``attempt`` (1-based) just failed."""
        # Exponential from min_delay, capped at max_delay, plus up to min_delay of jitter so
        # rows that failed together do not come back together.
        wait = tenacity.wait_exponential(
            multiplier=self.min_delay, max=self.max_delay
        ) + tenacity.wait_random(0, self.min_delay)
        state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = max(1, attempt)
        delay = float(wait(state))
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
        return delay

    def give_up_reason(self, attempts: int, age_seconds: float) -> str | None:
        """Why a row that just failed should be dead-lettered, or None to retry it."""
        if attempts >= self.max_attempts:
            return f"gave up after {attempts} attempts"
        if age_seconds >= self.max_age:
            return f"gave up after {age_seconds:.0f} s (max age {self.max_age:.0f} s)"
        return None


class EndpointBreaker:
    """A worker-wide circuit breaker over the publish endpoint.

    Closed: publish freely. After ``threshold`` consecutive endpoint failures it opens and the
    worker claims nothing until the pause ends; then, still ``tripped``, it lets one small probe
    through. A success closes it; a failure re-opens it with a longer pause. ``reason`` says why
    it last opened (for the log). The clock is injectable (``tests/test_plan.py`` steps it).
    """

    def __init__(
        self, policy: RetryPolicy, threshold: int = 3, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._policy = policy
        self._threshold = threshold
        self._clock = clock
        self._consecutive = 0
        self._openings = 0
        self._open_until = 0.0
        self.reason = ""
        #: Whether the endpoint's last answer was a success. A fresh worker knows nothing yet.
        self.serving = False

    @property
    def is_open(self) -> bool:
        return self._consecutive >= self._threshold and self._clock() < self._open_until

    @property
    def tripped(self) -> bool:
        """True while the endpoint is considered down (open or probing)."""
        return self._consecutive >= self._threshold

    @property
    def failing(self) -> bool:
        """True while the endpoint's latest answer was a failure, with no success since (fewer
        than ``threshold`` failures included: tripped or not, it is not publishing now)."""
        return self._consecutive > 0

    def record_success(self) -> None:
        self.serving = True
        self._consecutive = 0
        self._openings = 0
        self._open_until = 0.0
        self.reason = ""

    def record_failure(self, reason: str, retry_after: float | None = None) -> float | None:
        """Count one endpoint failure; returns the pause in seconds when this opens the breaker.

        Failures of requests that were already in flight when the breaker opened do not open it
        again: one burst of concurrent failures is one opening, not a stretched pause.
        """
        self.serving = False
        if self.is_open:
            return None
        self._consecutive += 1
        self.reason = reason
        if self._consecutive < self._threshold:
            return None
        self._openings += 1
        pause = self._policy.delay(self._openings, retry_after)
        self._open_until = self._clock() + pause
        return pause

    def observe(self, failures: Sequence[tuple[str, float | None]], served: bool) -> float | None:
        """Count one claim's failed requests (reason, Retry-After), or its success.

        Every failed request counts, not one per claim: a failed batch comes back as many rows
        sent alone, and the breaker must open within the first wave of them, not after several
        waves have each cost every row an attempt. Returns the pause when this opens it.
        """
        for reason, retry_after in failures:
            pause = self.record_failure(reason, retry_after)
            if pause is not None:
                return pause
        if not failures and served:
            self.record_success()
        return None

    def pause_for(self, seconds: float, reason: str) -> None:
        """Open for a fixed time (misconfiguration: retry slowly, whatever the count)."""
        self.serving = False
        self._consecutive = max(self._consecutive, self._threshold)
        self._open_until = self._clock() + seconds
        self.reason = reason

    async def wait_closed(self, stopping: asyncio.Event) -> None:
        """Sleep while open; return early if ``stopping`` is set."""
        while self.is_open and not stopping.is_set():
            remaining = self._open_until - self._clock()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=max(0.01, remaining))

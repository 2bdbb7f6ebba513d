"""A worker's side work: taking back expired leases and trimming published history.

Both run beside the claim loop (the worker supervises the task: if it dies, the worker stops
loudly). A database error skips one round; the next round tries again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable

import sqlalchemy as sa

from .database import short_error
from .drivers import Driver

log = logging.getLogger("outbox.worker")

#: Retention deletes published rows in pages of this many, one short transaction each ...
TRIM_PAGE = 5_000
#: ... and looks again this often (seconds) once it has caught up.
TRIM_INTERVAL = 30.0


class Maintenance:
    """Reclaims expired leases every ``reclaim_interval`` and applies the retention."""

    def __init__(
        self,
        driver: Driver,
        *,
        lease_seconds: float,
        retention_seconds: float,
        on_reclaimed: Callable[[int], None] = lambda rows: None,
        on_due: Callable[[], None] = lambda: None,
    ) -> None:
        self.driver = driver
        self.retention_seconds = retention_seconds
        self.reclaim_interval = max(0.5, min(lease_seconds / 4, 15.0))
        self._on_reclaimed = on_reclaimed
        self._on_due = on_due

    async def run(self, stopping: Callable[[], bool]) -> None:
        """Forever (until cancelled): trim when due, then reclaim, every ``reclaim_interval``."""
        next_trim = 0.0
        while True:
            if self.retention_seconds and time.monotonic() >= next_trim:
                await self.trim_published(stopping)
                next_trim = time.monotonic() + TRIM_INTERVAL
            await asyncio.sleep(self.reclaim_interval)
            await self.reclaim_expired()

    async def reclaim_expired(self) -> int:
        """Return rows whose lease expired to pending (a killed worker's); returns how many.

        Also makes due the mutations whose message went out while their producer was committing
        (:meth:`~outbox.drivers.base.Driver.mutations_wake_stranded`)."""
        try:
            reclaimed = await self.driver.events_reclaim_expired()
            woken = await self.driver.mutations_wake_stranded()
        except sa.exc.DBAPIError as exc:
            log.warning("could not reclaim expired leases: %s", short_error(exc))
            return 0
        if reclaimed:
            log.warning("reclaimed %d row(s) whose lease expired", reclaimed)
            self._on_reclaimed(reclaimed)
        if woken:
            log.info("%d mutation(s) whose message went out are due", woken)
            self._on_due()
        return reclaimed

    async def trim_published(self, stopping: Callable[[], bool] = lambda: False) -> int:
        """Delete published rows past the retention, a page per short transaction.

        Pages follow each other as long as they come back full, so retention keeps up with any
        drain rate without one long-running delete holding locks.
        """
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=self.retention_seconds)
        deleted = 0
        while not stopping():
            try:
                page = await self.driver.published_delete_before(cutoff, TRIM_PAGE)
            except sa.exc.DBAPIError as exc:
                log.warning("retention skipped: %s", short_error(exc))
                break
            deleted += page
            if page < TRIM_PAGE:
                break
        if deleted:
            log.info("retention: deleted %d published row(s) older than the retention", deleted)
        return deleted

"""The test server's memory: clock, idempotency caches, delivery record, faults and request counters.

Everything here is thread-safe and knows nothing about HTTP, so the request logic in ``app.py``
reads as a list of Sockudo's rules and the control API in ``http.py`` only serializes.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

#: The value Sockudo stores under a claimed key until the publish finishes.
PROCESSING = "__processing__"


class Clock:
    """Wall-clock seconds plus an offset tests can advance, so TTLs expire without sleeping."""

    def __init__(self, time_func: Callable[[], float] = time.time) -> None:
        self._time_func = time_func
        self._offset = 0.0
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._time_func() + self._offset

    def advance(self, seconds: float) -> float:
        with self._lock:
            self._offset += seconds
            return self._time_func() + self._offset


class ExpiringCache:
    """Sockudo's cache manager, reduced to what publishing uses: get, set-if-absent, set, remove.

    Entries expire at ``clock.now() + ttl``; an expired entry is indistinguishable from an absent
    one, exactly like a Redis key whose TTL ran out.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._entries: dict[str, tuple[Any, float]] = {}
        self._lock = threading.Lock()

    def _live(self, key: str) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, expires_at = entry
        if self._clock.now() >= expires_at:
            del self._entries[key]
            return None
        return value

    def get(self, key: str) -> Any | None:
        with self._lock:
            return self._live(key)

    def set_if_absent(self, key: str, value: Any, ttl: float) -> bool:
        with self._lock:
            if self._live(key) is not None:
                return False
            self._entries[key] = (value, self._clock.now() + ttl)
            return True

    def set(self, key: str, value: Any, ttl: float) -> None:
        with self._lock:
            self._entries[key] = (value, self._clock.now() + ttl)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


@dataclass(frozen=True)
class Delivery:
    """One event as subscribers of one channel received it."""

    seq: int
    time: float
    channel: str
    name: str
    data: str
    socket_id: str | None = None
    message_id: str | None = None
    idempotency_key: str | None = None
    tags: dict[str, str] | None = None
    extras: dict[str, Any] | None = None
    endpoint: str = "events"

    @property
    def identity(self) -> tuple[str, ...]:
        """What makes two deliveries "the same event" when counting duplicates."""
        if self.message_id is not None:
            return ("message_id", self.channel, self.message_id)
        if self.idempotency_key is not None:
            return ("idempotency_key", self.channel, self.idempotency_key)
        return ("content", self.channel, self.name, self.data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Delivery:
        return cls(**raw)


class DeliveryLog:
    def __init__(self) -> None:
        self._items: list[Delivery] = []
        self._lock = threading.Lock()

    def record(self, clock: Clock, **fields: Any) -> Delivery:
        with self._lock:
            delivery = Delivery(seq=len(self._items) + 1, time=clock.now(), **fields)
            self._items.append(delivery)
            return delivery

    def list(self, channel: str | None = None) -> list[Delivery]:
        with self._lock:
            return [d for d in self._items if channel is None or d.channel == channel]

    def duplicates(self) -> dict[tuple[str, ...], int]:
        counts = Counter(d.identity for d in self.list())
        return {identity: n for identity, n in counts.items() if n > 1}

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


@dataclass
class Fault:
    """One armed fault. ``remaining=None`` means "until cleared"."""

    kind: str  # "fail" | "drop" | "latency" | "batch_item"
    stage: str = "claimed"  # "received" | "claimed" | "published"
    remaining: int | None = 1
    status: int = 500
    code: str = "internal_error"
    message: str = "Internal server error"
    retry_after: int | None = None
    seconds: float = 0.0
    index: int = 0
    endpoints: tuple[str, ...] = ("events", "batch_events")


STAGES = ("received", "claimed", "published")


@dataclass
class RateLimit:
    per_second: int
    retry_after: int = 1
    accepted: dict[str, deque[float]] = field(default_factory=dict)


class Faults:
    """Armed faults; each request takes the ones matching its endpoint and stage."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._rate_limit: RateLimit | None = None
        self._lock = threading.Lock()

    def add(self, fault: Fault) -> None:
        if fault.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, not {fault.stage!r}")
        with self._lock:
            self._faults.append(fault)

    def take(self, kind: str, stage: str, endpoint: str, index: int | None = None) -> Fault | None:
        """The first armed fault of this kind for this point of a request, consuming one use."""
        with self._lock:
            for fault in self._faults:
                if (
                    fault.kind == kind
                    and endpoint in fault.endpoints
                    and (kind == "batch_item" or fault.stage == stage)
                    and (index is None or fault.index == index)
                ):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    return fault
        return None

    def set_rate_limit(self, per_second: int | None, retry_after: int = 1) -> None:
        with self._lock:
            self._rate_limit = None if per_second is None else RateLimit(per_second, retry_after)

    def over_rate_limit(self, client: str) -> int | None:
        """``Retry-After`` seconds when ``client`` had ``per_second`` requests accepted in the last
        second, else None (and this request counts as accepted).

        A sliding window on the real monotonic clock: rate limiting is about how fast a client
        hammers the server, which the test clock must not distort.
        """
        with self._lock:
            limit = self._rate_limit
            if limit is None:
                return None
            now = time.monotonic()
            accepted = limit.accepted.setdefault(client, deque())
            while accepted and now - accepted[0] >= 1.0:
                accepted.popleft()
            if len(accepted) >= limit.per_second:
                return limit.retry_after
            accepted.append(now)
            return None

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "faults": [asdict(f) for f in self._faults],
                "rate_limit": None
                if self._rate_limit is None
                else {
                    "per_second": self._rate_limit.per_second,
                    "retry_after": self._rate_limit.retry_after,
                },
            }

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self._rate_limit = None


@dataclass(frozen=True)
class RequestRecord:
    time: float  # when it was answered
    endpoint: str
    status: int  # 0 = connection dropped without an answer
    client: str
    #: The idempotency keys the request carried (one for /events, one per item of a batch).
    keys: tuple[str, ...] = ()
    received: float = 0.0
    retry_after: int | None = None


class Stats:
    """Requests by endpoint and status, plus a bounded log to check spacing (no hot loop)."""

    def __init__(self, keep: int = 10_000) -> None:
        self._log: deque[RequestRecord] = deque(maxlen=keep)
        self._by_endpoint: Counter[str] = Counter()
        self._by_status: Counter[int] = Counter()
        self._by_both: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()

    def record(
        self,
        endpoint: str,
        status: int,
        client: str,
        keys: tuple[str, ...] = (),
        received: float | None = None,
        retry_after: int | None = None,
    ) -> None:
        now = time.time()
        record = RequestRecord(
            now, endpoint, status, client, keys, now if received is None else received, retry_after
        )
        with self._lock:
            self._log.append(record)
            self._by_endpoint[endpoint] += 1
            self._by_status[status] += 1
            self._by_both[(endpoint, status)] += 1

    def count(self, endpoint: str | None = None, status: int | None = None) -> int:
        with self._lock:
            return sum(
                n
                for (e, s), n in self._by_both.items()
                if (endpoint is None or e == endpoint) and (status is None or s == status)
            )

    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._log)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            by_endpoint_status: dict[str, dict[str, int]] = {}
            for (endpoint, status), n in self._by_both.items():
                by_endpoint_status.setdefault(endpoint, {})[str(status)] = n
            return {
                "total": sum(self._by_endpoint.values()),
                "by_endpoint": dict(self._by_endpoint),
                "by_status": {str(s): n for s, n in self._by_status.items()},
                "by_endpoint_status": by_endpoint_status,
            }

    def clear(self) -> None:
        with self._lock:
            self._log.clear()
            self._by_endpoint.clear()
            self._by_status.clear()
            self._by_both.clear()

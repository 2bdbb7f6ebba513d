"""What ``outbox demo`` proves, decided from what it recorded: plain values in, claims out.

Nothing here does I/O, so each claim is tested with made-up records, including wrong ones (a
duplicate, a rolled-back event delivered, a payload seen in plain) that must make it fail.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ..sockudo.crypto import is_encrypted_channel, open_sealed
from ..sockudo.errors import SockudoError


@dataclass(frozen=True)
class Transaction:
    """One transaction of the demo's producer: an order row and its event, committed or not."""

    order: int
    channel: str
    #: The event's data exactly as enqueued (JSON text; sent as is).
    data: str
    committed: bool
    #: When the transaction was told to commit (or rolled back), ``time.time()``.
    at: float
    #: The one event made bigger than the server's payload limit.
    oversized: bool = False


@dataclass(frozen=True)
class Seen:
    """One event as the server delivered it to its channel (or a subscriber received it)."""

    channel: str
    data: str
    at: float


@dataclass(frozen=True)
class Refusal:
    """What happened to the oversized event: the outbox's reason once it was dead, the replay."""

    #: The error the outbox recorded for the dead row (None: it was never seen dead).
    reason: str | None
    #: Rows the replay put back in line.
    replayed: int
    replayed_at: float | None


@dataclass(frozen=True)
class Facts:
    transactions: Sequence[Transaction]
    seen: Sequence[Seen]
    master_key: bytes
    #: The outbox's own counts per state at the end (``outbox.admin.status``).
    counts: dict[str, int]
    #: None when the run had no refused event (against another Sockudo, whose limits stay).
    refusal: Refusal | None


@dataclass(frozen=True)
class Claim:
    holds: bool
    text: str


def order_of(seen: Seen, master_key: bytes) -> int | None:
    """The order number inside a delivered event (opening it on an encrypted channel), or None."""
    data = seen.data
    if is_encrypted_channel(seen.channel):
        try:
            data = open_sealed(seen.channel, data, master_key)
        except SockudoError:
            return None
    try:
        order = json.loads(data)["order"]
    except (ValueError, KeyError, TypeError):
        return None
    return order if isinstance(order, int) else None


def prove(facts: Facts) -> list[Claim]:
    """Every claim the demo makes, each saying whether the records bear it out."""
    claims = [_committed_once(facts), _rolled_back_never(facts)]
    if facts.refusal is not None:
        claims.append(_refused_then_replayed(facts, facts.refusal))
    claims += [_encrypted_never_plain(facts), _outbox_settled(facts)]
    return claims


def _deliveries_per_order(facts: Facts) -> tuple[Counter[int], int]:
    """How many times each (order, its channel) was seen, and how many deliveries match none."""
    channels = {t.order: t.channel for t in facts.transactions}
    counts: Counter[int] = Counter()
    strangers = 0
    for seen in facts.seen:
        order = order_of(seen, facts.master_key)
        if order is None or channels.get(order) != seen.channel:
            strangers += 1
        else:
            counts[order] += 1
    return counts, strangers


def _committed_once(facts: Facts) -> Claim:
    committed = [t.order for t in facts.transactions if t.committed]
    counts, strangers = _deliveries_per_order(facts)
    missing = [o for o in committed if counts[o] == 0]
    repeated = [o for o in committed if counts[o] > 1]
    text = f"committed {len(committed)} events in their transactions: each delivered exactly once"
    problems = []
    if missing:
        problems.append(f"never delivered: orders {_few(missing)}")
    if repeated:
        problems.append(f"delivered more than once: orders {_few(repeated)}")
    if strangers:
        problems.append(f"{strangers} deliveries of events the demo never committed")
    if problems or not committed:
        return Claim(False, f"{text} - NO: {'; '.join(problems) or 'nothing was committed'}")
    return Claim(True, text)


def _rolled_back_never(facts: Facts) -> Claim:
    rolled_back = [t.order for t in facts.transactions if not t.committed]
    counts, _ = _deliveries_per_order(facts)
    delivered = [o for o in rolled_back if counts[o]]
    text = f"rolled back {len(rolled_back)} transactions: none of their events was ever delivered"
    if delivered:
        return Claim(False, f"{text} - NO: delivered orders {_few(delivered)}")
    if not rolled_back:
        return Claim(False, f"{text} - NO: nothing was rolled back")
    return Claim(True, text)


def _refused_then_replayed(facts: Facts, refusal: Refusal) -> Claim:
    oversized = [t for t in facts.transactions if t.oversized and t.committed]
    reason = refusal.reason or "no reason recorded"
    text = (
        f"refused {len(oversized)} event ({reason}): dead with the server's reason, then "
        "delivered once after the replay"
    )
    if len(oversized) != 1:
        return Claim(False, f"{text} - NO: {len(oversized)} oversized events were committed")
    order = oversized[0].order
    times = [s.at for s in facts.seen if order_of(s, facts.master_key) == order]
    problems = []
    if refusal.reason is None:
        problems.append("it was never seen dead")
    if refusal.replayed != 1:
        problems.append(f"the replay put back {refusal.replayed} events")
    if len(times) != 1:
        problems.append(f"delivered {len(times)} times")
    elif refusal.replayed_at is None or times[0] < refusal.replayed_at:
        problems.append("delivered before the replay")
    if problems:
        return Claim(False, f"{text} - NO: {'; '.join(problems)}")
    return Claim(True, text)


def _encrypted_never_plain(facts: Facts) -> Claim:
    sent = [t for t in facts.transactions if t.committed and is_encrypted_channel(t.channel)]
    channels = sorted({t.channel for t in sent}) or ["an encrypted channel"]
    text = (
        f"{len(sent)} events to {', '.join(channels)}: the server only ever had ciphertext, "
        "which opens with the master key"
    )
    encrypted_seen = [s for s in facts.seen if is_encrypted_channel(s.channel)]
    sealed = [s for s in encrypted_seen if order_of(s, facts.master_key) is not None]
    leaked = [t.order for t in sent if any(t.data in s.data for s in facts.seen)]
    problems = []
    if leaked:
        problems.append(f"plaintext of orders {_few(leaked)} seen")
    if len(sealed) != len(encrypted_seen):
        problems.append(f"{len(encrypted_seen) - len(sealed)} do not open with the master key")
    if len(sealed) != len(sent):
        problems.append(f"{len(sealed)} sealed deliveries for {len(sent)} events")
    if problems or not sent:
        return Claim(False, f"{text} - NO: {'; '.join(problems) or 'none was sent'}")
    return Claim(True, text)


def _outbox_settled(facts: Facts) -> Claim:
    committed = sum(1 for t in facts.transactions if t.committed)
    counts = facts.counts
    shown = ", ".join(f"{counts.get(s, 0)} {s.replace('_', ' ')}" for s in _STATES)
    text = f"the outbox ends with every committed event published ({shown})"
    settled = counts.get("published", 0) == committed and not any(
        counts.get(s, 0) for s in _STATES if s != "published"
    )
    if not settled:
        return Claim(False, f"{text} - NO: {committed} were committed")
    return Claim(True, text)


_STATES = ("published", "pending", "in_flight", "dead")


def latencies(facts: Facts) -> list[float]:
    """Seconds from commit to delivery of each committed event delivered once (the oversized one
    aside: its delivery waited for the replay)."""
    first_seen: dict[int, float] = {}
    for seen in facts.seen:
        order = order_of(seen, facts.master_key)
        if order is not None and order not in first_seen:
            first_seen[order] = seen.at
    return [
        first_seen[t.order] - t.at
        for t in facts.transactions
        if t.committed and not t.oversized and t.order in first_seen
    ]


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile (``fraction`` 0.5 is the median); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _few(orders: Sequence[int], shown: int = 8) -> str:
    head = ", ".join(str(o) for o in orders[:shown])
    return head + (f" and {len(orders) - shown} more" if len(orders) > shown else "")

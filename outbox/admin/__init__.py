"""Operator queries, one module per job (the CLI, the dashboard and the worker's gauges read
through these; nothing here is on the hot path, so it is portable SQLAlchemy Core):

- :mod:`.status`: what is in the outbox, counts and lags per state (``outbox status``);
- :mod:`.replay`: putting dead or published events back in line, deleting dead ones;
- :mod:`.keys`: parked ordering keys, and the leases workers hold;
- :mod:`.lookup`: one event, searches, the queue, the dead list, the throughput chart;
- :mod:`.selection`: the filters an operator selects events by;
- :mod:`.events`: the three tables (hot, dead, published log) read as one.

Everything is also importable from here (``from outbox import admin; admin.replay(...)``).
"""

from __future__ import annotations

from .events import (
    database_now,
    events,
    hot_state,
    jsonable,
    waits_for_message,
)
from .keys import (
    Lease,
    ParkedKey,
    leases,
    parked_key,
    parked_keys,
    release_leases,
    skip_parked,
)
from .lookup import (
    MAX_ROW_ID,
    WAITING_FOR_ITS_KEY,
    WAITING_FOR_MESSAGE,
    EventRecord,
    QueuedEvent,
    ThroughputBucket,
    dead_events,
    event_record,
    find_events,
    queued_events,
    search_events,
    throughput,
)
from .replay import (
    KEY_FRESH,
    KEY_KEEP,
    REPLAY_PAGE,
    count_elsewhere,
    count_for_replay,
    delete_dead,
    delete_dead_in_pages,
    parked_heads_among,
    replay,
    replay_in_pages,
    select_for_replay,
)
from .selection import (
    EVERY_EVENT,
    FILTER_STATUSES,
    FILTER_TIMES,
    FilterError,
    ReplayFilter,
    filter_error_code,
    filter_time,
    select_matching,
)
from .status import (
    UNSENT_STATES,
    StatusReport,
    snapshot,
    status,
)

__all__ = [
    "EVERY_EVENT",
    "FILTER_STATUSES",
    "FILTER_TIMES",
    "KEY_FRESH",
    "KEY_KEEP",
    "MAX_ROW_ID",
    "REPLAY_PAGE",
    "UNSENT_STATES",
    "WAITING_FOR_ITS_KEY",
    "WAITING_FOR_MESSAGE",
    "EventRecord",
    "FilterError",
    "Lease",
    "ParkedKey",
    "QueuedEvent",
    "ReplayFilter",
    "StatusReport",
    "ThroughputBucket",
    "count_elsewhere",
    "count_for_replay",
    "database_now",
    "dead_events",
    "delete_dead",
    "delete_dead_in_pages",
    "event_record",
    "events",
    "filter_error_code",
    "filter_time",
    "find_events",
    "hot_state",
    "jsonable",
    "leases",
    "parked_heads_among",
    "parked_key",
    "parked_keys",
    "queued_events",
    "release_leases",
    "replay",
    "replay_in_pages",
    "search_events",
    "select_for_replay",
    "select_matching",
    "skip_parked",
    "snapshot",
    "status",
    "throughput",
    "waits_for_message",
]

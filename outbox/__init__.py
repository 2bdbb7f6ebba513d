"""sockudo-outbox: a transactional outbox publisher for Sockudo.

Write events in your own transaction with :func:`enqueue`; run ``outbox worker`` (or
``python worker.py``) to publish them through Sockudo's signed HTTP API.
"""

from . import mutations
from .enqueue import BY_CHANNEL, OutboxEvent, derive_channel_key, enqueue, enqueue_many
from .schema import DEFAULT_TABLE_NAME, Status, metadata_for, outbox_table
from .sockudo.errors import InvalidEvent

__version__ = "0.1.0"

__all__ = [
    "BY_CHANNEL",
    "DEFAULT_TABLE_NAME",
    "InvalidEvent",
    "OutboxEvent",
    "Status",
    "derive_channel_key",
    "enqueue",
    "enqueue_many",
    "metadata_for",
    "mutations",
    "outbox_table",
]

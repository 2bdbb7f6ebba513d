"""The test server's configuration: one app, its limits and its feature switches."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerConfig:
    """One app and its limits. Defaults are a Sockudo app defined by ``SOCKUDO_DEFAULT_APP_*``."""

    app_id: str = "app-id"
    key: str = "app-key"
    secret: str = field(default="app-secret", repr=False)
    max_batch_size: int = 100
    max_payload_kb: int = 100
    max_event_name_bytes: int = 100
    max_channel_name_bytes: int = 100
    max_channels_per_event: int = 100
    namespaces: frozenset[str] = frozenset()
    idempotency: bool = True
    idempotency_ttl: float = 120.0
    idempotency_max_key_bytes: int = 128
    timestamp_window: int = 600
    #: How long a repeat waits for an in-flight first request before 503 (Sockudo: 6 x 50 ms).
    inflight_wait: float = 0.3
    #: How long a same-payload (channel, message_id) repeat waits (Sockudo: 40 x 25 ms).
    message_id_wait: float = 1.0
    # Feature switches, all off by default as in Sockudo (each answers 422 feature_disabled).
    #: ``HISTORY_ENABLED``: durable history, and the history half of mutations and annotations.
    history: bool = False
    #: ``VERSIONED_MESSAGES_ENABLED``: message serials in publish answers, get/versions/mutations.
    versioned_messages: bool = False
    #: ``PRESENCE_HISTORY_ENABLED``.
    presence_history: bool = False
    #: ``ANNOTATIONS_ENABLED`` (global; needs versioned messages, as Sockudo checks at startup).
    annotations: bool = False
    #: ``SOCKUDO_DEFAULT_APP_ANNOTATIONS_ENABLED``: the app's policy (off: 403). It also forces
    #: history on for every channel: without ``history``, every publish then fails with 500.
    app_annotations: bool = False
    history_max_page_size: int = 100
    presence_history_max_page_size: int = 100
    versioned_max_page_size: int = 100
    #: ``INSTANCE_PROCESS_ID``: the node part of message, version and annotation serials.
    node_id: str = "node"

    def __post_init__(self) -> None:
        if self.annotations and not self.versioned_messages:
            raise ValueError("annotations need versioned_messages (a Sockudo startup error)")

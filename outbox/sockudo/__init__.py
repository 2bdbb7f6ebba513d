"""A Sockudo (Pusher-compatible) HTTP client: sync and asyncio, signed, typed, no hidden retries.

from outbox.sockudo import Sockudo

with Sockudo.from_url("http://KEY:SECRET@127.0.0.1:6001/apps/APP_ID") as sockudo:
    result = sockudo.trigger("orders", "order-created", {"id": 42}, message_id="evt-1")
    print(result.channels["orders"].acknowledgement_id)
"""

from .auth import PresenceUser, Webhook, WebhookEvent
from .bodies import Event
from .calls import Call, PreparedRequest
from .client import AsyncSockudo, Sockudo, TriggerOptions
from .config import Config, ConfigError, mask_url
from .errors import (
    ClientMisconfigured,
    CursorExpired,
    EndpointUnavailable,
    EventRefused,
    FeatureDisabled,
    Forbidden,
    InvalidEvent,
    NotAllowed,
    NotFound,
    PublishFailed,
    SockudoError,
    Unsupported,
    WebhookInvalid,
)
from .models import (
    AnnotationDeleted,
    AnnotationEvent,
    AnnotationPage,
    AnnotationPublished,
    AnnotationSummary,
    ChannelInfo,
    ChannelList,
    ChannelUsers,
    HistoryBounds,
    HistoryItem,
    HistoryPage,
    Message,
    MessageVersion,
    MessageVersionsPage,
    MutationResult,
    OperatorResult,
    Page,
    PresenceEvent,
    PresenceHistoryPage,
    PresenceSnapshot,
    StreamState,
)
from .params import (
    AnnotationEventsParams,
    ChannelParams,
    ChannelsParams,
    HistoryParams,
    MessageMutation,
    MessageVersionsParams,
    PresenceHistoryParams,
    PresenceSnapshotParams,
    PublishAnnotationRequest,
    SockudoOptions,
)
from .responses import ChannelAck, Result, parse_retry_after
from .signing import Signer, body_md5, string_to_sign
from .validation import DEFAULT_LIMITS, Limits

__all__ = [
    "DEFAULT_LIMITS",
    "AnnotationDeleted",
    "AnnotationEvent",
    "AnnotationEventsParams",
    "AnnotationPage",
    "AnnotationPublished",
    "AnnotationSummary",
    "AsyncSockudo",
    "Call",
    "ChannelAck",
    "ChannelInfo",
    "ChannelList",
    "ChannelParams",
    "ChannelUsers",
    "ChannelsParams",
    "ClientMisconfigured",
    "Config",
    "ConfigError",
    "CursorExpired",
    "EndpointUnavailable",
    "Event",
    "EventRefused",
    "FeatureDisabled",
    "Forbidden",
    "HistoryBounds",
    "HistoryItem",
    "HistoryPage",
    "HistoryParams",
    "InvalidEvent",
    "Limits",
    "Message",
    "MessageMutation",
    "MessageVersion",
    "MessageVersionsPage",
    "MessageVersionsParams",
    "MutationResult",
    "NotAllowed",
    "NotFound",
    "OperatorResult",
    "Page",
    "PreparedRequest",
    "PresenceEvent",
    "PresenceHistoryPage",
    "PresenceHistoryParams",
    "PresenceSnapshot",
    "PresenceSnapshotParams",
    "PresenceUser",
    "PublishAnnotationRequest",
    "PublishFailed",
    "Result",
    "Signer",
    "Sockudo",
    "SockudoError",
    "SockudoOptions",
    "StreamState",
    "TriggerOptions",
    "Unsupported",
    "Webhook",
    "WebhookEvent",
    "WebhookInvalid",
    "body_md5",
    "mask_url",
    "parse_retry_after",
    "string_to_sign",
]

"""A Sockudo (Pusher-compatible) HTTP client: sync and asyncio, signed, typed, no hidden retries.

from outbox.sockudo import Sockudo

with Sockudo.from_url("http://KEY:SECRET@127.0.0.1:6001/apps/APP_ID") as sockudo:
    result = sockudo.trigger("orders", "order-created", {"id": 42}, message_id="evt-1")
    print(result.channels["orders"].acknowledgement_id)
"""

from .auth import PresenceUser, Webhook, WebhookEvent
from .client import AsyncSockudo, PreparedRequest, Sockudo, TriggerOptions
from .config import Config, ConfigError, mask_url
from .errors import (
    ClientMisconfigured,
    EndpointUnavailable,
    EventRefused,
    InvalidEvent,
    PublishFailed,
    SockudoError,
    WebhookInvalid,
)
from .events import DEFAULT_LIMITS, Event, Limits
from .responses import ChannelAck, Result, parse_retry_after
from .signing import Signer, body_md5, string_to_sign

__all__ = [
    "DEFAULT_LIMITS",
    "AsyncSockudo",
    "ChannelAck",
    "ClientMisconfigured",
    "Config",
    "ConfigError",
    "EndpointUnavailable",
    "Event",
    "EventRefused",
    "InvalidEvent",
    "Limits",
    "PreparedRequest",
    "PresenceUser",
    "PublishFailed",
    "Result",
    "Signer",
    "Sockudo",
    "SockudoError",
    "TriggerOptions",
    "Webhook",
    "WebhookEvent",
    "WebhookInvalid",
    "body_md5",
    "mask_url",
    "parse_retry_after",
    "string_to_sign",
]

"""Channel authorization, user authentication and webhooks: what every subscribing app needs.

Pure functions of a :class:`Config`; the clients expose them as methods.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import crypto
from .config import Config
from .errors import InvalidEvent, SockudoError, WebhookInvalid
from .signing import hmac_sha256_hex
from .validation import CHANNEL_NAME_RE

_SOCKET_ID_RE = re.compile(r"^[0-9]+\.[0-9]+\Z")


@dataclass(frozen=True)
class PresenceUser:
    """The member a presence channel announces: ``user_id`` plus optional public ``user_info``."""

    user_id: str | int
    user_info: Mapping[str, Any] | None = None

    def channel_data(self) -> str:
        payload: dict[str, Any] = {"user_id": self.user_id}
        if self.user_info is not None:
            payload["user_info"] = dict(self.user_info)
        return _compact(payload)


@dataclass(frozen=True)
class WebhookEvent:
    """One event of a webhook; ``data`` is decrypted for encrypted channels."""

    name: str
    channel: str | None = None
    event: str | None = None
    data: str | None = None
    socket_id: str | None = None
    user_id: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Webhook:
    time_ms: int
    events: tuple[WebhookEvent, ...]


def authenticate(
    config: Config,
    socket_id: str,
    channel: str,
    presence_user: PresenceUser | Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The JSON object a subscriber sends to authorize ``channel``.

    Presence channels need ``presence_user`` (its ``channel_data`` is signed too); encrypted channels
    also get ``shared_secret``, the channel's key, which needs the encryption master key.
    """
    _check_socket_id(socket_id)
    if not isinstance(channel, str) or not CHANNEL_NAME_RE.match(channel):
        raise InvalidEvent(f"invalid channel name {channel!r}", field="channel")
    is_presence = channel.startswith("presence-")
    if is_presence and presence_user is None:
        raise InvalidEvent("a presence channel needs presence_user", field="presence_user")
    if not is_presence and presence_user is not None:
        raise InvalidEvent("presence_user is only for presence- channels", field="presence_user")
    result: dict[str, str] = {}
    to_sign = f"{socket_id}:{channel}"
    if presence_user is not None:
        if not isinstance(presence_user, PresenceUser) and not presence_user.get("user_id"):
            raise InvalidEvent("presence_user needs a 'user_id'", field="presence_user")
        user = (
            presence_user
            if isinstance(presence_user, PresenceUser)
            else PresenceUser(presence_user["user_id"], presence_user.get("user_info"))
        )
        result["channel_data"] = user.channel_data()
        to_sign = f"{to_sign}:{result['channel_data']}"
    result = {"auth": f"{config.key}:{hmac_sha256_hex(config.secret, to_sign)}", **result}
    if crypto.is_encrypted_channel(channel):
        master_key = config.master_key
        if master_key is None:
            raise InvalidEvent(
                "authorizing a private-encrypted- channel needs the encryption master key",
                field="channel",
            )
        shared = crypto.channel_key(channel, master_key)
        result["shared_secret"] = base64.b64encode(shared).decode("ascii")
    return result


def authenticate_user(config: Config, socket_id: str, user: Mapping[str, Any]) -> dict[str, str]:
    """The response to a ``pusher:signin`` request: ``auth`` and the ``user_data`` it signs."""
    _check_socket_id(socket_id)
    if not isinstance(user, Mapping) or not user.get("id"):
        raise InvalidEvent("user must be a mapping with a non-empty 'id'", field="user")
    user_data = _compact(dict(user))
    signature = hmac_sha256_hex(config.secret, f"{socket_id}::user::{user_data}")
    return {"auth": f"{config.key}:{signature}", "user_data": user_data}


def validate_webhook_signature(config: Config, key: str, signature: str, body: bytes | str) -> bool:
    """True when ``X-Pusher-Key`` is ours and ``X-Pusher-Signature`` signs ``body`` (constant time)."""
    raw = body.encode("utf-8") if isinstance(body, str) else body
    expected = hmac_sha256_hex(config.secret, raw)
    key_ok = hmac.compare_digest(str(key).encode(), config.key.encode())
    signature_ok = hmac.compare_digest(str(signature).encode(), expected.encode())
    return key_ok and signature_ok


def parse_webhook(config: Config, key: str, signature: str, body: bytes | str) -> Webhook:
    """Verify and parse a webhook; events of encrypted channels come back decrypted."""
    if not validate_webhook_signature(config, key, signature, body):
        raise WebhookInvalid("webhook key or signature does not match this app")
    try:
        payload = json.loads(body)
        time_ms = int(payload["time_ms"])
        items = payload["events"]
        if not isinstance(items, list):
            raise TypeError("events is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        raise WebhookInvalid(f"webhook body is not a valid webhook: {exc}") from exc
    return Webhook(time_ms, tuple(_webhook_event(config, item) for item in items))


def _webhook_event(config: Config, item: Any) -> WebhookEvent:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise WebhookInvalid("webhook event without a name")
    data = item.get("data")
    channel = item.get("channel")
    if isinstance(channel, str) and crypto.is_encrypted_channel(channel) and data is not None:
        master_key = config.master_key
        if master_key is None:
            raise WebhookInvalid("encrypted webhook event but no encryption master key is set")
        try:
            data = crypto.open_sealed(channel, str(data), master_key)
        except SockudoError as exc:
            raise WebhookInvalid(str(exc)) from exc
    return WebhookEvent(
        name=item["name"],
        channel=channel,
        event=item.get("event"),
        data=data,
        socket_id=item.get("socket_id"),
        user_id=item.get("user_id"),
        raw=item,
    )


def _check_socket_id(socket_id: str) -> None:
    if not isinstance(socket_id, str) or not _SOCKET_ID_RE.match(socket_id):
        raise InvalidEvent(f"invalid socket_id {socket_id!r}", field="socket_id")


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

"""What Sockudo would refuse in a publish, checked before a request or a row exists.

Channel names (characters, length, namespace, the ``#`` syntax), an event's fields and sizes
against an app's :class:`Limits` (the sealed size of an encrypted channel's data included), and
the sent form of ``data``. Pure code shared by the sync and async clients, ``outbox.enqueue`` and
``outbox.mutations``: what is refused here, the server would refuse at every attempt.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import crypto
from .errors import InvalidEvent
from .jsontext import compact_json

#: Characters Sockudo accepts in a channel name (``:`` opens a namespace, ``#`` a user-limited channel).
CHANNEL_NAME_RE = re.compile(r"^[A-Za-z0-9\-_=@,;.:#]+\Z")
SERVER_TO_USER_PREFIX = "#server-to-user-"
MAX_IDEMPOTENCY_KEY_BYTES = 128


@dataclass(frozen=True)
class Limits:
    """An app's publish limits; the defaults are Sockudo's for an app defined by environment.

    ``namespaces`` are the channel namespaces the app configures (``orders`` allows
    ``orders:eu``); ``user_limited_namespaces`` those of them that allow user-limited channels
    (``orders:42#alice``). An app defined by environment variables can configure neither.
    """

    max_channels_per_event: int = 100
    max_batch_size: int = 100
    max_payload_bytes: int = 100 * 1024
    max_event_name_bytes: int = 100
    max_channel_name_bytes: int = 100
    max_idempotency_key_bytes: int = MAX_IDEMPOTENCY_KEY_BYTES
    namespaces: frozenset[str] = frozenset()
    user_limited_namespaces: frozenset[str] = frozenset()


DEFAULT_LIMITS = Limits()


def encode_data(data: Any) -> str:
    """``data`` as sent: a ``str`` as is, anything else JSON-encoded once, compactly."""
    if isinstance(data, str):
        return data
    try:
        return compact_json(data)
    except (TypeError, ValueError) as exc:
        raise InvalidEvent(f"data is not JSON-serializable: {exc}", field="data") from exc


def check_text(value: object, field: str) -> str:
    """A non-empty ``str`` that is valid Unicode without NUL bytes, or :class:`InvalidEvent`."""
    if not isinstance(value, str):
        raise InvalidEvent(f"{field} must be a string, got {type(value).__name__}", field=field)
    if not value:
        raise InvalidEvent(f"{field} must not be empty", field=field)
    if "\x00" in value:
        raise InvalidEvent(f"{field} must not contain NUL characters", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidEvent(f"{field} is not valid Unicode (lone surrogate)", field=field) from exc
    return value


def utf8_len(value: str) -> int:
    return len(value.encode("utf-8", "surrogatepass"))


#: Channel type prefixes Sockudo strips before reading a namespace, longest first.
CHANNEL_TYPE_PREFIXES = (
    "private-encrypted-cache-",
    "private-cache-",
    "presence-cache-",
    "cache-",
    "private-encrypted-",
    "presence-",
    "private-",
)


def validate_channel_name(channel: object, limits: Limits = DEFAULT_LIMITS) -> str:
    """Check one channel name as Sockudo does (characters, length, namespace, ``#`` syntax)."""
    return _valid_channel_name(check_text(channel, "channel"), limits)


# Bulk enqueues name the same few channels over and over: each name is checked once per limits
# (a refused name raises every time, as exceptions are not cached).
@functools.lru_cache(maxsize=4096)
def _valid_channel_name(name: str, limits: Limits) -> str:
    if utf8_len(name) > limits.max_channel_name_bytes:
        raise InvalidEvent(
            f"channel name is {utf8_len(name)} bytes, over the limit of "
            f"{limits.max_channel_name_bytes}: {name[:40]!r}...",
            field="channel",
        )
    if not CHANNEL_NAME_RE.match(name):
        raise InvalidEvent(
            f"invalid channel name {name!r}: allowed are A-Z a-z 0-9 and - _ = @ , ; . : #",
            field="channel",
        )
    logical = next((name[len(p) :] for p in CHANNEL_TYPE_PREFIXES if name.startswith(p)), name)
    base, user_limited, _users = logical.partition("#")
    namespace = base.split(":", 1)[0] if ":" in base else None
    if namespace is not None and namespace not in limits.namespaces:
        raise InvalidEvent(
            f"channel {name!r} is in namespace {namespace!r}, which the app does not configure "
            "(Sockudo answers 400; declare it with Limits(namespaces=...))",
            field="channel",
        )
    # "#server-to-user-ID" (nothing before the "#") is send_to_user's channel, not user-limited.
    if user_limited and base and namespace not in limits.user_limited_namespaces:
        raise InvalidEvent(
            f"channel {name!r} uses the user-limited '#' syntax, which needs a namespace that "
            "allows it (Limits(user_limited_namespaces=...))",
            field="channel",
        )
    return name


def validate_channels(channels: Sequence[str], limits: Limits = DEFAULT_LIMITS) -> list[str]:
    """Check the channels of one request: each name, their number, the encrypted-channel rule."""
    if isinstance(channels, str) or not isinstance(channels, Sequence):
        raise InvalidEvent("channels must be a channel name or a list of them", field="channel")
    result = list(channels)
    if not result:
        raise InvalidEvent("at least one channel is required", field="channel")
    if len(result) > limits.max_channels_per_event:
        raise InvalidEvent(
            f"{len(result)} channels is over the limit of {limits.max_channels_per_event}",
            field="channel",
        )
    for channel in result:
        validate_channel_name(channel, limits)
    if len(result) > 1 and any(crypto.is_encrypted_channel(c) for c in result):
        raise InvalidEvent(
            "an event for a private-encrypted- channel must target exactly that one channel",
            field="channel",
        )
    return result


def validate_extras(extras: object) -> dict[str, Any] | None:
    """Check the fields of ``extras`` that Sockudo types (``MessageExtras``); others are opaque.

    A field of the wrong type is a 422 for the whole request, so it is refused here.
    """
    if extras is None:
        return None
    if not isinstance(extras, Mapping):
        raise InvalidEvent("extras must be a mapping", field="extras")
    value = dict(extras)
    problems = []
    if not _flat_map_or_none(value.get("headers"), str | int | float):
        problems.append("headers must map names to strings, numbers or booleans (flat)")
    problems += [
        f"{flag} must be true or false"
        for flag in ("ephemeral", "echo")
        if not isinstance(value.get(flag), bool | None)
    ]
    if not isinstance(value.get("idempotencyKey"), str | None):
        problems.append("idempotencyKey must be a string")
    ai = value.get("ai")
    if ai is not None and not (
        isinstance(ai, Mapping)
        and _flat_map_or_none(ai.get("transport"), str)
        and _flat_map_or_none(ai.get("codec"), str)
    ):
        problems.append("ai.transport and ai.codec must map strings to strings")
    if problems:
        raise InvalidEvent(f"extras.{problems[0]}", field="extras")
    return value


def _flat_map_or_none(value: object, value_types: Any) -> bool:
    return value is None or (
        isinstance(value, Mapping)
        and all(isinstance(k, str) and isinstance(v, value_types) for k, v in value.items())
    )


def validate_event_fields(
    name: str,
    data: str,
    *,
    idempotency_key: str | None = None,
    message_id: str | None = None,
    socket_id: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> None:
    """Check everything Sockudo would refuse about one event besides its channels."""
    _valid_event_name(check_text(name, "event"), limits)
    if not isinstance(data, str):
        raise InvalidEvent("data must be encoded to a string first", field="data")
    try:
        size = len(data.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidEvent("data is not valid Unicode (lone surrogate)", field="data") from exc
    if size > limits.max_payload_bytes:
        raise InvalidEvent(
            f"data is {size} bytes, over the limit of {limits.max_payload_bytes}", field="data"
        )
    for field, value in (("idempotency_key", idempotency_key), ("message_id", message_id)):
        if value is None:
            continue
        check_text(value, field)
        if utf8_len(value) > limits.max_idempotency_key_bytes:
            raise InvalidEvent(
                f"{field} is {utf8_len(value)} bytes, over the limit of "
                f"{limits.max_idempotency_key_bytes}",
                field=field,
            )
    if socket_id is not None:
        check_text(socket_id, "socket_id")


# A bulk enqueue names the same few events over and over (as with channel names, a refused name
# raises every time).
@functools.lru_cache(maxsize=4096)
def _valid_event_name(name: str, limits: Limits) -> str:
    if utf8_len(name) > limits.max_event_name_bytes:
        raise InvalidEvent(
            f"event name is {utf8_len(name)} bytes, over the limit of "
            f"{limits.max_event_name_bytes}",
            field="event",
        )
    return name


@dataclass(frozen=True)
class CheckedEvent:
    """An event every rule Sockudo enforces has accepted, its values in their sent form."""

    channels: list[str]
    name: str
    data: str
    idempotency_key: str | None = None
    message_id: str | None = None
    socket_id: str | None = None
    info: str | None = None
    tags: dict[str, str] | None = None
    extras: dict[str, Any] | None = None

    @property
    def encrypted(self) -> bool:
        return any(crypto.is_encrypted_channel(c) for c in self.channels)


def check_event(
    channels: Sequence[str],
    name: str,
    data: Any,
    *,
    idempotency_key: str | None = None,
    message_id: str | None = None,
    socket_id: str | None = None,
    info: str | Sequence[str] | None = None,
    tags: Mapping[str, str] | None = None,
    extras: Mapping[str, Any] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> CheckedEvent:
    """Check one event as Sockudo would (every channel name, every field, the sealed size).

    The one validation of events: :func:`.bodies.prepare_event` (the client) and ``outbox.enqueue`` both
    call it. Rules about one request (how many channels, an encrypted channel alone) are
    :func:`validate_channels`'s: an outbox row carries one channel.
    """
    if isinstance(channels, str) or not isinstance(channels, Sequence):
        raise InvalidEvent("channels must be a channel name or a list of them", field="channel")
    names = [validate_channel_name(c, limits) for c in channels]
    if not names:
        raise InvalidEvent("at least one channel is required", field="channel")
    text = encode_data(data)
    validate_event_fields(
        name,
        text,
        idempotency_key=idempotency_key,
        message_id=message_id,
        socket_id=socket_id,
        limits=limits,
    )
    checked = CheckedEvent(
        channels=names,
        name=name,
        data=text,
        idempotency_key=idempotency_key,
        message_id=message_id,
        socket_id=socket_id,
        info=check_info(info),
        tags=check_tags(tags),
        extras=validate_extras(extras),
    )
    if checked.encrypted:
        # The server measures the sealed envelope, about 4/3 of the plaintext: refuse here what
        # it would refuse (413) at every attempt.
        sealed = crypto.sealed_size(len(text.encode("utf-8")))
        if sealed > limits.max_payload_bytes:
            raise InvalidEvent(
                f"data is {sealed} bytes once encrypted, over the limit of "
                f"{limits.max_payload_bytes}",
                field="data",
            )
    return checked


def check_info(info: object) -> str | None:
    """``info`` as sent: a comma list (``user_count,subscription_count``) from a str or a list."""
    if info is None:
        return None
    if isinstance(info, str):
        return check_text(info, "info")
    if not isinstance(info, Sequence) or not all(isinstance(i, str) for i in info):
        raise InvalidEvent("info must be a string or a list of strings", field="info")
    return check_text(",".join(check_text(i, "info") for i in info), "info")


def check_tags(tags: object) -> dict[str, str] | None:
    """``tags`` as sent: Sockudo types them as a map of strings to strings."""
    if tags is None:
        return None
    if not isinstance(tags, Mapping):
        raise InvalidEvent("tags must be a mapping", field="tags")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        raise InvalidEvent("tags must map strings to strings", field="tags")
    return dict(tags)

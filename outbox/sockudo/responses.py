"""Turning what came back (an HTTP answer or a transport error) into a result or one exception.

This is the single place where statuses, error codes and transport failures (``httpx`` exceptions,
and the socket errors of the asyncio-streams transport) are classified, so the sync and async
clients and their transports cannot disagree about what a 503 or a dropped connection means.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from .errors import (
    ClientMisconfigured,
    CursorExpired,
    EndpointUnavailable,
    EventRefused,
    FeatureDisabled,
    Forbidden,
    NotFound,
    PublishFailed,
    Unsupported,
)

_REFUSED = frozenset({400, 409, 413, 415, 422})
_MISCONFIGURED = frozenset({401, 404})
_MAX_MESSAGE = 500
_PUBLISH_ROUTES = ("/events", "/batch_events")
#: What turns a feature on, by the start of Sockudo's ``feature_disabled`` message.
FEATURE_SETTINGS = {
    "Durable history": "HISTORY_ENABLED=true",
    "Presence history": "PRESENCE_HISTORY_ENABLED=true",
    "Versioned messages": "VERSIONED_MESSAGES_ENABLED=true",
    "Annotations are disabled globally": "ANNOTATIONS_ENABLED=true",
}
#: The per-app policy behind a 403 "Annotations are disabled by channel policy".
ANNOTATION_POLICY_SETTING = "SOCKUDO_DEFAULT_APP_ANNOTATIONS_ENABLED=true"


@dataclass(frozen=True)
class ChannelAck:
    """What the server reported for one channel (or one batch item)."""

    acknowledgement_id: str | None = None
    message_serial: Any = None
    history_serial: Any = None
    raw: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, value: object) -> ChannelAck:
        raw = value if isinstance(value, dict) else {}
        ack = raw.get("acknowledgement_id")
        return cls(
            acknowledgement_id=str(ack) if ack is not None else None,
            message_serial=raw.get("message_serial"),
            history_serial=raw.get("history_serial"),
            raw=raw,
        )


@dataclass(frozen=True)
class Result:
    """A successful answer: status, raw bytes and the parsed JSON body."""

    status_code: int
    body: Any
    raw: bytes = field(repr=False, default=b"")

    @property
    def ok(self) -> bool:
        """True for the 2xx answers a Result is made of: failures raise instead (the SDK
        returns ``Result(ok=False)``)."""
        return 200 <= self.status_code < 300

    def json(self) -> Any:
        """The parsed JSON body (as the SDK's ``Result.json()``)."""
        return self.body

    @property
    def channels(self) -> dict[str, ChannelAck]:
        """Per-channel acknowledgements of ``/events`` (empty when the server sent ``{"ok":true}``)."""
        chans = self.body.get("channels") if isinstance(self.body, dict) else None
        if not isinstance(chans, dict):
            return {}
        return {name: ChannelAck.from_json(v) for name, v in chans.items()}

    @property
    def batch(self) -> list[ChannelAck]:
        """Per-item acknowledgements of ``/batch_events`` (empty when the server sent ``{}``).

        Sockudo answers ``{}`` for an item it skipped because its idempotency key was present.
        """
        items = self.body.get("batch") if isinstance(self.body, dict) else None
        if not isinstance(items, list):
            return []
        return [ChannelAck.from_json(v) for v in items]


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:  # asctime / "-0000" dates: HTTP dates are always GMT
            when = when.replace(tzinfo=datetime.UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def interpret(
    status: int, headers: Mapping[str, str], raw: bytes, path: str | None = None
) -> Result:
    """Return the :class:`Result` of a successful answer or raise the matching exception.

    Soketi-style servers answer some errors with HTTP 200 and ``{"error": ..., "code": N}``: such a
    body is classified by its ``code`` exactly as the same HTTP status would be. ``path`` (the
    request's) tells a missing route of a non-publish endpoint from a wrong app URL.
    """
    body = _parse_json(raw)
    if 200 <= status < 300:
        embedded = _embedded_error_status(body)
        if embedded is None:
            return Result(status, body, raw)
        status = embedded
    message, code = _error_fields(body, raw, status)
    retry_after = parse_retry_after(_header(headers, "retry-after"))
    refusal = _refused_by_setup(status, body, message, code, raw, path)
    if refusal is not None:
        raise refusal
    if status in _MISCONFIGURED:
        raise ClientMisconfigured(_misconfigured_hint(status, message), status=status, code=code)
    if status == 429 or status == 408 or status >= 500:
        # 429 and 503 are answered before the publish path runs; other 5xx may come after it.
        raise EndpointUnavailable(
            message,
            status=status,
            code=code,
            body=raw,
            retry_after=retry_after,
            maybe_delivered=status not in (429, 503),
        )
    if status in _REFUSED or 400 <= status < 500:
        raise EventRefused(message, status=status, code=code, body=raw)
    # 1xx/3xx: we never follow redirects; a publish endpoint that redirects is a wrong URL.
    raise ClientMisconfigured(
        f"unexpected HTTP {status} from the publish endpoint: {message}", status=status, code=code
    )


def _refused_by_setup(
    status: int, body: Any, message: str, code: str | None, raw: bytes, path: str | None
) -> PublishFailed | None:
    """The answers of the non-publish API that say more than their status: which feature is off,
    a policy refusal, a missing message, an expired cursor, a route the server lacks."""
    json_code = code if isinstance(body, dict) else None  # a plain-text 422 is axum's, not ours
    if status == 422 and json_code == "feature_disabled":
        setting = next((v for k, v in FEATURE_SETTINGS.items() if message.startswith(k)), None)
        hint = f" (turn on {setting} on the server)" if setting else ""
        return FeatureDisabled(message + hint, status=status, code=code, body=raw, setting=setting)
    if status == 403:
        policy = "disabled by channel policy" in message
        ai_code = body.get("ai_code") if isinstance(body, dict) else None
        return Forbidden(
            message + (f" (turn on {ANNOTATION_POLICY_SETTING})" if policy else ""),
            status=status,
            code=code,
            body=raw,
            setting=ANNOTATION_POLICY_SETTING if policy else None,
            ai_code=ai_code if isinstance(ai_code, int) else None,
        )
    if status == 404 and json_code == "not_found":
        return NotFound(message, status=status, code=code, body=raw)
    if status == 404 and json_code is None and path and not path.endswith(_PUBLISH_ROUTES):
        return Unsupported(
            f"this server has no {path.split('?')[0]} endpoint (HTTP 404 {message})",
            status=status,
            code=code,
            body=raw,
        )
    if status == 400 and message.startswith("Expired history cursor"):
        return CursorExpired(message, status=status, code=code, body=raw)
    return None


def translate_transport_error(exc: httpx.HTTPError) -> PublishFailed:
    """Map an ``httpx`` transport exception onto our family (the one boundary for them)."""
    # Connect errors and pool timeouts happen before a byte was sent: the event did not go out.
    not_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    kind = type(exc).__name__
    detail = str(exc) or "no detail"
    return EndpointUnavailable(f"{kind}: {detail}", maybe_delivered=not not_sent)


#: The stages of a request that come before any byte of it was written.
_STAGES_BEFORE_SENDING = frozenset({"pool", "connect"})


def translate_connection_error(exc: Exception, stage: str) -> PublishFailed:
    """Map a failure of a connection driven over asyncio streams onto our family.

    ``stage`` is where it happened: ``pool`` (waiting for a free connection), ``connect``,
    ``write`` or ``read``. A timeout is named like httpx's (``ReadTimeout``...); an OS error after
    the first byte was written, or a malformed answer, means the event may have gone out.
    """
    if isinstance(exc, TimeoutError):
        kind = f"{stage.capitalize()}Timeout"
    elif isinstance(exc, OSError):
        kind = f"{stage.capitalize()}Error"
    else:
        kind = type(exc).__name__
    detail = str(exc) or ("timed out" if isinstance(exc, TimeoutError) else type(exc).__name__)
    return EndpointUnavailable(
        f"{kind}: {detail}", maybe_delivered=stage not in _STAGES_BEFORE_SENDING
    )


def _parse_json(raw: bytes) -> Any:
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _embedded_error_status(body: Any) -> int | None:
    if not isinstance(body, dict) or "error" not in body:
        return None
    for key in ("code", "status"):
        value = body.get(key)
        if isinstance(value, int) and value >= 400:
            return value
        if isinstance(value, str) and value.isdigit() and int(value) >= 400:
            return int(value)
    return 400  # an error body with no usable code: the event was not accepted


def _error_fields(body: Any, raw: bytes, status: int) -> tuple[str, str | None]:
    code: str | None = None
    if isinstance(body, dict):
        message = body.get("error") or body.get("message") or ""
        raw_code = body.get("code")
        code = str(raw_code) if raw_code is not None else None
    else:
        message = raw.decode("utf-8", "replace")
    message = str(message).strip() or f"HTTP {status}"
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE] + "..."
    return message, code


def _misconfigured_hint(status: int, message: str) -> str:
    hint = {
        401: "check the app secret and this host's clock (signatures are valid for +-600 s)",
        404: "check the app id and key",
    }.get(status, "check the client settings")
    return f"{message} ({hint})"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    if isinstance(headers, httpx.Headers):
        return headers.get(name)
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None

"""The Sockudo client's exceptions: one family, split by what the caller should do next.

::

    SockudoError
    ├── InvalidEvent           refused locally, before any request (never retry as written)
    ├── PublishFailed          the server or the network said no; carries status, code, message
    │   ├── EventRefused       400/413/415/422: the request is bad; never retry it as written
    │   │   ├── NotFound       404 not_found: no such message or annotation in that channel
    │   │   └── CursorExpired  400 "Expired history cursor": start the walk again from the top
    │   ├── EndpointUnavailable  network error, timeout, 5xx, 429, 503: retry later
    │   │                        (``retry_after`` holds a parsed ``Retry-After``)
    │   └── ClientMisconfigured  the setup is at fault, not the request: fix it, then retry
    │       │                    (401/404: wrong secret, clock, key or app id)
    │       └── NotAllowed     the server's own settings refuse this operation; credentials are fine
    │           ├── FeatureDisabled  422 feature_disabled; ``setting`` names what to turn on
    │           ├── Forbidden        403: channel policy or a socket's capability
    │           └── Unsupported      404 without an error code: this server has no such endpoint
    └── WebhookInvalid         a webhook whose signature or key does not check out

``NotAllowed`` sits under ``ClientMisconfigured`` because the caller's decision is the same (no
request is at fault; an operator changes a setting, and then the same request succeeds), while
``except NotAllowed`` tells a server setting apart from bad credentials.

Exceptions are raised by :mod:`outbox.sockudo.responses` (HTTP answers), by the sync client and
by the async client's transports (:mod:`outbox.sockudo.transport`) for transport errors, each
translated once at that boundary. Messages never contain the secret.
"""

from __future__ import annotations

from typing import Any


class SockudoError(Exception):
    """Base class of every error raised by :mod:`outbox.sockudo`."""


class InvalidEvent(SockudoError, ValueError):
    """The event cannot be sent as given (bad channel, encrypted channel mixed, missing key...).

    Raised before any request is made. ``field`` names the offending argument when there is one.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PublishFailed(SockudoError):
    """A request reached the transport and did not succeed."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        body: bytes | None = None,
    ) -> None:
        super().__init__(message)
        #: HTTP status, or the ``code`` of a soketi-style 200 error body; None for transport errors.
        self.status = status
        #: The server's error code (``"payload_too_large"``, ``"backpressure"``...) when it sent one.
        self.code = code
        #: The server's message (or the transport error's description).
        self.message = message
        self.body = body

    def __str__(self) -> str:
        parts = [p for p in (str(self.status) if self.status else None, self.code) if p]
        prefix = f"[{' '.join(parts)}] " if parts else ""
        return f"{prefix}{self.message}"


class EventRefused(PublishFailed):
    """The server refused the event itself (400, 413, 415, 422). Retrying the same bytes cannot help."""


class EndpointUnavailable(PublishFailed):
    """The endpoint could not take the request now (network, timeout, 5xx, 429, 503). Retry later.

    ``retry_after`` is the server's ``Retry-After`` in seconds, when it sent one. ``maybe_delivered``
    is True when the request may have reached the server before the failure (a read timeout, a
    connection dropped before the answer): the event may have been published.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        body: bytes | None = None,
        retry_after: float | None = None,
        maybe_delivered: bool = True,
    ) -> None:
        super().__init__(message, status=status, code=code, body=body)
        self.retry_after = retry_after
        self.maybe_delivered = maybe_delivered


class ClientMisconfigured(PublishFailed):
    """The server does not accept this client (401 bad signature or clock, 404 unknown app or key).

    No event is at fault: fix the configuration (secret, key, app id, host clock). The subclass
    :class:`NotAllowed` is the server's configuration instead of this client's.
    """


class NotFound(EventRefused):
    """404 ``not_found``: the message serial or annotation serial does not exist in that channel.

    Sockudo answers the same for a mistyped serial, a message published while history or versioned
    messages were off, and (with ``VERSIONED_MESSAGES_DRIVER=memory``) one lost in a restart.
    """


class CursorExpired(EventRefused):
    """400 "Expired history cursor": the stream was reset, or retention passed the cursor.

    The walk cannot continue from that cursor: start again without one.
    """


class NotAllowed(ClientMisconfigured):
    """The server is set up not to allow this operation; the credentials are fine.

    ``setting`` names the server setting (environment variable) that allows it, when known.
    """

    def __init__(self, message: str, *, setting: str | None = None, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.setting = setting


class FeatureDisabled(NotAllowed):
    """422 ``feature_disabled``: history, presence history, versioned messages or annotations
    are off for the channel. ``setting`` says what to turn on (e.g. ``HISTORY_ENABLED=true``).
    """


class Forbidden(NotAllowed):
    """403: refused by channel policy (annotations off for the app) or by a socket's capabilities
    (``mutable_not_permitted``; ``ai_code`` 93002 on AI-transport channels). Not a signature error.
    """

    def __init__(self, message: str, *, ai_code: int | None = None, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.ai_code = ai_code


class Unsupported(NotAllowed):
    """A 404 without a JSON error code on an endpoint other than publishing: this server has no
    such route (soketi has no history, messages or annotations; Sockudo in ``server_role=api`` has
    no channel-state routes).
    """


class WebhookInvalid(SockudoError):
    """A webhook's key or signature does not match, or its body cannot be read."""


#: Result classes of a publish request, as the metrics (their ``result`` label) and the traces
#: (``error.type``) name them.
RESULT_OK = "ok"
RESULT_REFUSED = "refused"
RESULT_UNAUTHORIZED = "unauthorized"
RESULT_RATE_LIMITED = "rate_limited"
RESULT_BACKPRESSURE = "backpressure"
RESULT_UNAVAILABLE = "unavailable"
RESULT_NETWORK = "network"


def request_result(exc: BaseException | None) -> str:
    """The result class of one publish request: None (it succeeded) or what it raised."""
    if exc is None:
        return RESULT_OK
    if isinstance(exc, EventRefused):
        return RESULT_REFUSED
    if isinstance(exc, ClientMisconfigured):
        return RESULT_UNAUTHORIZED
    if isinstance(exc, EndpointUnavailable):
        if exc.status == 429:
            return RESULT_RATE_LIMITED
        if exc.code == "backpressure":
            return RESULT_BACKPRESSURE
        return RESULT_NETWORK if exc.status is None else RESULT_UNAVAILABLE
    if isinstance(exc, PublishFailed):
        return RESULT_UNAVAILABLE
    return RESULT_NETWORK

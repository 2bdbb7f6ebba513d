"""The Sockudo client's exceptions: one family, split by what the caller should do next.

::

    SockudoError
    ├── InvalidEvent           refused locally, before any request (never retry as written)
    ├── PublishFailed          the server or the network said no; carries status, code, message
    │   ├── EventRefused       400/413/415/422: the event is bad; never retry it as written
    │   ├── EndpointUnavailable  network error, timeout, 5xx, 429, 503: retry later
    │   │                        (``retry_after`` holds a parsed ``Retry-After``)
    │   └── ClientMisconfigured  401/403/404: wrong secret, clock, key or app id; no event is at fault
    └── WebhookInvalid         a webhook whose signature or key does not check out

Exceptions are raised by :mod:`outbox.sockudo.responses` (HTTP answers), by the sync client and
by the async client's transports (:mod:`outbox.sockudo.transport`) for transport errors, each
translated once at that boundary. Messages never contain the secret.
"""

from __future__ import annotations


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

    No event is at fault: fix the configuration (secret, key, app id, host clock).
    """


class WebhookInvalid(SockudoError):
    """A webhook's key or signature does not match, or its body cannot be read."""

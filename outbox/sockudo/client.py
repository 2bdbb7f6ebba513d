"""``Sockudo`` and ``AsyncSockudo``: two thin shells over one pure request-building core.

Everything but the network call lives in :class:`_Core` (building bodies, sealing encrypted data,
signing at send time) and in :mod:`.responses` (classifying answers). The shells only send. There
are no retries in here: the caller owns its retry policy (the outbox worker does it durably).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypedDict, Unpack

import httpx

from . import auth, events
from .config import Config, ConfigError
from .errors import InvalidEvent
from .events import DEFAULT_LIMITS, Event, Limits
from .responses import Result, interpret, translate_transport_error
from .signing import Signer, quote_path_segment
from .transport import AsyncTransport, HttpxTransport, open_transport

USER_AGENT = "sockudo-outbox/0.1"
#: Sent with every request, so a caller-supplied ``httpx`` client still sends JSON as JSON
#: (Sockudo answers 415 to a body without ``Content-Type: application/json``).
_HEADERS = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
Clock = Callable[[], float]


@dataclass(frozen=True)
class PreparedRequest:
    """A request ready to be signed and sent: its body bytes never change between attempts."""

    method: str
    path: str
    body: bytes | None = field(default=None, repr=False)
    params: Mapping[str, object] = field(default_factory=dict)


class TriggerOptions(TypedDict, total=False):
    """Optional fields of one publish (see :meth:`Sockudo.trigger`)."""

    socket_id: str | None
    info: str | Sequence[str] | None
    idempotency_key: str | None
    message_id: str | None
    tags: Mapping[str, str] | None
    extras: Mapping[str, Any] | None
    encryption_nonce: bytes | None


class _Core:
    """The pure part shared by both clients: configuration, bodies, signing, auth helpers."""

    def __init__(
        self,
        app_id: str | Config,
        key: str | None = None,
        secret: str | None = None,
        *,
        clock: Clock = time.time,
        limits: Limits = DEFAULT_LIMITS,
        **settings: Any,
    ) -> None:
        if isinstance(app_id, Config):
            config = app_id.replace(**settings) if settings else app_id
        else:
            config = Config(app_id=app_id, key=key, secret=secret, **settings)  # type: ignore[arg-type]
        self.config = config
        self.limits = limits
        self._clock = clock
        self._signer = Signer(config.key, config.secret)
        self._master_key = config.master_key

    @classmethod
    def from_url(cls, url: str, **settings: Any) -> Self:
        """Build a client from ``http(s)://KEY:SECRET@HOST:PORT/apps/APP_ID``."""
        clock = settings.pop("clock", time.time)
        limits = settings.pop("limits", DEFAULT_LIMITS)
        transport_options = {k: settings.pop(k) for k in ("client", "transport") if k in settings}
        return cls(
            Config.from_url(url, **settings), clock=clock, limits=limits, **transport_options
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.config.masked_url}>"

    # -- request building -------------------------------------------------------------------

    def app_path(self, suffix: str) -> str:
        return f"/apps/{quote_path_segment(self.config.app_id)}{suffix}"

    def prepare_trigger(
        self,
        channels: str | Sequence[str],
        event: str,
        data: Any,
        *,
        socket_id: str | None = None,
        info: str | Sequence[str] | None = None,
        idempotency_key: str | None = None,
        message_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        extras: Mapping[str, Any] | None = None,
        encryption_nonce: bytes | None = None,
    ) -> PreparedRequest:
        if not isinstance(channels, str | Sequence):
            # None, a number, a set (no stable order, so no stable body bytes)...
            raise InvalidEvent("channels must be a channel name or a list of them", field="channel")
        one = Event(
            channel=channels if isinstance(channels, str) else None,
            channels=None if isinstance(channels, str) else list(channels),
            name=event,
            data=data,
            socket_id=socket_id,
            info=info,
            idempotency_key=idempotency_key,
            message_id=message_id,
            tags=tags,
            extras=extras,
            encryption_nonce=encryption_nonce,
        )
        item = events.prepare_event(one, self._master_key, self.limits)
        return PreparedRequest("POST", self.app_path("/events"), events.dump_body(item))

    def prepare_batch(self, batch: Sequence[Event]) -> PreparedRequest:
        items = [events.prepare_event(e, self._master_key, self.limits) for e in batch]
        return PreparedRequest(
            "POST", self.app_path("/batch_events"), events.batch_body(items, self.limits)
        )

    def prepare_events_body(self, body: bytes) -> PreparedRequest:
        """Wrap an ``/events`` body built elsewhere (the worker builds bodies from stored rows)."""
        return PreparedRequest("POST", self.app_path("/events"), body)

    def prepare_batch_body(self, body: bytes) -> PreparedRequest:
        """Wrap a ``/batch_events`` body built elsewhere."""
        return PreparedRequest("POST", self.app_path("/batch_events"), body)

    def prepare_get(self, path: str, params: Mapping[str, object] | None = None) -> PreparedRequest:
        full = path if path.startswith("/apps/") else self.app_path("/" + path.lstrip("/"))
        return PreparedRequest("GET", full, None, dict(params or {}))

    # -- signing ------------------------------------------------------------------------------

    def signed_uri(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        parameters: Mapping[str, object] | None = None,
    ) -> str:
        """The full URL of a request signed now. ``path`` is signed exactly as given."""
        query = self._signer.signed_query(method, path, body, int(self._clock()), parameters)
        return f"{self.config.base_url}{path}?{query}"

    def _url(self, request: PreparedRequest) -> str:
        return self.signed_uri(request.method, request.path, request.body, request.params)

    # -- auth and webhooks (pure) -------------------------------------------------------------

    def authenticate(
        self,
        socket_id: str,
        channel: str,
        presence_user: auth.PresenceUser | Mapping[str, Any] | None = None,
    ) -> dict[str, str]:
        """Channel authorization for a private, presence or private-encrypted channel."""
        return auth.authenticate(self.config, socket_id, channel, presence_user)

    def authenticate_user(self, socket_id: str, user: Mapping[str, Any]) -> dict[str, str]:
        """User authentication (``pusher:signin``)."""
        return auth.authenticate_user(self.config, socket_id, user)

    def validate_webhook_signature(self, key: str, signature: str, body: bytes | str) -> bool:
        return auth.validate_webhook_signature(self.config, key, signature, body)

    def parse_webhook(self, key: str, signature: str, body: bytes | str) -> auth.Webhook:
        return auth.parse_webhook(self.config, key, signature, body)

    # -- transport construction ---------------------------------------------------------------

    def _transport_options(self) -> dict[str, Any]:
        config = self.config
        use_h2 = config.http2_prior_knowledge or (config.http2 and config.use_tls)
        if config.http2_prior_knowledge and config.use_tls:
            raise ConfigError("http2_prior_knowledge is for plain http:// endpoints")
        options: dict[str, Any] = {
            "timeout": httpx.Timeout(config.timeout),
            "verify": config.verify_tls,
            "headers": dict(_HEADERS),
            "follow_redirects": False,
            "trust_env": False,
        }
        if use_h2:
            options["http2"] = True
            if config.http2_prior_knowledge:
                options["http1"] = False
        return options


class Sockudo(_Core):
    """Synchronous client. Use it as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        app_id: str | Config,
        key: str | None = None,
        secret: str | None = None,
        *,
        client: httpx.Client | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(app_id, key, secret, **settings)
        self._owns_http = client is None
        self._http = client if client is not None else httpx.Client(**self._transport_options())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def send(self, request: PreparedRequest) -> Result:
        """Sign ``request`` now, send it once, and return its :class:`Result` or raise."""
        try:
            response = self._http.request(
                request.method, self._url(request), content=request.body, headers=_HEADERS
            )
        except httpx.HTTPError as exc:
            raise translate_transport_error(exc) from exc
        return interpret(response.status_code, response.headers, response.content)

    def trigger(
        self,
        channels: str | Sequence[str],
        event: str,
        data: Any,
        **options: Unpack[TriggerOptions],
    ) -> Result:
        """Publish one event to one channel or several (``/events``)."""
        return self.send(self.prepare_trigger(channels, event, data, **options))

    def trigger_batch(self, batch: Sequence[Event]) -> Result:
        """Publish several events in one request (``/batch_events``)."""
        return self.send(self.prepare_batch(batch))

    def send_to_user(
        self, user_id: str, event: str, data: Any, **options: Unpack[TriggerOptions]
    ) -> Result:
        """Publish to every connection of one signed-in user."""
        return self.trigger(_user_channel(user_id), event, data, **options)

    def get(self, path: str, params: Mapping[str, object] | None = None) -> Result:
        """A signed GET under ``/apps/{app_id}`` (channel queries and the like)."""
        return self.send(self.prepare_get(path, params))


class AsyncSockudo(_Core):
    """asyncio client. Use it as an async context manager, or await :meth:`aclose`.

    ``transport`` picks how requests travel: ``"httpx"`` (the default: TLS, HTTP/2), ``"h11"``
    (plain-http HTTP/1.1 at a fraction of the CPU; see :mod:`.transport`) or any
    :class:`~.transport.AsyncTransport`, which the caller then closes. ``client`` wraps an
    ``httpx.AsyncClient`` of your own (also left for you to close).
    """

    def __init__(
        self,
        app_id: str | Config,
        key: str | None = None,
        secret: str | None = None,
        *,
        client: httpx.AsyncClient | None = None,
        transport: str | AsyncTransport | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(app_id, key, secret, **settings)
        if client is not None and transport is not None:
            raise ConfigError("pass an httpx client or a transport, not both")
        self._owns_transport = client is None and not isinstance(transport, AsyncTransport)
        if client is not None:
            self._transport: AsyncTransport = HttpxTransport(client)
        elif isinstance(transport, AsyncTransport):
            self._transport = transport
        else:
            name = transport or "httpx"
            options = self._transport_options() if name == "httpx" else {}
            self._transport = open_transport(name, self.config, options)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_transport:
            await self._transport.aclose()

    async def send(self, request: PreparedRequest) -> Result:
        """Sign ``request`` now, send it once, and return its :class:`Result` or raise."""
        response = await self._transport.send(
            request.method, self._url(request), _HEADERS, request.body
        )
        return interpret(response.status, response.headers, response.content)

    async def trigger(
        self,
        channels: str | Sequence[str],
        event: str,
        data: Any,
        **options: Unpack[TriggerOptions],
    ) -> Result:
        """Publish one event to one channel or several (``/events``)."""
        return await self.send(self.prepare_trigger(channels, event, data, **options))

    async def trigger_batch(self, batch: Sequence[Event]) -> Result:
        """Publish several events in one request (``/batch_events``)."""
        return await self.send(self.prepare_batch(batch))

    async def send_to_user(
        self, user_id: str, event: str, data: Any, **options: Unpack[TriggerOptions]
    ) -> Result:
        """Publish to every connection of one signed-in user."""
        return await self.trigger(_user_channel(user_id), event, data, **options)

    async def get(self, path: str, params: Mapping[str, object] | None = None) -> Result:
        """A signed GET under ``/apps/{app_id}`` (channel queries and the like)."""
        return await self.send(self.prepare_get(path, params))


def _user_channel(user_id: str) -> str:
    events.check_text(user_id, "user_id")
    return f"{events.SERVER_TO_USER_PREFIX}{user_id}"

"""``Sockudo`` and ``AsyncSockudo``: two thin shells over one pure request-building core.

Everything but the network call is pure: :class:`_Core` and :class:`.operations.Operations`
build requests (checking events with :mod:`.validation`, body bytes from :mod:`.bodies`, sealing
encrypted data with :mod:`.crypto`) and sign them at send time; :mod:`.responses` classifies
answers. Each operation is written once, as a method that builds a :class:`~.calls.Call`; how a
shell runs it is :mod:`.calls`'s, and the shells here add only the sending (an ``httpx`` client
or an async transport) and their lifetime. There are no retries in here: the caller owns its
retry policy (the outbox worker does it durably).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Self, TypedDict, TypeVar, Unpack

import httpx

from . import auth
from .bodies import Event, batch_body, dump_body, prepare_event
from .calls import AsyncShell, Call, PreparedRequest, SyncShell, Walk, keep, operation
from .config import Config, ConfigError
from .errors import InvalidEvent
from .operations import Operations
from .params import SockudoOptions
from .responses import Result, interpret, translate_transport_error
from .signing import Signer
from .transport import AsyncTransport, HttpxTransport, open_transport
from .validation import DEFAULT_LIMITS, SERVER_TO_USER_PREFIX, Limits, check_text

USER_AGENT = "sockudo-outbox/0.1"
#: Sent with every request, so a caller-supplied ``httpx`` client still sends JSON as JSON
#: (Sockudo answers 415 to a body without ``Content-Type: application/json``).
_HEADERS = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
Clock = Callable[[], float]
T = TypeVar("T")

__all__ = ["AsyncSockudo", "Call", "PreparedRequest", "Sockudo", "TriggerOptions"]


class TriggerOptions(TypedDict, total=False):
    """Optional fields of one publish (see :meth:`Sockudo.trigger`).

    Pass them as keywords, or as the SDK does: ``trigger(ch, ev, data, TriggerOptions(...))``.
    ``idempotency_key=True`` makes a new key for this call.
    """

    socket_id: str | None
    info: str | Sequence[str] | None
    idempotency_key: str | Literal[True] | None
    message_id: str | None
    tags: Mapping[str, str] | None
    extras: Mapping[str, Any] | None
    encryption_nonce: bytes | None


class _Core(Operations):
    """The pure part shared by both clients: configuration, bodies, signing, auth helpers."""

    def __init__(
        self,
        app_id: str | Config,
        key: str | None = None,
        secret: str | None = None,
        *,
        options: SockudoOptions | None = None,
        auto_idempotency: bool | None = None,
        clock: Clock = time.time,
        limits: Limits = DEFAULT_LIMITS,
        **settings: Any,
    ) -> None:
        if options is not None:
            # The SDK's options object: its connection fields, then explicit keywords win.
            settings = {**options.settings(), **settings}
            if auto_idempotency is None:
                auto_idempotency = options.auto_idempotency
        if isinstance(app_id, Config):
            config = app_id.replace(**settings) if settings else app_id
        else:
            config = Config(app_id=app_id, key=key, secret=secret, **settings)  # type: ignore[arg-type]
        self.config = config
        self.limits = limits
        #: Give every publish without an idempotency key one (``"{base}:{n}"``, as the SDK).
        self.auto_idempotency = bool(auto_idempotency)
        self._clock = clock
        self._signer = Signer(config.key, config.secret)
        self._master_key = config.master_key
        self._key_base = uuid.uuid4().hex
        self._key_serial = 0

    @classmethod
    def from_url(cls, url: str, **settings: Any) -> Self:
        """Build a client from ``http(s)://KEY:SECRET@HOST:PORT/apps/APP_ID``."""
        own = {
            k: settings.pop(k)
            for k in ("clock", "limits", "client", "transport", "auto_idempotency")
            if k in settings
        }
        return cls(Config.from_url(url, **settings), **own)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.config.masked_url}>"

    # -- request building -------------------------------------------------------------------

    def set_auto_idempotency_key(self, auto: bool) -> None:
        """The SDK's switch for :attr:`auto_idempotency`."""
        self.auto_idempotency = auto

    def _idempotency_key(self, value: str | bool | None) -> str | None:
        """``True``: a new key; None: a new one only with :attr:`auto_idempotency`."""
        if value is True:
            return str(uuid.uuid4())
        if value is None and self.auto_idempotency:
            self._key_serial += 1
            return f"{self._key_base}:{self._key_serial}"
        return None if value is False else value

    def prepare_trigger(
        self,
        channels: str | Sequence[str],
        event: str,
        data: Any,
        *,
        socket_id: str | None = None,
        info: str | Sequence[str] | None = None,
        idempotency_key: str | bool | None = None,
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
            idempotency_key=self._idempotency_key(idempotency_key),
            message_id=message_id,
            tags=tags,
            extras=extras,
            encryption_nonce=encryption_nonce,
        )
        item = prepare_event(one, self._master_key, self.limits)
        return PreparedRequest("POST", self.app_path("/events"), dump_body(item))

    def prepare_batch(self, batch: Sequence[Event]) -> PreparedRequest:
        if self.auto_idempotency and any(e.idempotency_key is None for e in batch):
            self._key_serial += 1  # one serial per batch: keys "{base}:{batch}:{index}"
            keys = [f"{self._key_base}:{self._key_serial}:{i}" for i in range(len(batch))]
        else:
            keys = [None] * len(batch)
        batch = [
            dataclasses.replace(
                e,
                idempotency_key=key
                if e.idempotency_key is None
                else self._idempotency_key(e.idempotency_key),
            )
            for e, key in zip(batch, keys, strict=True)
        ]
        items = [prepare_event(e, self._master_key, self.limits) for e in batch]
        return PreparedRequest(
            "POST", self.app_path("/batch_events"), batch_body(items, self.limits)
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

    # -- publishing ---------------------------------------------------------------------------

    @operation
    def trigger(
        self,
        channels: str | Sequence[str],
        event: str,
        data: Any,
        options: TriggerOptions | Mapping[str, Any] | None = None,
        **keywords: Unpack[TriggerOptions],
    ) -> Call[Result]:
        """Publish one event to one channel or several (``/events``)."""
        merged = _merge_options(options, keywords)
        return Call(self.prepare_trigger(channels, event, data, **merged), keep)

    @operation
    def trigger_batch(self, batch: Sequence[Event]) -> Call[Result]:
        """Publish several events in one request (``/batch_events``)."""
        return Call(self.prepare_batch(batch), keep)

    @operation
    def send_to_user(
        self,
        user_id: str,
        event: str,
        data: Any,
        options: TriggerOptions | Mapping[str, Any] | None = None,
        **keywords: Unpack[TriggerOptions],
    ) -> Call[Result]:
        """Publish to every connection of one signed-in user."""
        merged = _merge_options(options, keywords)
        return Call(self.prepare_trigger(_user_channel(user_id), event, data, **merged), keep)

    @operation
    def get(self, path: str, params: Mapping[str, object] | None = None) -> Call[Result]:
        """A signed GET under ``/apps/{app_id}`` (any endpoint this client has no method for)."""
        return Call(self.prepare_get(path, params), keep)

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

    # -- binding operations: the core hands back the Call itself ------------------------------

    def _bind_call(self, build: Callable[..., Call[T]]) -> Callable[..., Any]:
        return build

    def _bind_walk(self, build: Callable[..., Walk[T]]) -> Callable[..., Any]:
        return build


class Sockudo(SyncShell, _Core):
    """Synchronous client. Use it as a context manager, or call :meth:`close`.

    Every operation of :class:`_Core` (``trigger``, ``get_channel_history``, ``update_message``...)
    is sent at once and returns its parsed answer; ``iter_*`` operations return an iterator
    (:class:`~.calls.SyncShell`).
    """

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
        return interpret(response.status_code, response.headers, response.content, request.path)


class AsyncSockudo(AsyncShell, _Core):
    """asyncio client. Use it as an async context manager, or await :meth:`aclose`.

    Every operation of :class:`_Core` returns an awaitable of the same answer as on
    :class:`Sockudo`; ``iter_*`` operations return an async iterator (``async for``;
    :class:`~.calls.AsyncShell`).

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

    async def close(self) -> None:
        """The SDK's name for :meth:`aclose`."""
        await self.aclose()

    async def send(self, request: PreparedRequest) -> Result:
        """Sign ``request`` now, send it once, and return its :class:`Result` or raise."""
        response = await self._transport.send(
            request.method, self._url(request), _HEADERS, request.body
        )
        return interpret(response.status, response.headers, response.content, request.path)


def _merge_options(
    options: TriggerOptions | Mapping[str, Any] | None, keywords: Mapping[str, Any]
) -> dict[str, Any]:
    """The SDK's positional ``TriggerOptions`` and our keywords, as one set (no field twice)."""
    merged = dict(options or {})
    twice = sorted(k for k in merged if keywords.get(k) is not None)
    if twice:
        raise InvalidEvent(f"given both in options and as a keyword: {twice}", field=twice[0])
    merged.update(keywords)
    unknown = sorted(set(merged) - set(TriggerOptions.__annotations__))
    if unknown:
        raise InvalidEvent(f"unknown publish options: {unknown}", field=unknown[0])
    return merged


def _user_channel(user_id: str) -> str:
    check_text(user_id, "user_id")
    return f"{SERVER_TO_USER_PREFIX}{user_id}"

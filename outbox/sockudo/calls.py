"""One operation, defined once, run by either shell.

An operation of the client is a method of the pure core that *builds* a :class:`Call`: the
request (method, path, query, body bytes) and how to read its answer. It does no I/O. The two
shells decide how a call is run: :class:`SyncShell` (:class:`~outbox.sockudo.Sockudo`) sends it
and returns the parsed answer, :class:`AsyncShell` (:class:`~outbox.sockudo.AsyncSockudo`)
returns an awaitable of it; each needs only a ``send`` from its client. The ``@operation`` and
``@paginated`` descriptors below make that binding, so no operation is written twice:

    class _Core:
        @operation
        def get_message(self, channel, message_serial) -> Call[Message]: ...

    sockudo.get_message("orders", serial)          # Sockudo: a Message
    await async_sockudo.get_message("orders", serial)  # AsyncSockudo: the same Message
    call = sockudo.get_message.prepare("orders", serial)  # the Call itself: send it when you like

``prepare`` is how a caller retries: the Call's body bytes never change, so sending it again
(``sockudo.run(call)``) is a byte-identical retry, signed anew at each send.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from .responses import Result

if TYPE_CHECKING:
    from .models import Page

T = TypeVar("T")
ItemT = TypeVar("ItemT")
P = ParamSpec("P")


@dataclass(frozen=True)
class PreparedRequest:
    """A request ready to be signed and sent: its body bytes never change between attempts."""

    method: str
    path: str
    body: bytes | None = field(default=None, repr=False)
    params: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Call(Generic[T]):
    """A prepared request and the function that reads its successful answer."""

    request: PreparedRequest
    parse: Callable[[Result], T]


@dataclass(frozen=True)
class Walk(Generic[ItemT]):
    """A paginated read: the first page's call, and how to get the call of the page after one.

    ``after`` keeps everything of the first request but the cursor, so direction and bounds stay
    what the server bound the cursor to.
    """

    first: Call[Page]
    after: Callable[[Page], Call[Page] | None]


def keep(result: Result) -> Result:
    """The parse of calls whose answer is the plain :class:`Result`."""
    return result


class operation(Generic[P, T]):
    """Marks a core method that builds a :class:`Call`; each shell binds it to run the call."""

    def __init__(self, build: Callable[Concatenate[Any, P], Call[T]]) -> None:
        self.build = build
        functools.update_wrapper(self, build)  # type: ignore[arg-type]

    @overload
    def __get__(self, instance: None, owner: type) -> operation[P, T]: ...
    @overload
    def __get__(self, instance: SyncShell, owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(self, instance: AsyncShell, owner: type) -> Callable[P, Awaitable[T]]: ...
    @overload
    def __get__(self, instance: object, owner: type) -> Callable[P, Call[T]]: ...
    def __get__(self, instance: Any, owner: type) -> Any:
        if instance is None:
            return self
        return instance._bind_call(self.build.__get__(instance, owner))


class paginated(Generic[P, ItemT]):
    """Marks a core method that builds a :class:`Walk`; each shell binds it to iterate items."""

    def __init__(self, build: Callable[Concatenate[Any, P], Walk[ItemT]]) -> None:
        self.build = build
        functools.update_wrapper(self, build)  # type: ignore[arg-type]

    @overload
    def __get__(self, instance: None, owner: type) -> paginated[P, ItemT]: ...
    @overload
    def __get__(self, instance: SyncShell, owner: type) -> Callable[P, Iterator[ItemT]]: ...
    @overload
    def __get__(self, instance: AsyncShell, owner: type) -> Callable[P, AsyncIterator[ItemT]]: ...
    @overload
    def __get__(self, instance: object, owner: type) -> Callable[P, Walk[ItemT]]: ...
    def __get__(self, instance: Any, owner: type) -> Any:
        if instance is None:
            return self
        return instance._bind_walk(self.build.__get__(instance, owner))


class SyncShell:
    """How :class:`~outbox.sockudo.Sockudo` runs operations: each call is sent at once and
    answers its parsed result; a walk is an iterator that sends one page's call at a time."""

    #: Sign a request now, send it once, and return its :class:`Result` or raise.
    send: Callable[[PreparedRequest], Result]

    def run(self, call: Call[T]) -> T:
        """Send a prepared call (again: the same bytes) and return its parsed answer."""
        return call.parse(self.send(call.request))

    def _bind_call(self, build: Callable[..., Call[T]]) -> Callable[..., T]:
        @functools.wraps(build)
        def run(*args: Any, **kwargs: Any) -> T:
            return self.run(build(*args, **kwargs))

        run.prepare = build  # type: ignore[attr-defined]
        return run

    def _bind_walk(self, build: Callable[..., Walk[T]]) -> Callable[..., Iterator[T]]:
        @functools.wraps(build)
        def walk(*args: Any, **kwargs: Any) -> Iterator[T]:
            step = build(*args, **kwargs)
            call: Call[Any] | None = step.first
            while call is not None:
                page = self.run(call)
                yield from page.items
                call = step.after(page)

        return walk


class AsyncShell:
    """How :class:`~outbox.sockudo.AsyncSockudo` runs operations: each call is an awaitable of
    its parsed result; a walk is an async iterator that sends one page's call at a time."""

    #: Sign a request now, send it once, and return its :class:`Result` or raise.
    send: Callable[[PreparedRequest], Awaitable[Result]]

    async def run(self, call: Call[T]) -> T:
        """Send a prepared call (again: the same bytes) and return its parsed answer."""
        return call.parse(await self.send(call.request))

    def _bind_call(self, build: Callable[..., Call[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(build)
        async def run(*args: Any, **kwargs: Any) -> T:
            return await self.run(build(*args, **kwargs))

        run.prepare = build  # type: ignore[attr-defined]
        return run

    def _bind_walk(self, build: Callable[..., Walk[T]]) -> Callable[..., AsyncIterator[T]]:
        @functools.wraps(build)
        async def walk(*args: Any, **kwargs: Any) -> AsyncIterator[T]:
            step = build(*args, **kwargs)
            call: Call[Any] | None = step.first
            while call is not None:
                page = await self.run(call)
                for item in page.items:
                    yield item
                call = step.after(page)

        return walk

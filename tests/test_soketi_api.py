"""Channel state, users and terminate_user_connections against real soketi and real sockets.

Subscribers are Pusher-protocol WebSocket connections (``outbox.testing.pusher_ws``); presence
members join with authorizations our client signed. soketi has no history, messages or
annotations: those answer 404 without a body, which the client reports as ``Unsupported``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from outbox.sockudo import AsyncSockudo, EventRefused, Sockudo, Unsupported
from outbox.testing.pusher_ws import PusherSubscriber
from outbox.testing.soketi import SoketiServer

pytestmark = pytest.mark.soketi


@pytest.fixture
def client(soketi: SoketiServer) -> Iterator[Sockudo]:
    with Sockudo.from_url(soketi.url) as sockudo:
        yield sockudo


async def call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A blocking client call off the event loop, so the subscribers keep reading."""
    return await asyncio.to_thread(function, *args, **kwargs)


async def member(server: SoketiServer, client: Sockudo, user_id: str) -> PusherSubscriber:
    """A connection signed in as ``user_id`` and present on ``presence-room``."""
    sub = PusherSubscriber(server.ws_url())
    socket_id = await sub.connect()
    await sub.signin(client.authenticate_user(socket_id, {"id": user_id}))
    presence = client.authenticate(socket_id, "presence-room", {"user_id": user_id})
    await sub.subscribe("presence-room", presence)
    return sub


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``check`` (a blocking call) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)


async def test_channel_state_and_users_from_real_subscribers(
    soketi: SoketiServer, client: Sockudo
) -> None:
    ann = await member(soketi, client, "user-ann")
    bob = await member(soketi, client, "user-bob")
    try:
        await ann.subscribe("orders")
        await bob.subscribe("orders")
        listed = await call(client.list_channels)
        assert set(listed) == {"orders", "presence-room"}
        assert listed.channels["orders"].subscription_count == 2  # soketi ignores info
        presence_only = await call(client.list_channels, filter_by_prefix="presence-")
        assert set(presence_only) == {"presence-room"}
        room = await call(client.get_channel, "presence-room", info="user_count")
        assert (room.occupied, room.subscription_count, room.user_count) == (True, 2, 2)
        users = await call(client.get_channel_users, "presence-room")
        assert sorted(users.ids) == ["user-ann", "user-bob"]
        assert (await call(client.get_channel, "nobody-here")).occupied is False
        with pytest.raises(EventRefused) as refused:
            await call(client.get_channel_users, "orders")
        assert refused.value.status == 400
    finally:
        await ann.close()
        await bob.close()
    emptied = await eventually(lambda: not client.list_channels().channels)
    assert emptied


async def test_async_client_reads_channel_state(soketi: SoketiServer, client: Sockudo) -> None:
    ann = await member(soketi, client, "user-ann")
    try:
        async with AsyncSockudo.from_url(soketi.url) as async_client:
            users = await async_client.get_channel_users("presence-room")
            channel = await async_client.get_channel("presence-room")
            listed = await async_client.list_channels(info=["subscription_count"])
        assert users.ids == ("user-ann",)
        assert (channel.subscription_count, channel.user_count) == (1, 1)
        assert listed.channels["presence-room"].subscription_count == 1
    finally:
        await ann.close()


async def test_terminate_user_connections_closes_only_that_users_sockets(
    soketi: SoketiServer, client: Sockudo
) -> None:
    ann = await member(soketi, client, "user-ann")
    ann_again = await member(soketi, client, "user-ann")  # a second tab
    bob = await member(soketi, client, "user-bob")
    try:
        result = await call(client.terminate_user_connections, "user-ann")
        assert result.ok
        await ann.wait_closed()
        await ann_again.wait_closed()
        assert not bob.closed
        left = await eventually(
            lambda: client.get_channel_users("presence-room").ids == ("user-bob",)
        )
        assert left
        await call(client.trigger, "presence-room", "still-here", "yes")
        [event] = await bob.wait_for("presence-room", 1)
        assert event.data == "yes"
    finally:
        for sub in (ann, ann_again, bob):
            await sub.close()


def test_endpoints_soketi_lacks_are_unsupported(client: Sockudo) -> None:
    serial = "00000001724310000000:node:00000000000000000001"
    for operation in (
        lambda: client.get_channel_history("orders"),
        lambda: client.get_message("orders", serial),
        lambda: client.update_message("orders", serial, data="x"),
        lambda: client.list_annotations("orders", serial),
        lambda: client.reset_channel_history("orders", "why"),
    ):
        with pytest.raises(Unsupported) as caught:
            operation()
        assert caught.value.status == 404
        assert "has no" in str(caught.value)

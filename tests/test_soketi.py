"""Our Sockudo client against a real Pusher-compatible server (soketi 1.6.1) and real subscribers.

What this proves: the bodies, paths and signatures we send are accepted by an independent
implementation, the events reach WebSocket subscribers of public, private, presence, encrypted and
user channels exactly as sent, and soketi's error answers (HTTP 200 with the real code in the body)
are classified like the matching HTTP statuses.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import nacl.secret
import pytest

from outbox.sockudo import (
    AsyncSockudo,
    ClientMisconfigured,
    EndpointUnavailable,
    Event,
    EventRefused,
    Sockudo,
)
from outbox.testing.pusher_ws import PusherProtocolError, PusherSubscriber
from outbox.testing.soketi import (
    UWS_OVERRIDE,
    SoketiError,
    SoketiInstallError,
    SoketiServer,
    ensure_soketi,
    free_port,
)

pytestmark = pytest.mark.soketi

MASTER_KEY_B64 = base64.b64encode(bytes(range(32))).decode("ascii")


# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture
def client(soketi: SoketiServer) -> Iterator[Sockudo]:
    with Sockudo.from_url(soketi.url) as sockudo:
        yield sockudo


class Recorder:
    """Keeps the raw HTTP answers the client saw, to assert soketi's wire behaviour too."""

    def __init__(self) -> None:
        self.responses: list[tuple[int, bytes]] = []

    def hook(self, response: httpx.Response) -> None:
        response.read()
        self.responses.append((response.status_code, response.content))

    def client(self) -> httpx.Client:
        """An ``httpx.Client`` to pass to ``Sockudo(client=...)``; the caller closes it."""
        return httpx.Client(event_hooks={"response": [self.hook]}, trust_env=False)


async def call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking client call off the event loop so subscribers keep reading (and ponging)."""
    return await asyncio.to_thread(function, *args, **kwargs)


async def subscriber(server: SoketiServer) -> PusherSubscriber:
    sub = PusherSubscriber(server.ws_url())
    await sub.connect()
    return sub


# -- the launcher itself ------------------------------------------------------------------------


def test_url_and_ws_url_have_the_documented_forms(soketi: SoketiServer) -> None:
    assert soketi.url == f"http://app-key:app-secret@127.0.0.1:{soketi.port}/apps/app-id"
    assert soketi.ws_url().startswith(f"ws://127.0.0.1:{soketi.port}/app/app-key?protocol=7")
    assert soketi.ws_url("other").startswith(f"ws://127.0.0.1:{soketi.port}/app/other?")
    response = httpx.get(f"{soketi.base_url}/ready", trust_env=False)
    assert response.status_code == 200


def _bound_addresses(pid: int) -> list[tuple[str, str]]:
    """(protocol, local hex address) of every inet socket process ``pid`` holds (Linux /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for proto in ("tcp", "udp", "tcp6", "udp6"):
        with open(f"/proc/net/{proto}") as table:
            for line in table.read().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    found.append((proto, fields[1].split(":")[0]))
    return found


def test_every_socket_of_soketi_is_on_loopback(soketi: SoketiServer) -> None:
    assert soketi.pid is not None
    sockets = _bound_addresses(soketi.pid)
    # HTTP/WS, metrics and the UDP cluster-discovery socket; 0100007F is 127.0.0.1 in /proc.
    assert {proto for proto, _ in sockets} >= {"tcp", "udp"}
    assert all(address == "0100007F" for _, address in sockets), sockets


def test_ensure_soketi_is_idempotent_and_safe_concurrently(soketi_install: Any) -> None:
    results: list[object] = []

    def install() -> None:
        try:
            results.append(ensure_soketi())
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=install) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == [soketi_install] * 4
    assert soketi_install.name == "server.js" and soketi_install.is_file()


def test_failed_npm_install_raises_with_npm_output_and_is_redone(tmp_path: Path) -> None:
    fake_npm = tmp_path / "npm"
    fake_npm.write_text("#!/bin/sh\necho 'npm ERR! 404 simulated registry failure'\nexit 1\n")
    fake_npm.chmod(0o755)
    cache = tmp_path / "cache"
    for _ in range(2):  # no stamp is left behind: the second call tries npm again
        with pytest.raises(SoketiInstallError) as failure:
            ensure_soketi(cache, npm=str(fake_npm))
        assert "exit 1" in str(failure.value)
        assert "simulated registry failure" in failure.value.output
        assert "simulated registry failure" in str(failure.value)
    package = json.loads((cache / "package.json").read_text())
    assert package["dependencies"] == {"@soketi/soketi": "1.6.1"}
    assert package["overrides"] == {"uWebSockets.js": UWS_OVERRIDE}


def test_start_timeout_reports_soketi_output(soketi_install: Any) -> None:
    import socket

    # A port someone else holds (without SO_REUSEPORT): soketi claims to be up, /ready never answers.
    # The timeout leaves node room to start and say so on a loaded machine (2 s did not, once).
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        server = SoketiServer(
            server_js=soketi_install, port=holder.getsockname()[1], ready_timeout=10
        )
        with pytest.raises(SoketiError) as failure:
            server.start()
    assert "was not ready" in str(failure.value)
    assert "soketi output" in str(failure.value)
    assert "Server is up and running" in str(failure.value)
    assert not server.running
    server.close()


async def test_python_m_soketi_serves_until_sigterm(soketi_install: Any) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "outbox.testing.soketi", "--port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 60)
        ready, url, ws_url = line.split()
        assert (ready, url) == ("READY", f"http://app-key:app-secret@127.0.0.1:{port}/apps/app-id")
        async with PusherSubscriber(ws_url) as sub:
            await sub.subscribe("orders")
            with Sockudo.from_url(url) as client:
                await call(client.trigger, "orders", "order-created", {"id": 1})
            [event] = await sub.wait_for("orders", 1)
        assert (event.event, event.data) == ("order-created", '{"id":1}')
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # soketi went with it.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/ready", trust_env=False)


# -- publishing reaches subscribers -------------------------------------------------------------


async def test_trigger_one_public_channel_is_received_as_sent(
    soketi: SoketiServer, client: Sockudo
) -> None:
    async with PusherSubscriber(soketi.ws_url()) as sub:
        await sub.subscribe("orders")
        result = await call(client.trigger, "orders", "order-created", {"id": 42, "note": "héllo"})
        assert result.status_code == 200
        assert result.body == {"ok": True}
        [event] = await sub.wait_for("orders", 1)
    assert event.event == "order-created"
    assert event.channel == "orders"
    assert event.data == '{"id":42,"note":"héllo"}'


async def test_trigger_several_channels_public_private_presence(
    soketi: SoketiServer, client: Sockudo
) -> None:
    async with PusherSubscriber(soketi.ws_url()) as sub:
        assert sub.socket_id is not None
        await sub.subscribe("news")
        await sub.subscribe("private-orders", client.authenticate(sub.socket_id, "private-orders"))
        presence = client.authenticate(
            sub.socket_id, "presence-room", {"user_id": "u-1", "user_info": {"name": "Ann"}}
        )
        members = await sub.subscribe("presence-room", presence)
        assert members["presence"]["ids"] == ["u-1"]
        assert members["presence"]["hash"] == {"u-1": {"name": "Ann"}}

        channels = ["news", "private-orders", "presence-room"]
        result = await call(client.trigger, channels, "status", "plain text, not JSON")
        assert result.body == {"ok": True}
        for channel in channels:
            [event] = await sub.wait_for(channel, 1)
            assert (event.event, event.channel, event.data) == (
                "status",
                channel,
                "plain text, not JSON",
            )


async def test_private_subscription_with_a_wrong_signature_is_refused(
    soketi: SoketiServer,
) -> None:
    wrong = Sockudo("app-id", "app-key", "not-the-secret")
    async with PusherSubscriber(soketi.ws_url()) as sub:
        assert sub.socket_id is not None
        with pytest.raises(PusherProtocolError, match="unauthorized"):
            await sub.subscribe("private-x", wrong.authenticate(sub.socket_id, "private-x"))
    wrong.close()


async def test_trigger_batch_reaches_each_channel_in_order(
    soketi: SoketiServer, client: Sockudo
) -> None:
    async with PusherSubscriber(soketi.ws_url()) as sub:
        assert sub.socket_id is not None
        await sub.subscribe("a")
        await sub.subscribe("private-b", client.authenticate(sub.socket_id, "private-b"))
        batch = [
            Event("a", "first", {"n": 1}),
            Event("private-b", "second", "two"),
            Event("a", "third", [3, "three"]),
            Event(None, "fourth", {"n": 4}, channels=["a", "private-b"]),
        ]
        result = await call(client.trigger_batch, batch)
        assert result.status_code == 200
        assert result.body == {"ok": True}
        on_a = await sub.wait_for("a", 3)
        on_b = await sub.wait_for("private-b", 2)
    assert [(e.event, e.data) for e in on_a] == [
        ("first", '{"n":1}'),
        ("third", '[3,"three"]'),
        ("fourth", '{"n":4}'),
    ]
    assert [(e.event, e.data) for e in on_b] == [("second", "two"), ("fourth", '{"n":4}')]


async def test_optional_fields_are_accepted_and_socket_id_excludes_the_sender(
    soketi: SoketiServer, client: Sockudo
) -> None:
    async with (
        PusherSubscriber(soketi.ws_url()) as sender,
        PusherSubscriber(soketi.ws_url()) as other,
    ):
        await sender.subscribe("chat")
        await other.subscribe("chat")
        result = await call(
            client.trigger,
            "chat",
            "message",
            {"text": "hi"},
            socket_id=sender.socket_id,
            info=["subscription_count"],
            idempotency_key="idem-1",
            message_id="msg-1",
            tags={"kind": "chat"},
            extras={"ephemeral": True},
        )
        # soketi ignores the Sockudo-only fields (it has no idempotency or acks): plain ok.
        assert result.body == {"ok": True}
        [event] = await other.wait_for("chat", 1)
        assert (event.event, event.data) == ("message", '{"text":"hi"}')
        await sender.assert_no_more("chat", 0)


async def test_send_to_user_reaches_only_that_signed_in_user(
    soketi: SoketiServer, client: Sockudo
) -> None:
    async with (
        PusherSubscriber(soketi.ws_url()) as ann,
        PusherSubscriber(soketi.ws_url()) as bob,
    ):
        assert ann.socket_id is not None and bob.socket_id is not None
        await ann.signin(client.authenticate_user(ann.socket_id, {"id": "user-7", "name": "Ann"}))
        await bob.signin(client.authenticate_user(bob.socket_id, {"id": "user-8"}))
        result = await call(client.send_to_user, "user-7", "notice", {"unread": 3})
        assert result.body == {"ok": True}
        [event] = await ann.wait_for("#server-to-user-user-7", 1)
        assert (event.event, event.data) == ("notice", '{"unread":3}')
        await bob.assert_no_more("#server-to-user-user-8", 0)
        assert sum(len(v) for v in bob.events.values()) == 0


async def test_encrypted_channel_payload_opens_with_the_shared_secret(
    soketi: SoketiServer,
) -> None:
    channel = "private-encrypted-payments"
    data = {"amount": 12.5, "currency": "EUR", "memo": "naïve ☕"}
    with Sockudo.from_url(soketi.url, encryption_master_key_base64=MASTER_KEY_B64) as client:
        async with PusherSubscriber(soketi.ws_url()) as sub:
            assert sub.socket_id is not None
            authorization = client.authenticate(sub.socket_id, channel)
            await sub.subscribe(channel, authorization)
            await sub.subscribe("plain")
            result = await call(client.trigger, channel, "paid", data)
            assert result.body == {"ok": True}
            await call(client.trigger, "plain", "paid", data)
            [sealed] = await sub.wait_for(channel, 1)
            [plain] = await sub.wait_for("plain", 1)
    assert sealed.event == "paid" and sealed.channel == channel
    envelope = json.loads(sealed.data)
    assert set(envelope) == {"nonce", "ciphertext"}
    # Plain PyNaCl, not our crypto module: what a pusher-js client would do.
    box = nacl.secret.SecretBox(base64.b64decode(authorization["shared_secret"]))
    opened = box.decrypt(
        base64.b64decode(envelope["ciphertext"]), base64.b64decode(envelope["nonce"])
    ).decode("utf-8")
    assert opened == plain.data == '{"amount":12.5,"currency":"EUR","memo":"naïve ☕"}'
    assert "EUR" not in sealed.data


# -- soketi-style errors ------------------------------------------------------------------------


def test_wrong_secret_is_client_misconfigured(soketi: SoketiServer) -> None:
    recorder = Recorder()
    url = soketi.url.replace(":app-secret@", ":wrong-secret@")
    with (
        recorder.client() as http,
        Sockudo.from_url(url, client=http) as client,
        pytest.raises(ClientMisconfigured) as failure,
    ):
        client.trigger("orders", "created", {"id": 1})
    # soketi sends the real status only in the body; the HTTP status is 200.
    assert recorder.responses == [(200, b'{"error":"The secret authentication failed","code":401}')]
    assert failure.value.status == 401
    assert failure.value.code == "401"
    assert "wrong-secret" not in str(failure.value)


def test_unknown_app_is_client_misconfigured(soketi: SoketiServer) -> None:
    recorder = Recorder()
    url = soketi.url.replace("/apps/app-id", "/apps/no-such-app")
    with (
        recorder.client() as http,
        Sockudo.from_url(url, client=http) as client,
        pytest.raises(ClientMisconfigured) as failure,
    ):
        client.trigger("orders", "created", {"id": 1})
    assert recorder.responses == [
        (200, b'{"error":"The app no-such-app could not be found.","code":404}')
    ]
    assert failure.value.status == 404


async def test_oversized_event_is_refused_and_not_delivered(soketi_factory: Any) -> None:
    server = soketi_factory(max_event_size_kb=1)
    recorder = Recorder()
    async with PusherSubscriber(server.ws_url()) as sub:
        await sub.subscribe("big")
        with recorder.client() as http, Sockudo.from_url(server.url, client=http) as client:
            with pytest.raises(EventRefused) as failure:
                await call(client.trigger, "big", "blob", "x" * 2048)
            # Just under the limit goes through, so the refusal was about size.
            await call(client.trigger, "big", "small", "x" * 1000)
        [event] = await sub.wait_for("big", 1)
        assert event.event == "small"
        await sub.assert_no_more("big", 1)
    assert recorder.responses[0] == (
        200,
        b'{"error":"The event data should be less than 1 KB.","code":413}',
    )
    assert failure.value.status == 413


async def test_batch_over_the_limit_is_refused_and_nothing_delivered(
    soketi_factory: Any,
) -> None:
    server = soketi_factory(max_batch_size=3)
    recorder = Recorder()
    async with PusherSubscriber(server.ws_url()) as sub:
        await sub.subscribe("a")
        with recorder.client() as http, Sockudo.from_url(server.url, client=http) as client:
            with pytest.raises(EventRefused) as failure:
                await call(client.trigger_batch, [Event("a", f"e{i}", str(i)) for i in range(4)])
            result = await call(
                client.trigger_batch, [Event("a", f"ok{i}", str(i)) for i in range(3)]
            )
        assert result.body == {"ok": True}
        received = await sub.wait_for("a", 3)
        await sub.assert_no_more("a", 3)
    assert [e.event for e in received] == ["ok0", "ok1", "ok2"]
    assert recorder.responses[0] == (
        200,
        b'{"error":"Cannot batch-send more than 3 messages at once","code":400}',
    )
    assert failure.value.status == 400


def test_publishing_to_a_stopped_server_is_endpoint_unavailable(soketi: SoketiServer) -> None:
    with Sockudo.from_url(soketi.url) as client:
        assert client.trigger("orders", "before", "1").body == {"ok": True}
        soketi.stop()
        assert not soketi.running
        with pytest.raises(EndpointUnavailable) as failure:
            client.trigger("orders", "after", "2")
    assert failure.value.status is None
    # Nothing listens any more: the connection was refused, so the event surely did not go out.
    assert failure.value.maybe_delivered is False


# -- asyncio client -----------------------------------------------------------------------------


async def test_async_client_trigger_batch_and_user(soketi: SoketiServer) -> None:
    async with (
        AsyncSockudo.from_url(soketi.url) as client,
        PusherSubscriber(soketi.ws_url()) as sub,
    ):
        assert sub.socket_id is not None
        await sub.subscribe("private-async", client.authenticate(sub.socket_id, "private-async"))
        await sub.signin(client.authenticate_user(sub.socket_id, {"id": "async-user"}))
        one = await client.trigger("private-async", "one", {"n": 1})
        batch = await client.trigger_batch(
            [Event("private-async", "two", "2"), Event("private-async", "three", "3")]
        )
        user = await client.send_to_user("async-user", "hello", "you")
        assert one.body == batch.body == user.body == {"ok": True}
        events = await sub.wait_for("private-async", 3)
        [direct] = await sub.wait_for("#server-to-user-async-user", 1)
    assert [(e.event, e.data) for e in events] == [("one", '{"n":1}'), ("two", "2"), ("three", "3")]
    assert (direct.event, direct.data) == ("hello", "you")


async def test_async_client_errors_are_classified(soketi: SoketiServer) -> None:
    wrong = soketi.url.replace(":app-secret@", ":nope@")
    async with AsyncSockudo.from_url(wrong) as client:
        with pytest.raises(ClientMisconfigured) as misconfigured:
            await client.trigger("a", "e", "1")
    assert misconfigured.value.status == 401
    async with AsyncSockudo.from_url(soketi.url) as client:
        await asyncio.to_thread(soketi.stop)
        with pytest.raises(EndpointUnavailable) as unavailable:
            await client.trigger("a", "e", "1")
    assert unavailable.value.maybe_delivered is False

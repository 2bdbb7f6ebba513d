"""``outbox.sockudo`` against the official SDK (``sockudo-http-python`` from PyPI).

1. The same inputs, given to the SDK and to our client through a recording transport, produce the
   same method, path, query and body for every operation; the differences we chose are listed in
   ``DELIBERATE`` and asserted to be exactly those.
2. Every snippet of the SDK's README runs unchanged against our client (import renamed to
   ``outbox.sockudo``), on the test server with every feature on.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
import sockudo_http_python as sdk
import sockudo_http_python.client as sdk_client

import outbox.sockudo as ours
from outbox.testing.server import TestServer

T0 = 1_700_000_000
SERIAL = "00000001724310000000:node:00000000000000000001"

#: What our client sends differently on purpose, per operation (the README's table says why).
DELIBERATE: dict[str, set[str]] = {
    # A durable idempotency key on every mutation: the SDK sends none (and cannot on append).
    "update_message": {"op_id"},
    "delete_message": {"op_id"},
    "append_message": {"op_id"},
}


class Recording:
    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(200, json={})


def sent(request: httpx.Request) -> tuple[str, str, dict[str, str], Any]:
    query = dict(parse_qsl(request.url.query.decode(), keep_blank_values=True))
    for signed in ("auth_signature", "body_md5"):
        query.pop(signed, None)
    body = json.loads(request.content) if request.content else None
    return request.method, request.url.raw_path.split(b"?")[0].decode(), query, body


CASES: list[tuple[str, Callable[[Any, Any], Any]]] = [
    (
        "trigger",
        lambda m, c: c.trigger(
            "orders",
            "order.created",
            {"id": "ord_123"},
            m.TriggerOptions(
                socket_id="1.2", info=["subscription_count"], idempotency_key="k-1", tags={"a": "b"}
            ),
        ),
    ),
    ("trigger", lambda m, c: c.trigger(["a", "b"], "fanout", "plain text")),
    (
        "trigger_batch",
        lambda m, c: c.trigger_batch(
            [m.Event("orders", "a", {"n": 1}), m.Event(None, "b", "x", channels=["a", "b"])]
        ),
    ),
    ("send_to_user", lambda m, c: c.send_to_user("user-123", "notice", {"body": "hello"})),
    ("get", lambda m, c: c.get("/channels", {"filter_by_prefix": "presence-"})),
    (
        "list_channels",
        lambda m, c: c.list_channels(
            m.ChannelsParams(
                filter_by_prefix="presence-", info=["subscription_count", "user_count"]
            )
        ),
    ),
    (
        "get_channel",
        lambda m, c: c.get_channel("presence-room", m.ChannelParams(info="user_count")),
    ),
    ("get_channel_users", lambda m, c: c.get_channel_users("presence-room")),
    (
        "get_channel_history",
        lambda m, c: c.get_channel_history(
            "orders",
            m.HistoryParams(limit=50, direction="newest_first", start_serial=2, end_time_ms=9),
        ),
    ),
    ("get_channel_history_state", lambda m, c: c.get_channel_history_state("orders")),
    ("reset_channel_history", lambda m, c: c.reset_channel_history("orders", "incident", "ops")),
    (
        "purge_channel_history",
        lambda m, c: c.purge_channel_history("orders", "before_serial", "gdpr", "ops", 3),
    ),
    (
        "purge_channel_history",
        lambda m, c: c.purge_channel_history("orders", "before_time_ms", "r", before_time_ms=5),
    ),
    (
        "get_channel_presence_history",
        lambda m, c: c.get_channel_presence_history(
            "presence-room", m.PresenceHistoryParams(limit=50, cursor="abc")
        ),
    ),
    (
        "get_channel_presence_history_state",
        lambda m, c: c.get_channel_presence_history_state("presence-room"),
    ),
    (
        "reset_channel_presence_history",
        lambda m, c: c.reset_channel_presence_history("presence-room", "privacy"),
    ),
    (
        "get_channel_presence_snapshot",
        lambda m, c: c.get_channel_presence_snapshot(
            "presence-room", m.PresenceSnapshotParams(at_serial=3, at_time_ms=7)
        ),
    ),
    ("get_message", lambda m, c: c.get_message("orders", SERIAL)),
    (
        "get_message_versions",
        lambda m, c: c.get_message_versions(
            "orders", SERIAL, m.MessageVersionsParams(limit=2, direction="oldest_first", cursor="v")
        ),
    ),
    (
        "update_message",
        lambda m, c: c.update_message(
            "orders",
            SERIAL,
            m.MessageMutation(
                data={"status": "paid"},
                extras={"headers": {"x": "1"}},
                clear_fields=["name"],
                client_id="svc",
                description="paid",
                metadata={"by": "billing"},
            ),
        ),
    ),
    ("update_message", lambda m, c: c.update_message("orders", SERIAL, {"data": "raw"})),
    ("delete_message", lambda m, c: c.delete_message("orders", SERIAL)),
    (
        "delete_message",
        lambda m, c: c.delete_message("orders", SERIAL, m.MessageMutation(description="moderated")),
    ),
    ("append_message", lambda m, c: c.append_message("orders", SERIAL, " more", "1.2")),
    (
        "publish_annotation",
        lambda m, c: c.publish_annotation(
            "orders",
            SERIAL,
            m.PublishAnnotationRequest(
                type="reactions:distinct.v1", name="like", client_id="user-1", count=1
            ),
        ),
    ),
    (
        "list_annotations",
        lambda m, c: c.list_annotations(
            "orders",
            SERIAL,
            m.AnnotationEventsParams(type="t:total.v1", from_serial="s", limit=5, socket_id="1.2"),
        ),
    ),
    ("delete_annotation", lambda m, c: c.delete_annotation("orders", SERIAL, "ann:7", "1.2")),
    ("terminate_user_connections", lambda m, c: c.terminate_user_connections("user 1")),
    ("force_reconnect_user", lambda m, c: c.force_reconnect_user("user-1")),
]


@pytest.fixture
def frozen_sdk_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdk_client.time, "time", lambda: T0)


@pytest.mark.usefixtures("frozen_sdk_clock")
@pytest.mark.parametrize(
    ("operation", "call"), CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)]
)
def test_same_request_as_the_sdk(operation: str, call: Callable[[Any, Any], Any]) -> None:
    theirs_rec, ours_rec = Recording(), Recording()
    theirs = sdk.Sockudo(
        "app-id",
        "app-key",
        "app-secret",
        options=sdk.SockudoOptions(http2=False, max_retries=1),
        client=httpx.Client(transport=httpx.MockTransport(theirs_rec)),
    )
    mine = ours.Sockudo(
        "app-id",
        "app-key",
        "app-secret",
        clock=lambda: T0,
        client=httpx.Client(transport=httpx.MockTransport(ours_rec)),
    )
    call(sdk, theirs)
    call(ours, mine)
    [their_request], [our_request] = theirs_rec.requests, ours_rec.requests
    their_sent, our_sent = sent(their_request), sent(our_request)
    for field in DELIBERATE.get(operation, set()):
        assert field in our_sent[3] and field not in their_sent[3]
        del our_sent[3][field]
    assert our_sent == their_sent
    if our_request.content == their_request.content:
        # Same bytes: the whole signed query, signature included, is the same.
        assert our_request.url.query == their_request.url.query
    if operation == "trigger" and "idempotency_key" in (their_sent[3] or {}):
        # The SDK repeats the key in a header; the body's key is the one Sockudo reads first.
        assert their_request.headers["x-idempotency-key"] == "k-1"
        assert "x-idempotency-key" not in our_request.headers


def test_every_sdk_operation_is_compared() -> None:
    readme_methods = {
        "list_channels",
        "get_channel",
        "get_channel_users",
        "get_channel_history",
        "get_channel_history_state",
        "get_channel_presence_history",
        "get_channel_presence_history_state",
        "get_channel_presence_snapshot",
        "get_message",
        "get_message_versions",
        "update_message",
        "delete_message",
        "append_message",
        "publish_annotation",
        "list_annotations",
        "delete_annotation",
        "reset_channel_history",
        "purge_channel_history",
        "reset_channel_presence_history",
        "terminate_user_connections",
        "force_reconnect_user",
        "trigger",
        "trigger_batch",
        "send_to_user",
        "get",
    }
    assert readme_methods <= {name for name, _ in CASES}
    for name in readme_methods:
        assert hasattr(sdk.Sockudo, name) and hasattr(ours.Sockudo, name)
        assert hasattr(ours.AsyncSockudo, name)


def test_pure_helpers_agree_with_the_sdk() -> None:
    key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
    theirs = sdk.Sockudo("app-id", "app-key", "app-secret", encryption_master_key_base64=key)
    mine = ours.Sockudo("app-id", "app-key", "app-secret", encryption_master_key_base64=key)
    try:
        channel = "private-encrypted-room"
        assert mine.channel_shared_secret(channel) == theirs.channel_shared_secret(channel)
        assert mine.authenticate("123.456", channel) == json.loads(
            theirs.authenticate("123.456", channel)
        )
        presence_theirs = theirs.authenticate(
            "123.456", "presence-room", sdk.PresenceUser("user-1", {"name": "Ada"})
        )
        presence_ours = mine.authenticate(
            "123.456", "presence-room", ours.PresenceUser("user-1", {"name": "Ada"})
        )
        assert presence_ours == json.loads(presence_theirs)
        user = {"id": "user-1", "name": "Ada"}
        assert mine.authenticate_user("123.456", user) == json.loads(
            theirs.authenticate_user("123.456", user)
        )
    finally:
        theirs.close()
        mine.close()


# -- the SDK README, unchanged -------------------------------------------------------------------

#: The README's snippets, verbatim but for ``sockudo_http[_python]`` -> ``outbox.sockudo``.
#: The one other change: port 6001 becomes the test server's port (6001 may be taken here).
README_SNIPPETS = {
    "quick start": """
        from outbox.sockudo import Config, Sockudo

        sockudo = Sockudo(Config(app_id="app-id", key="app-key", secret="app-secret", host="127.0.0.1", port=6001))

        result = sockudo.trigger("orders", "order.created", {"id": "ord_123"})
        assert result.ok
        sockudo.close()
    """,
    "async": """
        from outbox.sockudo import AsyncSockudo, SockudoOptions

        async with AsyncSockudo(
            "app-id",
            "app-key",
            "app-secret",
            options=SockudoOptions(host="127.0.0.1", port=6001),
        ) as sockudo:
            await sockudo.trigger("orders", "order.created", {"id": "ord_123"})
    """,
    "idempotent publishing": """
        from outbox.sockudo import TriggerOptions

        sockudo.trigger(
            "orders",
            "order.created",
            {"id": "ord_123"},
            TriggerOptions(idempotency_key="order-created-ord_123"),
        )

        sockudo.trigger("orders", "order.created", {"id": "ord_124"}, TriggerOptions(idempotency_key=True))
    """,
    "auto idempotency": """
        from outbox.sockudo import Sockudo, SockudoOptions

        auto = Sockudo("app-id", "app-key", "app-secret", options=SockudoOptions(port=6001, auto_idempotency=True))
        auto.trigger("orders", "order.created", {"id": "ord_125"})
        auto.close()
    """,
    "send to user": """
        sockudo.send_to_user("user-123", "notice", {"body": "hello"})
    """,
    "authentication": """
        from outbox.sockudo import PresenceUser

        private_body = sockudo.authenticate("123.456", "private-orders")

        presence_body = sockudo.authenticate(
            "123.456",
            "presence-room",
            PresenceUser("user-1", {"name": "Ada"}),
        )

        user_body = sockudo.authenticate_user("123.456", {"id": "user-1", "name": "Ada"})
    """,
    "encrypted": """
        encrypted = Sockudo(
            "app-id",
            "app-key",
            "app-secret",
            encryption_master_key_base64="AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        )

        body = encrypted.authenticate("123.456", "private-encrypted-room")
    """,
    "channel and history": """
        from outbox.sockudo import ChannelsParams, HistoryParams, PresenceHistoryParams

        sockudo.list_channels(ChannelsParams(filter_by_prefix="presence-", info=["subscription_count", "user_count"]))
        sockudo.get_channel_users("presence-room")
        sockudo.get_channel_history("orders", HistoryParams(limit=50, direction="newest_first"))
        sockudo.get_channel_presence_history("presence-room", PresenceHistoryParams(limit=50))
    """,
    "versioned messages and annotations": """
        from outbox.sockudo import MessageMutation, PublishAnnotationRequest

        sockudo.get_message("orders", "msg:1")
        sockudo.get_message_versions("orders", "msg:1")
        sockudo.update_message("orders", "msg:1", MessageMutation(data={"status": "paid"}))
        sockudo.append_message("orders", "msg:1", " appended text")
        sockudo.delete_message("orders", "msg:1", MessageMutation(description="moderated"))

        sockudo.publish_annotation(
            "orders",
            "msg:1",
            PublishAnnotationRequest(type="reactions:distinct.v1", name="like", client_id="user-1", count=1),
        )
        sockudo.list_annotations("orders", "msg:1")
    """,
    "webhooks": """
        validity = sockudo.validate_webhook_signature(x_pusher_key, x_pusher_signature, raw_body)
        webhook = sockudo.parse_webhook(x_pusher_key, x_pusher_signature, raw_body)
    """,
    "signed uri": """
        uri = sockudo.signed_uri("GET", "/apps/app-id/channels", parameters={"filter_by_prefix": "presence-"})
    """,
    "from url": """
        sockudo = Sockudo.from_url("http://app-key:app-secret@127.0.0.1:6001/apps/app-id")
    """,
}


@pytest.fixture
def full_server(sockudo_server_all_features: TestServer) -> TestServer:
    return sockudo_server_all_features


def run_snippet(name: str, server: TestServer, namespace: dict[str, Any]) -> dict[str, Any]:
    code = textwrap.dedent(README_SNIPPETS[name]).replace("6001", str(server.port))
    if "await " in code:
        wrapped = "async def _snippet():\n" + textwrap.indent(code, "    ")
        exec(compile(wrapped, name, "exec"), namespace)
        asyncio.run(namespace["_snippet"]())
    else:
        exec(compile(code, name, "exec"), namespace)
    return namespace


def test_the_sdk_readme_runs_unchanged(full_server: TestServer) -> None:
    import hashlib
    import hmac

    namespace: dict[str, Any] = {}
    run_snippet("quick start", full_server, namespace)
    run_snippet("async", full_server, namespace)
    with ours.Sockudo.from_url(full_server.url) as sockudo:
        full_server.connect(["presence-room"], "user-1")
        raw_body = json.dumps({"time_ms": 1, "events": [{"name": "channel_occupied"}]})
        signature = hmac.new(b"app-secret", raw_body.encode(), hashlib.sha256).hexdigest()
        namespace.update(
            sockudo=sockudo,
            Sockudo=ours.Sockudo,
            x_pusher_key="app-key",
            x_pusher_signature=signature,
            raw_body=raw_body,
        )
        for name in (
            "idempotent publishing",
            "auto idempotency",
            "send to user",
            "authentication",
            "encrypted",
            "channel and history",
            "webhooks",
            "signed uri",
        ):
            run_snippet(name, full_server, namespace)
        assert namespace["validity"] is True
        assert httpx.get(namespace["uri"]).json() == {"channels": {"presence-room": {}}}
    run_snippet("from url", full_server, namespace)
    namespace["sockudo"].close()
    delivered = [(d.channel, d.data) for d in full_server.deliveries()]
    assert delivered == [
        ("orders", '{"id":"ord_123"}'),  # quick start
        ("orders", '{"id":"ord_123"}'),  # async
        ("orders", '{"id":"ord_123"}'),  # an explicit key
        ("orders", '{"id":"ord_124"}'),  # idempotency_key=True
        ("orders", '{"id":"ord_125"}'),  # auto_idempotency
        ("#server-to-user-user-123", '{"body":"hello"}'),
    ]


def test_the_sdk_readme_message_calls_send_what_the_server_reads(full_server: TestServer) -> None:
    """``"msg:1"`` is the README's placeholder (real serials are ``ts:node:counter``): the calls are
    checked on a recording transport, then on the test server with a real serial."""
    recording = Recording()
    client = ours.Sockudo(
        "app-id",
        "app-key",
        "app-secret",
        client=httpx.Client(transport=httpx.MockTransport(recording)),
    )
    run_snippet("versioned messages and annotations", full_server, {"sockudo": client})
    paths = [r.url.raw_path.split(b"?")[0].decode().split("msg%3A1")[1] for r in recording.requests]
    assert paths == [
        "",
        "/versions",
        "/update",
        "/append",
        "/delete",
        "/annotations",
        "/annotations",
    ]
    with ours.Sockudo.from_url(full_server.url) as sockudo:
        serial = (
            sockudo.trigger("orders", "e", "x", message_id="m").channels["orders"].message_serial
        )
        snippet = README_SNIPPETS["versioned messages and annotations"].replace("msg:1", serial)
        exec(compile(textwrap.dedent(snippet), "snippet", "exec"), {"sockudo": sockudo})
        message = sockudo.get_message("orders", serial)
        assert (message.action, message.data) == ("delete", '{"status":"paid"} appended text')
        [annotation] = sockudo.list_annotations("orders", serial).items
        assert annotation.client_id == "user-1"

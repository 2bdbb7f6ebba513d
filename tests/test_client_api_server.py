"""The whole non-publish API, on both clients, against the test server over real HTTP.

Every test runs twice: with ``Sockudo`` and with ``AsyncSockudo`` (driven through one event loop
per call, so the test body is the same). The server has every feature on unless a test says not.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from outbox.sockudo import (
    AnnotationEventsParams,
    AsyncSockudo,
    ChannelsParams,
    CursorExpired,
    EndpointUnavailable,
    EventRefused,
    FeatureDisabled,
    Forbidden,
    HistoryParams,
    InvalidEvent,
    MessageMutation,
    NotFound,
    PresenceHistoryParams,
    PresenceSnapshotParams,
    PublishAnnotationRequest,
    Sockudo,
)
from outbox.sockudo.bodies import dump_body
from outbox.testing.server import TestServer, TestServerProcess
from tests.plugins.sockudo_server import ALL_FEATURES as ALL_ON


class AsyncClient:
    """``AsyncSockudo`` with the call surface of ``Sockudo``: each call awaits in its own loop."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            async def go() -> Any:
                async with AsyncSockudo.from_url(self.url, timeout=5.0) as client:
                    if name == "run_twice":
                        built = getattr(client, args[0]).prepare(*args[1:], **kwargs)
                        return [await client.run(built), await client.run(built)]
                    result = getattr(client, name)(*args, **kwargs)
                    if name.startswith("iter_"):
                        return [item async for item in result]
                    return await result

            return asyncio.run(go())

        return call


class SyncClient:
    """``Sockudo``, with ``iter_*`` collected into lists like :class:`AsyncClient`."""

    def __init__(self, url: str) -> None:
        self.client = Sockudo.from_url(url, timeout=5.0)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name == "run_twice":

            def twice(operation: str, *args: Any, **kwargs: Any) -> list[Any]:
                built = getattr(self.client, operation).prepare(*args, **kwargs)
                return [self.client.run(built), self.client.run(built)]

            return twice
        method = getattr(self.client, name)
        if name.startswith("iter_"):
            return lambda *a, **k: list(method(*a, **k))
        return method


@pytest.fixture
def server(sockudo_server_all_features: TestServer) -> TestServer:
    return sockudo_server_all_features


@pytest.fixture(params=["sync", "async"])
def client(request: pytest.FixtureRequest, server: TestServer) -> Iterator[Any]:
    if request.param == "sync":
        wrapper = SyncClient(server.url)
        yield wrapper
        wrapper.client.close()
    else:
        yield AsyncClient(server.url)


def publish(server: TestServer, channel: str, count: int) -> list[str]:
    """Publish ``count`` events (``text-0``...), each with a new message id; their serials."""
    serials = []
    with Sockudo.from_url(server.url) as sockudo:
        for n in range(count):
            message_id = f"{channel}-{server.delivered_count()}"
            result = sockudo.trigger(channel, "e", f"text-{n}", message_id=message_id)
            serials.append(result.channels[channel].message_serial)
    return serials


# -- channel state -------------------------------------------------------------------------------


def test_channel_state_and_users(client: Any, server: TestServer) -> None:
    server.connect(["presence-room"], "ann", {"name": "Ann"})
    server.connect(["presence-room", "orders"], "bob")
    server.connect(["orders"])
    listed = client.list_channels(
        ChannelsParams(filter_by_prefix="presence-", info=["subscription_count", "user_count"])
    )
    assert listed.ok and set(listed) == {"presence-room"}
    room = listed.channels["presence-room"]
    assert (room.subscription_count, room.user_count) == (2, 2)
    everything = client.list_channels()
    assert set(everything) == {"orders", "presence-room"}
    assert everything.json() == {"channels": {"orders": {}, "presence-room": {}}}
    orders = client.get_channel("orders", info="subscription_count")
    assert (orders.occupied, orders.subscription_count, orders.user_count) == (True, 2, None)
    assert client.get_channel("empty").occupied is False
    assert client.get_channel_users("presence-room").ids == ("ann", "bob")
    with pytest.raises(EventRefused, match="Only presence channels"):
        client.get_channel_users("orders")
    with pytest.raises(EventRefused, match="user_count is only available"):
        client.get_channel("orders", info="user_count")
    with pytest.raises(EventRefused, match="user_count is only available"):
        client.list_channels(info="user_count")


def test_terminate_user_connections_removes_the_member_and_records_why(
    client: Any, server: TestServer
) -> None:
    server.connect(["presence-room"], "ann")
    server.connect(["presence-room"], "bob")
    assert client.terminate_user_connections("ann").json() == {"ok": True}
    assert client.get_channel_users("presence-room").ids == ("bob",)
    events = client.iter_channel_presence_history("presence-room", direction="oldest_first")
    assert [(e.event, e.user_id, e.cause) for e in events] == [
        ("member_added", "ann", "join"),
        ("member_added", "bob", "join"),
        ("member_removed", "ann", "forced_disconnect"),
    ]
    assert client.force_reconnect_user("bob").json() == {"ok": True}
    assert client.get_channel_users("presence-room").ids == ()


# -- durable history -----------------------------------------------------------------------------


def test_publish_answers_message_serials_only_with_history_and_versions(server: TestServer) -> None:
    with Sockudo.from_url(server.url) as sockudo:
        versioned = sockudo.trigger("orders", "e", "x", message_id="m-1").channels["orders"]
        server.set_features(versioned_messages=False, annotations=False)
        plain = sockudo.trigger("orders", "e", "x", message_id="m-2").channels["orders"]
    assert versioned.message_serial.endswith(":node:00000000000000000001")
    assert versioned.acknowledgement_id == versioned.message_serial
    assert versioned.history_serial == 1
    assert (plain.acknowledgement_id, plain.message_serial) == ("m-2", None)


def test_history_pages_walk_with_fixed_direction_and_bounds(
    client: Any, server: TestServer
) -> None:
    publish(server, "orders", 7)
    first = client.get_channel_history("orders", HistoryParams(limit=3))
    assert [i.serial for i in first] == [7, 6, 5]
    assert first.has_more and first.next_cursor and first.direction == "newest_first"
    assert first.items[0].message_id == "orders-6" and first.items[0].message_serial
    second = client.get_channel_history("orders", limit=2, cursor=first.next_cursor)
    assert [i.serial for i in second] == [4, 3]  # limit may change between pages
    walked = client.iter_channel_history("orders", limit=3)
    assert [i.serial for i in walked] == [7, 6, 5, 4, 3, 2, 1]
    bounded = client.iter_channel_history(
        "orders", direction="oldest_first", start_serial=2, end_serial=6, limit=2
    )
    assert [i.serial for i in bounded] == [2, 3, 4, 5, 6]
    with pytest.raises(EventRefused, match="direction does not match"):
        client.get_channel_history("orders", direction="oldest_first", cursor=first.next_cursor)
    with pytest.raises(EventRefused, match="bounds do not match"):
        client.get_channel_history("orders", start_serial=1, cursor=first.next_cursor)
    with pytest.raises(EventRefused, match="greater than 0"):
        client.get_channel_history("orders", limit=0)


def test_an_expired_cursor_raises_cursor_expired(client: Any, server: TestServer) -> None:
    publish(server, "orders", 4)
    page = client.get_channel_history("orders", limit=1, direction="oldest_first")
    client.purge_channel_history("orders", "before_serial", "tidy", before_serial=3)
    with pytest.raises(CursorExpired, match="before retained history"):
        client.get_channel_history(
            "orders", limit=1, direction="oldest_first", cursor=page.next_cursor
        )
    page = client.get_channel_history("orders", limit=1)
    client.reset_channel_history("orders", "start over")
    with pytest.raises(CursorExpired, match="stream changed"):
        client.get_channel_history("orders", limit=1, cursor=page.next_cursor)


def test_history_state_reset_and_purge(client: Any, server: TestServer) -> None:
    publish(server, "orders", 5)
    state = client.get_channel_history_state("orders")
    assert (state.next_serial, state.retained["retained_messages"]) == (6, 5)
    assert state.durable_state == "healthy"
    purged = client.purge_channel_history("orders", "before_serial", "gdpr", before_serial=3)
    assert (purged.operation, purged.mode, purged.purged, purged.reason) == (
        "purge",
        "before_serial",
        2,
        "gdpr",
    )
    again = client.purge_channel_history("orders", "before_serial", "gdpr", before_serial=3)
    assert again.purged == 0  # the before_* modes are repeat-safe
    reset = client.reset_channel_history("orders", "incident 42", requested_by="ops")
    assert (reset.operation, reset.purged, reset.requested_by) == ("reset", 3, "ops")
    assert reset.previous_stream_id == state.stream_id != reset.new_stream_id
    publish(server, "orders", 1)
    assert [i.serial for i in client.iter_channel_history("orders")] == [1]  # restarted at 1


def test_operator_controls_are_checked_before_any_request(client: Any) -> None:
    with pytest.raises(InvalidEvent) as caught:
        client.reset_channel_history("orders", "  ")
    assert caught.value.field == "reason"
    for mode, bounds in [
        ("all", {"before_serial": 3}),
        ("before_serial", {}),
        ("before_time_ms", {"before_serial": 1}),
        ("everything", {}),
    ]:
        with pytest.raises(InvalidEvent):
            client.purge_channel_history("orders", mode, "r", **bounds)


def test_the_server_checks_the_confirmation_fields(server: TestServer) -> None:
    with Sockudo.from_url(server.url) as sockudo:
        path = sockudo.app_path("/channels/orders/history/reset")
        wrong = {"confirm_channel": "other", "confirm_operation": "reset", "reason": "r"}
        with pytest.raises(EventRefused, match="confirm_channel must exactly match"):
            sockudo.send(sockudo._post(path, wrong))
        with pytest.raises(EventRefused) as caught:
            sockudo.send(sockudo._post(path, {"reason": "r"}))
    assert caught.value.status == 422 and caught.value.code is None  # axum's plain text


# -- versioned messages --------------------------------------------------------------------------


def test_update_delete_append_and_versions(client: Any, server: TestServer) -> None:
    [serial] = publish(server, "orders", 1)
    update = client.update_message("orders", serial, MessageMutation(data={"status": "paid"}))
    assert (update.action, update.status, update.message_serial) == ("update", "applied", serial)
    assert client.get_message("orders", serial).data == '{"status":"paid"}'
    client.append_message("orders", serial, " +1")
    client.append_message("orders", serial, " +1")  # a second call is a second append
    assert client.get_message("orders", serial).data == '{"status":"paid"} +1 +1'
    deleted = client.delete_message("orders", serial, MessageMutation(description="moderated"))
    message = client.get_message("orders", serial)
    assert (deleted.action, message.action, message.data) == (
        "delete",
        "delete",
        '{"status":"paid"} +1 +1',
    )  # a soft delete keeps the data
    client.delete_message("orders", serial, clear_fields=["data", "extras"])
    assert client.get_message("orders", serial).data is None
    revived = client.update_message("orders", serial, {"data": "back"})
    assert (revived.action, client.get_message("orders", serial).data) == ("update", "back")
    versions = client.iter_message_versions("orders", serial, limit=2, direction="oldest_first")
    assert [v.action for v in versions] == [
        "create",
        "update",
        "append",
        "append",
        "delete",
        "delete",
        "update",
    ]
    assert versions[2].data == " +1"  # an append version shows its fragment
    assert versions[4].version["description"] == "moderated"
    newest = client.get_message_versions("orders", serial, limit=1)
    assert newest.items[0].version_serial == revived.version_serial and newest.has_more
    history = client.get_channel_history("orders")
    assert history.items[0].event_name == "sockudo:message.update"
    assert history.items[0].message_serial == serial and history.items[0].serial == 1


def test_a_retried_mutation_is_a_duplicate_with_the_same_bytes_and_no_broadcast(
    client: Any, server: TestServer
) -> None:
    [serial] = publish(server, "orders", 1)
    first, again = client.run_twice("append_message", "orders", serial, " chunk")
    assert (first.status, again.status) == ("applied", "duplicate")
    assert again.version_serial == first.version_serial
    assert client.get_message("orders", serial).data == "text-0 chunk"
    broadcasts = [d for d in server.deliveries("orders") if d.endpoint == "mutation"]
    assert [d.name for d in broadcasts] == ["sockudo:message.append"]
    bodies = [r for r in server.requests() if r["endpoint"] == "mutation"]
    assert len(bodies) == 2


def test_op_id_is_the_callers_and_a_changed_payload_conflicts(
    client: Any, server: TestServer
) -> None:
    [serial] = publish(server, "orders", 1)
    first = client.update_message("orders", serial, data="paid", op_id="order-1-paid")
    repeat = client.update_message("orders", serial, {"data": "paid", "op_id": "order-1-paid"})
    assert (first.status, repeat.status) == ("applied", "duplicate")
    with pytest.raises(EventRefused, match="different payload"):
        client.update_message("orders", serial, data="refunded", op_id="order-1-paid")
    # The same op_id on another action is another operation.
    assert client.delete_message("orders", serial, op_id="order-1-paid").status == "applied"


def test_unknown_message_is_not_found(client: Any, server: TestServer) -> None:
    publish(server, "orders", 1)
    missing = "00000000000000000001:node:00000000000000000999"
    with pytest.raises(NotFound, match="was not found"):
        client.get_message("orders", missing)
    with pytest.raises(NotFound):
        client.update_message("orders", missing, data="x")
    with pytest.raises(InvalidEvent):
        client.get_message("orders", "has space")


# -- annotations ---------------------------------------------------------------------------------


def test_annotations_publish_list_delete(client: Any, server: TestServer) -> None:
    [serial] = publish(server, "orders", 1)
    like = PublishAnnotationRequest(type="reactions:distinct.v1", name="like", client_id="ann")
    one = client.publish_annotation("orders", serial, like)
    two = client.publish_annotation(
        "orders", serial, {"type": "reactions:distinct.v1", "name": "like", "client_id": "bob"}
    )
    three = client.publish_annotation("orders", serial, type="votes:total.v1")
    assert len({one.annotation_serial, two.annotation_serial, three.annotation_serial}) == 3
    page = client.list_annotations("orders", serial, AnnotationEventsParams(limit=2))
    assert [e.client_id for e in page] == ["ann", "bob"] and page.has_more
    assert page.message_serial == serial
    events = client.iter_annotations("orders", serial, limit=1)
    assert [e.type for e in events] == ["reactions:distinct.v1"] * 2 + ["votes:total.v1"]
    deleted = client.delete_annotation("orders", serial, one.annotation_serial)
    assert deleted.deleted_annotation_serial == one.annotation_serial
    assert not deleted.already_deleted
    repeat = client.delete_annotation("orders", serial, one.annotation_serial)
    assert repeat.already_deleted
    actions = [e.action for e in client.iter_annotations("orders", serial)]
    assert actions.count("annotation.delete") == 1
    assert client.list_annotations("orders", serial, type="votes:total.v1").items[0].id


def test_annotation_publish_is_not_idempotent_on_the_server(
    client: Any, server: TestServer
) -> None:
    [serial] = publish(server, "orders", 1)
    first, again = client.run_twice("publish_annotation", "orders", serial, type="votes:total.v1")
    assert first.annotation_serial != again.annotation_serial
    assert len(client.list_annotations("orders", serial).items) == 2


def test_the_server_ignores_snake_case_client_id(server: TestServer) -> None:
    """Why the client converts: Sockudo reads only clientId, and a distinct type then fails."""
    [serial] = publish(server, "orders", 1)
    with Sockudo.from_url(server.url) as sockudo:
        path = sockudo._message_path("orders", serial, "/annotations")
        body = {"type": "reactions:distinct.v1", "name": "like", "client_id": "ann"}
        with pytest.raises(EventRefused, match="client_id is required"):
            sockudo.send(sockudo._post(path, body))
        sent = sockudo.publish_annotation.prepare("orders", serial, body).request.body
    assert json.loads(sent)["clientId"] == "ann"


# -- presence history ----------------------------------------------------------------------------


def test_presence_history_snapshot_and_reset(client: Any, server: TestServer) -> None:
    ann = server.connect(["presence-room"], "ann", {"name": "Ann"})
    server.connect(["presence-room"], "bob")
    server.disconnect(ann)
    page = client.get_channel_presence_history("presence-room", PresenceHistoryParams(limit=2))
    assert [(e.serial, e.event, e.user_id) for e in page] == [
        (3, "member_removed", "ann"),
        (2, "member_added", "bob"),
    ]
    assert page.has_more
    oldest = client.iter_channel_presence_history("presence-room", direction="oldest_first")
    assert oldest[0].presence_event == {"user_id": "ann", "user_info": {"name": "Ann"}}
    at_two = client.get_channel_presence_snapshot(
        "presence-room", PresenceSnapshotParams(at_serial=2)
    )
    assert at_two.user_ids == ("ann", "bob") and at_two.member_count == 2
    assert client.get_channel_presence_snapshot("presence-room").user_ids == ("bob",)
    state = client.get_channel_presence_history_state("presence-room")
    assert state.retained["retained_events"] == 3
    reset = client.reset_channel_presence_history("presence-room", "privacy request")
    assert (reset.operation, reset.purged) == ("reset", 3)
    with pytest.raises(EventRefused, match="Only presence channels"):
        client.get_channel_presence_history("orders")


# -- features off --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("switches", "call", "setting"),
    [
        ({"history": False, "app_annotations": False}, "history", "HISTORY_ENABLED=true"),
        ({"presence_history": False}, "presence", "PRESENCE_HISTORY_ENABLED=true"),
        (
            {"versioned_messages": False, "annotations": False},
            "message",
            "VERSIONED_MESSAGES_ENABLED=true",
        ),
        ({"annotations": False}, "annotations", "ANNOTATIONS_ENABLED=true"),
        ({"history": False, "app_annotations": False}, "update", "HISTORY_ENABLED=true"),
    ],
)
def test_a_disabled_feature_names_its_setting(
    client: Any, server: TestServer, switches: dict[str, bool], call: str, setting: str
) -> None:
    [serial] = publish(server, "orders", 1)
    server.set_features(**switches)
    calls: dict[str, Callable[[], Any]] = {
        "history": lambda: client.get_channel_history("orders"),
        "presence": lambda: client.get_channel_presence_history("presence-room"),
        "message": lambda: client.get_message("orders", serial),
        "annotations": lambda: client.list_annotations("orders", serial),
        "update": lambda: client.update_message("orders", serial, data="x"),
    }
    with pytest.raises(FeatureDisabled) as caught:
        calls[call]()
    assert (caught.value.status, caught.value.code, caught.value.setting) == (
        422,
        "feature_disabled",
        setting,
    )
    assert setting in str(caught.value)
    assert not isinstance(caught.value, EventRefused)


def test_annotation_policy_off_is_forbidden_not_auth(client: Any, server: TestServer) -> None:
    [serial] = publish(server, "orders", 1)
    server.set_features(app_annotations=False)
    with pytest.raises(Forbidden) as caught:
        client.publish_annotation("orders", serial, type="votes:total.v1")
    assert caught.value.status == 403
    assert caught.value.setting == "SOCKUDO_DEFAULT_APP_ANNOTATIONS_ENABLED=true"


def test_annotation_policy_without_history_fails_every_publish() -> None:
    """Sockudo's trap: the app policy forces history on, and the history store is a no-op."""
    with (
        TestServer(versioned_messages=True, annotations=True, app_annotations=True) as server,
        Sockudo.from_url(server.url) as sockudo,
        pytest.raises(EndpointUnavailable) as caught,
    ):
        sockudo.trigger("orders", "e", "x")
    assert caught.value.status == 500
    assert server.delivered_count() == 0


def test_annotations_without_versioned_messages_is_a_startup_error() -> None:
    with pytest.raises(ValueError, match="versioned_messages"):
        TestServer(annotations=True)


# -- the subprocess and its control API -----------------------------------------------------------


def test_server_process_flags_and_control_api() -> None:
    with TestServerProcess(all_features=True) as remote:
        assert remote.features() == dict.fromkeys(ALL_ON, True)
        socket_id = remote.connect(["presence-room"], "ann")
        with Sockudo.from_url(remote.url) as sockudo:
            assert sockudo.get_channel_users("presence-room").ids == ("ann",)
            serial = (
                sockudo.trigger("orders", "e", "x", info="subscription_count")
                .channels["orders"]
                .message_serial
            )
            assert sockudo.get_message("orders", serial).data == "x"
            remote.disconnect(socket_id)
            assert remote.connections() == []
            remote.set_features(history=False, app_annotations=False)
            with pytest.raises(FeatureDisabled):
                sockudo.get_channel_history("orders")
        control = httpx.post(f"{remote.control_url}/features", json={"nope": True})
        assert control.status_code == 400


def test_raw_bodies_are_refused_like_sockudo(server: TestServer) -> None:
    [serial] = publish(server, "orders", 1)
    with Sockudo.from_url(server.url) as sockudo:
        path = sockudo._message_path("orders", serial, "/append")
        with pytest.raises(EventRefused) as missing:
            sockudo.send(sockudo._post(path, {"op_id": "x"}))
        long_op = {"data": "x", "op_id": "x" * 65}
        with pytest.raises(EventRefused, match="op_id must be"):
            sockudo.send(sockudo._post(path, long_op))
        body = dump_body({"data": 5})
        with pytest.raises(EventRefused) as wrong_type:
            sockudo.send(type(sockudo._post(path, {}))("POST", path, body))
    assert (missing.value.status, missing.value.code) == (422, None)
    assert wrong_type.value.status == 422


def test_server_process_refuses_annotations_without_versioned_messages(tmp_path: Path) -> None:
    log = tmp_path / "stderr.log"
    with pytest.raises(RuntimeError, match="did not start"):
        TestServerProcess(annotations=True, stderr=log).start()
    assert "annotations need versioned_messages" in log.read_text()

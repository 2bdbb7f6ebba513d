"""Request shape, error classification and local validation of the non-publish operations.

Narrow unit tests on ``httpx.MockTransport`` (no socket): paths and their encoding, what is
signed, the exact bodies, the SDK's call forms, and how each answer becomes a result or an error.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from outbox.sockudo import (
    AsyncSockudo,
    ClientMisconfigured,
    CursorExpired,
    Event,
    EventRefused,
    FeatureDisabled,
    Forbidden,
    HistoryParams,
    InvalidEvent,
    Limits,
    MessageMutation,
    NotAllowed,
    NotFound,
    PublishAnnotationRequest,
    Sockudo,
    SockudoOptions,
    TriggerOptions,
    Unsupported,
)

SECRET = "s3cr3t-api-unit"
SERIAL = "00000001724310000000:node-a:00000000000000000001"


class Recorder:
    def __init__(self, response: httpx.Response | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.response = response or httpx.Response(200, json={})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.response

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


def sync(recorder: Recorder, **settings: Any) -> Sockudo:
    transport = httpx.Client(transport=httpx.MockTransport(recorder))
    return Sockudo(
        "app-1", "key", SECRET, client=transport, clock=lambda: 1_700_000_000, **settings
    )


def query(request: httpx.Request) -> dict[str, str]:
    return dict(parse_qsl(request.url.query.decode(), keep_blank_values=True))


def path(request: httpx.Request) -> str:
    return request.url.raw_path.split(b"?")[0].decode()


# -- paths, verbs, signing -----------------------------------------------------------------------


def test_paths_are_encoded_and_only_posts_carry_body_md5() -> None:
    recorder = Recorder()
    # A user-limited channel ("#"), as an app whose namespace "ns" allows them has.
    limits = Limits(namespaces=frozenset({"ns"}), user_limited_namespaces=frozenset({"ns"}))
    with sync(recorder, limits=limits) as client:
        client.get_channel("presence-ns:a#b", info=["user_count", "subscription_count"])
        client.get_message_versions("orders", SERIAL, limit=5, direction="oldest_first")
        client.delete_annotation("orders", SERIAL, "ann:00000000000000000003", socket_id="1.2")
        client.reset_channel_history("orders", "why")
    get, versions, delete, reset = recorder.requests
    assert path(get) == "/apps/app-1/channels/presence-ns%3Aa%23b"
    assert query(get)["info"] == "user_count,subscription_count"
    quoted = SERIAL.replace(":", "%3A")
    assert path(versions) == f"/apps/app-1/channels/orders/messages/{quoted}/versions"
    assert {k: query(versions)[k] for k in ("limit", "direction")} == {
        "limit": "5",
        "direction": "oldest_first",
    }
    assert delete.method == "DELETE" and delete.content == b""
    assert path(delete).endswith("/annotations/ann%3A00000000000000000003")
    assert query(delete)["socket_id"] == "1.2"
    for request in (get, versions, delete):
        assert "body_md5" not in query(request)
    assert reset.method == "POST" and "body_md5" in query(reset)
    assert json.loads(reset.content) == {
        "confirm_channel": "orders",
        "confirm_operation": "reset",
        "reason": "why",
    }


def test_sdk_params_and_keywords_give_the_same_query_but_not_both() -> None:
    recorder = Recorder()
    with sync(recorder) as client:
        client.get_channel_history("orders", HistoryParams(limit=10, start_serial=3))
        client.get_channel_history("orders", limit=10, start_serial=3)
        with pytest.raises(InvalidEvent, match="either"):
            client.get_channel_history("orders", HistoryParams(limit=1), limit=2)
        with pytest.raises(InvalidEvent):
            client.get_channel_history("orders", no_such_field=1)
    first, second = (query(r) for r in recorder.requests)
    assert first == second


# -- mutation bodies -----------------------------------------------------------------------------


def test_every_mutation_carries_an_op_id_and_a_prepared_call_keeps_its_bytes() -> None:
    recorder = Recorder()
    with sync(recorder) as client:
        call = client.append_message.prepare("orders", SERIAL, "tail")
        client.run(call)
        client.run(call)
        client.append_message("orders", SERIAL, "tail")
        client.delete_message("orders", SERIAL)
        client.update_message("orders", SERIAL, MessageMutation(name="renamed"))
    first, retry, other, delete, update = (r.content for r in recorder.requests)
    assert first == retry  # a retry is byte-identical
    assert json.loads(first)["op_id"] != json.loads(other)["op_id"]  # one op_id per call
    assert re.fullmatch(r"[0-9a-f]{32}", json.loads(first)["op_id"])
    assert set(json.loads(delete)) == {"op_id"}
    assert json.loads(update) == {"name": "renamed", "op_id": json.loads(update)["op_id"]}


def test_mutation_bodies_are_canonical_and_the_callers_op_id_wins() -> None:
    recorder = Recorder()
    with sync(recorder) as client:
        client.update_message(
            "orders",
            SERIAL,
            MessageMutation(data={"b": 1, "a": 2}, metadata={"z": 1, "y": {"d": 1, "c": 2}}),
            op_id="op-1",
        )
        client.update_message(
            "orders",
            SERIAL,
            data={"b": 1, "a": 2},
            metadata={"y": {"c": 2, "d": 1}, "z": 1},
            op_id="op-1",
        )
        client.update_message("orders", SERIAL, {"data": "x", "op_id": "mine"})
        client.append_message("orders", SERIAL, "x", "1.2", op_id="op-2", metadata={"b": 1, "a": 1})
    one, two, mapping, append = (r.content for r in recorder.requests)
    assert one == two
    assert one == (
        b'{"data":"{\\"b\\":1,\\"a\\":2}","metadata":{"y":{"c":2,"d":1},"z":1},"op_id":"op-1"}'
    )
    assert json.loads(mapping)["op_id"] == "mine"
    assert append == b'{"data":"x","socket_id":"1.2","metadata":{"a":1,"b":1},"op_id":"op-2"}'


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.update_message("o", SERIAL, MessageMutation()), "mutation"),
        (lambda c: c.update_message("o", SERIAL, {"data": "x"}, data="y"), "data"),
        (lambda c: c.update_message("o", SERIAL, {"op_id": "a"}, op_id="b"), "op_id"),
        (lambda c: c.update_message("o", SERIAL, data="x", op_id="x" * 65), "op_id"),
        (lambda c: c.update_message("o", SERIAL, data="x", op_id=""), "op_id"),
        (lambda c: c.update_message("o", SERIAL, data="x", clear_fields=["data"]), "clear_fields"),
        (lambda c: c.update_message("o", SERIAL, clear_fields=["data", "data"]), "clear_fields"),
        (lambda c: c.update_message("o", SERIAL, clear_fields=["body"]), "clear_fields"),
        (lambda c: c.delete_message("o", SERIAL, {"name": "x"}), "name"),
        (lambda c: c.append_message("o", SERIAL, ""), "data"),
        (lambda c: c.get_message("o", "two words"), "message_serial"),
        (lambda c: c.get_message("o", "s" * 129), "message_serial"),
        (lambda c: c.get_message("bad channel", SERIAL), "channel"),
        (lambda c: c.get_message_versions("o", SERIAL, direction="backwards"), "direction"),
        (lambda c: c.publish_annotation("o", SERIAL, {"name": "x"}), "type"),
        (lambda c: c.publish_annotation("o", SERIAL, type="t:total.v1", count=0), "count"),
        (
            lambda c: c.publish_annotation(
                "o", SERIAL, {"type": "t", "clientId": "a", "client_id": "b"}
            ),
            "client_id",
        ),
        (lambda c: c.terminate_user_connections(""), "user_id"),
        (lambda c: c.channel_shared_secret("private-x"), "channel"),
        (
            lambda c: c.trigger("o", "e", "x", TriggerOptions(socket_id="1.2"), socket_id="1.3"),
            "socket_id",
        ),
        (lambda c: c.trigger("o", "e", "x", {"nonsense": 1}), "nonsense"),
    ],
)
def test_refused_before_any_request(call: Any, field: str) -> None:
    recorder = Recorder()
    with sync(recorder) as client, pytest.raises(InvalidEvent) as caught:
        call(client)
    assert caught.value.field == field
    assert recorder.requests == []


def test_annotation_bodies_are_camel_case_in_every_form() -> None:
    recorder = Recorder()
    with sync(recorder) as client:
        client.publish_annotation(
            "o", SERIAL, PublishAnnotationRequest("r:distinct.v1", "like", "u-1", "1.2", 1)
        )
        client.publish_annotation(
            "o",
            SERIAL,
            {
                "type": "r:distinct.v1",
                "name": "like",
                "client_id": "u-1",
                "socket_id": "1.2",
                "count": 1,
            },
        )
        client.publish_annotation(
            "o",
            SERIAL,
            type="r:distinct.v1",
            name="like",
            client_id="u-1",
            socket_id="1.2",
            count=1,
        )
    bodies = {r.content for r in recorder.requests}
    assert bodies == {
        b'{"type":"r:distinct.v1","name":"like","clientId":"u-1","socketId":"1.2","count":1}'
    }


# -- publishing: the SDK's forms -----------------------------------------------------------------


def test_trigger_options_positional_and_idempotency_key_true() -> None:
    recorder = Recorder()
    with sync(recorder) as client:
        client.trigger("o", "e", {"id": 1}, TriggerOptions(idempotency_key="k-1", socket_id="1.2"))
        client.trigger("o", "e", "x", TriggerOptions(idempotency_key=True))
        client.trigger("o", "e", "x", {"idempotency_key": True}, message_id="m")
        client.send_to_user("u", "e", "x", TriggerOptions(info="subscription_count"))
    bodies = [json.loads(r.content) for r in recorder.requests]
    assert bodies[0] == {
        "name": "e",
        "data": '{"id":1}',
        "channel": "o",
        "socket_id": "1.2",
        "idempotency_key": "k-1",
    }
    generated = [bodies[1]["idempotency_key"], bodies[2]["idempotency_key"]]
    assert all(re.fullmatch(r"[0-9a-f-]{36}", k) for k in generated) and len(set(generated)) == 2
    assert bodies[2]["message_id"] == "m"
    assert bodies[3]["info"] == "subscription_count"


def test_auto_idempotency_from_sdk_options_keys_every_publish() -> None:
    recorder = Recorder()
    options = SockudoOptions(host="push.example", port=443, use_tls=True, auto_idempotency=True)
    with sync(recorder, options=options) as client:
        assert (client.config.host, client.config.port, client.config.use_tls) == (
            "push.example",
            443,
            True,
        )
        client.trigger("o", "e", "x")
        client.trigger("o", "e", "x", idempotency_key="mine")
        client.trigger_batch([Event("o", "a", 1), Event("o", "b", 2, idempotency_key="own")])
        client.set_auto_idempotency_key(False)
        client.trigger("o", "e", "x")
    one, mine, batch, off = (json.loads(r.content) for r in recorder.requests)
    base, n = one["idempotency_key"].split(":")
    assert re.fullmatch(r"[0-9a-f]{32}", base) and n == "1"
    assert mine["idempotency_key"] == "mine"
    assert [i["idempotency_key"] for i in batch["batch"]] == [f"{base}:2:0", "own"]
    assert "idempotency_key" not in off


def test_typed_results_keep_the_body() -> None:
    body = {"channels": {"presence-a": {"subscription_count": 2, "user_count": 1}}}
    with sync(Recorder(httpx.Response(200, json=body))) as client:
        listed = client.list_channels(filter_by_prefix="presence-", info="user_count")
    assert listed.ok and listed.json() == body and listed.status_code == 200
    assert listed.channels["presence-a"].user_count == 1


async def test_async_client_builds_the_same_requests() -> None:
    recorder, async_recorder = Recorder(), Recorder()
    transport = httpx.AsyncClient(transport=httpx.MockTransport(async_recorder))
    async with AsyncSockudo("app-1", "key", SECRET, client=transport) as client:
        await client.update_message("orders", SERIAL, data="x", op_id="op")
        items = [i async for i in client.iter_channel_history("orders", limit=5)]
    with sync(recorder) as client:
        client.update_message("orders", SERIAL, data="x", op_id="op")
    assert items == []
    assert async_recorder.requests[0].content == recorder.requests[0].content
    assert path(async_recorder.requests[0]) == path(recorder.requests[0])


def test_a_walk_repeats_the_first_request_with_only_the_cursor_changed() -> None:
    pages = [
        {"items": [{"serial": 9}], "has_more": True, "next_cursor": "c1"},
        {"items": [{"serial": 8}], "has_more": True, "next_cursor": "c2"},
        {"items": [{"serial": 7}], "has_more": False, "next_cursor": None},
    ]
    recorder = Recorder()
    recorder.response = None  # type: ignore[assignment]
    answers = iter(pages)

    def answer(request: httpx.Request) -> httpx.Response:
        recorder.requests.append(request)
        return httpx.Response(200, json=next(answers))

    client_http = httpx.Client(transport=httpx.MockTransport(answer))
    with Sockudo("app-1", "key", SECRET, client=client_http) as client:
        serials = [i.serial for i in client.iter_channel_history("o", limit=1, start_time_ms=5)]
    assert serials == [9, 8, 7]
    queries = [
        {k: v for k, v in query(r).items() if not k.startswith("auth_")} for r in recorder.requests
    ]
    assert queries == [
        {"limit": "1", "start_time_ms": "5"},
        {"limit": "1", "start_time_ms": "5", "cursor": "c1"},
        {"limit": "1", "start_time_ms": "5", "cursor": "c2"},
    ]


# -- answers that become errors ------------------------------------------------------------------


def error(status: int, code: str | None, message: str, **extra: Any) -> httpx.Response:
    if code is None:
        return httpx.Response(status, text=message, headers={"content-type": "text/plain"})
    return httpx.Response(status, json={"error": message, "code": code, "status": status, **extra})


HISTORY = ("get_channel_history", ("orders",))
MESSAGE = ("get_message", ("orders", SERIAL))
PUBLISH = ("trigger", ("orders", "e", "x"))


@pytest.mark.parametrize(
    ("answer", "operation", "kind", "setting"),
    [
        (
            error(422, "feature_disabled", "Durable history is disabled by policy for channel 'o'"),
            HISTORY,
            FeatureDisabled,
            "HISTORY_ENABLED=true",
        ),
        (
            error(
                422, "feature_disabled", "Presence history is disabled by policy for channel 'p'"
            ),
            HISTORY,
            FeatureDisabled,
            "PRESENCE_HISTORY_ENABLED=true",
        ),
        (
            error(422, "feature_disabled", "Versioned messages are disabled for channel 'o'"),
            MESSAGE,
            FeatureDisabled,
            "VERSIONED_MESSAGES_ENABLED=true",
        ),
        (
            error(422, "feature_disabled", "Annotations are disabled globally for channel 'o'"),
            MESSAGE,
            FeatureDisabled,
            "ANNOTATIONS_ENABLED=true",
        ),
        (
            error(422, "feature_disabled", "Something new is disabled"),
            MESSAGE,
            FeatureDisabled,
            None,
        ),
        (error(422, None, "Failed to deserialize the JSON body"), MESSAGE, EventRefused, None),
        (error(422, "unprocessable", "bad"), PUBLISH, EventRefused, None),
        (
            error(403, "forbidden", "Annotations are disabled by channel policy for channel 'o'"),
            MESSAGE,
            Forbidden,
            "SOCKUDO_DEFAULT_APP_ANNOTATIONS_ENABLED=true",
        ),
        (error(403, "mutable_not_permitted", "no", ai_code=93002), MESSAGE, Forbidden, None),
        (error(404, "not_found", "Message 'x' was not found"), MESSAGE, NotFound, None),
        (httpx.Response(404), HISTORY, Unsupported, None),
        (error(404, None, "404 NOT FOUND"), HISTORY, Unsupported, None),
        (httpx.Response(404), PUBLISH, ClientMisconfigured, None),
        (
            error(404, "app_not_found", "Application key not found"),
            HISTORY,
            ClientMisconfigured,
            None,
        ),
        (error(401, "auth_failed", "Invalid API signature"), HISTORY, ClientMisconfigured, None),
        (
            error(400, "invalid_input", "Expired history cursor: channel stream changed"),
            HISTORY,
            CursorExpired,
            None,
        ),
        (
            error(400, "invalid_input", "History limit must be greater than 0"),
            HISTORY,
            EventRefused,
            None,
        ),
    ],
)
def test_answers_map_to_errors(
    answer: httpx.Response, operation: Any, kind: type, setting: Any
) -> None:
    name, args = operation
    with sync(Recorder(answer)) as client, pytest.raises(kind) as caught:
        getattr(client, name)(*args)
    assert type(caught.value) is kind
    assert caught.value.status == answer.status_code
    if isinstance(caught.value, NotAllowed):
        assert caught.value.setting == setting
        if setting:
            assert setting in str(caught.value)
    if kind is Forbidden and "ai_code" in answer.text:
        assert caught.value.ai_code == 93002
    assert SECRET not in str(caught.value)


def test_server_setting_errors_are_still_caught_as_misconfiguration() -> None:
    """The worker's ``except ClientMisconfigured`` keeps catching a 403 on publish."""
    for kind in (FeatureDisabled, Forbidden, Unsupported):
        assert issubclass(kind, NotAllowed) and issubclass(kind, ClientMisconfigured)
        assert not issubclass(kind, EventRefused)
    assert issubclass(NotFound, EventRefused) and issubclass(CursorExpired, EventRefused)


def test_channel_shared_secret_matches_authentication() -> None:
    key = base64.b64encode(bytes(range(32))).decode()
    with sync(Recorder(), encryption_master_key_base64=key) as client:
        secret = client.channel_shared_secret("private-encrypted-room")
        auth = client.authenticate("1.2", "private-encrypted-room")
    assert len(secret) == 32 and base64.b64encode(secret).decode() == auth["shared_secret"]


def test_message_summary_payload_and_message_pickle() -> None:
    import pickle

    from outbox.sockudo import AnnotationSummary, Message

    payload = {
        "action": "message.summary",
        "serial": SERIAL,
        "annotations": {"summary": {"reactions:distinct.v1": {"like": {"total": 2}}}},
    }
    summary = AnnotationSummary.from_json(payload)
    assert summary.message_serial == SERIAL
    assert summary.summary["reactions:distinct.v1"]["like"]["total"] == 2
    message = Message.from_json({"channel": "o", "item": {"action": "update", "data": "x"}})
    assert (message.action, message.data) == ("update", "x")
    assert pickle.loads(pickle.dumps(message)) == message

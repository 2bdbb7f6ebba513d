"""Our client against the Sockudo-faithful test server over real HTTP on 127.0.0.1.

Publishes arrive; every row of Sockudo's error table becomes the exception class that says what
to do; Retry-After is parsed; and the two idempotency traps behave as Sockudo's do, so the
worker's strategy (a batch is sent once, later attempts go alone) is proven against them.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from outbox.sockudo import (
    AsyncSockudo,
    ClientMisconfigured,
    EndpointUnavailable,
    Event,
    EventRefused,
    InvalidEvent,
    Limits,
    Sockudo,
)
from outbox.sockudo.bodies import dump_body, event_item
from outbox.testing.server import TestServer


def client_for(server: TestServer, **settings: object) -> Sockudo:
    return Sockudo.from_url(server.url, timeout=5.0, **settings)


def delivered(server: TestServer, channel: str | None = None) -> list[tuple[str, str, str]]:
    return [(d.channel, d.name, d.data) for d in server.deliveries(channel)]


# -- publishes arrive ---------------------------------------------------------------------------


def test_single_multi_channel_batch_and_user_publishes_arrive(sockudo_server):
    with client_for(sockudo_server) as client:
        one = client.trigger("orders", "created", {"id": 1}, message_id="m-1")
        many = client.trigger(["a", "b"], "fanout", "as is", message_id="m-2")
        batch = client.trigger_batch(
            [
                Event("orders", "first", {"n": 1}, message_id="b-1"),
                Event(None, "second", "two", channels=["a", "b"], message_id="b-2"),
            ]
        )
        user = client.send_to_user("user-7", "notice", {"text": "hi"})
    assert one.channels["orders"].acknowledgement_id == "m-1"
    assert set(many.channels) == {"a", "b"}
    assert [ack.acknowledgement_id for ack in batch.batch] == ["b-1", "b-2"]
    assert user.body == {"ok": True}
    assert delivered(sockudo_server) == [
        ("orders", "created", '{"id":1}'),
        ("a", "fanout", "as is"),
        ("b", "fanout", "as is"),
        ("orders", "first", '{"n":1}'),
        ("a", "second", "two"),
        ("b", "second", "two"),
        ("#server-to-user-user-7", "notice", '{"text":"hi"}'),
    ]


async def test_async_client_publishes_arrive(sockudo_server):
    async with AsyncSockudo.from_url(sockudo_server.url) as client:
        results = await asyncio.gather(
            *(client.trigger("orders", "created", {"n": i}) for i in range(5))
        )
        await client.trigger_batch([Event("orders", "batched", "x")])
    assert all(r.body == {"ok": True} for r in results)
    assert sorted(d[2] for d in delivered(sockudo_server, "orders")) == sorted(
        [f'{{"n":{i}}}' for i in range(5)] + ["x"]
    )


# -- the error table ------------------------------------------------------------------------------


def raw_event(client: Sockudo, item: dict[str, object]):  # type: ignore[no-untyped-def]
    """Send a body our own validation would refuse, to reach the server's."""
    return client.send(client.prepare_events_body(dump_body(item)))


def test_400_unconfigured_namespace_is_refused(sockudo_server):
    # The client believes the app configures namespace "ns" (so it does not refuse it
    # locally); the server does not, and refuses the event.
    limits = Limits(namespaces=frozenset({"ns"}))
    with client_for(sockudo_server, limits=limits) as client, pytest.raises(EventRefused) as info:
        client.trigger("ns:orders", "created", "x")
    assert (info.value.status, info.value.code) == (400, "invalid_input")


def test_a_namespace_the_app_lacks_is_refused_before_sending(sockudo_server):
    with client_for(sockudo_server) as client, pytest.raises(InvalidEvent) as info:
        client.trigger("ns:orders", "created", "x")
    assert info.value.field == "channel" and "namespace 'ns'" in str(info.value)
    assert sockudo_server.request_count() == 0


def test_400_bad_body_field_is_refused(sockudo_server):
    with client_for(sockudo_server) as client, pytest.raises(EventRefused) as info:
        raw_event(client, {"name": "e", "data": "x", "channels": []})
    assert info.value.status == 400


def test_401_wrong_secret_is_misconfigured_and_never_shows_the_secret(sockudo_server):
    url = sockudo_server.url.replace(":app-secret@", ":wrong-s3cret@")
    with Sockudo.from_url(url) as client, pytest.raises(ClientMisconfigured) as info:
        client.trigger("orders", "created", "x")
    assert (info.value.status, info.value.code) == (401, "auth_failed")
    assert "wrong-s3cret" not in str(info.value) and "wrong-s3cret" not in repr(client)


def test_401_clock_skew_is_misconfigured(sockudo_server):
    signed_in_1970 = client_for(sockudo_server, clock=lambda: 0.0)
    with signed_in_1970 as client, pytest.raises(ClientMisconfigured) as info:
        client.trigger("orders", "created", "x")
    assert info.value.status == 401
    assert "clock" in str(info.value)


def test_404_unknown_key_is_misconfigured(sockudo_server):
    url = sockudo_server.url.replace("app-key:", "no-such-key:")
    with Sockudo.from_url(url) as client, pytest.raises(ClientMisconfigured) as info:
        client.trigger("orders", "created", "x")
    assert (info.value.status, info.value.code) == (404, "app_not_found")


def test_413_payload_over_the_server_limit_is_refused():
    with TestServer(max_payload_kb=1) as server, client_for(server) as client:
        with pytest.raises(EventRefused) as info:
            client.trigger("orders", "big", "x" * 2048)
        assert (info.value.status, info.value.code) == (413, "payload_too_large")
        assert server.delivered_count() == 0


def test_422_wrong_field_types_are_refused(sockudo_server):
    with client_for(sockudo_server) as client, pytest.raises(EventRefused) as info:
        raw_event(client, {"name": 5, "data": "x", "channel": "orders"})
    assert info.value.status == 422


@pytest.mark.parametrize(
    ("status", "code", "retry_after", "cls"),
    [
        (415, "unsupported_media_type", None, EventRefused),
        (500, "internal_error", None, EndpointUnavailable),
        (503, "service_unavailable", None, EndpointUnavailable),
        (503, "backpressure", "1", EndpointUnavailable),
    ],
)
def test_injected_statuses_map_to_their_class(sockudo_server, status, code, retry_after, cls):
    sockudo_server.fail_next(1, status=status, code=code, retry_after=retry_after, stage="received")
    with client_for(sockudo_server) as client, pytest.raises(cls) as info:
        client.trigger("orders", "created", "x")
    assert (info.value.status, info.value.code) == (status, code)
    if retry_after is not None:
        assert info.value.retry_after == float(retry_after)


def test_429_rate_limit_carries_a_parsed_retry_after(sockudo_server):
    sockudo_server.rate_limit(1, retry_after=3)
    with client_for(sockudo_server) as client:
        client.trigger("orders", "first", "x")
        with pytest.raises(EndpointUnavailable) as info:
            client.trigger("orders", "second", "x")
    assert info.value.status == 429
    assert info.value.retry_after == 3.0
    assert info.value.maybe_delivered is False


def test_connection_refused_is_unavailable_and_not_delivered(sockudo_server):
    sockudo_server.go_down()
    with client_for(sockudo_server) as client, pytest.raises(EndpointUnavailable) as info:
        client.trigger("orders", "created", "x")
    assert info.value.status is None and info.value.maybe_delivered is False


def test_no_hidden_retries(sockudo_server):
    sockudo_server.fail_next(1, status=503, code="service_unavailable", stage="received")
    with client_for(sockudo_server) as client, pytest.raises(EndpointUnavailable):
        client.trigger("orders", "created", "x")
    assert sockudo_server.request_count("events") == 1
    assert sockudo_server.delivered_count() == 0


# -- the idempotency traps the worker's strategy rests on ---------------------------------------


def test_trap_a_failed_publish_leaves_its_key_claimed_until_the_ttl(sockudo_server):
    """A retry of a failed /events publish gets 503 backpressure until the window ends."""
    sockudo_server.fail_next(1, status=500, code="internal_error", stage="claimed")
    with client_for(sockudo_server) as client:
        with pytest.raises(EndpointUnavailable):
            client.trigger("orders", "created", "x", idempotency_key="k-1", message_id="k-1")
        with pytest.raises(EndpointUnavailable) as info:
            client.trigger("orders", "created", "x", idempotency_key="k-1", message_id="k-1")
        assert (info.value.status, info.value.code, info.value.retry_after) == (
            503,
            "backpressure",
            1.0,
        )
        assert sockudo_server.delivered_count() == 0
        sockudo_server.advance_clock(sockudo_server.config.idempotency_ttl + 1)
        result = client.trigger("orders", "created", "x", idempotency_key="k-1", message_id="k-1")
    assert result.channels["orders"].acknowledgement_id == "k-1"
    assert sockudo_server.delivered_count() == 1


def test_trap_a_resent_batch_skips_the_failed_item_and_answers_200(sockudo_server):
    """Why a batch is never sent twice: the failed item is skipped, reported fine, and lost."""
    items = [
        event_item(["orders"], "e", str(i), idempotency_key=f"k-{i}", message_id=f"k-{i}")
        for i in range(3)
    ]
    body = json.dumps({"batch": items}, separators=(",", ":")).encode()
    sockudo_server.fail_batch_item(1, status=500, code="internal_error")
    with client_for(sockudo_server) as client:
        with pytest.raises(EndpointUnavailable):
            client.send(client.prepare_batch_body(body))
        assert [d.data for d in sockudo_server.deliveries()] == ["0"]
        again = client.send(client.prepare_batch_body(body))
        # 200, and item 1 answered like the others, yet it was never delivered.
        assert again.status_code == 200
        assert [d.data for d in sockudo_server.deliveries()] == ["0", "2"]
        # Sent alone, the same key meets backpressure instead of a silent success.
        with pytest.raises(EndpointUnavailable) as info:
            client.send(client.prepare_events_body(dump_body(items[1])))
    assert info.value.code == "backpressure"


def test_a_repeat_is_answered_from_the_cache_with_the_same_bytes(sockudo_server):
    with client_for(sockudo_server) as client:
        first = client.trigger("orders", "created", "x", idempotency_key="k-9", message_id="k-9")
        second = client.trigger("orders", "created", "x", idempotency_key="k-9", message_id="k-9")
    assert first.raw == second.raw
    assert sockudo_server.delivered_count() == 1

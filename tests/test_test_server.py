"""The Sockudo-faithful test server, driven over real HTTP with requests signed by our Signer."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

from outbox.sockudo.signing import Signer
from outbox.testing.server import RemoteTestServer, TestServer

SIGNER = Signer("app-key", "app-secret")
EVENTS = "/apps/app-id/events"
BATCH = "/apps/app-id/batch_events"
JSON = {"content-type": "application/json"}


def post(
    server: TestServer | RemoteTestServer,
    path: str,
    payload: Any = None,
    *,
    body: bytes | None = None,
    signer: Signer = SIGNER,
    timestamp: float | None = None,
    query: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    raw = body if body is not None else json.dumps(payload).encode()
    ts = int(time.time() if timestamp is None else timestamp)
    q = query if query is not None else signer.signed_query("POST", path, raw, ts)
    return httpx.post(
        f"{server.base_url}{path}?{q}", content=raw, headers={**JSON, **(headers or {})}
    )


def event(channel: str = "orders", **fields: Any) -> dict[str, Any]:
    return {"name": "order-created", "channel": channel, "data": '{"id":1}', **fields}


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and body["status"] == status and body["error"]


# ------------------------------------------------------------------ signatures


def test_signed_request_is_accepted_and_answered_with_connection_close(sockudo_server):
    response = post(sockudo_server, EVENTS, event())
    assert response.status_code == 200
    assert response.content == b'{"ok":true}'
    assert response.headers["connection"] == "close"
    assert httpx.get(f"{sockudo_server.base_url}/up").status_code == 200
    assert httpx.get(f"{sockudo_server.base_url}/up/app-id").text == "OK"


def test_bad_signature_is_401(sockudo_server):
    response = post(sockudo_server, EVENTS, event(), signer=Signer("app-key", "wrong"))
    assert_error(response, 401, "auth_failed")


def test_body_md5_mismatch_is_401(sockudo_server):
    raw = json.dumps(event()).encode()
    query = SIGNER.signed_query("POST", EVENTS, b"{}", int(time.time()))
    assert_error(post(sockudo_server, EVENTS, body=raw, query=query), 401, "auth_failed")


def test_missing_body_md5_on_post_is_401(sockudo_server):
    raw = json.dumps(event()).encode()
    params = SIGNER.signed_parameters("GET", EVENTS, None, int(time.time()))  # no body_md5
    query = "&".join(f"{k}={v}" for k, v in params.items())
    response = post(sockudo_server, EVENTS, body=raw, query=query)
    assert_error(response, 401, "auth_failed")
    assert "body_md5 is required" in response.json()["error"]


def test_body_md5_on_get_is_401(sockudo_server):
    params = SIGNER.signed_parameters("POST", EVENTS, b"", int(time.time()))
    query = "&".join(f"{k}={v}" for k, v in params.items())
    response = httpx.get(f"{sockudo_server.base_url}{EVENTS}?{query}")
    # GET on /events is not a route: 405 before auth. An empty-body POST carrying body_md5 is
    # what Sockudo refuses with 401, the same rule on the only route we serve.
    assert response.status_code == 405
    response = post(sockudo_server, EVENTS, body=b"", query=query)
    assert_error(response, 401, "auth_failed")
    assert "must not be present" in response.json()["error"]


@pytest.mark.parametrize(("skew", "status"), [(601, 401), (-601, 401), (600, 200), (-600, 200)])
def test_timestamp_skew_over_600_s_is_401(skew, status):
    """The window is inclusive. The server's clock is frozen: a boundary checked against a moving
    clock fails whenever a second ticks between signing and checking."""
    now = 1_800_000_000
    with TestServer(time_func=lambda: now + 0.999) as server:
        response = post(server, EVENTS, event(), timestamp=now + skew)
        if status == 401:
            assert_error(response, 401, "auth_failed")
        else:
            assert response.status_code == 200, response.text


def test_unknown_key_is_404_app_not_found(sockudo_server):
    response = post(sockudo_server, EVENTS, event(), signer=Signer("other-key", "app-secret"))
    assert_error(response, 404, "app_not_found")


def test_wrong_app_id_in_path_is_401(sockudo_server):
    assert_error(post(sockudo_server, "/apps/other/events", event()), 401, "auth_failed")


# ------------------------------------------------------------------ body parsing and limits


def test_non_json_body_is_415_and_bad_json_400_and_wrong_types_422(sockudo_server):
    raw = json.dumps(event()).encode()
    query = SIGNER.signed_query("POST", EVENTS, raw, int(time.time()))
    url = f"{sockudo_server.base_url}{EVENTS}?{query}"
    assert httpx.post(url, content=raw, headers={"content-type": "text/plain"}).status_code == 415
    assert post(sockudo_server, EVENTS, body=b"{not json").status_code == 400
    assert post(sockudo_server, EVENTS, event(channels="orders")).status_code == 422
    assert post(sockudo_server, EVENTS, {"name": 1, "channel": "x"}).status_code == 422
    assert post(sockudo_server, BATCH, {"items": []}).status_code == 422


def test_missing_name_or_channel_is_400(sockudo_server):
    assert_error(post(sockudo_server, EVENTS, {"channel": "a", "data": "x"}), 400, "invalid_input")
    no_channel = {"name": "e", "data": "x"}
    assert_error(post(sockudo_server, EVENTS, no_channel), 400, "missing_channel_info")
    empty_list = event(channels=[])
    assert_error(post(sockudo_server, EVENTS, empty_list), 400, "missing_channel_info")


def test_payload_limit_is_inclusive_in_utf8_bytes():
    with TestServer(max_payload_kb=1) as server:
        assert post(server, EVENTS, event(data="é" * 512)).status_code == 200  # 1024 bytes
        response = post(server, EVENTS, event(data="é" * 512 + "x"))
        assert_error(response, 413, "payload_too_large")
        assert server.delivered_count() == 1


def test_limits_change_while_running_in_process_and_remotely(sockudo_server_process):
    big = event(data="x" * 2048)
    with TestServer(max_payload_kb=1) as local:
        for server in (local, sockudo_server_process):
            assert server.set_limits(max_payload_kb=1)["max_payload_kb"] == 1
            assert_error(post(server, EVENTS, big), 413, "payload_too_large")
            limits = server.set_limits(max_payload_kb=4)
            assert limits == {**server.limits(), "max_payload_kb": 4}
            assert limits["max_batch_size"] == 100  # the others are untouched
            assert post(server, EVENTS, big).status_code == 200
            assert [d.data for d in server.deliveries()] == [big["data"]]
            with pytest.raises((ValueError, httpx.HTTPStatusError)):
                server.set_limits(max_payload=4)
            with pytest.raises((ValueError, httpx.HTTPStatusError)):
                server.set_limits(max_payload_kb=0)
            assert server.limits()["max_payload_kb"] == 4


def test_name_channel_and_count_limits(sockudo_server):
    assert post(sockudo_server, EVENTS, event(name="n" * 100)).status_code == 200
    assert_error(post(sockudo_server, EVENTS, event(name="n" * 101)), 400, "limit_exceeded")
    assert post(sockudo_server, EVENTS, event("c" * 100)).status_code == 200
    assert_error(post(sockudo_server, EVENTS, event("c" * 101)), 400, "invalid_input")
    many = event(channels=[f"c{i}" for i in range(101)])
    assert_error(post(sockudo_server, EVENTS, many), 400, "limit_exceeded")
    batch = {"batch": [event() for _ in range(101)]}
    assert_error(post(sockudo_server, BATCH, batch), 400, "limit_exceeded")


def test_channel_characters_and_namespaces():
    with TestServer(namespaces=["chat"]) as server:
        assert_error(post(server, EVENTS, event("bad channel!")), 400, "invalid_input")
        assert_error(post(server, EVENTS, event("news:today")), 400, "invalid_input")
        assert post(server, EVENTS, event("chat:room-1")).status_code == 200
        assert post(server, EVENTS, event("private-a-_=@,;.b")).status_code == 200
        assert post(server, EVENTS, event("#server-to-user-7")).status_code == 200


def test_json_data_is_stringified_compactly(sockudo_server):
    post(sockudo_server, EVENTS, event(data={"a": [1, 2], "b": "ü"}))
    assert sockudo_server.deliveries()[0].data == '{"a":[1,2],"b":"ü"}'


# ------------------------------------------------------------------ success bodies


def test_events_success_bodies(sockudo_server):
    response = post(sockudo_server, EVENTS, event(channels=["a", "b"], message_id="m-1"))
    assert response.json() == {
        "channels": {"a": {"acknowledgement_id": "m-1"}, "b": {"acknowledgement_id": "m-1"}}
    }
    info = post(sockudo_server, EVENTS, event(info="subscription_count")).json()
    assert info["channels"]["orders"]["subscription_count"] == 0
    assert info["channels"]["orders"]["acknowledgement_id"]


def test_batch_success_bodies(sockudo_server):
    assert post(sockudo_server, BATCH, {"batch": [event(), event("b")]}).content == b"{}"
    response = post(sockudo_server, BATCH, {"batch": [event(message_id="x"), event("b")]})
    body = response.json()["batch"]
    assert body[0] == {"acknowledgement_id": "x"}
    assert body[1] == {}  # only items that sent info/message_id collect channel info


# ------------------------------------------------------------------ idempotency


def test_repeat_gets_byte_identical_response_and_is_not_republished(sockudo_server):
    first = post(sockudo_server, EVENTS, event(idempotency_key="k1", info="subscription_count"))
    changed = event(idempotency_key="k1", data="other", info="subscription_count")
    second = post(sockudo_server, EVENTS, changed)
    assert second.status_code == 200 and second.content == first.content
    assert sockudo_server.delivered_count() == 1
    header = post(sockudo_server, EVENTS, event(), headers={"X-Idempotency-Key": "k1"})
    assert header.content == first.content


def test_key_longer_than_128_bytes_is_400_and_does_not_claim(sockudo_server):
    assert_error(
        post(sockudo_server, EVENTS, event(idempotency_key="k" * 129)), 400, "invalid_input"
    )
    assert sockudo_server.idempotency_state("k" * 129) is None
    assert post(sockudo_server, EVENTS, event(idempotency_key="k" * 128)).status_code == 200


def test_repeat_while_first_in_flight_is_503_backpressure(sockudo_server):
    # The first request holds its key for 3 s; the second is sent once the key is held (not
    # after a fixed pause: a busy machine may not have sent the first one yet), and is answered
    # after the server's 0.3 s of waiting for it.
    sockudo_server.add_latency(3.0, stage="claimed", count=1)
    results: list[httpx.Response] = []
    first = threading.Thread(
        target=lambda: results.append(post(sockudo_server, EVENTS, event(idempotency_key="k")))
    )
    first.start()
    deadline = time.monotonic() + 10
    while sockudo_server.idempotency_state("k") != "processing":
        assert time.monotonic() < deadline, "the first request never reached the server"
        time.sleep(0.01)
    second = post(sockudo_server, EVENTS, event(idempotency_key="k"))
    first.join()
    assert_error(second, 503, "backpressure")
    assert second.headers["retry-after"] == "1"
    assert results[0].status_code == 200
    assert sockudo_server.delivered_count() == 1


def test_failed_publish_leaves_key_claimed_until_ttl(sockudo_server):
    sockudo_server.fail_next(status=500)
    assert_error(post(sockudo_server, EVENTS, event(idempotency_key="k")), 500, "internal_error")
    assert sockudo_server.idempotency_state("k") == "processing"
    assert_error(post(sockudo_server, EVENTS, event(idempotency_key="k")), 503, "backpressure")
    sockudo_server.advance_clock(119)
    assert_error(post(sockudo_server, EVENTS, event(idempotency_key="k")), 503, "backpressure")
    sockudo_server.advance_clock(2)
    assert post(sockudo_server, EVENTS, event(idempotency_key="k")).status_code == 200
    assert sockudo_server.delivered_count() == 1


def test_rejected_event_poisons_its_key_as_in_sockudo():
    # Name/size/channel checks run after the claim in Sockudo; only parse errors and key checks
    # run before it. So a 413 with a key leaves that key "processing".
    with TestServer(max_payload_kb=1) as server:
        assert post(server, EVENTS, event(data="x" * 2000, idempotency_key="k")).status_code == 413
        assert server.idempotency_state("k") == "processing"
        assert post(server, EVENTS, {"name": 5, "idempotency_key": "j"}).status_code == 422
        assert server.idempotency_state("j") is None


def test_key_expires_in_real_time():
    with TestServer(idempotency_ttl=0.3) as server:
        post(server, EVENTS, event(idempotency_key="k"))
        time.sleep(0.4)
        post(server, EVENTS, event(idempotency_key="k"))
        assert server.delivered_count() == 2
        assert server.duplicates() == {("idempotency_key", "orders", "k"): 2}


def test_batch_item_with_claimed_key_is_skipped_and_lost(sockudo_server):
    sockudo_server.fail_next(status=500)
    post(sockudo_server, EVENTS, event(idempotency_key="lost"))  # leaves "lost" processing
    batch = {"batch": [event(idempotency_key="lost"), event(idempotency_key="fresh")]}
    response = post(sockudo_server, BATCH, batch)
    assert response.status_code == 200 and response.content == b"{}"
    assert [d.idempotency_key for d in sockudo_server.deliveries()] == ["fresh"]


def test_batch_stops_at_first_failing_item_and_retry_loses_it(sockudo_server):
    items = [event(idempotency_key=f"k{i}", message_id=f"m{i}") for i in range(4)]
    sockudo_server.fail_batch_item(2)
    assert_error(post(sockudo_server, BATCH, {"batch": items}), 413, "payload_too_large")
    assert [d.message_id for d in sockudo_server.deliveries()] == ["m0", "m1"]
    retry = post(sockudo_server, BATCH, {"batch": items})
    assert retry.status_code == 200
    assert retry.json()["batch"][:3] == [{}, {}, {}]  # skipped items answer {}
    assert [d.message_id for d in sockudo_server.deliveries()] == ["m0", "m1", "m3"]


def test_real_limit_fails_batch_at_item(sockudo_server):
    items = [event(name="ok"), event(name="n" * 101), event(name="never")]
    assert_error(post(sockudo_server, BATCH, {"batch": items}), 400, "limit_exceeded")
    assert [d.name for d in sockudo_server.deliveries()] == ["ok"]


def test_message_id_with_different_payload_is_400(sockudo_server):
    first = post(sockudo_server, EVENTS, event(message_id="m"))
    assert first.status_code == 200
    again = post(sockudo_server, EVENTS, event(message_id="m"))
    assert again.content == first.content  # same payload: replayed, not re-published
    response = post(sockudo_server, EVENTS, event(message_id="m", data="changed"))
    assert_error(response, 400, "invalid_input")
    assert response.json()["error"] == "idempotency key was already used with a different payload"
    assert sockudo_server.delivered_count() == 1
    assert post(sockudo_server, EVENTS, event("other", message_id="m", data="x")).status_code == 200


def test_idempotency_can_be_disabled():
    with TestServer(idempotency=False) as server:
        post(server, EVENTS, event(idempotency_key="k", message_id="m"))
        post(server, EVENTS, event(idempotency_key="k", message_id="m", data="y"))
        assert server.delivered_count() == 2
        assert server.duplicates() == {("message_id", "orders", "m"): 2}


# ------------------------------------------------------------------ faults


def test_fail_next_with_retry_after_counts_down(sockudo_server):
    sockudo_server.fail_next(2, status=503, code="service_unavailable", retry_after=7)
    first = post(sockudo_server, EVENTS, event())
    assert_error(first, 503, "service_unavailable")
    assert first.headers["retry-after"] == "7"
    assert post(sockudo_server, EVENTS, event()).status_code == 503
    assert post(sockudo_server, EVENTS, event()).status_code == 200
    assert sockudo_server.request_count("events", 503) == 2
    assert sockudo_server.stats()["by_endpoint_status"]["events"] == {"503": 2, "200": 1}


def test_latency_before_answering(sockudo_server):
    sockudo_server.add_latency(0.3, stage="published", count=1)
    started = time.monotonic()
    assert post(sockudo_server, EVENTS, event()).status_code == 200
    assert time.monotonic() - started >= 0.3
    assert sockudo_server.delivered_count() == 1


def test_drop_before_publishing(sockudo_server):
    sockudo_server.drop_next()
    with pytest.raises(httpx.TransportError):
        post(sockudo_server, EVENTS, event(idempotency_key="k"))
    assert sockudo_server.delivered_count() == 0
    assert sockudo_server.idempotency_state("k") is None
    assert sockudo_server.request_count("events", 0) == 1


def test_drop_after_publishing_then_retry_gets_cached_answer(sockudo_server):
    sockudo_server.drop_next(stage="published")
    with pytest.raises(httpx.TransportError):
        post(sockudo_server, EVENTS, event(idempotency_key="k", message_id="m"))
    assert sockudo_server.delivered_count() == 1  # it went through
    retry = post(sockudo_server, EVENTS, event(idempotency_key="k", message_id="m"))
    assert retry.json() == {"channels": {"orders": {"acknowledgement_id": "m"}}}
    assert sockudo_server.delivered_count() == 1


def test_rate_limit_answers_429_with_retry_after(sockudo_server):
    sockudo_server.rate_limit(3, retry_after=2)
    responses = [post(sockudo_server, EVENTS, event()) for _ in range(5)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 429]
    assert responses[3].headers["retry-after"] == "2"
    assert sockudo_server.delivered_count() == 3
    sockudo_server.rate_limit(None)
    assert post(sockudo_server, EVENTS, event()).status_code == 200


def test_down_refuses_connections_and_comes_back_on_same_port(sockudo_server):
    port = sockudo_server.port
    sockudo_server.go_down()
    with pytest.raises(httpx.ConnectError):
        post(sockudo_server, EVENTS, event())
    assert httpx.get(f"{sockudo_server.control_url}/stats").status_code == 200  # control stays up
    sockudo_server.come_up()
    assert sockudo_server.port == port
    assert post(sockudo_server, EVENTS, event()).status_code == 200
    sockudo_server.go_down(seconds=0.2)
    time.sleep(0.5)
    assert post(sockudo_server, EVENTS, event()).status_code == 200


def test_reset_forgets_everything(sockudo_server):
    post(sockudo_server, EVENTS, event(idempotency_key="k"))
    sockudo_server.fail_next(5)
    sockudo_server.reset()
    assert sockudo_server.delivered_count() == 0 and sockudo_server.stats()["total"] == 0
    assert post(sockudo_server, EVENTS, event(idempotency_key="k")).status_code == 200


def test_handles_concurrent_requests(sockudo_server):
    def send(i: int) -> int:
        return post(sockudo_server, EVENTS, event(message_id=f"m{i}")).status_code

    threads = [threading.Thread(target=send, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sockudo_server.delivered_count() == 50
    assert [d.seq for d in sockudo_server.deliveries()] == list(range(1, 51))
    assert sockudo_server.duplicates() == {}


# ------------------------------------------------------------------ subprocess mode


def test_subprocess_server_driven_remotely(sockudo_server_process):
    server = sockudo_server_process
    assert server.url.startswith("http://app-key:app-secret@127.0.0.1:")
    assert post(server, EVENTS, event(idempotency_key="k")).status_code == 200
    server.fail_next(status=500)
    assert post(server, EVENTS, event(idempotency_key="j")).status_code == 500
    assert server.idempotency_state("j") == "processing"
    server.advance_clock(121)
    assert post(server, EVENTS, event(idempotency_key="j")).status_code == 200
    server.drop_next()
    with pytest.raises(httpx.TransportError):
        post(server, EVENTS, event())
    assert [d.idempotency_key for d in server.deliveries()] == ["k", "j"]
    assert server.request_count("events", 0) == 1
    assert server.stats()["delivered"] == 2
    server.go_down()
    with pytest.raises(httpx.ConnectError):
        post(server, EVENTS, event())
    server.come_up()
    assert post(server, EVENTS, event(message_id="m")).status_code == 200
    post(server, EVENTS, event(message_id="m", idempotency_key="z"))
    assert server.duplicates() == {}
    server.reset()
    assert server.deliveries() == []

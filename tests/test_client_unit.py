"""Request shape, status mapping, transport errors, configuration and validation of the client.

Every request goes to an ``httpx.MockTransport``: no socket is opened.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from outbox.sockudo import (
    AsyncSockudo,
    ClientMisconfigured,
    Config,
    ConfigError,
    EndpointUnavailable,
    Event,
    EventRefused,
    Forbidden,
    InvalidEvent,
    PublishFailed,
    Sockudo,
    SockudoError,
    parse_retry_after,
)
from outbox.sockudo.signing import quote_path_segment

APP_ID = "app-1"
KEY = "app-key"
SECRET = "s3cr3t-never-shown-7f1e"
T0 = 1_700_000_000

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A mock transport handler that records requests and answers with a fixed response."""

    def __init__(self, response: Handler | httpx.Response | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self._response = response if response is not None else httpx.Response(200, json={})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if callable(self._response):
            return self._response(request)
        return self._response


def _refuse(request: httpx.Request) -> httpx.Response:
    pytest.fail(f"no request may be made: {request.method} {request.url}")


def _sync(handler: Handler = _refuse, clock: Callable[[], float] = lambda: T0) -> Sockudo:
    transport = httpx.MockTransport(handler)
    return Sockudo(APP_ID, KEY, SECRET, clock=clock, client=httpx.Client(transport=transport))


def _async(handler: Handler = _refuse) -> AsyncSockudo:
    transport = httpx.MockTransport(handler)
    return AsyncSockudo(
        APP_ID, KEY, SECRET, clock=lambda: T0, client=httpx.AsyncClient(transport=transport)
    )


def _query(request: httpx.Request) -> dict[str, str]:
    return dict(parse_qsl(request.url.query.decode(), keep_blank_values=True))


def _assert_signed(request: httpx.Request, timestamp: int = T0) -> None:
    """Verify the request as the server would: raw path, body_md5 of the raw body, HMAC."""
    params = _query(request)
    assert params["auth_key"] == KEY
    assert params["auth_timestamp"] == str(timestamp)
    assert params["auth_version"] == "1.0"
    if request.method == "POST":
        assert params["body_md5"] == hashlib.md5(request.content).hexdigest()
    else:
        assert "body_md5" not in params
    signature = params.pop("auth_signature")
    query = "&".join(f"{k.lower()}={params[k]}" for k in sorted(params, key=str.lower))
    text = f"{request.method}\n{request.url.raw_path.split(b'?')[0].decode()}\n{query}"
    assert signature == hmac.new(SECRET.encode(), text.encode(), hashlib.sha256).hexdigest()


# -- body bytes ----------------------------------------------------------------------------------


def test_trigger_body_with_dict_data_is_compact_json_with_data_encoded_once() -> None:
    recorder = Recorder()
    with _sync(recorder) as client:
        client.trigger("orders", "order-created", {"id": 42, "name": "é", "tags": [1, 2]})
    (request,) = recorder.requests
    assert request.method == "POST"
    assert request.url.path == f"/apps/{APP_ID}/events"
    assert (
        request.content
        == (
            '{"name":"order-created","data":"{\\"id\\":42,\\"name\\":\\"é\\",\\"tags\\":[1,2]}",'
            '"channel":"orders"}'
        ).encode()
    )
    assert request.headers["content-type"] == "application/json"


def test_trigger_body_with_str_data_sends_it_as_is() -> None:
    recorder = Recorder()
    with _sync(recorder) as client:
        client.trigger("orders", "e", '{"already": "json" }')
    assert recorder.requests[0].content == (
        b'{"name":"e","data":"{\\"already\\": \\"json\\" }","channel":"orders"}'
    )


def test_several_channels_go_as_channels() -> None:
    recorder = Recorder()
    with _sync(recorder) as client:
        client.trigger(["a", "b"], "e", "x")
        client.trigger(["only"], "e", "x")
    assert recorder.requests[0].content == b'{"name":"e","data":"x","channels":["a","b"]}'
    assert recorder.requests[1].content == b'{"name":"e","data":"x","channel":"only"}'


def test_optional_fields_placement() -> None:
    recorder = Recorder()
    with _sync(recorder) as client:
        client.trigger(
            "orders",
            "e",
            {"v": 1},
            socket_id="123.456",
            info=["subscription_count", "user_count"],
            idempotency_key="idem-1",
            message_id="msg-1",
            tags={"region": "eu"},
            extras={"headers": {"x": "1"}, "ephemeral": True, "idempotencyKey": "ik"},
        )
    body = recorder.requests[0].content
    assert body == (
        b'{"name":"e","data":"{\\"v\\":1}","channel":"orders","socket_id":"123.456",'
        b'"info":"subscription_count,user_count","idempotency_key":"idem-1",'
        b'"message_id":"msg-1","tags":{"region":"eu"},'
        b'"extras":{"headers":{"x":"1"},"ephemeral":true,"idempotencyKey":"ik"}}'
    )
    # Nothing of the event goes into the query string or headers.
    assert set(_query(recorder.requests[0])) == {
        "auth_key",
        "auth_timestamp",
        "auth_version",
        "body_md5",
        "auth_signature",
    }
    assert "x-idempotency-key" not in recorder.requests[0].headers


def test_same_trigger_twice_gives_identical_body_bytes() -> None:
    recorder = Recorder()
    with _sync(recorder) as client:
        for _ in range(2):
            client.trigger("orders", "e", {"b": 2, "a": 1}, message_id="m", tags={"t": "1"})
    assert recorder.requests[0].content == recorder.requests[1].content


def test_trigger_batch_body() -> None:
    recorder = Recorder(httpx.Response(200, json={"batch": [{}, {"acknowledgement_id": "a2"}]}))
    with _sync(recorder) as client:
        result = client.trigger_batch(
            [Event("a", "e1", {"n": 1}), Event(None, "e2", "s", channels=["b", "c"])]
        )
    request = recorder.requests[0]
    assert request.url.path == f"/apps/{APP_ID}/batch_events"
    assert request.content == (
        b'{"batch":[{"name":"e1","data":"{\\"n\\":1}","channel":"a"},'
        b'{"name":"e2","data":"s","channels":["b","c"]}]}'
    )
    assert [ack.acknowledgement_id for ack in result.batch] == [None, "a2"]


def test_send_to_user_publishes_to_the_server_to_user_channel() -> None:
    recorder = Recorder()
    with _sync(recorder) as client:
        client.send_to_user("u-7", "e", "x")
    assert json.loads(recorder.requests[0].content)["channel"] == "#server-to-user-u-7"


def test_success_result_exposes_channel_acks() -> None:
    answer = httpx.Response(200, json={"channels": {"orders": {"acknowledgement_id": "ack-1"}}})
    with _sync(Recorder(answer)) as client:
        result = client.trigger("orders", "e", "x", message_id="m")
    assert result.status_code == 200
    assert result.channels["orders"].acknowledgement_id == "ack-1"


# -- signing at send time ------------------------------------------------------------------------


def test_request_is_signed_at_send_time_with_the_injected_clock() -> None:
    now = [T0]
    recorder = Recorder()
    with _sync(recorder, clock=lambda: now[0]) as client:
        request = client.prepare_trigger("orders", "e", "x")
        now[0] = T0 + 3600  # the row waited an hour before it was sent
        client.send(request)
        now[0] = T0 + 7200
        client.send(request)
    assert [r.content for r in recorder.requests] == [request.body, request.body]
    _assert_signed(recorder.requests[0], T0 + 3600)
    _assert_signed(recorder.requests[1], T0 + 7200)


def test_get_is_signed_without_body_md5_and_keeps_the_encoded_path() -> None:
    recorder = Recorder(httpx.Response(200, json={"occupied": True}))
    channel = "presence-a#b;c@d,e=f"
    with _sync(recorder) as client:
        result = client.get(f"channels/{quote_path_segment(channel)}", {"info": "user_count"})
    request = recorder.requests[0]
    assert request.method == "GET"
    assert request.content == b""
    assert request.url.raw_path.startswith(
        f"/apps/{APP_ID}/channels/presence-a%23b%3Bc%40d%2Ce%3Df?".encode()
    )
    assert _query(request)["info"] == "user_count"
    _assert_signed(request)
    assert result.body == {"occupied": True}


def test_custom_client_still_sends_json_content_type_and_user_agent() -> None:
    recorder = Recorder()
    with _sync(recorder) as client:
        client.trigger("orders", "e", "x")
    headers = recorder.requests[0].headers
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("sockudo-outbox/")


def test_exactly_one_request_even_on_503() -> None:
    recorder = Recorder(httpx.Response(503, json={"error": "busy", "code": "backpressure"}))
    with _sync(recorder) as client, pytest.raises(EndpointUnavailable):
        client.trigger("orders", "e", "x", idempotency_key="k")
    assert len(recorder.requests) == 1


async def test_async_client_body_signing_and_single_request() -> None:
    recorder = Recorder(httpx.Response(503, headers={"Retry-After": "1"}, json={"error": "b"}))
    async with _async(recorder) as client:
        with pytest.raises(EndpointUnavailable) as caught:
            await client.trigger(["a", "b"], "e", {"x": 1}, message_id="m")
    assert caught.value.retry_after == 1.0
    (request,) = recorder.requests
    assert (
        request.content
        == b'{"name":"e","data":"{\\"x\\":1}","channels":["a","b"],"message_id":"m"}'
    )
    assert request.headers["content-type"] == "application/json"
    _assert_signed(request)


async def test_async_client_success_and_batch() -> None:
    recorder = Recorder(httpx.Response(200, json={}))
    async with _async(recorder) as client:
        result = await client.trigger_batch([Event("a", "e", "x")])
        await client.send_to_user("u", "e", "x")
        await client.get("channels")
    assert result.body == {}
    assert [r.url.path for r in recorder.requests] == [
        f"/apps/{APP_ID}/batch_events",
        f"/apps/{APP_ID}/events",
        f"/apps/{APP_ID}/channels",
    ]
    for request in recorder.requests:
        _assert_signed(request)


# -- status table --------------------------------------------------------------------------------


def _error(code: str, status: int) -> dict[str, Any]:
    return {"error": f"{code} happened", "code": code, "status": status}


STATUS_TABLE = [
    (400, {}, _error("invalid_input", 400), EventRefused, None),
    (401, {}, _error("auth_failed", 401), ClientMisconfigured, None),
    (403, {}, _error("forbidden", 403), Forbidden, None),
    (404, {}, _error("app_not_found", 404), ClientMisconfigured, None),
    (413, {}, _error("payload_too_large", 413), EventRefused, None),
    (415, {}, _error("unsupported_media_type", 415), EventRefused, None),
    (422, {}, _error("unprocessable", 422), EventRefused, None),
    (429, {"Retry-After": "17"}, _error("rate_limited", 429), EndpointUnavailable, 17.0),
    (500, {}, _error("internal", 500), EndpointUnavailable, None),
    (503, {"Retry-After": "1"}, _error("backpressure", 503), EndpointUnavailable, 1.0),
    (503, {}, _error("service_unavailable", 503), EndpointUnavailable, None),
]


@pytest.mark.parametrize(("status", "headers", "body", "exc_type", "retry_after"), STATUS_TABLE)
def test_status_maps_to_exception(
    status: int,
    headers: dict[str, str],
    body: dict[str, Any],
    exc_type: type[PublishFailed],
    retry_after: float | None,
) -> None:
    recorder = Recorder(httpx.Response(status, headers=headers, json=body))
    with _sync(recorder) as client, pytest.raises(exc_type) as caught:
        client.trigger("orders", "e", "x")
    error = caught.value
    assert type(error) is exc_type
    assert error.status == status
    assert error.code == body["code"]
    assert body["error"] in str(error)
    assert SECRET not in str(error)
    if isinstance(error, EndpointUnavailable):
        assert error.retry_after == retry_after
    assert len(recorder.requests) == 1


@pytest.mark.parametrize(("status", "headers", "body", "exc_type", "retry_after"), STATUS_TABLE)
async def test_async_status_maps_to_the_same_exception(
    status: int,
    headers: dict[str, str],
    body: dict[str, Any],
    exc_type: type[PublishFailed],
    retry_after: float | None,
) -> None:
    async with _async(Recorder(httpx.Response(status, headers=headers, json=body))) as client:
        with pytest.raises(exc_type) as caught:
            await client.trigger("orders", "e", "x")
    assert type(caught.value) is exc_type
    assert caught.value.status == status


def test_non_json_error_body_is_kept_as_message() -> None:
    recorder = Recorder(httpx.Response(502, text="<html>Bad Gateway</html>"))
    with _sync(recorder) as client, pytest.raises(EndpointUnavailable) as caught:
        client.trigger("orders", "e", "x")
    assert "Bad Gateway" in str(caught.value)
    assert caught.value.retry_after is None


def test_soketi_style_200_with_error_code_401_is_client_misconfigured() -> None:
    answer = httpx.Response(200, json={"error": "The auth signature is invalid.", "code": 401})
    with _sync(Recorder(answer)) as client, pytest.raises(ClientMisconfigured) as caught:
        client.trigger("orders", "e", "x")
    assert caught.value.status == 401
    assert "auth signature is invalid" in str(caught.value)


def test_soketi_style_200_with_error_code_413_is_event_refused() -> None:
    answer = httpx.Response(200, json={"error": "The data content is too large.", "code": 413})
    with _sync(Recorder(answer)) as client, pytest.raises(EventRefused) as caught:
        client.trigger("orders", "e", "x")
    assert caught.value.status == 413


def test_200_without_error_is_a_result() -> None:
    with _sync(Recorder(httpx.Response(200, json={"ok": True}))) as client:
        result = client.trigger("orders", "e", "x")
    assert result.body == {"ok": True}
    assert result.channels == {}


# -- transport errors ----------------------------------------------------------------------------


def _raising(exc_type: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("simulated failure", request=request)

    return handler


@pytest.mark.parametrize(
    ("exc_type", "maybe_delivered"),
    [
        (httpx.ConnectError, False),
        (httpx.ConnectTimeout, False),
        (httpx.PoolTimeout, False),
        (httpx.ReadTimeout, True),
        (httpx.ReadError, True),
        (httpx.RemoteProtocolError, True),
    ],
)
def test_transport_error_is_endpoint_unavailable(
    exc_type: type[httpx.TransportError], maybe_delivered: bool
) -> None:
    recorder = Recorder(_raising(exc_type))
    with _sync(recorder) as client, pytest.raises(EndpointUnavailable) as caught:
        client.trigger("orders", "e", "x")
    assert caught.value.maybe_delivered is maybe_delivered
    assert caught.value.status is None
    assert exc_type.__name__ in str(caught.value)
    assert isinstance(caught.value.__cause__, exc_type)
    assert SECRET not in str(caught.value)
    assert len(recorder.requests) == 1


@pytest.mark.parametrize(
    ("exc_type", "maybe_delivered"), [(httpx.ConnectError, False), (httpx.ReadTimeout, True)]
)
async def test_async_transport_error_is_endpoint_unavailable(
    exc_type: type[httpx.TransportError], maybe_delivered: bool
) -> None:
    async with _async(Recorder(_raising(exc_type))) as client:
        with pytest.raises(EndpointUnavailable) as caught:
            await client.trigger("orders", "e", "x")
    assert caught.value.maybe_delivered is maybe_delivered


# -- Retry-After ---------------------------------------------------------------------------------

HTTP_DATE_EPOCH = 1445412480  # Wed, 21 Oct 2015 07:28:00 GMT


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5.0),
        (" 120 ", 120.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("-3", 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
    ],
)
def test_parse_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "Wed, 21 Oct 2015 07:28:30 GMT",  # IMF-fixdate
        "Wednesday, 21-Oct-15 07:28:30 GMT",  # RFC 850
        "Wed Oct 21 07:28:30 2015",  # asctime: no zone, but HTTP dates are GMT
    ],
)
def test_parse_retry_after_http_dates(value: str) -> None:
    assert parse_retry_after(value, now=HTTP_DATE_EPOCH) == pytest.approx(30.0)
    assert parse_retry_after(value, now=HTTP_DATE_EPOCH + 100) == 0.0


@pytest.fixture
def non_utc_local_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("non_utc_local_time")
def test_parse_retry_after_asctime_date_ignores_the_local_time_zone() -> None:
    assert time.timezone != 0  # the fixture took effect
    assert parse_retry_after("Wed Oct 21 07:28:30 2015", now=HTTP_DATE_EPOCH) == pytest.approx(30)


# -- secrets stay out of everything printable ----------------------------------------------------


def test_secret_is_not_in_reprs_or_masked_url() -> None:
    config = Config(
        app_id=APP_ID,
        key=KEY,
        secret=SECRET,
        encryption_master_key_base64="AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    )
    with _sync() as client:
        assert SECRET not in repr(client)
        assert KEY in repr(client)
    assert SECRET not in repr(_async())
    assert SECRET not in repr(config)
    assert "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8" not in repr(config)
    assert config.masked_url == f"http://{KEY}:***@127.0.0.1:6001/apps/{APP_ID}"


def test_secret_is_never_sent() -> None:
    recorder = Recorder()
    with _sync(recorder) as client:
        client.trigger("orders", "e", "x")
        client.get("channels")
    for request in recorder.requests:
        assert SECRET.encode() not in request.content
        assert SECRET not in str(request.url)
        assert all(SECRET not in v for v in request.headers.values())


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        (f"http://{KEY}:{SECRET}@example.com/apps/{APP_ID}", "example.com", 80, False),
        (f"https://{KEY}:{SECRET}@example.com/apps/{APP_ID}", "example.com", 443, True),
        (f"http://{KEY}:{SECRET}@127.0.0.1:6001/apps/{APP_ID}", "127.0.0.1", 6001, False),
        (f"https://{KEY}:{SECRET}@[::1]:8443/apps/{APP_ID}/", "::1", 8443, True),
    ],
)
def test_config_from_url(url: str, host: str, port: int, tls: bool) -> None:
    config = Config.from_url(url)
    assert (config.app_id, config.key, config.secret) == (APP_ID, KEY, SECRET)
    assert (config.host, config.port, config.use_tls) == (host, port, tls)
    assert SECRET not in config.masked_url
    assert config.masked_url.startswith(("https://" if tls else "http://") + f"{KEY}:***@")


def test_config_from_url_unquotes_credentials_and_applies_overrides() -> None:
    config = Config.from_url("http://k%40x:se%2Fcr%3Aet@h/apps/a%2Fb", timeout=3.0)
    assert (config.key, config.secret, config.app_id, config.timeout) == (
        "k@x",
        "se/cr:et",
        "a/b",
        3.0,
    )


def test_client_from_url_uses_the_given_client() -> None:
    recorder = Recorder()
    url = f"https://{KEY}:{SECRET}@push.example.com/apps/{APP_ID}"
    transport = httpx.MockTransport(recorder)
    with Sockudo.from_url(url, clock=lambda: T0, client=httpx.Client(transport=transport)) as c:
        c.trigger("orders", "e", "x")
        assert SECRET not in repr(c)
    url_sent = recorder.requests[0].url
    assert (url_sent.scheme, url_sent.host, url_sent.port) == ("https", "push.example.com", None)
    assert url_sent.path == f"/apps/{APP_ID}/events"
    _assert_signed(recorder.requests[0])


@pytest.mark.parametrize(
    "url",
    [
        f"ftp://{KEY}:{SECRET}@h/apps/1",
        f"http://{KEY}:{SECRET}@h/apps",
        f"http://{KEY}:{SECRET}@h/other/1",
        f"http://{KEY}:{SECRET}@h/apps/1/events",
        f"http://{KEY}:{SECRET}@h:notaport/apps/1",
        f"http://{KEY}:{SECRET}@h:70000/apps/1",
        f"http://{KEY}@h/apps/1",
        f"http://:{SECRET}@h/apps/1",
        "not a url",
    ],
)
def test_bad_url_raises_config_error_without_the_secret(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_url(url)
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value)
    with pytest.raises(ConfigError) as caught:
        Sockudo.from_url(url)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    "settings",
    [
        {"port": 0},
        {"port": 65536},
        {"timeout": 0},
        {"encryption_master_key_base64": "not base64!"},
        {"encryption_master_key_base64": "AAAA"},
        {"secret": ""},
    ],
)
def test_bad_settings_raise_config_error(settings: dict[str, Any]) -> None:
    values = {"app_id": APP_ID, "key": KEY, "secret": SECRET, **settings}
    with pytest.raises(ConfigError) as caught:
        Config(**values)
    assert SECRET not in str(caught.value)


def test_http2_only_with_tls_or_prior_knowledge() -> None:
    handler = httpx.MockTransport(_refuse)

    def options(**settings: Any) -> dict[str, Any]:
        client = Sockudo(APP_ID, KEY, SECRET, client=httpx.Client(transport=handler), **settings)
        return client._transport_options()

    assert "http2" not in options()
    assert "http2" not in options(http2=True)  # plain http: h2 would need prior knowledge
    assert options(http2=True, use_tls=True)["http2"] is True
    assert "http1" not in options(http2=True, use_tls=True)  # ALPN may still pick HTTP/1.1
    prior = options(http2_prior_knowledge=True)
    assert (prior["http2"], prior["http1"]) == (True, False)
    with pytest.raises(ConfigError):
        options(http2_prior_knowledge=True, use_tls=True)


def test_default_transport_options() -> None:
    with _sync() as client:
        opts = client._transport_options()
    assert opts["follow_redirects"] is False
    assert opts["trust_env"] is False
    assert opts["timeout"] == httpx.Timeout(10.0)


# -- validation: refused before any request ------------------------------------------------------


def _refused(field: str, call: Callable[[Sockudo], object]) -> InvalidEvent:
    with _sync() as client, pytest.raises(InvalidEvent) as caught:
        call(client)
    assert caught.value.field == field
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, SockudoError)
    assert SECRET not in str(caught.value)
    return caught.value


@pytest.mark.parametrize(
    "channel",
    ["", "has space", "naïve", "a/b", "a*b", "new\nline", "trailing-newline\n", "nul\x00", "é"],
)
def test_bad_channel_names(channel: str) -> None:
    _refused("channel", lambda c: c.trigger(channel, "e", "x"))
    _refused("channel", lambda c: c.trigger(["ok", channel], "e", "x"))


@pytest.mark.parametrize("channels", [[], (), "", None, 42, {"a", "b"}])
def test_missing_or_malformed_channel_lists(channels: Any) -> None:
    _refused("channel", lambda c: c.trigger(channels, "e", "x"))


def test_channel_name_length_limit() -> None:
    recorder = Recorder()
    with _sync(recorder) as client:
        client.trigger("a" * 100, "e", "x")
    assert len(recorder.requests) == 1
    _refused("channel", lambda c: c.trigger("a" * 101, "e", "x"))


def test_more_than_100_channels() -> None:
    recorder = Recorder()
    with _sync(recorder) as client:
        client.trigger([f"c{i}" for i in range(100)], "e", "x")
    assert len(recorder.requests) == 1
    _refused("channel", lambda c: c.trigger([f"c{i}" for i in range(101)], "e", "x"))


def test_event_name_limits() -> None:
    _refused("event", lambda c: c.trigger("a", "", "x"))
    _refused("event", lambda c: c.trigger("a", "n" * 101, "x"))
    _refused("event", lambda c: c.trigger("a", "é" * 51, "x"))  # 102 bytes
    _refused("event", lambda c: c.trigger("a", "ev\x00", "x"))
    _refused("event", lambda c: c.trigger("a", "ev\ud800", "x"))
    _refused("event", lambda c: c.trigger("a", None, "x"))


def test_data_size_limit_is_inclusive_and_in_utf8_bytes() -> None:
    recorder = Recorder()
    with _sync(recorder) as client:
        client.trigger("a", "e", "x" * 102_400)
    assert len(recorder.requests) == 1
    _refused("data", lambda c: c.trigger("a", "e", "x" * 102_401))
    _refused("data", lambda c: c.trigger("a", "e", "é" * 51_201))  # 102,402 bytes
    _refused("data", lambda c: c.trigger("a", "e", {"k": "x" * 102_400}))


@pytest.mark.parametrize(
    "data",
    [
        object(),
        {1, 2},
        {"when": time},
        b"bytes",
        float("nan"),
        {"x": float("inf")},
        [float("-inf")],
    ],
)
def test_non_serializable_and_non_finite_data(data: Any) -> None:
    _refused("data", lambda c: c.trigger("a", "e", data))


@pytest.mark.parametrize("data", ["\ud800", {"k": "\udc00"}, ["ok", "\udfff"]])
def test_lone_surrogates_in_data(data: Any) -> None:
    _refused("data", lambda c: c.trigger("a", "e", data))


@pytest.mark.parametrize("field", ["idempotency_key", "message_id"])
def test_key_limits(field: str) -> None:
    recorder = Recorder()
    with _sync(recorder) as client:
        client.trigger("a", "e", "x", **{field: "k" * 128})
    assert json.loads(recorder.requests[0].content)[field] == "k" * 128
    _refused(field, lambda c: c.trigger("a", "e", "x", **{field: "k" * 129}))
    _refused(field, lambda c: c.trigger("a", "e", "x", **{field: "é" * 65}))  # 130 bytes
    _refused(field, lambda c: c.trigger("a", "e", "x", **{field: ""}))
    _refused(field, lambda c: c.trigger("a", "e", "x", **{field: "k\x00"}))
    _refused(field, lambda c: c.trigger("a", "e", "x", **{field: "k\ud800"}))


def test_bad_socket_id_and_user_id() -> None:
    _refused("socket_id", lambda c: c.trigger("a", "e", "x", socket_id=""))
    _refused("socket_id", lambda c: c.trigger("a", "e", "x", socket_id="1.2\x00"))
    _refused("user_id", lambda c: c.send_to_user("", "e", "x"))
    _refused("channel", lambda c: c.send_to_user("has space", "e", "x"))


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("extras", {"vendorField": {1, 2}}),
        ("extras", {"ttl": float("nan")}),
        ("tags", {"k": "\ud800"}),
    ],
)
def test_tags_and_extras_that_are_not_json_are_refused(option: str, value: Any) -> None:
    _refused("body", lambda c: c.trigger("a", "e", "x", **{option: value}))


def test_batch_limits() -> None:
    recorder = Recorder()
    with _sync(recorder) as client:
        client.trigger_batch([Event("a", "e", i) for i in range(100)])
    assert len(json.loads(recorder.requests[0].content)["batch"]) == 100
    _refused("batch", lambda c: c.trigger_batch([Event("a", "e", i) for i in range(101)]))
    _refused("batch", lambda c: c.trigger_batch([]))


def test_invalid_item_in_a_batch_is_refused_before_any_request() -> None:
    batch = [Event("a", "e", 1), Event("bad channel", "e", 2)]
    _refused("channel", lambda c: c.trigger_batch(batch))

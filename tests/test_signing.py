"""Pusher REST request signing: Pusher's worked example, and agreement with an independent signer.

The reference is the ``sockudo-http-python`` package (a dev dependency): its ``signed_uri`` reads
``time.time()``, so each comparison pins that module's clock to the timestamp our signer is given.
"""

from __future__ import annotations

import hashlib
import hmac
import types
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
import sockudo_http_python
import sockudo_http_python.client as reference_module

from outbox.sockudo import Signer, Sockudo, body_md5, string_to_sign
from outbox.sockudo.signing import RESERVED_PARAMETERS, quote_path_segment

# Pusher's documented worked example ("Worked authentication example",
# https://pusher.com/docs/channels/library_auth_reference/rest-api/#worked-authentication-example,
# also in /work/shared/sockudo-http-api.md).
APP_ID = "3"
KEY = "278d425bdf160c739803"
SECRET = "7ad3773142a6692b25b8"
TIMESTAMP = 1353088179
BODY = '{"name":"foo","channels":["project-3"],"data":"{\\"some\\":\\"data\\"}"}'
EXPECTED_MD5 = "ec365a775a4cd0599faeb73354201b6f"
EXPECTED_SIGNATURE = "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
EMPTY_MD5 = hashlib.md5(b"").hexdigest()


def _no_network(request: httpx.Request) -> httpx.Response:
    pytest.fail(f"signing must not make a request: {request.method} {request.url}")


def _ours(clock: float = TIMESTAMP) -> Sockudo:
    return Sockudo(
        APP_ID,
        KEY,
        SECRET,
        clock=lambda: clock,
        client=httpx.Client(transport=httpx.MockTransport(_no_network)),
    )


@pytest.fixture
def reference(monkeypatch: pytest.MonkeyPatch) -> sockudo_http_python.Sockudo:
    """The independent signer, with its clock pinned to TIMESTAMP and the same host and port."""
    monkeypatch.setattr(reference_module, "time", types.SimpleNamespace(time=lambda: TIMESTAMP))
    options = sockudo_http_python.SockudoOptions(host="127.0.0.1", port=6001, use_tls=False)
    client = sockudo_http_python.Sockudo(
        APP_ID,
        KEY,
        SECRET,
        options=options,
        client=httpx.Client(transport=httpx.MockTransport(_no_network)),
    )
    yield client
    client.close()


def _hmac_hex(text: str) -> str:
    return hmac.new(SECRET.encode(), text.encode(), hashlib.sha256).hexdigest()


def _split(url: str) -> tuple[str, str, dict[str, str]]:
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    params = dict(pairs)
    assert len(params) == len(pairs), f"duplicate query parameters in {url}"
    return f"{parts.scheme}://{parts.netloc}", parts.path, params


# -- Pusher's worked example -----------------------------------------------------------------


def test_worked_example_body_md5() -> None:
    assert body_md5(BODY) == EXPECTED_MD5
    assert body_md5(BODY.encode("utf-8")) == EXPECTED_MD5


def test_worked_example_signature_via_signer() -> None:
    params = Signer(KEY, SECRET).signed_parameters("POST", "/apps/3/events", BODY, TIMESTAMP)
    assert params == {
        "auth_key": KEY,
        "auth_timestamp": str(TIMESTAMP),
        "auth_version": "1.0",
        "body_md5": EXPECTED_MD5,
        "auth_signature": EXPECTED_SIGNATURE,
    }


def test_worked_example_string_to_sign() -> None:
    params = {
        "auth_key": KEY,
        "auth_timestamp": str(TIMESTAMP),
        "auth_version": "1.0",
        "body_md5": EXPECTED_MD5,
    }
    assert string_to_sign("POST", "/apps/3/events", params) == (
        "POST\n/apps/3/events\n"
        f"auth_key={KEY}&auth_timestamp={TIMESTAMP}&auth_version=1.0&body_md5={EXPECTED_MD5}"
    )


def test_worked_example_signature_via_client_signed_uri_with_injected_clock() -> None:
    with _ours() as client:
        base, path, params = _split(client.signed_uri("POST", "/apps/3/events", BODY))
    assert base == "http://127.0.0.1:6001"
    assert path == "/apps/3/events"
    assert params["auth_timestamp"] == str(TIMESTAMP)
    assert params["body_md5"] == EXPECTED_MD5
    assert params["auth_signature"] == EXPECTED_SIGNATURE


def test_client_signs_with_its_clock_at_call_time() -> None:
    now = [TIMESTAMP]
    with Sockudo(
        APP_ID,
        KEY,
        SECRET,
        clock=lambda: now[0],
        client=httpx.Client(transport=httpx.MockTransport(_no_network)),
    ) as client:
        first = _split(client.signed_uri("POST", "/apps/3/events", BODY))[2]
        now[0] = TIMESTAMP + 700.9
        second = _split(client.signed_uri("POST", "/apps/3/events", BODY))[2]
    assert first["auth_signature"] == EXPECTED_SIGNATURE
    assert second["auth_timestamp"] == str(TIMESTAMP + 700)
    assert second["auth_signature"] != EXPECTED_SIGNATURE


# -- the string to sign ------------------------------------------------------------------------


def test_string_to_sign_lowercases_and_sorts_keys_and_does_not_escape_values() -> None:
    # Pusher's rule: keys lowercased, sorted, values not URL-escaped ("name=Something else").
    text = string_to_sign("get", "/p", {"Name": "Something else", "auth_key": "foo", "B": "a&b"})
    assert text == "GET\n/p\nauth_key=foo&b=a&b&name=Something else"


def test_string_to_sign_leaves_out_auth_signature() -> None:
    assert string_to_sign("POST", "/p", {"a": "1", "auth_signature": "x"}) == "POST\n/p\na=1"


# -- agreement with the independent reference signer --------------------------------------------


def _assert_same_signed_uri(
    reference: sockudo_http_python.Sockudo,
    method: str,
    path: str,
    body: str | None,
    parameters: dict[str, str] | None = None,
) -> dict[str, str]:
    with _ours() as client:
        ours = _split(client.signed_uri(method, path, body, parameters))
    theirs = _split(reference.signed_uri(method, path, body, parameters))
    assert ours == theirs
    return ours[2]


def test_post_with_body_agrees_with_reference(reference: sockudo_http_python.Sockudo) -> None:
    params = _assert_same_signed_uri(reference, "POST", "/apps/3/events", BODY)
    assert params["auth_signature"] == EXPECTED_SIGNATURE


def test_post_with_unicode_body_agrees_with_reference(
    reference: sockudo_http_python.Sockudo,
) -> None:
    body = '{"name":"é","channel":"naïve","data":"日本語 ✓"}'
    params = _assert_same_signed_uri(reference, "POST", "/apps/3/events", body)
    assert params["body_md5"] == hashlib.md5(body.encode("utf-8")).hexdigest()


def test_post_with_empty_body_agrees_with_reference(
    reference: sockudo_http_python.Sockudo,
) -> None:
    params = _assert_same_signed_uri(reference, "POST", "/apps/3/events", "")
    assert params["body_md5"] == EMPTY_MD5


def test_get_with_several_query_parameters_agrees_with_reference(
    reference: sockudo_http_python.Sockudo,
) -> None:
    parameters = {
        "info": "user_count,subscription_count",
        "filter_by_prefix": "presence-",
        "Zeta": "last",
        "alpha": "first",
        "MiXeD": "a value with spaces & symbols=?",
    }
    params = _assert_same_signed_uri(reference, "GET", "/apps/3/channels", None, parameters)
    assert "body_md5" not in params
    for key, value in parameters.items():
        assert params[key] == value


@pytest.mark.parametrize(
    "channel",
    [
        "private-a#b",
        "presence-room;1",
        "user@example.com",
        "a,b,c",
        "key=value",
        "#server-to-user-42",
        "ns:chat-room",
        "all;of#them@here,x=y",
    ],
)
def test_percent_encoded_channel_paths_agree_with_reference(
    reference: sockudo_http_python.Sockudo, channel: str
) -> None:
    path = f"/apps/3/channels/{quote_path_segment(channel)}"
    assert not any(c in path for c in "#;@,=:")
    params = _assert_same_signed_uri(reference, "GET", path, None, {"info": "user_count"})
    # The signature covers the path exactly as sent on the wire, not the decoded one.
    query = f"auth_key={KEY}&auth_timestamp={TIMESTAMP}&auth_version=1.0&info=user_count"
    assert params["auth_signature"] == _hmac_hex(f"GET\n{path}\n{query}")
    assert params["auth_signature"] != _hmac_hex(f"GET\n/apps/3/channels/{channel}\n{query}")


def test_quote_path_segment_escapes_every_reserved_character() -> None:
    assert quote_path_segment("a#b;c@d,e=f:g/h") == "a%23b%3Bc%40d%2Ce%3Df%3Ag%2Fh"
    assert quote_path_segment("plain-name_1.2") == "plain-name_1.2"


# -- body_md5 presence ---------------------------------------------------------------------------


@pytest.mark.parametrize("body", [None, b"", ""])
def test_body_md5_is_present_on_post_even_without_a_body(body: bytes | str | None) -> None:
    params = Signer(KEY, SECRET).signed_parameters("POST", "/apps/3/events", body, TIMESTAMP)
    assert params["body_md5"] == EMPTY_MD5


@pytest.mark.parametrize("method", ["GET", "get"])
def test_body_md5_is_absent_on_get(method: str) -> None:
    signer = Signer(KEY, SECRET)
    params = signer.signed_parameters(method, "/apps/3/channels", b"ignored", TIMESTAMP, {"a": "1"})
    assert "body_md5" not in params
    assert params["auth_signature"] == _hmac_hex(
        f"GET\n/apps/3/channels\na=1&auth_key={KEY}&auth_timestamp={TIMESTAMP}&auth_version=1.0"
    )


def test_get_through_client_sends_no_body_md5() -> None:
    with _ours() as client:
        params = _split(client.signed_uri("GET", "/apps/3/channels", None, {"x": "1"}))[2]
    assert "body_md5" not in params


def test_auth_signature_is_the_last_parameter() -> None:
    query = Signer(KEY, SECRET).signed_query("POST", "/apps/3/events", BODY, TIMESTAMP)
    assert query.rsplit("&", 1)[1] == f"auth_signature={EXPECTED_SIGNATURE}"


def test_none_parameters_are_left_out_and_lists_joined() -> None:
    params = Signer(KEY, SECRET).signed_parameters(
        "GET", "/p", None, TIMESTAMP, {"skip": None, "info": ["user_count", "subscription_count"]}
    )
    assert "skip" not in params
    assert params["info"] == "user_count,subscription_count"


# -- reserved parameters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [*sorted(RESERVED_PARAMETERS), "AUTH_KEY", "Body_MD5", "Auth_Signature"]
)
def test_reserved_parameters_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="reserved"):
        Signer(KEY, SECRET).signed_parameters("GET", "/p", None, TIMESTAMP, {name: "x"})
    with _ours() as client, pytest.raises(ValueError, match="reserved"):
        client.signed_uri("GET", "/apps/3/channels", None, {name: "x"})


def test_reserved_parameter_on_get_is_refused_before_any_request() -> None:
    with _ours() as client, pytest.raises(ValueError, match="reserved"):
        client.get("channels", {"auth_timestamp": "1"})


def test_signer_repr_hides_the_secret() -> None:
    assert SECRET not in repr(Signer(KEY, SECRET))

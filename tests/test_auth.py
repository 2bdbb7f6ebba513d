"""Channel authorization, user authentication and webhooks against Pusher's published vectors."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import httpx
import pytest
from nacl.secret import SecretBox

from outbox.sockudo import Config, InvalidEvent, PresenceUser, Sockudo, WebhookInvalid, auth, crypto

# Pusher's credentials for its documented examples
# (https://pusher.com/docs/channels/library_auth_reference/auth-signatures/).
KEY = "278d425bdf160c739803"
SECRET = "7ad3773142a6692b25b8"
CONFIG = Config(app_id="3", key=KEY, secret=SECRET)

# pusher/pusher-http-node, tests/integration/pusher/authenticate.js ("Pusher with encryptionMasterKey").
NODE_MASTER_KEY_B64 = "zyrm8pvV2C9fJcBfhyXzvxbJVN/H7QLmbe0xJi1GhPU="
NODE_SHARED_SECRET = "nlr49ISQHz91yS3cy/yWmW8wFMNeTnNL5tNHnbPJcLQ="

MASTER_KEY = bytes(range(32))
MASTER_KEY_B64 = base64.b64encode(MASTER_KEY).decode()


def _sign(secret: str, text: str | bytes) -> str:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return hmac.new(secret.encode("utf-8"), raw, hashlib.sha256).hexdigest()


def _no_network(request: httpx.Request) -> httpx.Response:
    pytest.fail(f"auth helpers must not make a request: {request.method} {request.url}")


# -- private channels ----------------------------------------------------------------------------


def test_private_channel_pusher_example() -> None:
    # Pusher docs, "Worked example" (auth-signatures page): HMAC of "1234.1234:private-foobar".
    assert auth.authenticate(CONFIG, "1234.1234", "private-foobar") == {
        "auth": "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
    }


def test_private_channel_pusher_example_through_the_client() -> None:
    transport = httpx.MockTransport(_no_network)
    with Sockudo("3", KEY, SECRET, client=httpx.Client(transport=transport)) as client:
        result = client.authenticate("1234.1234", "private-foobar")
    assert result["auth"] == (
        "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
    )


def test_private_channel_with_every_allowed_character() -> None:
    # pusher/pusher-http-java, src/test/java/com/pusher/rest/PusherChannelAuthTest.java,
    # complexPrivateChannelAuth.
    assert auth.authenticate(CONFIG, "1234.1234", "private-azAZ9_=@,.;") == {
        "auth": "278d425bdf160c739803:208cbbce2a22fd7d7c3509046b17a97b99d345cf4c195bc0d54af9004a022b0b"
    }


# -- presence channels ---------------------------------------------------------------------------

# pusher/pusher-http-java, src/test/java/com/pusher/rest/PusherChannelAuthTest.java,
# presenceChannelAuth (the same vector as the older Pusher docs, auth_signatures#presence).
# Its user name is "Mr. Pusher": with "Mr. Channel" the signature would be different.
PRESENCE_DATA = '{"user_id":10,"user_info":{"name":"Mr. Pusher"}}'
PRESENCE_SIGNATURE = "afaed3695da2ffd16931f457e338e6c9f2921fa133ce7dac49f529792be6304c"


def test_presence_channel_pusher_example() -> None:
    result = auth.authenticate(
        CONFIG, "1234.1234", "presence-foobar", PresenceUser(10, {"name": "Mr. Pusher"})
    )
    assert result == {"auth": f"{KEY}:{PRESENCE_SIGNATURE}", "channel_data": PRESENCE_DATA}


def test_presence_channel_pusher_example_from_a_mapping() -> None:
    result = auth.authenticate(
        CONFIG,
        "1234.1234",
        "presence-foobar",
        {"user_id": 10, "user_info": {"name": "Mr. Pusher"}},
    )
    assert result == {"auth": f"{KEY}:{PRESENCE_SIGNATURE}", "channel_data": PRESENCE_DATA}


def test_presence_user_without_info_signs_only_the_user_id() -> None:
    result = auth.authenticate(CONFIG, "1.2", "presence-room", PresenceUser("u-1"))
    assert result["channel_data"] == '{"user_id":"u-1"}'
    signed = _sign(SECRET, '1.2:presence-room:{"user_id":"u-1"}')
    assert result["auth"] == f"{KEY}:{signed}"


def test_presence_channel_needs_a_user() -> None:
    with pytest.raises(InvalidEvent) as caught:
        auth.authenticate(CONFIG, "1.2", "presence-room")
    assert caught.value.field == "presence_user"


def test_presence_user_is_refused_on_a_private_channel() -> None:
    with pytest.raises(InvalidEvent) as caught:
        auth.authenticate(CONFIG, "1.2", "private-room", PresenceUser(1))
    assert caught.value.field == "presence_user"


# -- user authentication -------------------------------------------------------------------------

# pusher/pusher-http-node, tests/integration/pusher/authenticate.js, "#authenticateUser".


@pytest.mark.parametrize(
    ("key", "secret", "socket_id", "user", "user_data", "signature"),
    [
        (
            "1234",
            "tofu",
            "123.456",
            {"id": "45678"},
            '{"id":"45678"}',
            "f4b1fdeea7c93e32648c7230e32b172057c5623cace6cfce791c6e7035e0babd",
        ),
        (
            "aaaa",
            "tofu",
            "123.456",
            {"id": "55555", "user_name": "test"},
            '{"id":"55555","user_name":"test"}',
            "b8a9f173455903792ae2b788add0c4c78ad7372b3ae7fb5769479276a1993743",
        ),
        (
            "11111",
            "1",
            "123.456",
            {"id": "45678"},
            '{"id":"45678"}',
            "79bddf29fe8e2153dd5d8d569b3f45e5aeb26ae2eb4758879d844791b466cfa2",
        ),
        (
            "aaaa",
            "tofu",
            "1.1",
            {"id": "ą§¶™€łü€ß£"},
            '{"id":"ą§¶™€łü€ß£"}',
            "620494cee53d6c568b49598313194088afda37218f0d059af03c0c898ed61ff4",
        ),
    ],
)
def test_user_authentication_pusher_node_examples(
    key: str, secret: str, socket_id: str, user: dict, user_data: str, signature: str
) -> None:
    config = Config(app_id="10000", key=key, secret=secret)
    assert auth.authenticate_user(config, socket_id, user) == {
        "auth": f"{key}:{signature}",
        "user_data": user_data,
    }


def test_user_authentication_signs_the_documented_string() -> None:
    # Pusher docs: HMAC-SHA256(secret, "<socket_id>::user::<user_data>").
    result = auth.authenticate_user(CONFIG, "1234.1234", {"id": "1", "name": "Ada"})
    user_data = '{"id":"1","name":"Ada"}'
    assert result == {
        "auth": f"{KEY}:{_sign(SECRET, '1234.1234::user::' + user_data)}",
        "user_data": user_data,
    }


@pytest.mark.parametrize("user", [{}, {"id": ""}, {"name": "x"}, "abc", None])
def test_user_authentication_needs_an_id(user: object) -> None:
    with pytest.raises(InvalidEvent) as caught:
        auth.authenticate_user(CONFIG, "1.1", user)  # type: ignore[arg-type]
    assert caught.value.field == "user"


# -- socket ids (pusher-http-node and pusher-http-java refuse the same ones) ---------------------

BAD_SOCKET_IDS = ["", "1.1:", ":1.1", ":\n1.1", "1.1\n:", "1.1\n", "abc", "1", "1.", ".1", "1.1.1"]


@pytest.mark.parametrize("socket_id", [*BAD_SOCKET_IDS, None, 111, 1.1])
def test_bad_socket_ids_are_refused_for_channels(socket_id: object) -> None:
    with pytest.raises(InvalidEvent) as caught:
        auth.authenticate(CONFIG, socket_id, "private-foobar")  # type: ignore[arg-type]
    assert caught.value.field == "socket_id"


@pytest.mark.parametrize("socket_id", [*BAD_SOCKET_IDS, None, 111])
def test_bad_socket_ids_are_refused_for_users(socket_id: object) -> None:
    with pytest.raises(InvalidEvent) as caught:
        auth.authenticate_user(CONFIG, socket_id, {"id": "1"})  # type: ignore[arg-type]
    assert caught.value.field == "socket_id"


@pytest.mark.parametrize(
    "channel", ["", "private-foobar\n", "private-foobar\n:", "private foobar", "private-ä", None]
)
def test_bad_channel_names_are_refused(channel: object) -> None:
    with pytest.raises(InvalidEvent) as caught:
        auth.authenticate(CONFIG, "1.1", channel)  # type: ignore[arg-type]
    assert caught.value.field == "channel"


# -- encrypted channels --------------------------------------------------------------------------


def test_encrypted_channel_shared_secret_matches_pusher_node() -> None:
    config = Config(
        app_id="1234", key="f00d", secret="tofu", encryption_master_key_base64=NODE_MASTER_KEY_B64
    )
    result = auth.authenticate(config, "123.456", "private-encrypted-bla")
    assert result["shared_secret"] == NODE_SHARED_SECRET
    # shared_secret is not part of the signature: auth signs "<socket_id>:<channel>" only.
    assert result["auth"] == f"f00d:{_sign('tofu', '123.456:private-encrypted-bla')}"
    assert set(result) == {"auth", "shared_secret"}


def test_encrypted_channel_shared_secret_is_sha256_of_channel_and_master_key() -> None:
    config = Config(app_id="1", key="k", secret="s", encryption_master_key_base64=MASTER_KEY_B64)
    channel = "private-encrypted-orders"
    result = auth.authenticate(config, "5.6", channel)
    expected = hashlib.sha256(channel.encode("utf-8") + MASTER_KEY).digest()
    assert base64.b64decode(result["shared_secret"]) == expected
    assert result["shared_secret"] == base64.b64encode(expected).decode("ascii")


def test_plain_private_channel_gets_no_shared_secret_even_with_a_master_key() -> None:
    config = Config(app_id="1", key="k", secret="s", encryption_master_key_base64=MASTER_KEY_B64)
    assert "shared_secret" not in auth.authenticate(config, "5.6", "private-orders")


def test_encrypted_channel_without_master_key_is_refused() -> None:
    with pytest.raises(InvalidEvent) as caught:
        auth.authenticate(CONFIG, "1.1", "private-encrypted-bla")
    assert caught.value.field == "channel"


# -- webhooks ------------------------------------------------------------------------------------

WEBHOOK_BODY = json.dumps(
    {
        "time_ms": 1700000000123,
        "events": [{"name": "channel_occupied", "channel": "orders"}],
    },
    separators=(",", ":"),
).encode()


def test_webhook_signature_valid() -> None:
    assert auth.validate_webhook_signature(CONFIG, KEY, _sign(SECRET, WEBHOOK_BODY), WEBHOOK_BODY)
    assert auth.validate_webhook_signature(
        CONFIG, KEY, _sign(SECRET, WEBHOOK_BODY), WEBHOOK_BODY.decode()
    )


def test_webhook_signature_wrong_key() -> None:
    assert not auth.validate_webhook_signature(
        CONFIG, "not-our-key", _sign(SECRET, WEBHOOK_BODY), WEBHOOK_BODY
    )


def test_webhook_signature_wrong_signature() -> None:
    assert not auth.validate_webhook_signature(
        CONFIG, KEY, _sign("another-secret", WEBHOOK_BODY), WEBHOOK_BODY
    )
    assert not auth.validate_webhook_signature(CONFIG, KEY, "", WEBHOOK_BODY)


def test_webhook_signature_tampered_body() -> None:
    signature = _sign(SECRET, WEBHOOK_BODY)
    tampered = WEBHOOK_BODY.replace(b"orders", b"orderz")
    assert not auth.validate_webhook_signature(CONFIG, KEY, signature, tampered)


def test_parse_webhook_returns_events() -> None:
    hook = auth.parse_webhook(CONFIG, KEY, _sign(SECRET, WEBHOOK_BODY), WEBHOOK_BODY)
    assert hook.time_ms == 1700000000123
    assert [(e.name, e.channel) for e in hook.events] == [("channel_occupied", "orders")]


def test_parse_webhook_decrypts_an_encrypted_channel_event() -> None:
    config = Config(app_id="1", key="k", secret="s", encryption_master_key_base64=MASTER_KEY_B64)
    channel = "private-encrypted-chat"
    plaintext = '{"text":"hello ✓"}'
    # Seal with plain PyNaCl, as a client library would, independent of outbox.sockudo.crypto.
    nonce = bytes(range(100, 124))
    box = SecretBox(hashlib.sha256(channel.encode() + MASTER_KEY).digest())
    ciphertext = box.encrypt(plaintext.encode("utf-8"), nonce).ciphertext
    sealed = json.dumps(
        {
            "nonce": base64.b64encode(nonce).decode(),
            "ciphertext": base64.b64encode(ciphertext).decode(),
        }
    )
    body = json.dumps(
        {
            "time_ms": 1,
            "events": [
                {
                    "name": "client_event",
                    "channel": channel,
                    "event": "client-message",
                    "data": sealed,
                    "socket_id": "1.2",
                    "user_id": "u1",
                }
            ],
        }
    ).encode()
    hook = auth.parse_webhook(config, "k", _sign("s", body), body)
    (event,) = hook.events
    assert event.data == plaintext
    assert (event.channel, event.event, event.socket_id, event.user_id) == (
        channel,
        "client-message",
        "1.2",
        "u1",
    )


def test_parse_webhook_refuses_a_bad_signature() -> None:
    with pytest.raises(WebhookInvalid):
        auth.parse_webhook(CONFIG, KEY, _sign("wrong", WEBHOOK_BODY), WEBHOOK_BODY)


def test_parse_webhook_refuses_a_wrong_key() -> None:
    with pytest.raises(WebhookInvalid):
        auth.parse_webhook(CONFIG, "other", _sign(SECRET, WEBHOOK_BODY), WEBHOOK_BODY)


def test_parse_webhook_refuses_a_tampered_body() -> None:
    tampered = WEBHOOK_BODY.replace(b"1700000000123", b"1700000000124")
    with pytest.raises(WebhookInvalid):
        auth.parse_webhook(CONFIG, KEY, _sign(SECRET, WEBHOOK_BODY), tampered)


@pytest.mark.parametrize(
    "body", [b"not json", b"[]", b'{"events":[]}', b'{"time_ms":1,"events":{}}']
)
def test_parse_webhook_refuses_a_signed_body_that_is_not_a_webhook(body: bytes) -> None:
    with pytest.raises(WebhookInvalid):
        auth.parse_webhook(CONFIG, KEY, _sign(SECRET, body), body)


def test_parse_webhook_refuses_encrypted_data_it_cannot_open() -> None:
    config = Config(app_id="1", key="k", secret="s", encryption_master_key_base64=MASTER_KEY_B64)
    channel = "private-encrypted-chat"
    sealed = crypto.seal(channel, "x", bytes(32), bytes(24))  # another master key
    body = json.dumps({"time_ms": 1, "events": [{"name": "e", "channel": channel, "data": sealed}]})
    with pytest.raises(WebhookInvalid):
        auth.parse_webhook(config, "k", _sign("s", body), body)
    # Without a master key at all, an encrypted event cannot be read either.
    no_key = Config(app_id="1", key="k", secret="s")
    with pytest.raises(WebhookInvalid):
        auth.parse_webhook(no_key, "k", _sign("s", body), body)


def test_client_webhook_methods_use_its_config() -> None:
    transport = httpx.MockTransport(_no_network)
    with Sockudo("3", KEY, SECRET, client=httpx.Client(transport=transport)) as client:
        signature = _sign(SECRET, WEBHOOK_BODY)
        assert client.validate_webhook_signature(KEY, signature, WEBHOOK_BODY)
        assert not client.validate_webhook_signature(KEY, signature, WEBHOOK_BODY + b" ")
        assert client.parse_webhook(KEY, signature, WEBHOOK_BODY).time_ms == 1700000000123

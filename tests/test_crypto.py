"""Encrypted channels: what we seal opens with plain PyNaCl, and retries seal to the same bytes."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import httpx
import pytest
from nacl.secret import SecretBox

from outbox.sockudo import Event, InvalidEvent, Limits, Sockudo, SockudoError, crypto
from outbox.sockudo.validation import encode_data

MASTER_KEY = hashlib.sha256(b"test master key").digest()
MASTER_KEY_B64 = base64.b64encode(MASTER_KEY).decode()
CHANNEL = "private-encrypted-orders"
DATA = {"order": 42, "items": ["a", "ü"], "total": 9.5}


def _no_network(request: httpx.Request) -> httpx.Response:
    pytest.fail(f"no request may be made: {request.method} {request.url}")


def _client(**settings: Any) -> Sockudo:
    settings.setdefault("encryption_master_key_base64", MASTER_KEY_B64)
    return Sockudo(
        "1",
        "key",
        "secret",
        client=httpx.Client(transport=httpx.MockTransport(_no_network)),
        **settings,
    )


def _item(body: bytes) -> dict[str, Any]:
    return json.loads(body)


def _envelope(body: bytes) -> dict[str, str]:
    envelope = json.loads(_item(body)["data"])
    assert set(envelope) == {"nonce", "ciphertext"}
    return envelope


def _open_with_pynacl(channel: str, data: str) -> str:
    """Decrypt with PyNaCl only: key = SHA-256(channel || master key)."""
    envelope = json.loads(data)
    box = SecretBox(hashlib.sha256(channel.encode("utf-8") + MASTER_KEY).digest())
    nonce = base64.b64decode(envelope["nonce"])
    assert len(nonce) == 24
    return box.decrypt(base64.b64decode(envelope["ciphertext"]), nonce).decode("utf-8")


# -- what seal produces --------------------------------------------------------------------------


@pytest.mark.parametrize("data", [DATA, "a plain string ✓", [1, 2, 3], None, 7])
def test_trigger_payload_opens_with_pynacl_to_the_plain_data_string(data: Any) -> None:
    with _client() as client:
        request = client.prepare_trigger(CHANNEL, "created", data, idempotency_key="k1")
    item = _item(request.body)
    assert item["channel"] == CHANNEL
    assert _open_with_pynacl(CHANNEL, item["data"]) == encode_data(data)
    # ...and what an unencrypted publish of the same event would send as data:
    with _client() as client:
        plain = client.prepare_trigger("private-orders", "created", data, idempotency_key="k1")
    assert _open_with_pynacl(CHANNEL, item["data"]) == _item(plain.body)["data"]


def test_seal_opens_with_pynacl() -> None:
    nonce = bytes(24)
    sealed = crypto.seal(CHANNEL, '{"a":1}', MASTER_KEY, nonce)
    assert _open_with_pynacl(CHANNEL, sealed) == '{"a":1}'
    assert json.loads(sealed)["nonce"] == base64.b64encode(nonce).decode()


def test_channel_key_is_sha256_of_channel_then_master_key() -> None:
    expected = hashlib.sha256(CHANNEL.encode() + MASTER_KEY).digest()
    assert crypto.channel_key(CHANNEL, MASTER_KEY) == expected
    with pytest.raises(InvalidEvent):
        crypto.channel_key("private-orders", MASTER_KEY)


def test_open_sealed_round_trip_and_tamper_detection() -> None:
    sealed = crypto.seal(CHANNEL, "secret text", MASTER_KEY, bytes(range(24)))
    assert crypto.open_sealed(CHANNEL, sealed, MASTER_KEY) == "secret text"
    envelope = json.loads(sealed)
    raw = bytearray(base64.b64decode(envelope["ciphertext"]))
    raw[-1] ^= 1
    envelope["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(SockudoError):
        crypto.open_sealed(CHANNEL, json.dumps(envelope), MASTER_KEY)
    with pytest.raises(SockudoError):  # the key of another channel does not open it
        crypto.open_sealed("private-encrypted-other", sealed, MASTER_KEY)


# -- nonce rule ----------------------------------------------------------------------------------


def test_same_event_with_same_idempotency_key_seals_to_identical_bytes() -> None:
    with _client() as client:
        first = client.prepare_trigger(CHANNEL, "created", DATA, idempotency_key="evt-1")
        second = client.prepare_trigger(CHANNEL, "created", dict(DATA), idempotency_key="evt-1")
    assert first.body == second.body


def test_same_event_with_same_message_id_seals_to_identical_bytes() -> None:
    # Sockudo fingerprints a message_id's payload: a retry with another nonce would be refused.
    with _client() as client:
        first = client.prepare_trigger(CHANNEL, "created", DATA, message_id="msg-1")
        second = client.prepare_trigger(CHANNEL, "created", DATA, message_id="msg-1")
    assert first.body == second.body


def test_same_batch_seals_to_identical_bytes() -> None:
    batch = [Event(CHANNEL, "created", DATA, idempotency_key="b-1")]
    with _client() as client:
        assert client.prepare_batch(batch).body == client.prepare_batch(list(batch)).body


def test_different_plaintext_gets_a_different_nonce() -> None:
    with _client() as client:
        one = client.prepare_trigger(CHANNEL, "created", {"n": 1}, idempotency_key="evt-1")
        two = client.prepare_trigger(CHANNEL, "created", {"n": 2}, idempotency_key="evt-1")
    assert _envelope(one.body)["nonce"] != _envelope(two.body)["nonce"]


def test_different_idempotency_key_gets_a_different_nonce() -> None:
    with _client() as client:
        one = client.prepare_trigger(CHANNEL, "created", DATA, idempotency_key="evt-1")
        two = client.prepare_trigger(CHANNEL, "created", DATA, idempotency_key="evt-2")
    assert _envelope(one.body)["nonce"] != _envelope(two.body)["nonce"]


def test_derived_nonce_depends_on_channel_key_and_plaintext() -> None:
    base = crypto.derive_nonce(MASTER_KEY, CHANNEL, "k", "p")
    assert len(base) == crypto.NONCE_SIZE == 24
    assert base == crypto.derive_nonce(MASTER_KEY, CHANNEL, "k", "p")
    assert base != crypto.derive_nonce(MASTER_KEY, "private-encrypted-x", "k", "p")
    assert base != crypto.derive_nonce(MASTER_KEY, CHANNEL, "k2", "p")
    assert base != crypto.derive_nonce(MASTER_KEY, CHANNEL, "k", "p2")
    assert base != crypto.derive_nonce(bytes(32), CHANNEL, "k", "p")


def test_without_a_key_random_nonces_differ() -> None:
    with _client() as client:
        nonces = {
            _envelope(client.prepare_trigger(CHANNEL, "created", DATA).body)["nonce"]
            for _ in range(5)
        }
    assert len(nonces) == 5
    assert all(len(base64.b64decode(n)) == 24 for n in nonces)


def test_fixed_encryption_nonce_is_used_as_is() -> None:
    nonce = bytes(range(200, 224))
    with _client() as client:
        request = client.prepare_trigger(
            CHANNEL, "created", DATA, idempotency_key="evt-1", encryption_nonce=nonce
        )
    envelope = _envelope(request.body)
    assert base64.b64decode(envelope["nonce"]) == nonce
    box = SecretBox(hashlib.sha256(CHANNEL.encode() + MASTER_KEY).digest())
    expected = box.encrypt(encode_data(DATA).encode(), nonce).ciphertext
    assert base64.b64decode(envelope["ciphertext"]) == expected


@pytest.mark.parametrize("size", [0, 23, 25, 32])
def test_nonce_must_be_24_bytes(size: int) -> None:
    with pytest.raises(InvalidEvent) as caught:
        crypto.seal(CHANNEL, "x", MASTER_KEY, bytes(size))
    assert caught.value.field == "nonce"
    with _client() as client, pytest.raises(InvalidEvent) as caught:
        client.trigger(CHANNEL, "created", DATA, encryption_nonce=bytes(size))
    assert caught.value.field == "nonce"


# -- refused before any request ------------------------------------------------------------------


@pytest.mark.parametrize(
    "channels",
    [
        [CHANNEL, "orders"],
        ["orders", CHANNEL],
        [CHANNEL, "private-encrypted-other"],
        [CHANNEL, CHANNEL],
    ],
)
def test_mixing_an_encrypted_channel_with_another_is_refused_before_any_request(
    channels: list[str],
) -> None:
    with _client() as client, pytest.raises(InvalidEvent) as caught:
        client.trigger(channels, "created", DATA, idempotency_key="k")
    assert caught.value.field == "channel"


def test_mixing_in_a_batch_item_is_refused_before_any_request() -> None:
    batch = [
        Event("orders", "created", DATA),
        Event(None, "created", DATA, channels=[CHANNEL, "orders"]),
    ]
    with _client() as client, pytest.raises(InvalidEvent) as caught:
        client.trigger_batch(batch)
    assert caught.value.field == "channel"


def test_encrypted_channel_without_master_key_is_refused_before_any_request() -> None:
    with _client(encryption_master_key_base64=None) as client, pytest.raises(InvalidEvent) as c:
        client.trigger(CHANNEL, "created", DATA)
    assert c.value.field == "channel"


def test_sealed_data_over_the_size_limit_is_refused_before_any_request() -> None:
    # The server measures the sealed string (about 4/3 of the plaintext), not the plaintext.
    limits = Limits(max_payload_bytes=1000)
    plaintext = "x" * 900
    with _client(limits=limits) as client:
        assert client.prepare_trigger("private-orders", "e", plaintext).body
        with pytest.raises(InvalidEvent) as caught:
            client.trigger(CHANNEL, "e", plaintext, idempotency_key="k")
    assert caught.value.field == "data"

"""End-to-end encrypted channels (``private-encrypted-*``).

Per-channel key = SHA-256(channel name || 32-byte master key); the event's ``data`` becomes the
compact JSON ``{"nonce": b64, "ciphertext": b64}`` of a NaCl ``secretbox`` over the exact ``data``
string a plain channel would have received.

Retries must send the same bytes (Sockudo fingerprints the payload of a ``message_id``), so the nonce
is never drawn at send time for an event that has an identity. Our choice, in order:

1. a nonce the caller fixes (the outbox stores one per row at enqueue time);
2. else, when the event has an idempotency key (or else a message_id), a *derived* nonce:
   HMAC-SHA256(nonce key, channel || 0 || idempotency key || 0 || plaintext)[:24], where the nonce key
   is HMAC-SHA256(master key, "sockudo-outbox/nonce/v1"). The same event always seals to the same
   bytes; a different plaintext (or channel, or key) gets a different nonce, so a nonce is never
   reused for two different messages under one channel key;
3. else a random nonce.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json

from nacl import exceptions as nacl_exceptions
from nacl import secret as nacl_secret
from nacl import utils as nacl_utils

from .errors import InvalidEvent, SockudoError
from .jsontext import compact_json

ENCRYPTED_PREFIX = "private-encrypted-"
NONCE_SIZE = nacl_secret.SecretBox.NONCE_SIZE  # 24
MAC_SIZE = nacl_secret.SecretBox.MACBYTES  # 16
_NONCE_KEY_LABEL = b"sockudo-outbox/nonce/v1"


def is_encrypted_channel(channel: str) -> bool:
    return channel.startswith(ENCRYPTED_PREFIX)


def channel_key(channel: str, master_key: bytes) -> bytes:
    """The 32-byte secretbox key of one encrypted channel (also the auth ``shared_secret``)."""
    if not is_encrypted_channel(channel):
        raise InvalidEvent(f"{channel!r} is not a {ENCRYPTED_PREFIX}* channel", field="channel")
    return hashlib.sha256(channel.encode("utf-8") + master_key).digest()


def derive_nonce(master_key: bytes, channel: str, idempotency_key: str, plaintext: str) -> bytes:
    """A 24-byte nonce fixed by (channel, idempotency key, plaintext); see the module docstring."""
    nonce_key = hmac.new(master_key, _NONCE_KEY_LABEL, hashlib.sha256).digest()
    message = b"\x00".join(
        (channel.encode("utf-8"), idempotency_key.encode("utf-8"), plaintext.encode("utf-8"))
    )
    return hmac.new(nonce_key, message, hashlib.sha256).digest()[:NONCE_SIZE]


def random_nonce() -> bytes:
    return nacl_utils.random(NONCE_SIZE)


def seal(channel: str, plaintext: str, master_key: bytes, nonce: bytes) -> str:
    """The ``data`` string for an encrypted channel: deterministic for a given nonce."""
    if len(nonce) != NONCE_SIZE:
        raise InvalidEvent(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}", field="nonce")
    box = nacl_secret.SecretBox(channel_key(channel, master_key))
    sealed = box.encrypt(plaintext.encode("utf-8"), nonce)
    return compact_json(
        {
            "nonce": base64.b64encode(sealed.nonce).decode("ascii"),
            "ciphertext": base64.b64encode(sealed.ciphertext).decode("ascii"),
        }
    )


def seal_for_channel(
    channel: str,
    plaintext: str,
    master_key: bytes | None,
    idempotency_key: str | None,
    nonce: bytes | None,
) -> str:
    """Seal ``plaintext`` for an encrypted channel, its nonce chosen by the rule of this module's
    docstring: ``nonce`` if given, else derived from ``idempotency_key``, else random."""
    if master_key is None:
        raise InvalidEvent(
            f"{channel!r} is an encrypted channel but no encryption master key is configured",
            field="channel",
        )
    if nonce is None:
        nonce = (
            derive_nonce(master_key, channel, idempotency_key, plaintext)
            if idempotency_key is not None
            else random_nonce()
        )
    return seal(channel, plaintext, master_key, nonce)


def sealed_size(plaintext_bytes: int) -> int:
    """The length of :func:`seal`'s ``data`` for a plaintext of ``plaintext_bytes`` UTF-8 bytes.

    What the server measures against its payload limit: the envelope, about 4/3 of the plaintext.
    """
    # {"nonce":"<32 chars: base64 of 24 bytes>","ciphertext":"<base64 of plaintext + 16 MAC>"}
    return 60 + 4 * ((plaintext_bytes + MAC_SIZE + 2) // 3)


def open_sealed(channel: str, data: str, master_key: bytes) -> str:
    """Decrypt what :func:`seal` produced (used for webhooks and by tests)."""
    try:
        envelope = json.loads(data)
        nonce = base64.b64decode(envelope["nonce"], validate=True)
        ciphertext = base64.b64decode(envelope["ciphertext"], validate=True)
        box = nacl_secret.SecretBox(channel_key(channel, master_key))
        return box.decrypt(ciphertext, nonce).decode("utf-8")
    except (
        KeyError,
        TypeError,
        ValueError,
        binascii.Error,
        UnicodeDecodeError,
        nacl_exceptions.CryptoError,
    ) as exc:
        raise SockudoError(f"cannot decrypt the payload of {channel!r}") from exc

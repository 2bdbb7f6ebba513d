"""What the handlers take from a request, shared by the publish path (``app.py``) and the rest of
the API (``api.py``): the query and the JSON body as axum's extractors read them, and a channel
name as Sockudo's ``validate_channel_name`` checks it against the app's configuration.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from outbox.sockudo.validation import CHANNEL_TYPE_PREFIXES

from .config import ServerConfig
from .wire import Rejection, bad_request

_CHANNEL_CHARS = re.compile(r"^[A-Za-z0-9\-_=@,;.:#]*$")


def parse_query(query: str) -> dict[str, str]:
    """axum's ``Query`` extractor: every pair, blank values kept (a repeated name: its last)."""
    return {k: v for k, v in parse_qsl(query, keep_blank_values=True)}


def parse_json(headers: Mapping[str, str], body: bytes) -> Any:
    """axum's ``Json`` extractor: 415 without a JSON content type, 400 on bad syntax."""
    mime = headers.get("content-type", "").split(";")[0].strip().lower()
    kind, _, subtype = mime.partition("/")
    if kind != "application" or not (subtype == "json" or subtype.endswith("+json")):
        raise Rejection(415, "Expected request with `Content-Type: application/json`")
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as error:
        raise Rejection(400, f"Failed to parse the request body as JSON: {error}") from None


def _no_constants(name: str) -> Any:
    raise ValueError(f"invalid number {name}")


def validate_channel(channel: str, config: ServerConfig) -> None:
    """``validate_channel_name``: a channel name as the app's configuration allows it."""
    logical = channel
    # Sockudo's channel types, the client's list: a new type is added in one place.
    for prefix in CHANNEL_TYPE_PREFIXES:
        if logical.startswith(prefix):
            logical = logical[len(prefix) :]
            break
    base, hash_sign, _users = logical.partition("#")
    namespace = base.split(":", 1)[0] if ":" in base else None
    if namespace is not None and namespace not in config.namespaces:
        raise bad_request(f"Unknown channel namespace '{namespace}'")
    if len(channel.encode("utf-8")) > config.max_channel_name_bytes:
        raise bad_request(f"Channel name too long. Max length is {config.max_channel_name_bytes}")
    if not _CHANNEL_CHARS.match(channel):
        raise bad_request(f"Channel name contains invalid characters: '{channel}'")
    if hash_sign and base:
        # User-limited channels need a namespace that allows them; not modelled: refused.
        raise bad_request(
            f"Channel '{channel}' uses user-limited syntax but the namespace does not allow it"
        )

"""Pusher REST request signing, as Sockudo verifies it.

Pure functions, no I/O and no clock of their own: the caller passes the timestamp, so a request is
signed at the moment it is sent (Sockudo refuses signatures more than 600 s away from its clock) and
tests can sign with a fixed time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

AUTH_VERSION = "1.0"

#: Query parameters the signer owns; a caller passing one of them is a bug.
RESERVED_PARAMETERS = frozenset(
    {"auth_key", "auth_timestamp", "auth_version", "auth_signature", "body_md5"}
)


def body_md5(body: bytes | str) -> str:
    """Lowercase hex MD5 of the raw request body, as sent on the wire."""
    raw = body.encode("utf-8") if isinstance(body, str) else body
    return hashlib.md5(raw).hexdigest()


def hmac_sha256_hex(secret: str, message: str | bytes) -> str:
    """Hex HMAC-SHA256 of ``message`` under ``secret``: every Pusher signature is one of these."""
    raw = message.encode("utf-8") if isinstance(message, str) else message
    return hmac.new(secret.encode("utf-8"), raw, hashlib.sha256).hexdigest()


def string_to_sign(method: str, path: str, parameters: Mapping[str, str]) -> str:
    """``METHOD\\npath\\nquery`` with keys lowercased and sorted and values not URL-escaped."""
    lowered = {k.lower(): v for k, v in parameters.items() if k.lower() != "auth_signature"}
    query = "&".join(f"{k}={lowered[k]}" for k in sorted(lowered))
    return f"{method.upper()}\n{path}\n{query}"


def quote_path_segment(segment: str) -> str:
    """Percent-encode one path segment (a channel name, an app id); the result is what gets signed."""
    return quote(segment, safe="")


@dataclass(frozen=True)
class Signer:
    """Signs REST requests for one app key. The secret never appears in ``repr``."""

    key: str
    secret: str = field(repr=False)

    def signed_parameters(
        self,
        method: str,
        path: str,
        body: bytes | str | None,
        timestamp: int,
        parameters: Mapping[str, object] | None = None,
    ) -> dict[str, str]:
        """Every query parameter of the signed request, ``auth_signature`` last.

        ``body_md5`` is added for POST (even with an empty body) and never for GET, which
        Sockudo would refuse. ``path`` must be the path exactly as it goes on the wire.
        """
        params = {k: _query_value(v) for k, v in (parameters or {}).items() if v is not None}
        clash = RESERVED_PARAMETERS.intersection(k.lower() for k in params)
        if clash:
            raise ValueError(f"reserved signing parameters given by the caller: {sorted(clash)}")
        params["auth_key"] = self.key
        params["auth_timestamp"] = str(int(timestamp))
        params["auth_version"] = AUTH_VERSION
        if method.upper() == "POST":
            params["body_md5"] = body_md5(body if body is not None else b"")
        params["auth_signature"] = hmac_sha256_hex(
            self.secret, string_to_sign(method, path, params)
        )
        return params

    def signed_query(
        self,
        method: str,
        path: str,
        body: bytes | str | None,
        timestamp: int,
        parameters: Mapping[str, object] | None = None,
    ) -> str:
        """The URL-encoded query string of :meth:`signed_parameters`."""
        return urlencode(self.signed_parameters(method, path, body, timestamp, parameters))


def _query_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)

"""Connection settings for one Sockudo app, as an immutable value.

The secret and the encryption master key are kept out of ``repr`` and out of every URL this module
prints: :func:`mask_url` is the one place that renders a ``SOCKUDO_URL`` for humans.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field, replace
from urllib.parse import unquote

from .errors import InvalidEvent, SockudoError


class ConfigError(SockudoError, ValueError):
    """A setting is malformed (a URL without credentials, a master key of the wrong size...)."""


@dataclass(frozen=True)
class Config:
    """Where and as whom to publish. Build it directly or with :meth:`from_url`."""

    app_id: str
    key: str
    secret: str = field(repr=False)
    host: str = "127.0.0.1"
    port: int = 6001
    use_tls: bool = False
    #: Seconds for connect, read, write and pool waits of every request.
    timeout: float = 10.0
    #: HTTP/2 is used only where it can work: with TLS (ALPN), or on plain HTTP when
    #: ``http2_prior_knowledge`` says the server speaks h2c. Needs the ``http2`` extra.
    http2: bool = False
    http2_prior_knowledge: bool = False
    verify_tls: bool | str = True
    encryption_master_key_base64: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("app_id", "key", "secret"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name} is required and must be a non-empty string")
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigError(f"port must be an integer in 1..65535, got {self.port!r}")
        if not self.timeout > 0:
            raise ConfigError("timeout must be a positive number of seconds")
        if self.encryption_master_key_base64 is not None:
            decode_master_key(self.encryption_master_key_base64)

    @classmethod
    def from_url(cls, url: str, **overrides: object) -> Config:
        """Parse ``http(s)://KEY:SECRET@HOST[:PORT]/apps/APP_ID``; keyword overrides win.

        The secret may be written as is, even with characters a URL reserves (``/ ? # @ %``,
        common in base64 secrets): everything between the key's ``:`` and the last ``@`` before
        the host is the secret. Percent-escapes in it are decoded.
        """
        match = _SOCKUDO_URL.fullmatch(url) if isinstance(url, str) else None
        if match is None:
            what = _what_is_missing(url) if isinstance(url, str) else "it is not text"
            raise ConfigError(
                f"Sockudo URL {what}; it must look like "
                f"http(s)://KEY:SECRET@HOST[:PORT]/apps/APP_ID: {mask_url(str(url))}"
            )
        scheme, key, secret, host, port_text, app_id = match.groups()
        try:
            port = int(port_text) if port_text else None
        except ValueError:
            port = -1
        if port is not None and not 0 < port < 65536:
            raise ConfigError(f"Sockudo URL has a bad port: {mask_url(url)}")
        tls = scheme.lower() == "https"
        values: dict[str, object] = {
            "app_id": unquote(app_id),
            "key": unquote(key),
            "secret": unquote(secret),
            "host": host.strip("[]"),
            "port": port or (443 if tls else 80),
            "use_tls": tls,
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    @property
    def base_url(self) -> str:
        scheme = "https" if self.use_tls else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def masked_url(self) -> str:
        """The app's URL with the secret replaced by ``***``: safe for logs."""
        scheme, rest = self.base_url.split("://", 1)
        return f"{scheme}://{self.key}:***@{rest}/apps/{self.app_id}"

    @property
    def master_key(self) -> bytes | None:
        if self.encryption_master_key_base64 is None:
            return None
        return decode_master_key(self.encryption_master_key_base64)

    def replace(self, **changes: object) -> Config:
        return replace(self, **changes)  # type: ignore[arg-type]


def decode_master_key(value: str) -> bytes:
    """Decode a base64 encryption master key; it must be exactly 32 bytes."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError("encryption master key must be valid base64") from exc
    if len(raw) != 32:
        raise ConfigError(f"encryption master key must decode to 32 bytes, got {len(raw)}")
    return raw


#: scheme://KEY:SECRET@HOST[:PORT]/apps/APP_ID, the secret being anything up to the last "@".
_SOCKUDO_URL = re.compile(
    r"(https?)://([^:/?#@]+):(.+)@(\[[^\]/]+\]|[^:/?#@\[\]]+)(?::([^/?#@]*))?/apps/([^/?#@]+)/?",
    re.IGNORECASE,
)


def _what_is_missing(url: str) -> str:
    """Which part of a Sockudo URL that :data:`_SOCKUDO_URL` refused is missing or wrong, in
    words that never quote the credentials (they may hold the secret)."""
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() not in ("http", "https"):
        return "does not start with http:// or https://"
    credentials, at, address = rest.rpartition("@")
    if not at:
        return "has no key and secret (KEY:SECRET@ before the host)"
    key, colon, secret = credentials.partition(":")
    if not colon:
        return "has no secret (KEY:SECRET@ before the host holds no ':')"
    if not key:
        return "has no key (nothing before the ':' of KEY:SECRET@)"
    if not secret:
        return "has no secret (nothing after the ':' of KEY:SECRET@)"
    if any(c in key for c in "/?#@"):
        return "has a key with a character a URL reserves (/ ? # @)"
    host, _, path = address.partition("/")
    if not host or host.startswith(":"):
        return "has no host"
    if not path.lower().startswith("apps/"):
        return "has no /apps/APP_ID path"
    if not path[5:].strip("/"):
        return "has no app id (nothing after /apps/)"
    return "is malformed (a bad host or port, or more after /apps/APP_ID)"


#: scheme://USER:PASSWORD@..., the password being anything up to the last "@" of the URL.
_CREDENTIALS = re.compile(r"^([A-Za-z][A-Za-z0-9+.\- ]*:?//[^:/?#@]*):(.*)@([^@]*)$", re.DOTALL)


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``, whatever characters the password holds.

    Written for URLs people mistype: the password is everything between the user's ``:`` and the
    last ``@``, so a secret holding ``/``, ``?``, ``#`` or ``@`` (which a URL parser would read
    as the path, query, fragment or host) is still hidden. Without a recognisable user and
    ``@``, a URL that still contains an ``@`` is hidden whole.
    """
    match = _CREDENTIALS.match(url)
    if match is not None:
        return f"{match.group(1)}:***@{match.group(3)}"
    if "@" in url:
        return "<URL hidden: it may contain a password>"
    return url


def url_password(url: str) -> str | None:
    """The password :func:`mask_url` hides (as written in the URL), or None: for log masking."""
    match = _CREDENTIALS.match(url)
    return match.group(2) or None if match is not None else None


__all__ = [
    "Config",
    "ConfigError",
    "InvalidEvent",
    "decode_master_key",
    "mask_url",
    "url_password",
]

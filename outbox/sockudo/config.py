"""Connection settings for one Sockudo app, as an immutable value.

The secret and the encryption master key are kept out of ``repr`` and out of every URL this module
prints: :func:`mask_url` is the one place that renders a ``SOCKUDO_URL`` for humans.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field, replace
from urllib.parse import unquote, urlsplit

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
        """Parse ``http(s)://KEY:SECRET@HOST[:PORT]/apps/APP_ID``; keyword overrides win."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ConfigError(f"Sockudo URL must start with http:// or https://: {mask_url(url)}")
        if not parts.username or not parts.password:
            raise ConfigError(f"Sockudo URL must carry KEY:SECRET@ credentials: {mask_url(url)}")
        segments = [s for s in parts.path.split("/") if s]
        if len(segments) != 2 or segments[0] != "apps":
            raise ConfigError(f"Sockudo URL path must be /apps/APP_ID: {mask_url(url)}")
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"Sockudo URL has a bad port: {mask_url(url)}") from exc
        tls = parts.scheme == "https"
        values: dict[str, object] = {
            "app_id": unquote(segments[1]),
            "key": unquote(parts.username),
            "secret": unquote(parts.password),
            "host": parts.hostname or "127.0.0.1",
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


def mask_url(url: str) -> str:
    """Hide the password of a URL (``user:***@``); anything unparsable is hidden whole."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        return parts._replace(netloc=f"{parts.username}:***@{netloc}").geturl()
    except ValueError:
        return "<unparsable URL>"


__all__ = ["Config", "ConfigError", "InvalidEvent", "decode_master_key", "mask_url"]

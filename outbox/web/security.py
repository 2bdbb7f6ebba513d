"""Who may see the dashboard and what a request may do: pure decisions, no I/O.

- Bound to a loopback address the dashboard may run without credentials; bound to any other
  address it refuses to start without a token (``OUTBOX_WEB_TOKEN``) or basic-auth credentials
  (``OUTBOX_WEB_BASIC_AUTH=user:password``). Credentials come from the environment only, never a
  flag (flags show in ``ps``), and are compared in constant time.
- A browser logs in once with the token; the session is a cookie signed with a key made at
  start-up (a restart logs everyone out), HttpOnly and SameSite=Strict. Every visitor gets a
  session, logged in or not: the CSRF token of every form is derived from it.
- A state-changing request is a POST that carries that CSRF token and does not come from another
  site (Origin and Sec-Fetch-Site).
- Without credentials only loopback Host names are served, so a page on another site cannot reach
  the dashboard through a DNS name rebound to 127.0.0.1.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

TOKEN_VARIABLE = "OUTBOX_WEB_TOKEN"
BASIC_AUTH_VARIABLE = "OUTBOX_WEB_BASIC_AUTH"
#: Long enough that guessing it over HTTP is hopeless (``openssl rand -hex 32`` gives 64).
MIN_SECRET_LENGTH = 16
#: How long a login lasts.
SESSION_SECONDS = 12 * 3600.0
SESSION_COOKIE = "outbox_session"
#: The live refresh's bounds, seconds: faster is load, not information; slower than an hour is not
#: live; and a browser timer overflows past 2**31 - 1 ms (24.8 days) into firing at once. The
#: page's script keeps to the same bounds (static/dashboard.js).
REFRESH_SECONDS = (1, 3600)


class WebConfigError(ValueError):
    """The dashboard cannot start as asked; the message says why (and never shows a secret)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address to bind or a Host header's name) is this machine only."""
    name = host.strip().removeprefix("[").removesuffix("]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name part of a Host header (``[::1]:8025`` -> ``[::1]``, ``a:80`` -> ``a``)."""
    if host_header.startswith("["):
        return host_header.split("]", 1)[0] + "]"
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


@dataclass(frozen=True, repr=False)
class Credentials:
    """What a request may prove itself with. Its repr says which kinds are set, never a value."""

    token: str | None = None
    basic_user: str | None = None
    basic_password: str | None = None

    def __repr__(self) -> str:
        kinds = [k for k, v in (("token", self.token), ("basic", self.basic_password)) if v]
        return f"Credentials({', '.join(kinds) or 'none'})"

    @property
    def required(self) -> bool:
        return bool(self.token or self.basic_password)

    @property
    def kinds(self) -> str:
        """For the start-up line: ``token``, ``basic``, ``token, basic`` or ``none``."""
        return repr(self)[len("Credentials(") : -1]

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Credentials:
        token = environ.get(TOKEN_VARIABLE) or None
        if token is not None and len(token) < MIN_SECRET_LENGTH:
            raise WebConfigError(
                f"{TOKEN_VARIABLE} must be at least {MIN_SECRET_LENGTH} characters "
                f"(it has {len(token)}); make one with: openssl rand -hex 32"
            )
        basic = environ.get(BASIC_AUTH_VARIABLE) or None
        if basic is None:
            return cls(token=token)
        user, sep, password = basic.partition(":")
        if not sep or not user or len(password) < MIN_SECRET_LENGTH:
            raise WebConfigError(
                f"{BASIC_AUTH_VARIABLE} must be user:password with a password of at least "
                f"{MIN_SECRET_LENGTH} characters"
            )
        return cls(token=token, basic_user=user, basic_password=password)

    def accepts_token(self, submitted: str) -> bool:
        return self.token is not None and _same(submitted, self.token)

    def accepts_authorization(self, header: str | None) -> bool:
        """A ``Bearer <token>`` or ``Basic <base64 user:password>`` header with our credentials."""
        if not header:
            return False
        scheme, _, value = header.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            return self.accepts_token(value)
        if scheme.lower() != "basic" or self.basic_password is None:
            return False
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, _, password = decoded.partition(":")
        # Both compared, always: the time taken does not tell which one was wrong.
        user_ok = _same(user, self.basic_user or "")
        return _same(password, self.basic_password) and user_ok


def _same(submitted: str, expected: str) -> bool:
    return hmac.compare_digest(submitted.encode("utf-8"), expected.encode("utf-8"))


@dataclass(frozen=True)
class WebOptions:
    """How ``outbox web`` serves: address, write access, live refresh and credentials."""

    host: str = "127.0.0.1"
    port: int = 8025
    write: bool = False
    refresh_seconds: float = 5.0
    credentials: Credentials = field(default_factory=Credentials)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise WebConfigError(f"port must be between 0 and 65535, got {self.port}")
        low, high = REFRESH_SECONDS
        refresh = self.refresh_seconds
        if not low <= refresh <= high:  # nan fails every comparison
            # As typed: 2160000, not 2160000.0; 0.5, inf and nan as they are.
            whole = math.isfinite(refresh) and refresh == int(refresh) and abs(refresh) < 1e15
            shown = int(refresh) if whole else refresh
            raise WebConfigError(f"--refresh must be between {low} and {high} seconds, got {shown}")
        if not is_loopback(self.host) and not self.credentials.required:
            raise WebConfigError(
                f"refusing to serve the dashboard on {self.host} without credentials: set "
                f"{TOKEN_VARIABLE} (or {BASIC_AUTH_VARIABLE}=user:password), or bind 127.0.0.1"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **options: object) -> WebOptions:
        """Options from the command line, credentials from ``environ`` (and nothing else)."""
        return cls(credentials=Credentials.from_env(environ), **options)  # type: ignore[arg-type]


# -- sessions and CSRF --------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    id: str
    issued: int
    authenticated: bool


class Sessions:
    """Signed session cookies (``id.issued.authenticated.mac``) and the CSRF tokens bound to them.

    Nothing is stored server-side: the key is made at start-up, so a restart ends every session.
    """

    def __init__(
        self,
        key: bytes | None = None,
        max_age: float = SESSION_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)
        self.max_age = max_age
        self._clock = clock

    def __repr__(self) -> str:
        return f"Sessions(max_age={self.max_age})"

    def issue(self, authenticated: bool) -> tuple[Session, str]:
        """A new session (a new id: a login never keeps the id it was offered) and its cookie."""
        session = Session(secrets.token_urlsafe(18), int(self._clock()), authenticated)
        payload = f"{session.id}.{session.issued}.{int(authenticated)}"
        return session, f"{payload}.{self._mac('session', payload)}"

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie proves, or None (absent, forged, malformed or expired)."""
        if not cookie or len(cookie) > 200:
            return None
        payload, _, mac = cookie.rpartition(".")
        if not hmac.compare_digest(mac.encode(), self._mac("session", payload).encode()):
            return None
        session_id, issued, authenticated = payload.split(".")
        if not 0 <= self._clock() - int(issued) < self.max_age:
            return None
        return Session(session_id, int(issued), authenticated == "1")

    def csrf_token(self, session: Session) -> str:
        return self._mac("csrf", session.id)

    def accepts_csrf(self, session: Session | None, submitted: str | None) -> bool:
        if session is None or not submitted:
            return False
        return hmac.compare_digest(submitted.encode(), self.csrf_token(session).encode())

    def _mac(self, purpose: str, message: str) -> str:
        digest = hmac.new(self._key, f"{purpose}:{message}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


# -- requests -----------------------------------------------------------------------------------


def same_origin(headers: Mapping[str, str]) -> bool:
    """Whether a POST may come from our own pages: not from another site, as far as the browser
    says. A client that is not a browser sends neither header; the CSRF token still guards it."""
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")
    if origin is None:
        return True
    # "null" (sandboxed or privacy-sensitive contexts) has no host, so it is refused too. The
    # scheme is not compared: behind a TLS proxy the browser says https and we see http.
    return urlsplit(origin).netloc == headers.get("host", "") != ""


def host_allowed(host_header: str | None, credentials: Credentials) -> bool:
    """With credentials any Host will do; without, only loopback names (DNS rebinding)."""
    if credentials.required:
        return True
    return bool(host_header) and is_loopback(host_name(host_header or ""))


#: No script or style that is not a file of ours, no framing, forms post only to us.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    )
)


def security_headers(static: bool) -> dict[str, str]:
    """Headers on every answer. Pages and data are never cached; the static files hold no data."""
    return {
        "content-security-policy": CONTENT_SECURITY_POLICY,
        "x-frame-options": "DENY",
        "x-content-type-options": "nosniff",
        # Not no-referrer: with it Chrome sends "Origin: null" on our own form posts, which
        # same_origin() must refuse. same-origin still sends nothing to another site.
        "referrer-policy": "same-origin",
        "cross-origin-opener-policy": "same-origin",
        "cross-origin-resource-policy": "same-origin",
        "cache-control": "no-cache" if static else "no-store",
    }

"""Worker settings from the environment (CLI flags override them), validated in one place."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from .database import DEFAULT_DATABASE_URL
from .schema import DEFAULT_TABLE_NAME
from .sockudo.config import Config, ConfigError, mask_url

DEFAULT_SOCKUDO_URL = "http://app-key:app-secret@127.0.0.1:6001/apps/app-id"


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it (and never shows a secret)."""


#: What OUTBOX_LOG_FORMAT accepts.
LOG_FORMATS = ("text", "json")

#: Longest OUTBOX_TABLE: the index and constraint names derived from it must fit PostgreSQL's
#: 63-byte identifiers (``uq_<table>_idempotency_key``), or two of them would be truncated alike.
MAX_TABLE_NAME = 40


#: The values OUTBOX_HTTP_CLIENT accepts.
HTTP_CLIENTS = ("auto", "h11", "httpx")
DEAD_HEAD_POLICIES = ("park", "skip")

#: Largest batch (a claim's LIMIT) and server batch limit; Sockudo's default is 100.
MAX_BATCH = 10_000
#: Most batches in flight, requests at once for rows sent alone, failures before a pause.
MAX_CONCURRENCY = 1_000
#: Longest delay, lease or timeout a setting may give: a timer or a database interval set from a
#: huge number overflows, and nothing an outbox waits for should take longer anyway.
DAY = 86_400
#: Longest age limit or retention: ``now - retention`` must stay a date every database can store.
CENTURY = 100 * 365 * DAY


@dataclass(frozen=True)
class Bounds:
    """The numbers a numeric setting accepts: from ``low`` to ``high``, never ``inf`` or ``nan``.

    ``positive``: ``low`` (0) itself is refused. ``zero_means``: 0 is accepted too and means
    this (``"keep forever"``). ``high_note`` says ``high`` in words (``"a day"``).
    """

    low: float
    high: float
    positive: bool = False
    zero_means: str | None = None
    high_note: str = ""

    def problem(self, value: float) -> str | None:
        """What is wrong with ``value`` ("must be ..., got ..."), or None if it is accepted."""
        shown = _shown(value)
        if math.isnan(value):
            return f"must be a number, got {shown}"
        if isinstance(value, int) and not self.positive and self.zero_means is None:
            # Whole numbers: one range says it all.
            if not self.low <= value <= self.high:
                return f"must be between {_shown(self.low)} and {_shown(self.high)}, got {shown}"
            return None
        if self.zero_means is not None and value == 0:
            return None
        if value < self.low or (self.positive and value == self.low):
            if self.zero_means is not None:
                return f"must be 0 ({self.zero_means}) or positive, got {shown}"
            return f"must be positive, got {shown}"
        if value > self.high:
            note = f" ({self.high_note})" if self.high_note else ""
            return f"must be at most {_shown(self.high)}{note}, got {shown}"
        return None


def _shown(value: float) -> str:
    """A number as the operator typed it: ``-1``, not ``-1.0``; ``inf``, ``0.5``."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _count(high: int) -> Bounds:
    """Whole numbers from 1 to ``high``."""
    return Bounds(1, high)


def _seconds(high: int, note: str) -> Bounds:
    """Seconds: more than 0 and at most ``high`` (``note`` says it in words)."""
    return Bounds(0, high, positive=True, high_note=note)


@dataclass(frozen=True, repr=False)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    sockudo_url: str = DEFAULT_SOCKUDO_URL
    encryption_master_key_base64: str | None = None
    table_name: str = DEFAULT_TABLE_NAME
    #: Events per /batch_events request; never above the server's batch limit (None: that limit).
    batch_size: int | None = None
    #: The server's batch limit (Sockudo's default app: 100; soketi and Pusher: 10).
    server_batch_limit: int = 100
    #: Claimed batches being published at once.
    in_flight: int = 4
    #: Requests at once for rows that go alone through /events.
    alone_concurrency: int = 8
    lease_seconds: float = 60.0
    request_timeout: float = 10.0
    max_attempts: int = 25
    max_age_seconds: float = 24 * 3600.0
    backoff_min_seconds: float = 1.0
    backoff_max_seconds: float = 300.0
    #: Consecutive endpoint failures that pause the whole worker.
    breaker_threshold: int = 3
    #: How often to retry after a 401/404 (bad secret, clock or app).
    misconfigured_retry_seconds: float = 30.0
    #: Fallback poll when no notification arrives (SQLite always polls).
    poll_interval: float = 1.0
    #: Published rows older than this are deleted by the worker; 0 keeps them forever.
    retention_seconds: float = 7 * 24 * 3600.0
    shutdown_timeout: float = 30.0
    #: How the worker sends requests: "auto" (h11 for http://, httpx for https://), "h11" or
    #: "httpx" (see outbox.sockudo.transport; h11 costs a third to a half of httpx's CPU).
    http_client: str = "auto"
    #: Serve /metrics, /healthz and /readyz on this port (None: off; 0: any free port).
    metrics_port: int | None = None
    #: The address they listen on; 0.0.0.0 for a scraper in another container.
    metrics_host: str = "127.0.0.1"
    #: ``text`` (the default) or ``json``: one JSON object per log line.
    log_format: str = "text"
    #: What a dead head does to the rest of its ordering key: ``park`` (they wait until the head
    #: is replayed or the key skipped) or ``skip`` (they go on).
    dead_head: str = "park"

    def __repr__(self) -> str:
        # Built by hand so no secret can reach it: the database password and the Sockudo secret
        # are masked, the master key is left out.
        shown = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("database_url", "sockudo_url", "encryption_master_key_base64")
        }
        fields = ", ".join(f"{name}={value!r}" for name, value in shown.items())
        return (
            f"Settings(database_url={mask_url(self.database_url)!r}, "
            f"sockudo_url={self.masked_sockudo_url!r}, {fields})"
        )

    def __post_init__(self) -> None:
        if (
            not self.table_name
            or len(self.table_name) > MAX_TABLE_NAME
            or "\x00" in self.table_name
        ):
            raise SettingsError(
                f"OUTBOX_TABLE must be 1 to {MAX_TABLE_NAME} characters without NUL, "
                f"got {len(self.table_name)}"
            )
        for spec in SPECS:
            value = getattr(self, spec.name)
            if spec.bounds is not None and value is not None:
                spec.check(value)
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", self.server_batch_limit)
        elif self.batch_size > self.server_batch_limit:
            raise SettingsError(
                f"OUTBOX_BATCH_SIZE must be between 1 and OUTBOX_SERVER_BATCH_LIMIT "
                f"({self.server_batch_limit}), got {self.batch_size}"
            )
        if self.log_format not in LOG_FORMATS:
            raise SettingsError(
                f"OUTBOX_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}"
            )
        if self.dead_head not in DEAD_HEAD_POLICIES:
            raise SettingsError(
                f"OUTBOX_DEAD_HEAD must be one of {', '.join(DEAD_HEAD_POLICIES)}, "
                f"got {self.dead_head!r}"
            )
        if self.backoff_min_seconds > self.backoff_max_seconds:
            raise SettingsError(
                f"OUTBOX_BACKOFF_MIN ({_shown(self.backoff_min_seconds)}) must not exceed "
                f"OUTBOX_BACKOFF_MAX ({_shown(self.backoff_max_seconds)})"
            )
        if self.lease_seconds < 2 * self.request_timeout:
            # A lease must outlive the request it covers, or a slow answer would let another
            # worker take the row while it is still being published.
            raise SettingsError(
                f"OUTBOX_LEASE_SECONDS ({_shown(self.lease_seconds)}) must be at least twice "
                f"OUTBOX_REQUEST_TIMEOUT ({_shown(self.request_timeout)})"
            )
        if self.http_client not in HTTP_CLIENTS:
            raise SettingsError(
                f"OUTBOX_HTTP_CLIENT must be one of {', '.join(HTTP_CLIENTS)}, "
                f"got {self.http_client!r}"
            )
        config = self.sockudo_config()  # fail early, with a masked URL, on a malformed URL
        if self.http_client == "h11" and config.use_tls:
            raise SettingsError("OUTBOX_HTTP_CLIENT=h11 sends plain http:// only; use httpx")

    @property
    def transport(self) -> str:
        """The transport the worker uses (``http_client`` with "auto" resolved)."""
        if self.http_client != "auto":
            return self.http_client
        return "httpx" if self.sockudo_config().use_tls else "h11"

    def sockudo_config(self) -> Config:
        try:
            return Config.from_url(
                self.sockudo_url,
                timeout=self.request_timeout,
                encryption_master_key_base64=self.encryption_master_key_base64,
            )
        except ConfigError as exc:
            raise SettingsError(f"SOCKUDO_URL: {exc}") from None

    @property
    def masked_sockudo_url(self) -> str:
        return mask_url(self.sockudo_url)

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read ``OUTBOX_*`` and ``SOCKUDO_*`` variables; keyword overrides (CLI flags) win."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for spec in SPECS:
            raw = env.get(spec.variable)
            if raw is None or raw == "":
                continue
            values[spec.name] = spec.parse(raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)  # type: ignore[arg-type]
        except TypeError as exc:
            raise SettingsError(str(exc)) from None


@dataclass(frozen=True)
class SettingSpec:
    """How one setting is given: its variable (also its flag's name) and what it means."""

    name: str
    variable: str
    kind: type
    help: str
    #: Never given as a flag (a flag shows in the process list) nor printed.
    secret: bool = False
    #: The numbers it accepts (numeric settings).
    bounds: Bounds | None = None

    @property
    def flag(self) -> str:
        """``--batch-size`` for ``OUTBOX_BATCH_SIZE``: the variable's name, as a flag."""
        return "--" + self.variable.removeprefix("OUTBOX_").lower().replace("_", "-")

    def parse(self, raw: str) -> object:
        """The value of ``raw`` (the variable's or the flag's text), checked against its bounds;
        :class:`SettingsError` names the variable."""
        value = _parse(self.variable, raw, self.kind)
        if self.bounds is not None:
            self.check(value)  # type: ignore[arg-type]
        return value

    def check(self, value: float) -> None:
        """Refuse a number outside the bounds, naming the variable."""
        problem = None if self.bounds is None else self.bounds.problem(value)
        if problem is not None:
            raise SettingsError(f"{self.variable} {problem}")


#: Every setting, in the order ``outbox worker --help`` lists them.
SPECS: tuple[SettingSpec, ...] = (
    SettingSpec("database_url", "OUTBOX_DATABASE_URL", str, "database URL"),
    SettingSpec("sockudo_url", "SOCKUDO_URL", str, "http://KEY:SECRET@HOST:PORT/apps/APP_ID"),
    SettingSpec(
        "encryption_master_key_base64",
        "SOCKUDO_ENCRYPTION_MASTER_KEY_BASE64",
        str,
        "32-byte key for private-encrypted- channels",
        secret=True,
    ),
    SettingSpec("table_name", "OUTBOX_TABLE", str, "outbox table name"),
    SettingSpec(
        "batch_size",
        "OUTBOX_BATCH_SIZE",
        int,
        "events per /batch_events request",
        bounds=_count(MAX_BATCH),
    ),
    SettingSpec(
        "server_batch_limit",
        "OUTBOX_SERVER_BATCH_LIMIT",
        int,
        "the server's batch limit",
        bounds=_count(MAX_BATCH),
    ),
    SettingSpec(
        "in_flight",
        "OUTBOX_IN_FLIGHT",
        int,
        "claimed batches being published at once",
        bounds=_count(MAX_CONCURRENCY),
    ),
    SettingSpec(
        "alone_concurrency",
        "OUTBOX_ALONE_CONCURRENCY",
        int,
        "requests at once for rows sent alone",
        bounds=_count(MAX_CONCURRENCY),
    ),
    SettingSpec(
        "lease_seconds",
        "OUTBOX_LEASE_SECONDS",
        float,
        "how long a claim is held",
        bounds=_seconds(DAY, "a day"),
    ),
    SettingSpec(
        "request_timeout",
        "OUTBOX_REQUEST_TIMEOUT",
        float,
        "seconds for every request",
        bounds=_seconds(3600, "an hour"),
    ),
    SettingSpec(
        "max_attempts",
        "OUTBOX_MAX_ATTEMPTS",
        int,
        "an event's own failures before dead",
        bounds=_count(1_000_000),
    ),
    SettingSpec(
        "max_age_seconds",
        "OUTBOX_MAX_AGE_SECONDS",
        float,
        "age limit of a failing event",
        bounds=_seconds(CENTURY, "100 years"),
    ),
    SettingSpec(
        "backoff_min_seconds",
        "OUTBOX_BACKOFF_MIN",
        float,
        "first backoff, seconds",
        bounds=_seconds(DAY, "a day"),
    ),
    SettingSpec(
        "backoff_max_seconds",
        "OUTBOX_BACKOFF_MAX",
        float,
        "longest backoff, seconds",
        bounds=_seconds(DAY, "a day"),
    ),
    SettingSpec(
        "breaker_threshold",
        "OUTBOX_BREAKER_THRESHOLD",
        int,
        "failures in a row that pause",
        bounds=_count(MAX_CONCURRENCY),
    ),
    SettingSpec(
        "misconfigured_retry_seconds",
        "OUTBOX_MISCONFIGURED_RETRY",
        float,
        "seconds between tries after a 401/404",
        bounds=_seconds(DAY, "a day"),
    ),
    SettingSpec(
        "poll_interval",
        "OUTBOX_POLL_INTERVAL",
        float,
        "fallback poll, seconds",
        bounds=_seconds(3600, "an hour"),
    ),
    SettingSpec(
        "retention_seconds",
        "OUTBOX_RETENTION_SECONDS",
        float,
        "published rows kept this long, seconds (0: forever)",
        # Negative is refused, not read as "forever": now - (-1 s) would delete the whole log.
        bounds=Bounds(0, CENTURY, zero_means="keep forever", high_note="100 years"),
    ),
    SettingSpec(
        "shutdown_timeout",
        "OUTBOX_SHUTDOWN_TIMEOUT",
        float,
        "how long SIGTERM waits",
        bounds=_seconds(DAY, "a day"),
    ),
    SettingSpec("http_client", "OUTBOX_HTTP_CLIENT", str, "auto, h11 or httpx"),
    SettingSpec(
        "metrics_port",
        "OUTBOX_METRICS_PORT",
        int,
        "serve /metrics, /healthz, /readyz on this port (metrics extra)",
        bounds=Bounds(0, 65535),
    ),
    SettingSpec("metrics_host", "OUTBOX_METRICS_HOST", str, "address of the metrics port"),
    SettingSpec("log_format", "OUTBOX_LOG_FORMAT", str, "text or json (one object per line)"),
    SettingSpec(
        "dead_head", "OUTBOX_DEAD_HEAD", str, "park or skip: a dead head's effect on its key"
    ),
)

#: Setting name -> (environment variable, type).
ENVIRONMENT: dict[str, tuple[str, type]] = {s.name: (s.variable, s.kind) for s in SPECS}


def environment_for(**values: object) -> dict[str, str]:
    """The environment variables that give these settings (by setting name), as text.

    ``environment_for(lease_seconds=3, backoff_min_seconds=0.2)`` gives
    ``{"OUTBOX_LEASE_SECONDS": "3", "OUTBOX_BACKOFF_MIN": "0.2"}``; None values are left out.
    """
    unknown = sorted(set(values) - set(ENVIRONMENT))
    if unknown:
        raise SettingsError(f"unknown settings: {', '.join(unknown)}")
    return {ENVIRONMENT[k][0]: str(v) for k, v in values.items() if v is not None}


def _parse(variable: str, raw: str, kind: type) -> object:
    if kind is str:
        return raw
    try:
        return kind(raw)
    except ValueError:
        raise SettingsError(
            f"{variable} must be a{'n integer' if kind is int else ' number'}, got {raw!r}"
        ) from None

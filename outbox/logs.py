"""How the ``outbox`` command logs: text lines (the default) or one JSON object per line.

Both formats carry the same fields (time, level, logger, message, and the traceback when there is
one). Secrets are masked twice: the code never logs them (URLs go through ``mask_url``), and the
formatter replaces any secret it was given with ``***`` should one reach a line anyway (a library's
message quoting a URL, say). The JSON format masks before encoding, so a secret holding quotes or
backslashes cannot slip through in its escaped form.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from urllib.parse import quote, unquote

from .sockudo.config import url_password

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MASK = "***"
#: Shorter values are not masked: they would blank out ordinary words.
MIN_SECRET = 4


class _Masking:
    def __init__(self, secrets: Iterable[str]) -> None:
        variants = set()
        for secret in secrets:
            if len(secret) >= MIN_SECRET:
                variants |= {secret, quote(secret, safe=""), unquote(secret)}
        # Longest first: a secret that contains another is masked whole.
        self._secrets = sorted((v for v in variants if len(v) >= MIN_SECRET), key=len, reverse=True)

    def mask(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text


class TextFormatter(logging.Formatter):
    """Today's text lines, secrets masked."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__(TEXT_FORMAT)
        self._masking = _Masking(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return self._masking.mask(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, and
    ``exception`` when the record carries one."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._masking = _Masking(secrets)

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": self._masking.mask(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = self._masking.mask(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = self._masking.mask(record.exc_text)
        # ensure_ascii: a line stays one line of plain ASCII whatever a message holds.
        return json.dumps(entry, ensure_ascii=True)


def secrets_in(environ: Mapping[str, str]) -> list[str]:
    """The secrets this process was given: the Sockudo secret, the database password, the
    encryption master key (from the variables that hold them)."""
    found = []
    for variable in ("SOCKUDO_URL", "OUTBOX_DATABASE_URL"):
        password = url_password(environ.get(variable, ""))
        if password:
            found.append(password)
    key = environ.get("SOCKUDO_ENCRYPTION_MASTER_KEY_BASE64")
    if key:
        found.append(key)
    return found


def configure(level: str, log_format: str, secrets: Iterable[str] | None = None) -> None:
    """Log to stderr at ``level`` in ``log_format`` (``text`` or ``json``).

    Like :func:`logging.basicConfig`, it leaves a root logger that someone else configured alone
    (a host application, a test runner); a second call replaces only what the first installed.
    """
    root = logging.getLogger()
    if any(not getattr(h, _OURS, False) for h in root.handlers):
        return
    secrets = secrets_in(os.environ) if secrets is None else list(secrets)
    formatter = JsonFormatter(secrets) if log_format == "json" else TextFormatter(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    setattr(handler, _OURS, True)
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


#: Marks the handler :func:`configure` installed.
_OURS = "_outbox_handler"

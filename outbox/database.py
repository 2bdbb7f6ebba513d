"""Engines from the URLs users type: ``postgresql://user@host/db``, ``mysql://user@host/db``,
``mariadb://user@host/db`` and ``sqlite:///path``.

A bare ``postgresql://`` (or ``postgres://``) URL gets the driver this package depends on
(psycopg 3); a bare ``mysql://`` or ``mariadb://`` URL gets PyMySQL (aiomysql for asyncio), from
the ``mysql`` extra. SQLite connections get WAL and a busy timeout, so a worker waits for another
writer instead of failing at once. Options a database's statements rely on (MariaDB's isolation
level) come from its driver module, which says why.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

from .sockudo.config import mask_url

DEFAULT_DATABASE_URL = "sqlite:///outbox.db"
SQLITE_BUSY_TIMEOUT_MS = 30_000


class DatabaseURLError(ValueError):
    """The database URL cannot be used (unparsable, or a database we do not support)."""


class DriverMissing(DatabaseURLError):
    """The database driver a URL needs is not installed. The message is one line naming what to
    install (for a bare ``mysql://`` or ``mariadb://`` URL: the ``mysql`` extra)."""


#: The drivers this package picks for bare URLs, and the extra that installs each.
DRIVER_EXTRAS = {"pymysql": "mysql", "aiomysql": "mysql"}


def normalize_url(url: str | URL, *, asyncio: bool = False) -> URL:
    """Pick our driver for bare PostgreSQL URLs (sync or async); leave explicit drivers alone."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except sa.exc.ArgumentError as exc:
        raise DatabaseURLError(f"cannot parse database URL {mask_url(str(url))!r}") from exc
    backend = parsed.get_backend_name()
    if backend in ("mysql", "mariadb"):
        # SQLAlchemy names the dialect after the URL's scheme ("mariadb" also checks, on connect,
        # that the server is MariaDB); both are served by outbox.drivers.mysql.
        if parsed.drivername == backend:
            parsed = parsed.set(drivername=f"{backend}+{'aiomysql' if asyncio else 'pymysql'}")
    elif backend in ("postgresql", "postgres"):
        if parsed.drivername in ("postgresql", "postgres", "postgres+psycopg"):
            parsed = parsed.set(drivername="postgresql+psycopg")
    elif backend == "sqlite":
        if asyncio and parsed.drivername == "sqlite":
            parsed = parsed.set(drivername="sqlite+aiosqlite")
    else:
        raise DatabaseURLError(
            f"unsupported database {backend!r} in {parsed.render_as_string(hide_password=True)}: "
            "use postgresql://, mysql://, mariadb:// or sqlite:///"
        )
    return parsed


def create_engine(url: str | URL, **kwargs: Any) -> sa.Engine:
    """A sync engine for ``url`` with the settings the worker relies on.

    Raises :class:`DatabaseURLError` for a URL it cannot use, and :class:`DriverMissing` when
    the URL's driver is not installed (a ``mysql://`` URL without the ``mysql`` extra).
    """
    parsed = normalize_url(url)
    with _driver_required(parsed, display_url(url)):
        if parsed.get_backend_name() == "sqlite":
            engine = sa.create_engine(parsed, **kwargs)
            sa.event.listen(engine, "connect", _configure_sqlite)
            return engine
        # No pre-ping: it costs a round trip per transaction, and the worker already retries a
        # statement that meets a dropped connection (SQLAlchemy then replaces the connection).
        kwargs.setdefault("pool_pre_ping", False)
        from .drivers import driver_class

        driver = driver_class(parsed.get_dialect().name)
        for option, value in driver.engine_options.items():
            kwargs.setdefault(option, value)
        engine = sa.create_engine(parsed, **kwargs)
        if driver.session_setup is not None:
            setup = driver.session_setup
            sa.event.listen(engine, "connect", lambda dbapi, _record: _run_setup(dbapi, setup))
        return engine


def _run_setup(dbapi_connection: Any, statement: str) -> None:
    """Run a driver's session setup on a new connection of an engine of ours."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(statement)
    finally:
        cursor.close()
    # The DBAPI opened a transaction for it (autocommit off): end it, so the pool lends the
    # connection idle; a SET outside SET LOCAL stays for the session.
    dbapi_connection.commit()


@contextlib.contextmanager
def _driver_required(url: URL, shown: str) -> Iterator[None]:
    """Turn the import error of a missing driver (SQLAlchemy imports it when the engine is
    made) into :class:`DriverMissing`, saying what to install; ``shown`` is the URL as given,
    its password hidden."""
    try:
        yield
    except ModuleNotFoundError as exc:
        module = (exc.name or "").partition(".")[0]
        driver = url.get_driver_name()
        if module.lower() in DRIVER_EXTRAS:
            extra = DRIVER_EXTRAS[module.lower()]
            raise DriverMissing(
                f"{shown} needs the {module} driver (the {extra} extra), which is not "
                f'installed: pip install "sockudo-outbox[{extra}]"'
            ) from None
        if module and module.lower() == driver.lower():
            raise DriverMissing(
                f"{shown} names the {driver} driver, which is not installed"
            ) from None
        raise


def _configure_sqlite(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL lets the app read while the worker writes; the busy timeout makes writers queue.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def display_url(url: str | URL) -> str:
    """The URL with its password hidden, for logs and errors."""
    try:
        return (
            make_url(url).render_as_string(hide_password=True)
            if isinstance(url, str)
            else url.render_as_string(hide_password=True)
        )
    except sa.exc.ArgumentError:
        return mask_url(str(url))


def short_error(exc: BaseException) -> str:
    """The first line of a database error, for a log line (the driver's text, not SQL)."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__

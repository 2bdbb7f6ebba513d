"""The outbox table: everything needed to publish an event exactly as written and to explain its fate.

One row per (event, channel), in one of three tables with the same columns: the **hot** table holds
what is still to be sent (pending, or in flight while a lease holds it), ``<name>_dead`` what was
dead-lettered, ``<name>_published`` the log of what was published. The hot table stays as small
as the backlog however much history is kept, and a claim rewrites a row without touching an index.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import re
from functools import cache

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

DEFAULT_TABLE_NAME = "outbox_events"
ERROR_MESSAGE_MAX = 500
ERROR_CODE_MAX = 64
#: Sockudo's serials embed the node id (``INSTANCE_PROCESS_ID``): a Kubernetes pod name makes
#: them longer than 64 characters. 255 holds every serial Sockudo accepts in a request (at most
#: 128 bytes) with room to spare; the acknowledgement id equals the message serial when
#: versioned messages are on. Nothing longer is stored cut (see ``outbox.drivers.Ack``).
ACK_ID_MAX = 255
SERIAL_MAX = 255
TRACEPARENT_MAX = 55
ORDERING_KEY_MAX = 200


class Status(enum.StrEnum):
    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    PUBLISHED = "published"
    DEAD = "dead"


#: ``next_attempt_at`` of a keyed row enqueued behind an earlier row of its key: out of the front
#: of the due index, so a long key never sits in a claim's way. The transaction that takes the
#: key's head out of the table (its ack, burial or skip) makes the next row due.
WAITING_FOR_KEY = dt.datetime(9999, 1, 1, tzinfo=dt.UTC)


class Operation(enum.StrEnum):
    """What a mutation row asks of a message published earlier (``operation`` column)."""

    UPDATE = "update"
    DELETE = "delete"
    APPEND = "append"
    ANNOTATE = "annotate"
    UNANNOTATE = "unannotate"


#: SQLAlchemy's names for MariaDB and MySQL (after the URL scheme); one module serves both.
MYSQL_NAMES = ("mysql", "mariadb")


def timestamp_type() -> sa.types.TypeEngine[dt.datetime]:
    """The column type of a UTC time: ``timestamptz``; ``DATETIME(6)`` on MariaDB and MySQL.

    MySQL's ``DATETIME`` keeps whole seconds unless told otherwise, and ``TIMESTAMP`` converts by
    the session's time zone and ends in 2038: ``DATETIME(6)`` holding UTC is neither.
    """
    return sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), *MYSQL_NAMES)


#: Databases whose columns hold naive UTC (SQLite's text, MySQL's DATETIME): no zone is sent.
_NAIVE_UTC = ("sqlite", *MYSQL_NAMES)


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """Timestamps in UTC on every backend: ``timestamptz`` on PostgreSQL, fixed-width text on
    SQLite, ``DATETIME(6)`` holding UTC on MariaDB and MySQL.

    SQLite's text form (``YYYY-MM-DD HH:MM:SS.ffffff``) sorts like time, which the claim relies on.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[dt.datetime]:
        if dialect.name in MYSQL_NAMES:
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(self.impl)

    def process_bind_param(
        self, value: dt.datetime | None, dialect: sa.Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given for a UTC column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name in _NAIVE_UTC else value

    def process_result_value(
        self, value: dt.datetime | None, dialect: sa.Dialect
    ) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value


class utc_now(FunctionElement[dt.datetime]):
    """The database clock, in the column format of :class:`UTCDateTime`."""

    type = UTCDateTime()
    inherit_cache = True


@compiles(utc_now)
def _utc_now_default(element: utc_now, compiler: sa.sql.compiler.SQLCompiler, **kw: object) -> str:
    return "CURRENT_TIMESTAMP"


@compiles(utc_now, "postgresql")
def _utc_now_postgresql(
    element: utc_now, compiler: sa.sql.compiler.SQLCompiler, **kw: object
) -> str:
    # statement time, not transaction start: a long-running worker transaction must not
    # see a frozen clock when it computes lease expiries.
    return "statement_timestamp()"


@compiles(utc_now, "sqlite")
def _utc_now_sqlite(element: utc_now, compiler: sa.sql.compiler.SQLCompiler, **kw: object) -> str:
    # %f is "SS.SSS": padding with 000 gives the microsecond width UTCDateTime stores.
    return "(strftime('%Y-%m-%d %H:%M:%f000', 'now'))"


@compiles(utc_now, "mysql")
@compiles(utc_now, "mariadb")
def _utc_now_mysql(element: utc_now, compiler: sa.sql.compiler.SQLCompiler, **kw: object) -> str:
    # UTC whatever the session's time_zone (DATETIME stores no zone), to the microsecond; fixed
    # for the whole statement, like PostgreSQL's statement_timestamp().
    return "UTC_TIMESTAMP(6)"


def text_type() -> sa.types.TypeEngine[str]:
    """Unbounded text: MySQL's TEXT holds only 64 KB, less than an event's data may be, so
    ``MEDIUMTEXT`` (16 MB) on MariaDB and MySQL."""
    return sa.Text().with_variant(mysql.MEDIUMTEXT(), *MYSQL_NAMES)


def nonce_type() -> sa.types.TypeEngine[bytes]:
    """24 bytes: ``bytea`` / BLOB, and ``VARBINARY(24)`` inline in the row on MariaDB and MySQL."""
    return sa.LargeBinary(24).with_variant(mysql.VARBINARY(24), *MYSQL_NAMES)


def _id_type() -> sa.types.TypeEngine[int]:
    # SQLite only autoincrements an INTEGER PRIMARY KEY (the rowid).
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


#: utf8mb4 for any text; a binary collation, so that channels and keys that differ only in case
#: (or accents) are different values, as on the other databases. (Both prefixes: SQLAlchemy reads
#: ``mariadb_`` options for a ``mariadb://`` URL and ``mysql_`` ones for ``mysql://``.)
MYSQL_TABLE_OPTIONS = {
    f"{prefix}_{option}": value
    for prefix in MYSQL_NAMES
    for option, value in (("charset", "utf8mb4"), ("collate", "utf8mb4_bin"))
}

#: The published rows a mutation can look its message up in (``ix_<name>_published_serial``):
#: those with a serial, and those acknowledged by an answer without a receipt (whose serial, if
#: any, is in the channel's history).
MESSAGE_LOOKUP = "message_serial IS NOT NULL OR acknowledgement_id IS NULL"

#: Suffixes of the tables beside the hot table: dead-lettered rows, the published log, parked keys.
DEAD_SUFFIX = "_dead"
PUBLISHED_SUFFIX = "_published"
PARKED_SUFFIX = "_parked"

#: PostgreSQL storage settings of the hot table (set by migration 0004 and by ``create_all``).
#: A claim rewrites a row in place: with half of each page free it stays a HOT update (no index
#: entry written). Every published row leaves a dead tuple behind, so autovacuum must visit the
#: table after a fixed number of them, not after a share of a table that is mostly empty.
HOT_TABLE_STORAGE = {
    "fillfactor": "50",
    "autovacuum_vacuum_scale_factor": "0",
    "autovacuum_vacuum_threshold": "10000",
    "autovacuum_vacuum_insert_scale_factor": "0",
    "autovacuum_vacuum_insert_threshold": "10000",
    "autovacuum_analyze_scale_factor": "0",
    "autovacuum_analyze_threshold": "10000",
    "autovacuum_vacuum_cost_delay": "0",
}


def _event_columns(*, autoincrement: bool) -> list[sa.Column[object]]:
    """The columns every outbox table has: an event as written, where it is, and why."""
    return [
        sa.Column("id", _id_type(), primary_key=True, autoincrement=autoincrement),
        # The event's stable identity; rows of one multi-channel enqueue share it.
        sa.Column("event_id", sa.Uuid(as_uuid=True), nullable=False),
        # Sent as idempotency_key and message_id on every attempt of this row.
        sa.Column("idempotency_key", sa.String(128), nullable=False),
        sa.Column("channel", sa.String(200), nullable=False),
        sa.Column("event", sa.String(200), nullable=False),
        # The exact data string to send (plaintext for encrypted channels, sealed at send time).
        sa.Column("data", text_type(), nullable=False),
        sa.Column("socket_id", sa.String(64), nullable=True),
        sa.Column("info", sa.String(200), nullable=True),
        # Compact JSON text, kept as text so the bytes sent never depend on a JSON column's
        # rendering.
        sa.Column("tags", text_type(), nullable=True),
        sa.Column("extras", text_type(), nullable=True),
        # Fixed at enqueue for private-encrypted- channels: every attempt seals to the same bytes.
        sa.Column("encryption_nonce", nonce_type(), nullable=True),
        # Times the row was claimed to be sent. A row claimed once is on its first attempt and
        # may go in a batch; a claim whose request provably never left is taken back.
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        # Failed attempts charged to the event itself: its budget (OUTBOX_MAX_ATTEMPTS).
        # Outages, rate limits, backpressure and requests that never left are not the event's.
        sa.Column("failures", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False, server_default=utc_now()),
        sa.Column("lease_token", sa.Uuid(as_uuid=True), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False, server_default=utc_now()),
        # When the event last entered the queue (enqueue or replay): its age limit counts from
        # here.
        sa.Column("queued_at", UTCDateTime(), nullable=False, server_default=utc_now()),
        sa.Column("published_at", UTCDateTime(), nullable=True),
        sa.Column("acknowledgement_id", sa.String(ACK_ID_MAX), nullable=True),
        sa.Column("message_serial", sa.String(SERIAL_MAX), nullable=True),
        sa.Column("history_serial", sa.String(SERIAL_MAX), nullable=True),
        sa.Column("last_error_status", sa.Integer(), nullable=True),
        sa.Column("last_error_code", sa.String(ERROR_CODE_MAX), nullable=True),
        sa.Column("last_error_message", sa.String(ERROR_MESSAGE_MAX), nullable=True),
        sa.Column("last_error_at", UTCDateTime(), nullable=True),
        # The W3C trace context current when the event was enqueued (OpenTelemetry, optional):
        # the worker links each publish request's span to it. 55 = "00-" + 32 + "-" + 16 + "-" + 2.
        sa.Column("traceparent", sa.String(TRACEPARENT_MAX), nullable=True),
        # Rows with the same key are published one after another, in commit order (opt-in).
        sa.Column("ordering_key", sa.String(ORDERING_KEY_MAX), nullable=True),
        # None for a publish; else the mutation this row is (see Operation), whose request body
        # is ``data`` (for ``unannotate``: the serial of the annotation to delete).
        sa.Column("operation", sa.String(16), nullable=True),
        # A mutation's target: an outbox event (published first; its channel is this row's) ...
        sa.Column("target_event_id", sa.Uuid(as_uuid=True), nullable=True),
        # ... or a message_serial the application already knows.
        sa.Column("target_serial", sa.String(SERIAL_MAX), nullable=True),
    ]


#: The names of the columns all three tables share, in table order (rows move between them).
EVENT_COLUMNS: tuple[str, ...] = tuple(c.name for c in _event_columns(autoincrement=False))


@cache
def outbox_table(name: str = DEFAULT_TABLE_NAME, schema: str | None = None) -> sa.Table:
    """The hot outbox :class:`~sqlalchemy.Table`: events not yet published or dead.

    One per name, cached so every caller shares it; its :class:`~sqlalchemy.MetaData` also holds
    :func:`dead_table` and :func:`published_table`. A row here is pending, or leased while its
    ``lease_expires_at`` is in the future; an expired lease is simply claimable again. Published
    rows move to the published log, dead rows to the dead table, each in the statement that
    decides it, so nothing the claim reads or changes is indexed except the due order.
    """
    metadata = sa.MetaData(schema=schema)
    hot = sa.Table(
        name,
        metadata,
        *_event_columns(autoincrement=True),
        sa.UniqueConstraint("idempotency_key", name=f"uq_{name}_idempotency_key"),
        # The claim reads this index in order and stops after one batch. It holds no column a
        # claim changes, so a claim is a HOT update on PostgreSQL.
        sa.Index(f"ix_{name}_due", "next_attempt_at", "id"),
        sa.Index(f"ix_{name}_event_id", "event_id"),
        # The claim's "is this row the head of its key" test; only keyed rows are in it.
        sa.Index(
            f"ix_{name}_ordering",
            "ordering_key",
            "id",
            **_partial("ordering_key IS NOT NULL"),
        ),
        # The mutations naming one event on one channel, to find those waiting for its publish;
        # only mutations naming their message by an event are in it.
        sa.Index(
            f"ix_{name}_target",
            "target_event_id",
            "channel",
            **_partial("target_event_id IS NOT NULL"),
        ),
        # SQLite would otherwise reuse the largest id after it moved out to the log.
        sqlite_autoincrement=True,
        **MYSQL_TABLE_OPTIONS,
    )
    sa.Table(
        name + DEAD_SUFFIX,
        metadata,
        *_event_columns(autoincrement=False),
        sa.Index(f"ix_{name}{DEAD_SUFFIX}_event_id", "event_id"),
        sa.Index(f"ix_{name}{DEAD_SUFFIX}_key", "idempotency_key"),
        **MYSQL_TABLE_OPTIONS,
    )
    # Append-only: the primary key, and the two serial indexes below only for rows the server gave
    # a serial. Retention deletes by published_at with a scan; searches by event id or key scan too.
    sa.Table(
        name + PUBLISHED_SUFFIX,
        metadata,
        *_event_columns(autoincrement=False),
        # A mutation finds its target's message_serial here, or learns that the answer which
        # acknowledged it carried no receipt (the serial is then looked up in history). Only such
        # rows are in it: a drain that gets receipts without serials pays nothing for it.
        sa.Index(
            f"ix_{name}{PUBLISHED_SUFFIX}_serial",
            "event_id",
            "channel",
            **_partial(MESSAGE_LOOKUP),
        ),
        # A mutation naming its message by serial finds the event that published it here (one
        # message, one ordering key). Only publishes are in it: a message's mutations carry its
        # serial too, and a long run of appends must not lengthen the lookup.
        sa.Index(
            f"ix_{name}{PUBLISHED_SUFFIX}_message",
            "channel",
            "message_serial",
            **_partial("message_serial IS NOT NULL AND operation IS NULL"),
        ),
        **MYSQL_TABLE_OPTIONS,
    )
    # Keys whose head went dead under the "park" policy: their later rows wait until the head
    # is replayed or the key is skipped (``outbox keys``).
    sa.Table(
        name + PARKED_SUFFIX,
        metadata,
        sa.Column("ordering_key", sa.String(ORDERING_KEY_MAX), primary_key=True),
        sa.Column("row_id", _id_type(), nullable=False),
        sa.Column("parked_at", UTCDateTime(), nullable=False, server_default=utc_now()),
        **MYSQL_TABLE_OPTIONS,
    )
    sa.event.listen(hot, "after_create", _hot_table_storage(hot))
    return hot


def _partial(predicate: str) -> dict[str, sa.TextClause]:
    """Index options: only rows matching ``predicate`` where the database has partial indexes
    (PostgreSQL, SQLite); MariaDB and MySQL index every row."""
    return {"postgresql_where": sa.text(predicate), "sqlite_where": sa.text(predicate)}


def _hot_table_storage(hot: sa.Table) -> sa.DDLElement:
    options = ", ".join(f"{k} = {v}" for k, v in HOT_TABLE_STORAGE.items())
    return sa.DDL(f"ALTER TABLE %(fullname)s SET ({options})").execute_if(dialect="postgresql")


def dead_table(hot: sa.Table) -> sa.Table:
    """Where rows of ``hot`` go when they are dead-lettered (same columns)."""
    return hot.metadata.tables[_qualified(hot, DEAD_SUFFIX)]


def published_table(hot: sa.Table) -> sa.Table:
    """The append-only log of rows of ``hot`` that were published (same columns)."""
    return hot.metadata.tables[_qualified(hot, PUBLISHED_SUFFIX)]


def parked_table(hot: sa.Table) -> sa.Table:
    """The ordering keys of ``hot`` parked behind a dead head."""
    return hot.metadata.tables[_qualified(hot, PARKED_SUFFIX)]


def _qualified(hot: sa.Table, suffix: str) -> str:
    return f"{hot.schema}.{hot.name}{suffix}" if hot.schema else hot.name + suffix


_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_]{0,53}")


def trigger_base_name(table_name: str) -> str:
    """The base of the names derived for a table's NOTIFY trigger (function, trigger, channel).

    A plain lowercase name is used as is (``outbox_events`` -> ``outbox_events_enqueued``); any
    other name (quotes, spaces, capitals, over 54 characters) is replaced by a hash of it, so the
    derived names are safe SQL text and fit PostgreSQL's 63-byte identifiers.
    """
    if _PLAIN_NAME.fullmatch(table_name):
        return table_name
    return "outbox_" + hashlib.sha256(table_name.encode("utf-8")).hexdigest()[:20]


def notify_channel(table_name: str) -> str:
    """The LISTEN/NOTIFY channel an INSERT into this table notifies (migration 0002)."""
    return f"{trigger_base_name(table_name)}_enqueued"


def metadata_for(name: str = DEFAULT_TABLE_NAME, schema: str | None = None) -> sa.MetaData:
    """The MetaData holding the outbox table, for ``target_metadata`` in an app's Alembic env."""
    return outbox_table(name, schema).metadata

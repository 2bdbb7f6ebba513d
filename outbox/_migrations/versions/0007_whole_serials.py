"""Serials stored whole; a message's event found by its serial; a publish's mutations by its event.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05

Sockudo's serials embed the node id (``INSTANCE_PROCESS_ID``): with a Kubernetes pod name they are
longer than the 64 characters ``message_serial``, ``history_serial`` and ``target_serial`` held
(``acknowledgement_id``, which equals the message serial when versioned messages are on, held
200). The four become 255 characters on the three tables (hot, dead, published), which keep the
same columns:

- PostgreSQL: a longer ``varchar`` is a catalog change; no table is rewritten.
- MariaDB and MySQL: in place (a utf8mb4 ``VARCHAR(64)`` already has the two-byte length of a
  ``VARCHAR(255)``).
- SQLite keeps a column's declared type in the table's ``CREATE TABLE`` text only: each table is
  rebuilt from that text with the new widths (SQLite's documented procedure), keeping its rows,
  constraints, indexes and AUTOINCREMENT counter.

Indexes, partial where the database has partial indexes:

- ``ix_<name>_published_serial`` also holds the published rows acknowledged without a receipt
  (``acknowledgement_id IS NULL``): a mutation of such a message finds its event there, and its
  serial in the channel's history.
- ``ix_<name>_published_message``, the published log's ``(channel, message_serial)`` of
  publishes: a mutation naming its message by serial finds the event that published it, so one
  message has one ordering key however it is named.
- ``ix_<name>_target``, the hot table's ``(target_event_id, channel)`` of mutations naming their
  message by an event: the mutations waiting for that event's publish.

They are built while the migration holds its tables (a long published log takes a while). A
downgrade refuses, changing nothing, while any value is longer than the old width (the old code
cannot hold it whole).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import sqlalchemy as sa
from alembic import context, op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

#: The widened columns: their width before this revision, and after it.
_OLD_WIDTHS = {
    "acknowledgement_id": 200,
    "message_serial": 64,
    "history_serial": 64,
    "target_serial": 64,
}
_NEW_WIDTH = 255


def _names() -> tuple[str, str, str]:
    name = context.config.attributes.get("table_name", "outbox_events")
    return name, name + "_dead", name + "_published"


#: The published rows of ``ix_<name>_published_serial`` before this revision, and after it
#: (``outbox.schema.MESSAGE_LOOKUP``, copied: a migration must not change when the code does).
_OLD_LOOKUP = "message_serial IS NOT NULL"
_NEW_LOOKUP = "message_serial IS NOT NULL OR acknowledgement_id IS NULL"


def upgrade() -> None:
    name, _dead, published = _names()
    _set_widths(dict.fromkeys(_OLD_WIDTHS, _NEW_WIDTH), _OLD_WIDTHS)
    _index_message_lookup(_NEW_LOOKUP)
    served = sa.text("message_serial IS NOT NULL AND operation IS NULL")
    op.create_index(
        f"ix_{name}_published_message",
        published,
        ["channel", "message_serial"],
        postgresql_where=served,
        sqlite_where=served,
    )
    waiting = sa.text("target_event_id IS NOT NULL")
    op.create_index(
        f"ix_{name}_target",
        name,
        ["target_event_id", "channel"],
        postgresql_where=waiting,
        sqlite_where=waiting,
    )


def downgrade() -> None:
    name, _dead, published = _names()
    # Before any change: MariaDB and MySQL commit each ALTER on its own.
    _refuse_values_too_long_for(_OLD_WIDTHS)
    op.drop_index(f"ix_{name}_target", table_name=name)
    op.drop_index(f"ix_{name}_published_message", table_name=published)
    _index_message_lookup(_OLD_LOOKUP)
    _set_widths(_OLD_WIDTHS, dict.fromkeys(_OLD_WIDTHS, _NEW_WIDTH))


def _index_message_lookup(predicate: str) -> None:
    """Where a mutation finds its message's event: with its serial, or (since this revision)
    acknowledged without a receipt, whose serial is then looked up in history. Partial indexes
    only: MariaDB's and MySQL's index holds every row, the new ones already."""
    if op.get_bind().dialect.name not in ("postgresql", "sqlite"):
        return
    name, _dead, published = _names()
    op.drop_index(f"ix_{name}_published_serial", table_name=published)
    where = sa.text(predicate)
    op.create_index(
        f"ix_{name}_published_serial",
        published,
        ["event_id", "channel"],
        postgresql_where=where,
        sqlite_where=where,
    )


def _set_widths(widths: Mapping[str, int], existing: Mapping[str, int]) -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for table in _names():
        if sqlite:
            _rebuild_on_sqlite(table, widths)
            continue
        for column, width in widths.items():
            op.alter_column(
                table,
                column,
                type_=sa.String(width),
                existing_type=sa.String(existing[column]),
                existing_nullable=True,
            )


def _refuse_values_too_long_for(widths: Mapping[str, int]) -> None:
    conn = op.get_bind()
    # Characters, not bytes: MySQL's LENGTH() counts bytes; SQLite has no CHAR_LENGTH().
    length = sa.func.length if conn.dialect.name == "sqlite" else sa.func.char_length
    too_long = []
    for table in _names():
        columns = sa.table(table, *(sa.column(c) for c in widths))
        for column, width in widths.items():
            found = conn.execute(
                sa.select(sa.func.count()).where(length(columns.c[column]) > width)
            ).scalar_one()
            if found:
                too_long.append(f"{table}.{column}: {found} longer than {width}")
    if too_long:
        raise RuntimeError(
            "cannot downgrade below 0007 without cutting values the older code cannot hold "
            f"({'; '.join(too_long)}); nothing was changed. Clear or delete those rows first."
        )


def _rebuild_on_sqlite(table: str, widths: Mapping[str, int]) -> None:
    """Give ``table``'s columns these VARCHAR widths: SQLite has no ALTER COLUMN, and keeps
    declared types in the ``CREATE TABLE`` text, so the table is made again from its own text
    (constraints, quoting and AUTOINCREMENT as they were) and its rows and indexes copied over."""
    conn = op.get_bind()
    create = conn.execute(
        sa.text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :t"), {"t": table}
    ).scalar_one()
    for column, width in widths.items():
        create, found = re.subn(
            rf'((?:^|[\s,(])"?{column}"?\s+)VARCHAR\(\d+\)', rf"\g<1>VARCHAR({width})", create
        )
        if found != 1:
            raise RuntimeError(f"{table}.{column}: expected one VARCHAR column, found {found}")
    # (An index made by a constraint has no text of its own: the CREATE TABLE makes it again.)
    indexes = list(
        conn.execute(
            sa.text(
                "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = :t "
                "AND sql IS NOT NULL"
            ),
            {"t": table},
        ).scalars()
    )
    # The largest id ever handed out: a hot row's id must never be one already in the log.
    counter = _sqlite_sequence(table)
    quoted = conn.dialect.identifier_preparer.quote
    interim = f"{table}_before_0007"
    op.rename_table(table, interim)
    conn.exec_driver_sql(create)
    columns = ", ".join(
        quoted(row[1]) for row in conn.exec_driver_sql(f"PRAGMA table_info({quoted(interim)})")
    )
    conn.exec_driver_sql(
        f"INSERT INTO {quoted(table)} ({columns}) SELECT {columns} FROM {quoted(interim)}"
    )
    op.drop_table(interim)
    for index in indexes:
        conn.exec_driver_sql(index)
    if counter is not None:
        updated = conn.execute(
            sa.text("UPDATE sqlite_sequence SET seq = max(seq, :seq) WHERE name = :t"),
            {"seq": counter, "t": table},
        ).rowcount
        if not updated:
            conn.execute(
                sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES (:t, :seq)"),
                {"seq": counter, "t": table},
            )


def _sqlite_sequence(table: str) -> int | None:
    """The AUTOINCREMENT counter of ``table``, if it has one."""
    conn = op.get_bind()
    exists = conn.execute(
        sa.text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_sequence'")
    ).first()
    if exists is None:
        return None
    return conn.execute(
        sa.text("SELECT seq FROM sqlite_sequence WHERE name = :t"), {"t": table}
    ).scalar_one_or_none()

"""A lean hot table: published rows go to a log, dead rows to their own table.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28

The hot table keeps only what is still to be sent, without a ``status`` column: a row is pending,
or in flight while its lease holds (an expired lease is claimable again). No index holds a column
the claim changes, so on PostgreSQL a claim is a HOT update, and an ack or a burial is a DELETE
that writes no index entry (see docs/performance.md). Published rows move to ``<name>_published``
(append-only, primary key only), dead rows to ``<name>_dead``; both have the hot table's columns.
Rows are moved by status inside this migration's transaction; in-flight rows keep their lease.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from outbox.schema import MYSQL_NAMES, MYSQL_TABLE_OPTIONS, nonce_type, text_type, timestamp_type

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

#: Mirrors outbox.schema.HOT_TABLE_STORAGE (a migration must not change when the code does).
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


def _columns() -> list[sa.Column[object]]:
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    ts = timestamp_type()
    return [
        sa.Column("id", big_id, primary_key=True, autoincrement=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=False),
        sa.Column("channel", sa.String(200), nullable=False),
        sa.Column("event", sa.String(200), nullable=False),
        sa.Column("data", text_type(), nullable=False),
        sa.Column("socket_id", sa.String(64), nullable=True),
        sa.Column("info", sa.String(200), nullable=True),
        sa.Column("tags", text_type(), nullable=True),
        sa.Column("extras", text_type(), nullable=True),
        sa.Column("encryption_nonce", nonce_type(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("failures", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", ts, nullable=False, server_default=_now()),
        sa.Column("lease_token", sa.Uuid(), nullable=True),
        sa.Column("lease_expires_at", ts, nullable=True),
        sa.Column("created_at", ts, nullable=False, server_default=_now()),
        sa.Column("queued_at", ts, nullable=False, server_default=_now()),
        sa.Column("published_at", ts, nullable=True),
        sa.Column("acknowledgement_id", sa.String(200), nullable=True),
        sa.Column("message_serial", sa.String(64), nullable=True),
        sa.Column("history_serial", sa.String(64), nullable=True),
        sa.Column("last_error_status", sa.Integer(), nullable=True),
        sa.Column("last_error_code", sa.String(64), nullable=True),
        sa.Column("last_error_message", sa.String(500), nullable=True),
        sa.Column("last_error_at", ts, nullable=True),
    ]


def _now() -> sa.TextClause:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        return sa.text("statement_timestamp()")
    if dialect == "sqlite":
        return sa.text("(strftime('%Y-%m-%d %H:%M:%f000', 'now'))")
    if dialect in MYSQL_NAMES:
        return sa.text("(UTC_TIMESTAMP(6))")
    return sa.text("CURRENT_TIMESTAMP")


def _names() -> tuple[str, str, str]:
    name = context.config.attributes.get("table_name", "outbox_events")
    return name, name + "_dead", name + "_published"


def _quote(name: str) -> str:
    return op.get_bind().dialect.identifier_preparer.quote(name)


def _move(source: str, target: str, where: str, status: str | None = None) -> None:
    """Move the rows of ``source`` matching ``where`` into ``target`` (``status`` set, if given)."""
    listed = ", ".join(_quote(c.name) for c in _columns())
    into, values = listed, listed
    if status is not None:
        into, values = f"{listed}, status", f"{listed}, '{status}'"
    op.execute(
        f"INSERT INTO {_quote(target)} ({into}) SELECT {values} FROM {_quote(source)} WHERE {where}"
    )
    op.execute(f"DELETE FROM {_quote(source)} WHERE {where}")


def upgrade() -> None:
    name, dead, published = _names()
    op.create_table(dead, *_columns(), **MYSQL_TABLE_OPTIONS)
    op.create_index(f"ix_{dead}_event_id", dead, ["event_id"])
    op.create_index(f"ix_{dead}_key", dead, ["idempotency_key"])
    op.create_table(published, *_columns(), **MYSQL_TABLE_OPTIONS)
    _move(name, dead, "status = 'dead'")
    _move(name, published, "status = 'published'")
    op.drop_index(f"ix_{name}_pending", table_name=name)
    op.drop_index(f"ix_{name}_in_flight", table_name=name)
    op.drop_index(f"ix_{name}_status_created", table_name=name)
    # SQLite rebuilds the table here; AUTOINCREMENT keeps it from reusing the largest id after
    # that row moved out to the log.
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_without_status_on_sqlite(name)
    else:
        op.drop_constraint(f"ck_{name}_status", name, type_="check")
        op.drop_column(name, "status")
    op.create_index(f"ix_{name}_due", name, ["next_attempt_at", "id"])
    if op.get_bind().dialect.name == "postgresql":
        options = ", ".join(f"{k} = {v}" for k, v in HOT_TABLE_STORAGE.items())
        op.execute(f"ALTER TABLE {_quote(name)} SET ({options})")


def _rebuild_without_status_on_sqlite(name: str) -> None:
    """SQLite drops a column by rebuilding the table; done by hand rather than by Alembic's batch
    mode, whose reflection mangles constraint names that need quoting. AUTOINCREMENT keeps the
    new table from reusing the largest id after that row moved out to the log."""
    interim = f"{name}_before_0004"
    op.rename_table(name, interim)
    columns = _columns()
    columns[0] = sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True)
    op.create_table(
        name,
        *columns,
        sa.UniqueConstraint("idempotency_key", name=f"uq_{name}_idempotency_key"),
        sqlite_autoincrement=True,
    )
    listed = ", ".join(_quote(c.name) for c in _columns())
    op.execute(f"INSERT INTO {_quote(name)} ({listed}) SELECT {listed} FROM {_quote(interim)}")
    op.drop_index(f"ix_{name}_event_id", table_name=interim)
    op.drop_table(interim)
    op.create_index(f"ix_{name}_event_id", name, ["event_id"])


def downgrade() -> None:
    name, dead, published = _names()
    op.drop_index(f"ix_{name}_due", table_name=name)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE {_quote(name)} RESET ({', '.join(HOT_TABLE_STORAGE)})")
    with op.batch_alter_table(name, recreate="auto") as batch:
        batch.add_column(
            sa.Column("status", sa.String(16), nullable=False, server_default="pending")
        )
        batch.create_check_constraint(
            f"ck_{name}_status", "status IN ('pending', 'in_flight', 'published', 'dead')"
        )
    op.execute(f"UPDATE {_quote(name)} SET status = 'in_flight' WHERE lease_expires_at IS NOT NULL")
    _move(dead, name, "1 = 1", "dead")
    _move(published, name, "1 = 1", "published")
    op.drop_table(published)
    op.drop_table(dead)
    pending = sa.text("status = 'pending'")
    in_flight = sa.text("status = 'in_flight'")
    mysql = op.get_bind().dialect.name in MYSQL_NAMES
    op.create_index(
        f"ix_{name}_pending",
        name,
        ["status", "next_attempt_at", "id"] if mysql else ["next_attempt_at", "id"],
        postgresql_where=pending,
        sqlite_where=pending,
    )
    op.create_index(
        f"ix_{name}_in_flight",
        name,
        ["lease_expires_at"],
        postgresql_where=in_flight,
        sqlite_where=in_flight,
    )
    op.create_index(f"ix_{name}_status_created", name, ["status", "created_at"])

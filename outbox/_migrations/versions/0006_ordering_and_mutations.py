"""Ordering keys, mutations as outbox rows, and parked keys.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28

Four nullable columns on the three tables (hot, dead, published), which keep the same columns:
``ordering_key`` (events of one key go out one after another, in commit order), ``operation``
(None for a publish, else the mutation the row is), ``target_event_id`` and ``target_serial``
(the message a mutation acts on). The hot table gains the index of the claim's "head of its key"
test, the published log an index that finds a mutation's target serial (both partial where the
database has partial indexes: rows without a key or a serial are not in them), and
``<name>_parked`` holds the keys whose head went dead while the rest wait.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from outbox.schema import MYSQL_TABLE_OPTIONS, timestamp_type

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_COLUMNS = ("ordering_key", "operation", "target_event_id", "target_serial")


def _name() -> str:
    return context.config.attributes.get("table_name", "outbox_events")


def _now() -> sa.TextClause:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        return sa.text("statement_timestamp()")
    if dialect == "sqlite":
        return sa.text("(strftime('%Y-%m-%d %H:%M:%f000', 'now'))")
    return sa.text("(UTC_TIMESTAMP(6))")


def upgrade() -> None:
    name = _name()
    # ADD COLUMN of a nullable column without a default: no table rewrite on any database.
    for table in (name, name + "_dead", name + "_published"):
        op.add_column(table, sa.Column("ordering_key", sa.String(200), nullable=True))
        op.add_column(table, sa.Column("operation", sa.String(16), nullable=True))
        op.add_column(table, sa.Column("target_event_id", sa.Uuid(), nullable=True))
        op.add_column(table, sa.Column("target_serial", sa.String(64), nullable=True))
    keyed = sa.text("ordering_key IS NOT NULL")
    op.create_index(
        f"ix_{name}_ordering",
        name,
        ["ordering_key", "id"],
        postgresql_where=keyed,
        sqlite_where=keyed,
    )
    served = sa.text("message_serial IS NOT NULL")
    op.create_index(
        f"ix_{name}_published_serial",
        name + "_published",
        ["event_id", "channel"],
        postgresql_where=served,
        sqlite_where=served,
    )
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        name + "_parked",
        sa.Column("ordering_key", sa.String(200), primary_key=True),
        sa.Column("row_id", big_id, nullable=False),
        sa.Column("parked_at", timestamp_type(), nullable=False, server_default=_now()),
        **MYSQL_TABLE_OPTIONS,
    )


def downgrade() -> None:
    name = _name()
    op.drop_table(name + "_parked")
    op.drop_index(f"ix_{name}_published_serial", table_name=name + "_published")
    op.drop_index(f"ix_{name}_ordering", table_name=name)
    for table in (name, name + "_dead", name + "_published"):
        with op.batch_alter_table(table) as batch:
            for column in _COLUMNS:
                batch.drop_column(column)

"""Create the outbox table.

Revision ID: 0001
Revises:
Create Date: 2026-11-27

On MariaDB and MySQL: DATETIME(6) holding UTC, MEDIUMTEXT, a VARBINARY nonce, utf8mb4 with a binary
collation, defaults from UTC_TIMESTAMP(6) (an expression default: MySQL >= 8.0.13), and plain
indexes where the others have partial ones (the pending one led by status).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from outbox.schema import (
    MYSQL_NAMES,
    MYSQL_TABLE_OPTIONS,
    nonce_type,
    text_type,
    timestamp_type,
)

revision = "0001"
down_revision = None
branch_labels = ("outbox",)
depends_on = None


def _now() -> sa.TextClause:
    # The database clock in the column format the claim compares (see outbox.schema.utc_now).
    if op.get_bind().dialect.name == "postgresql":
        return sa.text("statement_timestamp()")
    if op.get_bind().dialect.name == "sqlite":
        return sa.text("(strftime('%Y-%m-%d %H:%M:%f000', 'now'))")
    if op.get_bind().dialect.name in MYSQL_NAMES:
        return sa.text("(UTC_TIMESTAMP(6))")
    return sa.text("CURRENT_TIMESTAMP")


def upgrade() -> None:
    name = context.config.attributes.get("table_name", "outbox_events")
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    ts = timestamp_type()
    mysql = op.get_bind().dialect.name in MYSQL_NAMES
    op.create_table(
        name,
        sa.Column("id", big_id, primary_key=True, autoincrement=True),
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
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", ts, nullable=False, server_default=_now()),
        sa.Column("lease_token", sa.Uuid(), nullable=True),
        sa.Column("lease_expires_at", ts, nullable=True),
        sa.Column("created_at", ts, nullable=False, server_default=_now()),
        sa.Column("published_at", ts, nullable=True),
        sa.Column("acknowledgement_id", sa.String(200), nullable=True),
        sa.Column("message_serial", sa.String(64), nullable=True),
        sa.Column("history_serial", sa.String(64), nullable=True),
        sa.Column("last_error_status", sa.Integer(), nullable=True),
        sa.Column("last_error_code", sa.String(64), nullable=True),
        sa.Column("last_error_message", sa.String(500), nullable=True),
        sa.Column("last_error_at", ts, nullable=True),
        sa.UniqueConstraint("idempotency_key", name=f"uq_{name}_idempotency_key"),
        sa.CheckConstraint(
            "status IN ('pending', 'in_flight', 'published', 'dead')", name=f"ck_{name}_status"
        ),
        **MYSQL_TABLE_OPTIONS,
    )
    pending = sa.text("status = 'pending'")
    in_flight = sa.text("status = 'in_flight'")
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
    op.create_index(f"ix_{name}_event_id", name, ["event_id"])


def downgrade() -> None:
    name = context.config.attributes.get("table_name", "outbox_events")
    op.drop_table(name)

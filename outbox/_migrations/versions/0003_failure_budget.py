"""The attempt budget and the age limit become the event's own.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27

``attempts`` keeps counting claims (it decides batch or alone); ``failures`` counts only the failed
attempts charged to the event, so an outage, a rate limit or a restart no longer spends its budget.
``queued_at`` is when the event last entered the queue (enqueue or replay): a replayed event gets a
fresh age limit instead of dying at its first failure because it was created days ago.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from outbox.schema import MYSQL_NAMES, timestamp_type

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _now() -> sa.TextClause:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        return sa.text("statement_timestamp()")
    if dialect == "sqlite":
        return sa.text("(strftime('%Y-%m-%d %H:%M:%f000', 'now'))")
    if dialect in MYSQL_NAMES:
        return sa.text("(UTC_TIMESTAMP(6))")
    return sa.text("CURRENT_TIMESTAMP")


def upgrade() -> None:
    name = context.config.attributes.get("table_name", "outbox_events")
    ts = timestamp_type()
    with op.batch_alter_table(name) as batch:
        batch.add_column(sa.Column("failures", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("queued_at", ts, nullable=True))
    table = sa.table(name, sa.column("queued_at", ts), sa.column("created_at", ts))
    op.execute(table.update().values(queued_at=table.c.created_at))
    with op.batch_alter_table(name) as batch:
        batch.alter_column("queued_at", existing_type=ts, nullable=False, server_default=_now())


def downgrade() -> None:
    name = context.config.attributes.get("table_name", "outbox_events")
    with op.batch_alter_table(name) as batch:
        batch.drop_column("queued_at")
        batch.drop_column("failures")

"""Each row keeps the trace context of the transaction that enqueued it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28

``traceparent`` holds the W3C trace context (``00-<trace id>-<span id>-<flags>``, 55 characters)
current when the event was enqueued, when the application uses OpenTelemetry; the worker links
the span of the request that publishes the row to it. Added to the three tables (hot, dead,
published), which keep the same columns. Nullable: rows enqueued without tracing, and every row
written before this revision, have none.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _tables() -> list[str]:
    name = context.config.attributes.get("table_name", "outbox_events")
    return [name, name + "_dead", name + "_published"]


def upgrade() -> None:
    # ADD COLUMN of a nullable column without a default: no table rewrite on either database.
    for table in _tables():
        op.add_column(table, sa.Column("traceparent", sa.String(55), nullable=True))


def downgrade() -> None:
    for table in _tables():
        with op.batch_alter_table(table) as batch:
            batch.drop_column("traceparent")

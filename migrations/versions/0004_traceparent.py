"""Each row keeps the trace context of the transaction that enqueued it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28

``traceparent`` holds the W3C trace context (``00-<trace id>-<span id>-<flags>``, 55 characters)
current when the event was enqueued, when the application uses OpenTelemetry; the worker links
the span of the request that publishes the row to it. Nullable: rows enqueued without tracing,
and every row written before this revision, have none.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    name = context.config.attributes.get("table_name", "outbox_events")
    with op.batch_alter_table(name) as batch:
        batch.add_column(sa.Column("traceparent", sa.String(55), nullable=True))


def downgrade() -> None:
    name = context.config.attributes.get("table_name", "outbox_events")
    with op.batch_alter_table(name) as batch:
        batch.drop_column("traceparent")

"""Wake workers on commit: a statement-level NOTIFY trigger on PostgreSQL.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

The trigger fires once per INSERT statement (not per row) and PostgreSQL delivers the
notification only when the inserting transaction commits, folding repeats within a transaction.
Doing it in the database spares every ``enqueue`` a second round trip, and wakes workers for
rows written by any means, not only through ``outbox.enqueue``. SQLite, MariaDB and MySQL have no
notifications: workers poll them.
"""

from __future__ import annotations

from alembic import context, op

from outbox.schema import notify_channel, trigger_base_name

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _names() -> tuple[str, str, str]:
    """(quoted table, quoted function and trigger name, channel); see outbox.schema."""
    table = context.config.attributes.get("table_name", "outbox_events")
    quote = op.get_bind().dialect.identifier_preparer.quote
    # The channel is plain SQL text by construction (trigger_base_name), so it can sit in a
    # string literal; the table is any name, so it is quoted as an identifier.
    return quote(table), quote(f"{trigger_base_name(table)}_notify"), notify_channel(table)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    table, function, channel = _names()
    op.execute(
        f"""
        CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            -- The payload names the table: outboxes in several schemas share the channel.
            PERFORM pg_notify('{channel}', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME);
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        f"CREATE TRIGGER {function} AFTER INSERT ON {table} "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    table, function, _ = _names()
    op.execute(f"DROP TRIGGER IF EXISTS {function} ON {table}")
    op.execute(f"DROP FUNCTION IF EXISTS {function}()")

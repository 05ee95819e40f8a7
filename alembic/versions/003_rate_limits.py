"""Per-user rate limit counters, shared by every bot process.

UNLOGGED: a counter is worth no WAL; after a server crash the table comes back empty, which
at worst forgives one minute of messages.

Revision ID: 003
Revises: 002
Create Date: 2026-11-23
"""

from alembic import op

revision = "003"
down_revision = "002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE UNLOGGED TABLE rate_limits (
        telegram_user_id bigint PRIMARY KEY,
        window_start     timestamptz NOT NULL,
        hits             integer NOT NULL
    )
    """)


def downgrade() -> None:
    op.execute("DROP TABLE rate_limits")

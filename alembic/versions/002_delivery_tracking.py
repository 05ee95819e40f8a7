"""Delivery tracking: Telegram message ids, answer links, and a time index for recovery and purge.

- ``telegram_message_id`` with UNIQUE (chat_id, telegram_message_id): a redelivered update
  cannot store the same user message twice.
- ``reply_to_id``: the user message an assistant message answers; UNIQUE, so a question is
  answered at most once. A user message with no answer is still awaiting one.
- BRIN on ``created_at``: rows arrive in time order, so a BRIN index finds recent (recovery)
  or old (retention purge) rows for almost no write cost.

Revision ID: 002
Revises: 001
Create Date: 2026-11-23
"""

from alembic import op

revision = "002"
down_revision = "001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    ALTER TABLE messages
        ADD COLUMN telegram_message_id bigint,
        ADD COLUMN reply_to_id bigint REFERENCES messages (id) ON DELETE SET NULL,
        ADD CONSTRAINT messages_telegram_message_key UNIQUE (chat_id, telegram_message_id),
        ADD CONSTRAINT messages_reply_to_key UNIQUE (reply_to_id),
        ADD CONSTRAINT messages_reply_role_check CHECK (reply_to_id IS NULL OR role = 'assistant')
    """)
    op.execute("CREATE INDEX messages_created_at_brin ON messages USING brin (created_at)")


def downgrade() -> None:
    op.execute("DROP INDEX messages_created_at_brin")
    op.execute("""
    ALTER TABLE messages
        DROP CONSTRAINT messages_reply_role_check,
        DROP CONSTRAINT messages_reply_to_key,
        DROP CONSTRAINT messages_telegram_message_key,
        DROP COLUMN reply_to_id,
        DROP COLUMN telegram_message_id
    """)

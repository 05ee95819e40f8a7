"""Turn pipeline: history in turn order, the forum topic of a question, tracked delivery.

- History is read in *turn order*: a question at its own id, its answer right after it
  (``coalesce(reply_to_id, id)``). A chat's second question can be stored while the first is
  still being answered; the first answer must still precede it in every later context. The
  expression index replaces ``messages_history_idx`` and serves the same backward scan.
- ``telegram_thread_id``: the forum topic a question was asked in; its answer goes there.
- ``delivered_at`` and ``sent_message_ids`` on answers: Telegram accepted every part (and the
  ids of the parts accepted so far), so recovery resends only what never arrived.
- ``failed_at``: the turn ended for good without success: a question the LLM could not answer
  (the user was told), an answer Telegram refused (the bot was blocked, the chat is gone).
  Recovery leaves both alone.

Every column is nullable with no default: adding them only touches the catalogue, whatever
the size of the table. The two indexes are built without CONCURRENTLY (Alembic runs each
migration in a transaction); on a large table, build ``messages_turn_idx`` with
``CREATE INDEX CONCURRENTLY`` by hand first, and this migration finds it there.

Revision ID: 004
Revises: 003
Create Date: 2026-11-24
"""

from alembic import op

revision = "004"
down_revision = "003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    ALTER TABLE messages
        ADD COLUMN telegram_thread_id bigint,
        ADD COLUMN delivered_at timestamptz,
        ADD COLUMN sent_message_ids bigint[],
        ADD COLUMN failed_at timestamptz
    """)
    op.execute("""
    CREATE INDEX IF NOT EXISTS messages_turn_idx
        ON messages (user_id, chat_id, (coalesce(reply_to_id, id)), id)
        WHERE deleted_at IS NULL
    """)
    op.execute("DROP INDEX messages_history_idx")
    # Answers stored before delivery was tracked were sent at the time: mark the ones recovery
    # could otherwise pick up (it looks back at most PENDING_REPLY_MAX_AGE_S, up to 7 days).
    op.execute("""
    UPDATE messages SET delivered_at = created_at
    WHERE role = 'assistant' AND created_at > now() - interval '7 days'
    """)


def downgrade() -> None:
    op.execute("CREATE INDEX messages_history_idx ON messages (user_id, chat_id, id) WHERE deleted_at IS NULL")
    op.execute("DROP INDEX messages_turn_idx")
    op.execute("""
    ALTER TABLE messages
        DROP COLUMN failed_at,
        DROP COLUMN sent_message_ids,
        DROP COLUMN delivered_at,
        DROP COLUMN telegram_thread_id
    """)

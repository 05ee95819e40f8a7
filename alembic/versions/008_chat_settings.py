"""Per-chat settings: the model, the system prompt and the temperature a chat has chosen.

``chat_settings`` holds at most one row per chat, keyed by the chat (``chat_id`` is the primary
key and references ``chats``, whose rows are never hard-deleted). Each setting is nullable:
NULL means "the default from the configuration" (``LLM_MODEL``, ``SYSTEM_PROMPT``,
``LLM_TEMPERATURE``), so a chat that never chose anything has no row, and a changed default
reaches every chat that kept it. ``updated_by`` is the Telegram user id of whoever changed the
row last (an administrator, in a group). A turn reads its chat's row inside the statement that
reads its history (``FETCH_TURN_START``), by primary key.

On a big database: a new, empty table; nothing else is touched or locked beyond the catalogue
and a ``SHARE ROW EXCLUSIVE`` lock on ``chats`` for the foreign key, held for milliseconds.

Revision ID: 008
Revises: 007
Create Date: 2026-11-25
"""

from alembic import op

revision = "008"
down_revision = "007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE chat_settings (
        chat_id bigint PRIMARY KEY REFERENCES chats (id),
        model text CHECK (model IS NULL OR char_length(model) BETWEEN 1 AND 200),
        system_prompt text CHECK (system_prompt IS NULL OR char_length(system_prompt) BETWEEN 1 AND 4000),
        temperature real CHECK (temperature IS NULL OR temperature BETWEEN 0 AND 2),
        updated_at timestamptz NOT NULL DEFAULT now(),
        updated_by bigint
    )
    """)


def downgrade() -> None:
    op.execute("DROP TABLE chat_settings")

"""Initial schema: users, chats, messages with soft delete and a partial history index.

Revision ID: 001
Revises:
Create Date: 2026-11-23
"""

from alembic import op

revision = "001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE users (
        id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        telegram_user_id bigint NOT NULL UNIQUE,
        first_name       text,
        created_at       timestamptz NOT NULL DEFAULT now(),
        deleted_at       timestamptz
    )
    """)
    op.execute("""
    CREATE TABLE chats (
        id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        telegram_chat_id bigint NOT NULL UNIQUE,
        created_at       timestamptz NOT NULL DEFAULT now(),
        deleted_at       timestamptz
    )
    """)
    # length is computed by the database from content, so it can never drift from it;
    # char_length counts characters (code points), not bytes.
    op.execute("""
    CREATE TABLE messages (
        id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        user_id    bigint NOT NULL REFERENCES users (id),
        chat_id    bigint NOT NULL REFERENCES chats (id),
        role       text NOT NULL CONSTRAINT messages_role_check
                       CHECK (role IN ('system', 'user', 'assistant')),
        content    text NOT NULL,
        length     integer GENERATED ALWAYS AS (char_length(content)) STORED,
        created_at timestamptz NOT NULL DEFAULT now(),
        deleted_at timestamptz
    )
    """)
    # Serves "last N live messages of (user, chat)" as one backward index scan: equality on
    # (user_id, chat_id), order by id (insertion order, unique even within one millisecond),
    # and only live rows are indexed, so cleared history costs the hot path nothing.
    op.execute("""
    CREATE INDEX messages_history_idx
        ON messages (user_id, chat_id, id)
        WHERE deleted_at IS NULL
    """)


def downgrade() -> None:
    op.execute("DROP TABLE messages")
    op.execute("DROP TABLE chats")
    op.execute("DROP TABLE users")

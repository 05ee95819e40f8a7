"""Context that fits the model: token estimates, rolling summaries, shared group history, daily use.

- ``messages.tokens``: the message's estimated tokens (``services/llm/tokens.py``), written with the
  message. Rows from before this revision keep NULL and are read as ``length`` (one token per
  character, more than any tokenizer gives for ordinary text), so an old history is never
  under-counted. A turn sums these newest first (a window over the rows it already reads) and
  keeps what fits the model's budget.
- ``summaries``: a rolling summary of a dialog's older part, written by the LLM. It covers the
  live messages whose turn (``coalesce(reply_to_id, id)``) is at most ``through_id``; the turn
  then reads history only after it. ``user_id`` is NULL for a group's shared history
  (``GROUP_CONTEXT=shared``). A summary is soft-deleted with the history it covers: by ``/clear``
  (``deleted_reason = 'clear'``, brought back by ``/undo`` with the clear), by ``/undo`` reaching
  into its range (``'undo'``), or by a newer summary of the same dialog (``'replaced'``).
  ``summaries_dialog_idx`` finds a dialog's newest live summary by one index probe.
- ``messages_chat_turn_idx``: a group's history across its users in turn order, for
  ``GROUP_CONTEXT=shared``; only live rows, like ``messages_turn_idx``.
- ``token_usage``: tokens each user spent per UTC day, counted as answers are stored, for
  ``DAILY_TOKEN_BUDGET_PER_USER``.

On a big table: ``messages`` gets a nullable column with no default and a constraint added
``NOT VALID`` (catalogue only), validated afterwards under SHARE UPDATE EXCLUSIVE, and one index
built ``CONCURRENTLY`` outside the migration's transaction (reads and writes go on); the rest
are new tables.

Revision ID: 009
Revises: 008
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "009"
down_revision = "008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    ALTER TABLE messages
        ADD COLUMN tokens integer,
        ADD CONSTRAINT messages_tokens_estimate_check CHECK (tokens >= 0) NOT VALID
    """)
    op.execute("""
    CREATE TABLE summaries (
        id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        user_id        bigint REFERENCES users (id),
        chat_id        bigint NOT NULL REFERENCES chats (id),
        through_id     bigint NOT NULL,
        covered        integer NOT NULL CHECK (covered > 0),
        content        text NOT NULL CHECK (content <> ''),
        tokens         integer NOT NULL CHECK (tokens >= 0),
        created_at     timestamptz NOT NULL DEFAULT now(),
        deleted_at     timestamptz,
        deleted_reason text CHECK (
            deleted_reason IS NULL OR (deleted_at IS NOT NULL AND deleted_reason IN ('clear', 'undo', 'replaced'))
        )
    )
    """)
    op.execute("""
    CREATE INDEX summaries_dialog_idx ON summaries (chat_id, user_id, through_id) WHERE deleted_at IS NULL
    """)
    # The purge takes set-aside summaries oldest first; /undo of a /clear finds those it set aside.
    op.execute("CREATE INDEX summaries_deleted_idx ON summaries (deleted_at) WHERE deleted_at IS NOT NULL")
    op.execute("""
    CREATE TABLE token_usage (
        user_id bigint NOT NULL REFERENCES users (id),
        day     date NOT NULL,
        tokens  bigint NOT NULL CHECK (tokens >= 0),
        PRIMARY KEY (user_id, day)
    )
    """)
    with op.get_context().autocommit_block():
        # A concurrent build cancelled half-way leaves an INVALID index, which IF NOT EXISTS
        # would accept: drop it to build it again.
        invalid = op.get_bind().execute(
            sa.text(
                "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE c.relname = 'messages_chat_turn_idx' AND NOT i.indisvalid"
            )
        )
        op.execute("ALTER TABLE messages VALIDATE CONSTRAINT messages_tokens_estimate_check")
        if invalid.first() is not None:
            op.execute("DROP INDEX CONCURRENTLY messages_chat_turn_idx")
        op.execute("SET statement_timeout = 0")
        op.execute("""
        CREATE INDEX CONCURRENTLY IF NOT EXISTS messages_chat_turn_idx
            ON messages (chat_id, (coalesce(reply_to_id, id)), id) WHERE deleted_at IS NULL
        """)
        op.execute("SET statement_timeout = '5min'")  # alembic/env.py's bound, for what follows


def downgrade() -> None:
    op.execute("DROP INDEX messages_chat_turn_idx")
    op.execute("DROP TABLE token_usage")
    op.execute("DROP TABLE summaries")
    op.execute("ALTER TABLE messages DROP COLUMN tokens")

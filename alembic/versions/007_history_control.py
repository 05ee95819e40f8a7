"""History the user controls: search, retry, undo, edits, token usage.

- ``search_vector``: the message's words for full-text search (``/search``), kept by the
  built-in ``tsvector_update_trigger`` on every insert and every change of ``content``. The
  configuration is ``russian``: its stemmer takes Russian word forms ("кошки" → "кошк"), and
  it hands words in Latin letters to the English stemmer ("running" → "run"), so one vector
  serves both languages. ``messages_search_idx`` is a GIN index on (user_id, chat_id,
  search_vector) (``btree_gin``), so a search reads only the posting lists of one dialog's rows.
- ``deleted_reason``: why a row was soft-deleted: ``clear``, ``undo``, ``retry``, ``edit`` (an
  answer replaced) or ``rate_limit`` (a question set aside). ``/undo`` right after a ``/clear``
  restores that clear's rows; ``messages_dialog_deleted_idx`` finds a dialog's latest deletion.
  Rows deleted before this revision keep NULL (reason unknown) and are never restored.
- ``edited_at``: when the user last edited the question in Telegram.
- ``prompt_tokens``/``completion_tokens``: the usage the endpoint reported for an answer.
- A question may now have several answers, one of them live (``/retry``): the unique
  constraint on ``reply_to_id`` becomes the partial unique index ``messages_live_answer_key``.
  ``messages_reply_to_idx`` still indexes every answer by its question: the purge's foreign key
  action (``ON DELETE SET NULL``) and the write-back look answers up by it.

On a big table: nothing here rewrites ``messages``. The new columns are nullable with no
default and the constraints are added ``NOT VALID`` (catalogue only, under a lock held for
milliseconds); then, outside the migration's transaction, the constraints are validated (SHARE
UPDATE EXCLUSIVE: reads and writes go on), ``search_vector`` is filled in batches of 10,000
rows by id, each its own transaction, and the indexes are built ``CONCURRENTLY``. The trigger
exists before the backfill starts, so rows written meanwhile get their vector from it. See
doc/guides/06-DATABASE.md for the times measured on 1,000,000 rows.

Revision ID: 007
Revises: 006
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "007"
down_revision = "006"
branch_labels = None
depends_on = None

BACKFILL_BATCH = 10_000
INDEXES = ("messages_search_idx", "messages_dialog_deleted_idx", "messages_live_answer_key", "messages_reply_to_idx")


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS btree_gin")
    op.execute("""
    ALTER TABLE messages
        ADD COLUMN search_vector tsvector,
        ADD COLUMN deleted_reason text,
        ADD COLUMN edited_at timestamptz,
        ADD COLUMN prompt_tokens integer,
        ADD COLUMN completion_tokens integer,
        ADD CONSTRAINT messages_deleted_reason_check CHECK (
            deleted_reason IS NULL
            OR (deleted_at IS NOT NULL AND deleted_reason IN ('clear', 'undo', 'retry', 'edit', 'rate_limit'))
        ) NOT VALID,
        ADD CONSTRAINT messages_tokens_check CHECK (
            (prompt_tokens IS NULL AND completion_tokens IS NULL)
            OR (role = 'assistant' AND coalesce(prompt_tokens, 0) >= 0 AND coalesce(completion_tokens, 0) >= 0)
        ) NOT VALID
    """)
    op.execute("""
    CREATE TRIGGER messages_search_vector_update
        BEFORE INSERT OR UPDATE OF content ON messages
        FOR EACH ROW EXECUTE FUNCTION tsvector_update_trigger(search_vector, 'pg_catalog.russian', content)
    """)
    with op.get_context().autocommit_block():
        op.execute("ALTER TABLE messages VALIDATE CONSTRAINT messages_deleted_reason_check")
        op.execute("ALTER TABLE messages VALIDATE CONSTRAINT messages_tokens_check")
        last_id = op.get_bind().exec_driver_sql("SELECT coalesce(max(id), 0) FROM messages").scalar_one()
        for start in range(0, last_id, BACKFILL_BATCH):
            op.execute(
                sa.text(
                    "UPDATE messages SET search_vector = to_tsvector('pg_catalog.russian', content)"
                    " WHERE id > :start AND id <= :end AND search_vector IS NULL"
                ).bindparams(start=start, end=start + BACKFILL_BATCH)
            )
        # A concurrent build cancelled half-way leaves an INVALID index, which IF NOT EXISTS would
        # accept: drop it to build it again. The GIN build takes minutes on 10M rows: no timeout.
        invalid = op.get_bind().execute(
            sa.text(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE c.relname = ANY(:names) AND NOT i.indisvalid"
            ).bindparams(names=list(INDEXES))
        )
        for (name,) in invalid.fetchall():
            assert name in INDEXES  # an identifier from the list above, never a value from outside
            op.execute(f"DROP INDEX CONCURRENTLY {name}")
        op.execute("SET statement_timeout = 0")
        op.execute("""
        CREATE INDEX CONCURRENTLY IF NOT EXISTS messages_search_idx
            ON messages USING gin (user_id, chat_id, search_vector)
        """)
        op.execute("""
        CREATE INDEX CONCURRENTLY IF NOT EXISTS messages_dialog_deleted_idx
            ON messages (user_id, chat_id, deleted_at) WHERE deleted_at IS NOT NULL
        """)
        op.execute("""
        CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS messages_live_answer_key
            ON messages (reply_to_id) WHERE deleted_at IS NULL
        """)
        op.execute("""
        CREATE INDEX CONCURRENTLY IF NOT EXISTS messages_reply_to_idx
            ON messages (reply_to_id) WHERE reply_to_id IS NOT NULL
        """)
        op.execute("SET statement_timeout = '5min'")  # alembic/env.py's bound, for what follows
    op.execute("ALTER TABLE messages DROP CONSTRAINT messages_reply_to_key")


def downgrade() -> None:
    # One answer per question again: answers replaced by /retry or an edit (soft-deleted) stop
    # pointing at their question. The rows stay; only that link is lost.
    op.execute("""
    UPDATE messages SET reply_to_id = NULL
    WHERE reply_to_id IS NOT NULL AND deleted_at IS NOT NULL
      AND EXISTS (
          SELECT FROM messages other
          WHERE other.reply_to_id = messages.reply_to_id AND other.id <> messages.id
            AND (other.deleted_at IS NULL OR other.id > messages.id)
      )
    """)
    op.execute("ALTER TABLE messages ADD CONSTRAINT messages_reply_to_key UNIQUE (reply_to_id)")
    op.execute("DROP INDEX messages_reply_to_idx")
    op.execute("DROP INDEX messages_live_answer_key")
    op.execute("DROP INDEX messages_dialog_deleted_idx")
    op.execute("DROP INDEX messages_search_idx")
    op.execute("DROP TRIGGER messages_search_vector_update ON messages")
    op.execute("""
    ALTER TABLE messages
        DROP COLUMN completion_tokens,
        DROP COLUMN prompt_tokens,
        DROP COLUMN edited_at,
        DROP COLUMN deleted_reason,
        DROP COLUMN search_vector
    """)
    # btree_gin stays installed: other schemas in the database may use it.

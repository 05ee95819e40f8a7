"""Memories the user controls: short facts a user asks the bot to keep about them (issue 26).

- ``memories``: one row per fact (``/remember``), the user's own, across every chat: a user's
  memories follow them, not a conversation. ``content`` is 1 to 500 characters; ``created_at``
  orders them. ``/memory forget`` and the "Forget" button set ``deleted_at`` (soft delete, as
  for messages: the row stays until a purge, the turn never reads it again). ``ON DELETE
  CASCADE``: a user's memories go with the user's row.
- ``memories_user_idx (user_id, id) WHERE deleted_at IS NULL``: a user's live memories by age
  (ids are given in insertion order), the only way they are read: the list, the count the limit
  of ``/remember`` decides on, forgetting them all, and every turn's context read (one range
  of it, bounded). Forgotten rows cost those reads nothing.
- ``users.memories_in_groups``: whether the user lets their memories into the context of a
  group chat (``/memory groups on|off``); off by default, so what someone told the bot in
  private never reaches a group without their say. In a private chat they are always read.

On a big database: a new, empty table (the foreign key takes a ``SHARE ROW EXCLUSIVE`` lock on
``users`` for milliseconds), and a ``NOT NULL`` column with a constant default, which PostgreSQL
11 and later add in the catalogue without rewriting ``users``. Downgrade drops both: the memories
are lost, nothing else is touched.

Revision ID: 014
Revises: 013
Create Date: 2026-12-03
"""

from alembic import op

revision = "014"
down_revision = "013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE memories (
        id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        user_id    bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        content    text NOT NULL CONSTRAINT memories_content_check CHECK (char_length(content) BETWEEN 1 AND 500),
        created_at timestamptz NOT NULL DEFAULT now(),
        deleted_at timestamptz
    )
    """)
    op.execute("CREATE INDEX memories_user_idx ON memories (user_id, id) WHERE deleted_at IS NULL")
    op.execute("ALTER TABLE users ADD COLUMN memories_in_groups boolean NOT NULL DEFAULT false")


def downgrade() -> None:
    op.execute("ALTER TABLE users DROP COLUMN memories_in_groups")
    op.execute("DROP TABLE memories")

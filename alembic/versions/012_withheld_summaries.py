"""Privacy in a shared group: a summary set aside by one user's /clear can be withheld for good.

A group's shared summary (``GROUP_CONTEXT=shared``, ``user_id`` NULL) holds every member's
words. One member's ``/clear`` sets it aside (``deleted_reason = 'clear'``), and that member's
``/undo`` brings it back with their messages. When another member has meanwhile taken back
words it holds (their ``/clear``, or an ``/undo`` of a turn it covers), bringing it back would
put those words into everyone's next context: the statement that takes them back marks such a
summary ``'withheld'`` instead, and no ``/undo`` restores it (whatever the order of the clears).

- ``summaries.deleted_reason`` may be ``'withheld'``; its check, which 009 left with the name
  PostgreSQL chose (``summaries_check``), is named ``summaries_deleted_reason_check``.
- ``summaries_cleared_idx``: the summaries a ``/clear`` set aside, by chat and time, so the
  ``/clear`` or ``/undo`` of a group member finds the ones to withhold, and an ``/undo`` the
  ones to bring back, without reading every summary ever set aside.

On a big table: the constraint is replaced ``NOT VALID`` (catalogue only, a lock held for
milliseconds) and validated afterwards under SHARE UPDATE EXCLUSIVE; the index is built
``CONCURRENTLY``: reads and writes go on. Downgrade: withheld summaries become ``'undo'``,
which no ``/undo`` restores either, so the downgraded code keeps them set aside.

Revision ID: 012
Revises: 011
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "012"
down_revision = "011"
branch_labels = None
depends_on = None

# The check of the reasons, by direction: (the constraint it replaces, its own name, the reasons).
# Revision 009 left it the name PostgreSQL chose, summaries_check; it gets one that says what.
REASONS = {
    "upgrade": ("summaries_check", "summaries_deleted_reason_check", "('clear', 'undo', 'replaced', 'withheld')"),
    "downgrade": ("summaries_deleted_reason_check", "summaries_check", "('clear', 'undo', 'replaced')"),
}


def _reasons(direction: str) -> str:
    """Replace the check of the reasons (catalogue only: NOT VALID); the new constraint's name."""
    old, new, reasons = REASONS[direction]  # constants above, never a value from outside
    op.execute(f"""
    ALTER TABLE summaries
        DROP CONSTRAINT {old},
        ADD CONSTRAINT {new} CHECK (
            deleted_reason IS NULL OR (deleted_at IS NOT NULL AND deleted_reason IN {reasons})
        ) NOT VALID
    """)
    return new


def upgrade() -> None:
    constraint = _reasons("upgrade")
    with op.get_context().autocommit_block():
        op.execute(f"ALTER TABLE summaries VALIDATE CONSTRAINT {constraint}")
        # A concurrent build cancelled half-way leaves an INVALID index, which IF NOT EXISTS
        # would accept: drop it to build it again.
        invalid = op.get_bind().execute(
            sa.text(
                "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE c.relname = 'summaries_cleared_idx' AND NOT i.indisvalid"
            )
        )
        if invalid.first() is not None:
            op.execute("DROP INDEX CONCURRENTLY summaries_cleared_idx")
        op.execute("SET statement_timeout = 0")
        op.execute("""
        CREATE INDEX CONCURRENTLY IF NOT EXISTS summaries_cleared_idx
            ON summaries (chat_id, deleted_at) WHERE deleted_reason = 'clear'
        """)
        op.execute("SET statement_timeout = '5min'")  # alembic/env.py's bound, for what follows


def downgrade() -> None:
    op.execute("DROP INDEX summaries_cleared_idx")
    op.execute("UPDATE summaries SET deleted_reason = 'undo' WHERE deleted_reason = 'withheld'")
    constraint = _reasons("downgrade")
    op.execute(f"ALTER TABLE summaries VALIDATE CONSTRAINT {constraint}")

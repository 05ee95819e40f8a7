"""The text a question replies to: ``quoted``, stored with the question.

A user who replies to a message (the bot's answer, an older message of theirs, another user's in
a group) asks about it; the turn's context shows that text before the question. It came only
with the update, so a turn that did not start from the update lost it: a question answered by
another process (several processes, ADR-07), a turn recovered after a restart, ``/retry`` and an
edited question. NULL: the question replies to nothing. A nullable column with no default: only
the catalogue changes (the check reads the table once).

Revision ID: 011
Revises: 010
Create Date: 2026-11-24
"""

from alembic import op

revision = "011"
down_revision = "010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    ALTER TABLE messages
        ADD COLUMN quoted text,
        ADD CONSTRAINT messages_quoted_check CHECK (quoted IS NULL OR role = 'user')
    """)


def downgrade() -> None:
    op.execute("ALTER TABLE messages DROP COLUMN quoted")

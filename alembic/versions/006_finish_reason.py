"""Answers cut short: ``finish_reason`` says an answer is incomplete, and why.

- ``stopped``: the user stopped it (the draft's stop button, ``/cancel``); what was written so
  far is the answer.
- ``failed``: the LLM failed in the middle; the user saw the partial text and an apology.
NULL: the answer is complete. The next turn's context marks an incomplete answer, so the model
knows it was cut short. A nullable column with no default: only the catalogue changes.

Revision ID: 006
Revises: 005
Create Date: 2026-11-24
"""

from alembic import op

revision = "006"
down_revision = "005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    ALTER TABLE messages
        ADD COLUMN finish_reason text,
        ADD CONSTRAINT messages_finish_reason_check
            CHECK (finish_reason IS NULL OR (role = 'assistant' AND finish_reason IN ('stopped', 'failed')))
    """)


def downgrade() -> None:
    op.execute("ALTER TABLE messages DROP COLUMN finish_reason")

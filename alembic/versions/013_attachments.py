"""Photos, voice messages and files in the conversation: what a message was sent with.

- ``messages.attachments``: the attachments a user message came with, as a JSON array of
  objects (``kind``, Telegram's ``file_id`` and ``file_unique_id``, ``mime_type``, ``file_size``,
  ``width``/``height`` or ``duration``, ``file_name``); NULL for a text message. What the
  conversation needs to rebuild a later context: an image is fetched again from Telegram by
  its ``file_id`` while its message is in the window. The text a voice message or a document
  was read as (its transcript, the document's text) is the message's ``content``, so the
  context, ``/search`` and ``/export`` read it as any text. Media bytes are never stored
  (ADR-13): Telegram keeps them, and a row stays the size of its text.

The metadata rides the message's row rather than a table of its own: it is read only with its
message (a turn's context read, ``/export``), never searched or joined alone, so a column costs
no join on the read every turn makes, and a text message pays one NULL. The check keeps it an
array of objects with a known ``kind``.

On a big table: a nullable column without a default and a ``NOT VALID`` check are catalogue
changes (a lock held for milliseconds); validating scans under SHARE UPDATE EXCLUSIVE, with
reads and writes going on. Downgrade drops the column: the attachments' metadata is lost, the
messages' text stays.

Revision ID: 013
Revises: 012
Create Date: 2026-12-02
"""

from alembic import op

revision = "013"
down_revision = "012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    ALTER TABLE messages
        ADD COLUMN attachments jsonb,
        ADD CONSTRAINT messages_attachments_check CHECK (
            attachments IS NULL OR (
                jsonb_typeof(attachments) = 'array' AND jsonb_array_length(attachments) BETWEEN 1 AND 10
                AND NOT jsonb_path_exists(
                    attachments, '$[*] ? (!(@.kind like_regex "^(photo|voice|audio|video_note|document)$"))'
                )
            )
        ) NOT VALID
    """)
    op.execute("ALTER TABLE messages VALIDATE CONSTRAINT messages_attachments_check")


def downgrade() -> None:
    op.execute("ALTER TABLE messages DROP COLUMN attachments")

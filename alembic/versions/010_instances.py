"""Several bot processes on one database: update claims and per-chat leases.

- ``update_claims``: the ``update_id`` of each non-idempotent update (a command, a button, an
  edit) one process has taken, so an update Telegram (or a load balancer) delivers twice runs
  once. Text messages need no claim: ``messages_telegram_message_key`` already stores a message
  once. Purged after a day with the other counters (Telegram gives up redelivering long before).
  Logged (unlike ``rate_limits``): a claim lost in a server crash would let a redelivered
  /retry run twice, and commands are few.
- ``chat_leases``: which process answers a chat's questions now (``holder``, NULL when none),
  until ``expires_at`` unless renewed; ``version`` grows with every question stored in the chat,
  so a holder's hand-over conditional on the version it read cannot miss one; ``done_through``:
  the chat's turn key (``coalesce(reply_to_id, id)`` of ``messages``) up to which the holder
  has settled its questions, where the next holder's search for open questions starts.
  ``chat_leases_expired_idx`` finds held leases by expiry for the sweeper. One row per chat
  that ever had a question since this revision; released rows are kept (holder NULL).

Revision ID: 010
Revises: 009
Create Date: 2026-11-24
"""

from alembic import op

revision = "010"
down_revision = "009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE update_claims (
        update_id  bigint PRIMARY KEY,
        claimed_at timestamptz NOT NULL DEFAULT now()
    )
    """)
    op.execute("""
    CREATE TABLE chat_leases (
        chat_id      bigint PRIMARY KEY REFERENCES chats (id) ON DELETE CASCADE,
        holder       text CHECK (holder <> ''),
        version      bigint NOT NULL DEFAULT 1,
        expires_at   timestamptz NOT NULL,
        done_through bigint NOT NULL DEFAULT 0
    )
    """)
    op.execute("CREATE INDEX chat_leases_expired_idx ON chat_leases (expires_at) WHERE holder IS NOT NULL")


def downgrade() -> None:
    op.execute("DROP TABLE chat_leases")
    op.execute("DROP TABLE update_claims")

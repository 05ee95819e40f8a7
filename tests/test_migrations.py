"""The Alembic revisions apply, roll back and re-apply; the schema has what DESIGN.md asks."""

from __future__ import annotations

import psycopg
import pytest
from alembic import command

from tests.conftest import alembic_config, create_database

ALL_TABLES = [
    "alembic_version",
    "chat_leases",
    "chat_settings",
    "chats",
    "memories",
    "messages",
    "rate_limits",
    "summaries",
    "token_usage",
    "update_claims",
    "users",
]
TABLES = "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1"


def tables(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [row[0] for row in conn.execute(TABLES)]


def indexes(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [row[0] for row in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'messages'")]


def columns_of(url: str, table: str) -> list[str]:
    with psycopg.connect(url) as conn:
        query = "SELECT column_name FROM information_schema.columns WHERE table_name = %s"
        return [row[0] for row in conn.execute(query, (table,))]


def test_upgrade_downgrade_upgrade_round_trip(admin_url: str) -> None:
    url = create_database(admin_url, "llmbot_migrations")
    cfg = alembic_config(url)
    command.upgrade(cfg, "head")
    assert tables(url) == ALL_TABLES
    assert {"messages_deleted_idx", "messages_chat_turn_idx"} <= set(indexes(url))
    command.downgrade(cfg, "013")
    assert tables(url) == [t for t in ALL_TABLES if t != "memories"]
    assert "memories_in_groups" not in columns_of(url, "users")
    command.upgrade(cfg, "head")
    assert "memories_in_groups" in columns_of(url, "users")
    command.downgrade(cfg, "009")
    assert tables(url) == [t for t in ALL_TABLES if t not in ("chat_leases", "update_claims", "memories")]
    command.upgrade(cfg, "head")
    command.downgrade(cfg, "008")
    assert tables(url) == ["alembic_version", "chat_settings", "chats", "messages", "rate_limits", "users"]
    assert "messages_chat_turn_idx" not in indexes(url)
    command.upgrade(cfg, "head")
    command.downgrade(cfg, "007")
    assert tables(url) == ["alembic_version", "chats", "messages", "rate_limits", "users"]
    command.upgrade(cfg, "head")
    command.downgrade(cfg, "006")
    assert "messages_search_idx" not in indexes(url) and "messages_reply_to_key" in indexes(url)
    command.upgrade(cfg, "head")
    assert {"messages_search_idx", "messages_live_answer_key", "messages_dialog_deleted_idx"} <= set(indexes(url))
    command.downgrade(cfg, "004")
    assert "messages_deleted_idx" not in indexes(url) and "messages_turn_idx" in indexes(url)
    command.upgrade(cfg, "head")
    command.downgrade(cfg, "base")
    assert tables(url) == ["alembic_version"]
    command.upgrade(cfg, "head")
    assert tables(url) == ALL_TABLES
    command.downgrade(cfg, "001")
    with psycopg.connect(url) as conn:
        columns = [
            r[0]
            for r in conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'messages'")
        ]
    assert "telegram_message_id" not in columns and "reply_to_id" not in columns
    command.upgrade(cfg, "head")


def test_schema_constraints_and_types(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        types: dict[str, str] = dict(
            conn.execute(
                "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = 'public'"
            ).fetchall()
        )
        generated = conn.execute(
            "SELECT is_generated, generation_expression FROM information_schema.columns"
            " WHERE table_name = 'messages' AND column_name = 'length'"
        ).fetchone()
        index = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'messages_turn_idx'").fetchone()
    for column in (
        "users.created_at",
        "users.deleted_at",
        "chats.created_at",
        "messages.created_at",
        "messages.deleted_at",
        "messages.delivered_at",
        "messages.failed_at",
    ):
        assert types[column] == "timestamp with time zone", column
    for column in (
        "users.id",
        "users.telegram_user_id",
        "chats.telegram_chat_id",
        "messages.id",
        "messages.user_id",
        "messages.chat_id",
        "messages.telegram_thread_id",
    ):
        assert types[column] == "bigint", column
    assert generated == ("ALWAYS", "char_length(content)")
    assert index is not None and "WHERE (deleted_at IS NULL)" in index[0]
    assert "COALESCE(reply_to_id, id)" in index[0]


# Each statement differs from a row the schema accepts by one value, and must be refused by the
# named constraint: one statement per case, so no other statement can be the one that failed.
REFUSED = {
    "messages_role_check": (
        "INSERT INTO messages (user_id, chat_id, role, content) VALUES (%(user)s, %(chat)s, 'robot', 'x')"
    ),
    "messages_reply_role_check": (
        "INSERT INTO messages (user_id, chat_id, role, content, reply_to_id)"
        " VALUES (%(user)s, %(chat)s, 'user', 'x', %(question)s)"
    ),
    "messages_live_answer_key": (
        "INSERT INTO messages (user_id, chat_id, role, content, reply_to_id)"
        " VALUES (%(user)s, %(chat)s, 'assistant', 'a second live answer', %(question)s)"
    ),
    "messages_deleted_reason_check": (
        "INSERT INTO messages (user_id, chat_id, role, content, deleted_reason)"
        " VALUES (%(user)s, %(chat)s, 'user', 'a reason but not deleted', 'undo')"
    ),
    "messages_tokens_check": (
        "INSERT INTO messages (user_id, chat_id, role, content, prompt_tokens)"
        " VALUES (%(user)s, %(chat)s, 'user', 'tokens on a question', 3)"
    ),
    "messages_telegram_message_key": (
        "INSERT INTO messages (user_id, chat_id, role, content, telegram_message_id)"
        " VALUES (%(user)s, %(chat)s, 'user', 'the same Telegram message', 1)"
    ),
    "messages_user_id_fkey": (
        "INSERT INTO messages (user_id, chat_id, role, content) VALUES (-1, %(chat)s, 'user', 'x')"
    ),
    "memories_content_check": "INSERT INTO memories (user_id, content) VALUES (%(user)s, repeat('я', 501))",
    "memories_user_id_fkey": "INSERT INTO memories (user_id, content) VALUES (-1, 'x')",
    "users_telegram_user_id_key": "INSERT INTO users (telegram_user_id) VALUES (7)",
    "chats_telegram_chat_id_key": "INSERT INTO chats (telegram_chat_id) VALUES (-7)",
}


@pytest.mark.parametrize("constraint", REFUSED)
def test_the_schema_refuses_what_breaks_a_constraint(database_url: str, constraint: str) -> None:
    with psycopg.connect(database_url) as conn:  # one transaction, rolled back at the end
        user = conn.execute("INSERT INTO users (telegram_user_id) VALUES (7) RETURNING id").fetchone()
        chat = conn.execute("INSERT INTO chats (telegram_chat_id) VALUES (-7) RETURNING id").fetchone()  # a group
        assert user is not None and chat is not None
        ids = {"user": user[0], "chat": chat[0]}
        question = conn.execute(
            "INSERT INTO messages (user_id, chat_id, role, content, telegram_message_id)"
            " VALUES (%(user)s, %(chat)s, 'user', 'q', 1) RETURNING id",
            ids,
        ).fetchone()
        assert question is not None
        ids["question"] = question[0]
        conn.execute(
            "INSERT INTO messages (user_id, chat_id, role, content, reply_to_id)"
            " VALUES (%(user)s, %(chat)s, 'assistant', 'a', %(question)s)",
            ids,
        )
        with pytest.raises(psycopg.errors.IntegrityError) as refused:
            conn.execute(REFUSED[constraint], ids)
        assert refused.value.diag.constraint_name == constraint
        conn.rollback()


def test_007_rebuilds_an_index_a_cancelled_concurrent_build_left_invalid(admin_url: str) -> None:
    url = create_database(admin_url, "llmbot_invalid_index")
    cfg = alembic_config(url)
    command.upgrade(cfg, "006")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO users (telegram_user_id) VALUES (1)")
        conn.execute("INSERT INTO chats (telegram_chat_id) VALUES (1)")
        conn.execute(
            "INSERT INTO messages (user_id, chat_id, role, content) VALUES (1, 1, 'user', 'a'), (1, 1, 'user', 'b')"
        )
        # a failed concurrent build leaves its index behind, INVALID, under the name 007 uses
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("CREATE UNIQUE INDEX CONCURRENTLY messages_search_idx ON messages (user_id)")
    command.upgrade(cfg, "head")
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i"
            " JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'messages_search_idx'"
        ).fetchone()
    assert row is not None and row[0] and "USING gin (user_id, chat_id, search_vector)" in row[1]


def test_012_a_withheld_summary_stays_set_aside_after_a_downgrade(admin_url: str) -> None:
    url = create_database(admin_url, "llmbot_withheld")
    cfg = alembic_config(url)
    command.upgrade(cfg, "head")
    summary = (
        "INSERT INTO summaries (chat_id, through_id, covered, content, tokens, deleted_at, deleted_reason)"
        " VALUES (1, 1, 1, 's', 5, now(), %s)"
    )
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO chats (telegram_chat_id) VALUES (-1)")
        conn.execute(summary, ("withheld",))
    command.downgrade(cfg, "011")
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT deleted_reason FROM summaries").fetchall() == [("undo",)]  # not restorable
        with pytest.raises(psycopg.errors.CheckViolation) as refused:
            conn.execute(summary, ("withheld",))
        assert refused.value.diag.constraint_name == "summaries_check"
    command.upgrade(cfg, "head")
    with psycopg.connect(url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CheckViolation) as refused:
            conn.execute(summary, ("forgotten",))
        assert refused.value.diag.constraint_name == "summaries_deleted_reason_check"
        assert "summaries_cleared_idx" in [
            row[0] for row in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'summaries'")
        ]

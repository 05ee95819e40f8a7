"""services.context over the real database, and its history budget."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services import context, database
from services.context import StorageUnavailable, fit_to_budget
from services.database import Pool, StoredMessage


def message(content: str, role: database.Role = "user") -> StoredMessage:
    return StoredMessage(id=0, role=role, content=content, length=len(content), created_at=datetime.now(UTC))


def test_budget_keeps_the_newest_messages_that_fit() -> None:
    history = [message("aaaa"), message("bbbb", "assistant"), message("cc")]
    assert fit_to_budget(history, 100) == [
        {"role": "user", "content": "aaaa"},
        {"role": "assistant", "content": "bbbb"},
        {"role": "user", "content": "cc"},
    ]
    assert fit_to_budget(history, 6) == [{"role": "assistant", "content": "bbbb"}, {"role": "user", "content": "cc"}]
    assert fit_to_budget(history, 1) == [{"role": "user", "content": "c"}]
    assert fit_to_budget([], 10) == []


async def turn(
    pool: Pool, text: str, *, user: int = 1, chat: int = 1, message_id: int | None = None, limit: int = 20
) -> context.Turn | None:
    return await context.add_user_message(
        pool,
        telegram_user_id=user,
        first_name="Ann",
        telegram_chat_id=chat,
        telegram_message_id=message_id,
        text=text,
        history_limit=limit,
        max_input_chars=10_000,
    )


async def test_turns_build_the_context_in_order(pool: Pool) -> None:
    first = await turn(pool, "one", message_id=1)
    assert first is not None and first.context == [{"role": "user", "content": "one"}]
    assert await context.add_answer(pool, question_id=first.question_id, text="1")
    assert not await context.add_answer(pool, question_id=first.question_id, text="again")
    second = await turn(pool, "two", message_id=2)
    assert second is not None
    assert [m["content"] for m in second.context] == ["one", "1", "two"]
    assert await turn(pool, "two", message_id=2) is None  # redelivered
    got = await context.get_context(pool, telegram_user_id=1, telegram_chat_id=1, history_limit=2, max_input_chars=100)
    assert [m["content"] for m in got] == ["1", "two"]


async def test_register_keeps_the_first_name_current(pool: Pool) -> None:
    await context.register(pool, telegram_user_id=5, first_name="Bob", telegram_chat_id=5)
    await context.register(pool, telegram_user_id=5, first_name="Robert", telegram_chat_id=-5)
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT first_name FROM users WHERE telegram_user_id = 5")
        assert await cur.fetchall() == [("Robert",)]


async def test_clear_and_pending(pool: Pool) -> None:
    await turn(pool, "q1", message_id=1)
    assert [q.telegram_message_id for q in await context.pending_questions(pool, max_age_s=60)] == [1]
    assert await context.clear_context(pool, telegram_user_id=1, telegram_chat_id=1) == 1
    assert await context.pending_questions(pool, max_age_s=60) == []  # cleared questions are not answered


async def test_a_closed_pool_raises_storage_unavailable(database_url: str) -> None:
    pool = await database.init_db(database_url, size=1)
    await database.close_db(pool)
    with pytest.raises(StorageUnavailable):
        await context.clear_context(pool, telegram_user_id=1, telegram_chat_id=1)

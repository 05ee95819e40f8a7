"""services.context over the real database: the context a turn reads."""

from __future__ import annotations

import pytest

from services import context, database, records
from services.context import RateLimited
from services.database import Pool
from services.failures import StorageUnavailable
from services.llm.budget import ContextBudget
from services.records import Question


async def ask(pool: Pool, text: str, *, message_id: int, rate_limit: int = 0) -> int:
    added = await context.add_question(
        pool,
        telegram_user_id=1,
        first_name="Ann",
        telegram_chat_id=1,
        telegram_message_id=message_id,
        telegram_thread_id=None,
        content=text,
        rate_limit=rate_limit,
    )
    return added.id


async def no_list() -> dict[str, int]:
    return {}


# 4096 tokens, 3584 kept for the answer: a prompt's room is 512 estimated tokens
BUDGET = ContextBudget(context_tokens=4096, max_tokens=3584, models=["m"], model_list=no_list)


async def contents(turn: records.TurnStart | None, *, history_limit: int = 20, system_prompt: str = "") -> list[str]:
    assert turn is not None
    window = await BUDGET.choose(turn.dialog, model="m", system_prompt=system_prompt, history_limit=history_limit)
    return [m["content"] for m in window.messages]


async def test_a_turn_reads_its_context_within_budget(pool: Pool) -> None:
    first = await ask(pool, "one", message_id=1)
    assert await context.add_answer(pool, question_id=first, content="1") is not None
    second = await ask(pool, "two", message_id=2)
    turn = await context.fetch_turn_start(pool, question_id=second, history_limit=20, budget=1000)
    assert turn is not None and turn.answer is None
    assert await contents(turn) == ["one", "1", "two"]
    # each message takes 5 tokens; a 500-token system prompt leaves room for "two" and "1" but
    # not "one", and "1" goes too: without "one" it answers nothing the LLM can see
    assert await contents(turn, system_prompt="x" * 4 * 496) == ["two"]
    bounded = await context.fetch_turn_start(pool, question_id=second, history_limit=20, budget=6)
    assert bounded is not None and [m.content for m in bounded.dialog.history] == ["two"]  # the read stops
    assert bounded.dialog.read == 3  # ...but counts what it found


async def test_a_history_window_cut_mid_turn_starts_at_a_question(pool: Pool) -> None:
    for n in (1, 2):
        question = await ask(pool, f"q{n}", message_id=n)
        assert await context.add_answer(pool, question_id=question, content=f"a{n}") is not None
    third = await ask(pool, "q3", message_id=3)
    # the last 4 messages are a1, q2, a2, q3: the window opens on an answer
    turn = await context.fetch_turn_start(pool, question_id=third, history_limit=4, budget=1000)
    assert await contents(turn, history_limit=4) == ["q2", "a2", "q3"]


async def test_the_memory_path_starts_at_a_question_too() -> None:
    from services.fallback.memory import RecentHistory
    from services.fallback.storage import Storage

    storage = Storage(None, history=RecentHistory(max_chars=10_000, per_dialog=10), spool=None)
    for n in (1, 2, 3):
        added = await storage.add_question(
            user_id=1, first_name="Ann", chat_id=1, message_id=n, thread_id=None, content=f"q{n}", rate_limit=0
        )
        if n < 3:
            assert await storage.add_answer(added, f"a{n}") is not None
    start = await storage.start_turn(Question(1, 1, 3), history_limit=4, budget=1000)
    assert start is not None and not start.from_database
    window = await BUDGET.choose(start.dialog, model="m", system_prompt="", history_limit=4)
    assert [m["content"] for m in window.messages] == ["q2", "a2", "q3"]


async def test_over_the_rate_limit_is_refused_but_a_redelivery_is_not(pool: Pool) -> None:
    await ask(pool, "one", message_id=1, rate_limit=1)
    with pytest.raises(RateLimited):
        await ask(pool, "two", message_id=2, rate_limit=1)
    await ask(pool, "two", message_id=2, rate_limit=1)  # stored before: not refused twice


async def test_register_keeps_the_first_name_current(pool: Pool) -> None:
    await context.upsert_user_and_chat(pool, telegram_user_id=5, first_name="Bob", telegram_chat_id=5)
    await context.upsert_user_and_chat(pool, telegram_user_id=5, first_name="Robert", telegram_chat_id=-5)
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT first_name FROM users WHERE telegram_user_id = 5")
        assert await cur.fetchall() == [("Robert",)]


async def test_clear_and_unfinished(pool: Pool) -> None:
    await ask(pool, "q1", message_id=1)
    assert [q.telegram_message_id for q in await context.fetch_unfinished_turns(pool, max_age_s=60)] == [1]
    assert (await context.soft_delete_messages(pool, telegram_user_id=1, telegram_chat_id=1)).cleared == 1
    assert await context.fetch_unfinished_turns(pool, max_age_s=60) == []  # cleared questions are not answered


async def test_only_one_holder_of_an_exclusive_lock(pool: Pool) -> None:
    async with context.exclusive(pool, "test-lock") as first, context.exclusive(pool, "test-lock") as second:
        assert first and not second
    async with context.exclusive(pool, "test-lock") as again:
        assert again


async def test_a_closed_pool_raises_storage_unavailable(database_url: str) -> None:
    pool = await database.init_db(database_url, size=1)
    await database.close_db(pool)
    with pytest.raises(StorageUnavailable):
        await context.soft_delete_messages(pool, telegram_user_id=1, telegram_chat_id=1)

"""Defects of issue 15, through the real bot: each test failed before its fix, or proves a rule
the design already keeps."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest

from bench.standins import LLMStandIn, TelegramStandIn
from handlers.commands import HELP
from services.database import Pool
from services.ops.local_postgres import LocalPostgres
from services.turn.turn import LLM_APOLOGY
from tests.harness import bot_command, fetch_after_outage, outage, running_bot, stored
from tests.test_outage import back_to_the_database, spooled_lines

GROUP = -100500
UNKNOWN = "I don't know that command. /help lists the ones I do."


# -- 2. unknown commands --------------------------------------------------------------------


async def test_a_command_for_another_bot_is_ignored_entirely(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        for text in ("/weather@other_bot Paris", "/help@other_bot", "/start@other_bot"):
            telegram.send(text, chat_id=GROUP, entities=bot_command(text))
        telegram.send("/help", chat_id=GROUP, entities=bot_command("/help"))  # the marker: handled after the others
        await telegram.wait_for_messages(GROUP, 1)
    assert telegram.messages_to(GROUP) == [HELP]
    assert llm.requests == [] and await stored(pool) == []
    async with pool.connection() as conn:
        assert await (await conn.execute("SELECT count(*) FROM users")).fetchall() == [(0,)]


async def test_an_unknown_command_for_this_bot_is_explained(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        telegram.send("/frobnicate", entities=bot_command("/frobnicate"))
        assert await telegram.wait_for_messages(1, 1) == [UNKNOWN]
        for text in ("/frobnicate@test_llm_bot now", "/FROBNICATE@Test_LLM_Bot"):
            telegram.send(text, chat_id=GROUP, entities=bot_command(text))
        assert await telegram.wait_for_messages(GROUP, 2) == [UNKNOWN, UNKNOWN]
        telegram.send("/help@test_llm_bot", chat_id=GROUP, entities=bot_command("/help@test_llm_bot"))
        assert (await telegram.wait_for_messages(GROUP, 3))[2] == HELP
    assert llm.requests == [] and await stored(pool) == []


async def test_text_that_merely_starts_with_a_slash_is_answered(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    pasted = "/usr/bin is where the binaries live, right?"  # Telegram marks no command here
    async with running_bot(env, telegram):
        telegram.send(pasted)
        assert await telegram.wait_for_messages(1, 1) == [f"echo: {pasted}"]
        telegram.send("see /help", entities=[{"type": "bot_command", "offset": 4, "length": 5}])
        assert (await telegram.wait_for_messages(1, 2))[1] == "echo: see /help"
    assert [c[-1]["content"] for c in llm.conversations] == [pasted, "see /help"]
    assert [content for _, content in await stored(pool)] == [
        pasted, f"echo: {pasted}", "see /help", "echo: see /help",
    ]  # fmt: skip


# -- 3. a question that got an apology stays unanswered after a restart ----------------------


async def test_a_question_the_user_got_an_apology_for_is_not_answered_after_a_restart(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    llm.status = 500
    async with running_bot(env, telegram):
        telegram.send("this one fails")
        assert await telegram.wait_for_messages(1, 1) == [LLM_APOLOGY]
    asked_before_restart = len(llm.requests)
    llm.status = 200
    async with running_bot(env, telegram):
        # the marker: a recovered turn of this chat would be queued ahead of it, and answered first
        telegram.send("and now?")
        await telegram.wait_for_messages(1, 2)
    assert telegram.messages_to(1) == [LLM_APOLOGY, "echo: and now?"]
    assert [c[-1]["content"] for c in llm.conversations[asked_before_restart:]] == ["and now?"]
    failed = await fetch_after_outage(pool, "SELECT content FROM messages WHERE failed_at IS NOT NULL")
    assert failed == [("this one fails",)]


# -- 4. an answer the database could not store is still sent once across a restart -----------


@pytest.mark.parametrize("restart", ["after-the-write-back", "stopped-during-the-outage"])
async def test_an_answer_made_during_an_outage_is_asked_and_sent_once_across_a_restart(
    restart: str, env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool, cluster: LocalPostgres
) -> None:
    llm.delay = 3  # the question is stored; PostgreSQL goes away while the LLM thinks
    async with AsyncExitStack() as first:
        dp = await first.enter_async_context(running_bot(env, telegram))
        telegram.send("question")
        await llm.started.wait()
        with outage(cluster):
            assert await telegram.wait_for_messages(1, 1, timeout=30) == ["echo: question"]
            store = dp["dialog_store"]
            await telegram.wait_for(lambda: store.spooled >= 2)  # the answer and its delivery (recorded after the send)
            if restart == "stopped-during-the-outage":
                await first.aclose()
                assert spooled_lines(env) >= 2  # kept in the file for the next start
        if restart == "after-the-write-back":
            await back_to_the_database(dp, telegram)
    llm.delay = 0
    async with running_bot(env, telegram) as dp:
        telegram.send("next")  # the marker: a recovered turn of this chat would be answered first
        await telegram.wait_for_messages(1, 2, timeout=30)
        await back_to_the_database(dp, telegram)
    assert telegram.messages_to(1) == ["echo: question", "echo: next"]
    assert [c[-1]["content"] for c in llm.conversations] == ["question", "next"]
    assert await fetch_after_outage(pool, "SELECT content, delivered_at IS NOT NULL FROM messages ORDER BY id") == [
        ("question", False), ("echo: question", True), ("next", False), ("echo: next", True),
    ]  # fmt: skip
    assert spooled_lines(env) == 0

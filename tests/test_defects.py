"""Defects of issue 15, through the real bot: each test failed before its fix, or proves a rule
the design already keeps."""

from __future__ import annotations

from typing import Any

from bench.standins import LLMStandIn, TelegramStandIn
from handlers.commands import HELP
from services.database import Pool
from tests.harness import running_bot

GROUP = -100500
UNKNOWN = "I don't know that command. /help lists the ones I do."


def command(text: str) -> list[dict[str, Any]]:
    """The entity Telegram puts on a message that starts with a command (``/cmd`` or ``/cmd@bot``)."""
    return [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]


async def stored(pool: Pool) -> list[tuple[str, str]]:
    async with pool.connection() as conn:
        return await (await conn.execute("SELECT role, content FROM messages ORDER BY id")).fetchall()


# -- 2. unknown commands --------------------------------------------------------------------


async def test_a_command_for_another_bot_is_ignored_entirely(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        for text in ("/weather@other_bot Paris", "/help@other_bot", "/start@other_bot"):
            telegram.send(text, chat_id=GROUP, entities=command(text))
        telegram.send("/help", chat_id=GROUP, entities=command("/help"))  # the marker: handled after the others
        await telegram.wait_for_messages(GROUP, 1)
    assert telegram.messages_to(GROUP) == [HELP]
    assert llm.requests == [] and await stored(pool) == []
    async with pool.connection() as conn:
        assert await (await conn.execute("SELECT count(*) FROM users")).fetchall() == [(0,)]


async def test_an_unknown_command_for_this_bot_is_explained(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        telegram.send("/frobnicate", entities=command("/frobnicate"))
        assert await telegram.wait_for_messages(1, 1) == [UNKNOWN]
        for text in ("/frobnicate@test_llm_bot now", "/FROBNICATE@Test_LLM_Bot"):
            telegram.send(text, chat_id=GROUP, entities=command(text))
        assert await telegram.wait_for_messages(GROUP, 2) == [UNKNOWN, UNKNOWN]
        telegram.send("/help@test_llm_bot", chat_id=GROUP, entities=command("/help@test_llm_bot"))
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

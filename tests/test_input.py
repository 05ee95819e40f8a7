"""Bad, odd and unwelcome input through the real bot: each has a defined outcome."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bench.standins import LLMStandIn, TelegramStandIn
from handlers.middlewares import NOT_ALLOWED
from services.database import Pool
from tests.harness import running_bot, stored


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("'; DROP TABLE messages; --", "'; DROP TABLE messages; --"),
        ("שלום עולם, مرحبا 👋🏽", "שלום עולם, مرحبا 👋🏽"),
        ("a\x00b", "a\ufffdb"),  # PostgreSQL text cannot hold NUL: replaced, the rest kept
        ("x" * 4096, "x" * 4096),
        ("%s %(x)s $1 \\", "%s %(x)s $1 \\"),
        ("lone \ud800 surrogate", "lone \ufffd surrogate"),
    ],
)
async def test_odd_text_is_stored_and_answered(
    text: str, kept: str, env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        telegram.send(text)
        await telegram.wait_for_messages(1, 1)
    assert (await stored(pool))[0] == ("user", kept)
    assert llm.conversations[0][-1]["content"] == kept


async def test_answers_with_markup_are_rendered_as_entities_never_parse_mode(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    answer = "**bold** <b>unclosed _italic [link](http://x) `code"
    llm.reply = lambda messages: answer
    async with running_bot(env, telegram):
        telegram.send("format something")
        assert await telegram.wait_for_messages(1, 1) == ["bold <b>unclosed _italic link `code"]
    [sent] = [s for s in telegram.calls("sendMessage") if s.status == 200]
    assert "parse_mode" not in sent.params
    assert [(e["type"], e["offset"], e["length"]) for e in sent.params["entities"]] == [
        ("bold", 0, 4),
        ("text_link", 25, 4),
    ]


async def test_whitespace_only_text_is_not_sent_to_the_llm(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        telegram.send(" \n\t ")
        assert "Send me some text" in (await telegram.wait_for_messages(1, 1))[0]
    assert llm.requests == [] and await stored(pool) == []


async def test_unknown_command_is_explained(env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn) -> None:
    async with running_bot(env, telegram):
        telegram.send("/frobnicate", entities=[{"type": "bot_command", "offset": 0, "length": 11}])
        assert "don't know that command" in (await telegram.wait_for_messages(1, 1))[0]
    assert llm.requests == []


@pytest.mark.parametrize(
    "update",
    [
        pytest.param(
            lambda t: t.push("edited_message", {**t.message("edited", message_id=5), "edit_date": 1}), id="edited"
        ),
        pytest.param(
            lambda t: t.push(
                "channel_post",
                {"message_id": 1, "date": 1, "chat": {"id": -100777, "type": "channel", "title": "C"}, "text": "post"},
            ),
            id="channel-post",
        ),
        pytest.param(lambda t: t.send("hi from a bot", user_id=99, is_bot=True), id="other-bot"),
        pytest.param(
            lambda t: t.send(
                "anonymous admin", chat_id=-100500, sender_chat={"id": -100500, "type": "supergroup", "title": "G"}
            ),
            id="sender-chat",
        ),
    ],
)
async def test_updates_not_from_a_person_writing_anew_are_ignored(
    update: Any, env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        update(telegram)
        telegram.send("/help", user_id=7)  # a marker: once it is answered, the first update was handled
        await telegram.wait_for_messages(7, 1)
        await asyncio.sleep(0.2)
    assert [s.chat_id for s in telegram.calls("sendMessage")] == [7]
    assert llm.requests == [] and await stored(pool) == []


async def test_whitelist_refuses_others_and_stores_nothing_for_them(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    env["ALLOWED_USER_IDS"] = "1"
    async with running_bot(env, telegram):
        telegram.send("let me in", user_id=2)
        assert await telegram.wait_for_messages(2, 1) == [NOT_ALLOWED]
        telegram.send("/start", user_id=2)
        await telegram.wait_for_messages(2, 2)
        telegram.send("hello", user_id=1)
        await telegram.wait_for_messages(1, 1)
    assert [c[-1]["content"] for c in llm.conversations] == ["hello"]
    async with pool.connection() as conn:
        assert await (await conn.execute("SELECT telegram_user_id FROM users")).fetchall() == [(1,)]

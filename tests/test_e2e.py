"""The whole bot over real HTTP: polling a Telegram stand-in, asking an LLM stand-in, storing in
the real test PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bench.standins import LLMStandIn, TelegramStandIn
from handlers.unsupported import NOT_HEARD, TEXT_ONLY
from services.database import Pool
from services.turn.turn import LLM_APOLOGY
from tests.harness import BotProcess, fetch, running_bot, stored


def contents(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


async def test_conversation_sends_earlier_turns_to_the_llm(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        assert [c["command"] for c in telegram.calls("setMyCommands")[0].params["commands"]] == [
            "start",
            "help",
            "clear",
            "cancel",
            "retry",
            "undo",
            "search",
            "export",
            "stats",
            "context",
            "remember",
            "memory",
            "model",
            "prompt",
            "temperature",
        ]
        telegram.send("/start")
        assert "/clear" in (await telegram.wait_for_messages(1, 1))[0]
        telegram.send("My name is Ann.")
        await telegram.wait_for_messages(1, 2)
        telegram.send("What is my name?")
        replies = await telegram.wait_for_messages(1, 3)
    assert replies[1:] == ["echo: My name is Ann.", "echo: What is my name?"]
    assert contents(llm.conversations[-1]) == [
        ("system", "You are a test."),
        ("user", "My name is Ann."),
        ("assistant", "echo: My name is Ann."),
        ("user", "What is my name?"),
    ]
    assert llm.requests[-1]["model"] == "stand-in"
    assert any(c.params["action"] == "typing" for c in telegram.calls("sendChatAction"))
    assert await stored(pool) == [
        ("user", "My name is Ann."),
        ("assistant", "echo: My name is Ann."),
        ("user", "What is my name?"),
        ("assistant", "echo: What is my name?"),
    ]
    assert await fetch(pool, "SELECT first_name FROM users") == [("Ann",)]


async def test_help_lists_the_commands(env: dict[str, str], telegram: TelegramStandIn) -> None:
    async with running_bot(env, telegram):
        telegram.send("/help")
        [reply] = await telegram.wait_for_messages(1, 1)
    assert "/start" in reply and "/help" in reply and "/clear" in reply


async def test_restart_of_the_bot_process_keeps_the_context(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    first = BotProcess(env, telegram)
    await first.start()
    telegram.send("Remember: the code word is PELICAN.")
    await telegram.wait_for_messages(1, 1)
    assert await first.stop() == 0, first.output()

    second = BotProcess(env, telegram)
    await second.start()
    telegram.send("What is the code word?")
    await telegram.wait_for_messages(1, 2)
    assert await second.stop() == 0, second.output()
    assert contents(llm.conversations[-1])[1:] == [
        ("user", "Remember: the code word is PELICAN."),
        ("assistant", "echo: Remember: the code word is PELICAN."),
        ("user", "What is the code word?"),
    ]


async def test_clear_soft_deletes_and_the_next_turn_starts_afresh(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        telegram.send("old question")
        await telegram.wait_for_messages(1, 1)
        telegram.send("/clear")
        replies = await telegram.wait_for_messages(1, 2)
        assert "2" in replies[1]
        telegram.send("/clear")
        assert "nothing" in (await telegram.wait_for_messages(1, 3))[2]
        telegram.send("new question")
        await telegram.wait_for_messages(1, 4)
    assert contents(llm.conversations[-1])[1:] == [("user", "new question")]
    rows = await fetch(pool, "SELECT content, deleted_at IS NOT NULL FROM messages ORDER BY id")
    assert rows == [
        ("old question", True),
        ("echo: old question", True),
        ("new question", False),
        ("echo: new question", False),
    ]


async def test_two_users_in_two_chats_stay_isolated(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    group = -100500
    async with running_bot(env, telegram):
        for user in (1, 2):
            telegram.send(f"private {user}", user_id=user)
            telegram.send(f"group {user}", user_id=user, chat_id=group)
        await telegram.wait_for(lambda: len(llm.requests) == 4 and len(telegram.calls("sendMessage")) == 4)
        for user in (1, 2):
            telegram.send(f"again private {user}", user_id=user)
            telegram.send(f"again group {user}", user_id=user, chat_id=group)
        await telegram.wait_for(lambda: len(telegram.calls("sendMessage")) == 8)
    by_last = {c[-1]["content"]: [m["content"] for m in c[1:]] for c in llm.conversations}
    for user in (1, 2):
        assert by_last[f"again private {user}"] == [f"private {user}", f"echo: private {user}", f"again private {user}"]
        assert by_last[f"again group {user}"] == [f"group {user}", f"echo: group {user}", f"again group {user}"]
    # in a group the answer quotes the question, so each user sees which answer is theirs
    group_replies = [s for s in telegram.calls("sendMessage") if s.chat_id == group]
    assert all("reply_parameters" in s.params for s in group_replies)


@pytest.mark.parametrize(
    ("kind", "reply"),
    [
        (
            {
                "sticker": {
                    "file_id": "s",
                    "file_unique_id": "s",
                    "type": "regular",
                    "width": 1,
                    "height": 1,
                    "is_animated": False,
                    "is_video": False,
                }
            },
            TEXT_ONLY,
        ),
        ({"location": {"latitude": 1.0, "longitude": 2.0}}, TEXT_ONLY),
        ({"voice": {"file_id": "v", "file_unique_id": "v", "duration": 1}}, NOT_HEARD),  # no TRANSCRIPTION_MODEL
    ],
)
async def test_what_the_bot_does_not_read_gets_a_polite_reply(
    kind: dict[str, Any], reply: str, env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        telegram.send(**kind)
        assert await telegram.wait_for_messages(1, 1) == [reply]
    assert llm.requests == []
    assert await stored(pool) == []


@pytest.mark.parametrize("failure", ["500", "429", "401", "empty", "timeout"])
async def test_llm_failure_gets_an_apology_and_keeps_the_question(
    failure: str, env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    if failure == "empty":
        llm.reply = lambda messages: "  "
    elif failure == "timeout":
        llm.delay = 3
        env["LLM_TIMEOUT_S"] = "0.5"
    else:
        llm.status = int(failure)
    async with running_bot(env, telegram):
        telegram.send("hello?")
        assert await telegram.wait_for_messages(1, 1) == [LLM_APOLOGY]
        llm.status, llm.delay, llm.reply = 200, 0, LLMStandIn().reply
        telegram.send("and now?")
        await telegram.wait_for_messages(1, 2)
    assert await stored(pool) == [("user", "hello?"), ("user", "and now?"), ("assistant", "echo: and now?")]
    assert contents(llm.conversations[-1])[1:] == [("user", "hello?"), ("user", "and now?")]


async def test_long_answer_is_split_on_paragraphs(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    paragraphs = [f"Paragraph {i}: " + "word " * 300 for i in range(8)]  # ~12k characters
    llm.reply = lambda messages: "\n\n".join(paragraphs)
    async with running_bot(env, telegram):
        telegram.send("tell me a lot")
        await telegram.wait_for(lambda: len(telegram.calls("sendMessage")) >= 4)
        await asyncio.sleep(0.3)
    parts = telegram.messages_to(1)
    assert len(parts) == 4
    assert all(len(p) <= 4096 for p in parts)
    assert all(p.startswith("Paragraph") for p in parts)
    assert " ".join(" ".join(parts).split()) == " ".join("\n\n".join(paragraphs).split())
    [(answer,)] = await fetch(pool, "SELECT content FROM messages WHERE role = 'assistant'")
    assert answer == "\n\n".join(paragraphs)  # stored whole, split only for Telegram

"""Groups with GROUP_TRIGGER=mention (the default): the bot answers what is addressed to it, and
a reply brings the replied-to text into that turn's context. Real bot, real HTTP, real PostgreSQL."""

from __future__ import annotations

from typing import Any

from bench.standins import BOT_USER, LLMStandIn, TelegramStandIn
from handlers.unsupported import TEXT_ONLY
from services.database import Pool
from tests.harness import fetch, running_bot

GROUP = -100777
MENTION = "@" + str(BOT_USER["username"])


def mentioning(text: str) -> dict[str, Any]:
    """Message fields of ``text`` that starts with the bot's @username, as Telegram marks it."""
    return {"text": f"{MENTION} {text}", "entities": [{"type": "mention", "offset": 0, "length": len(MENTION)}]}


def addressed(telegram: TelegramStandIn, text: str, **kwargs: Any) -> dict[str, Any]:
    """A group message that starts with the bot's @username (not yet sent)."""
    return {**telegram.message(None, chat_id=GROUP, **kwargs), **mentioning(text)}


async def test_in_a_group_the_bot_answers_only_what_is_addressed_to_it(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    env["GROUP_TRIGGER"] = "mention"
    async with running_bot(env, telegram):
        telegram.send("people talking among themselves", chat_id=GROUP, user_id=1)
        telegram.send(None, chat_id=GROUP, user_id=2, photo=[{"file_id": "p", "file_unique_id": "p", "width": 1,
                                                               "height": 1}])  # fmt: skip
        telegram.send("a mention of @someone_else", chat_id=GROUP, user_id=1,
                      entities=[{"type": "mention", "offset": 12, "length": 13}])  # fmt: skip
        telegram.push("message", addressed(telegram, "what is 2+2?", user_id=1))
        [answer] = await telegram.wait_for_messages(GROUP, 1)
        bot_message = telegram.calls("sendMessage")[-1]
        reply = telegram.message("and 3+3?", chat_id=GROUP, user_id=2)
        reply["reply_to_message"] = telegram.message(answer, chat_id=GROUP, message_id=bot_message.message_id)
        reply["reply_to_message"]["from"] = BOT_USER
        telegram.push("message", reply)
        await telegram.wait_for_messages(GROUP, 2)
        telegram.push("message", addressed(telegram, "marker", user_id=1))  # everything before it was handled
        replies = await telegram.wait_for_messages(GROUP, 3)
    assert replies == [
        "echo: what is 2+2?",  # the mention says who is asked: the LLM does not read it
        "echo: [Replying to: echo: what is 2+2?]\n\nand 3+3?",  # a reply to the bot needs no mention
        "echo: marker",
    ]
    assert TEXT_ONLY not in replies  # the photo nobody sent to the bot got no "text only"
    assert await fetch(pool, "SELECT content FROM messages WHERE role = 'user' ORDER BY id") == [
        ("what is 2+2?",),
        ("and 3+3?",),
        ("marker",),
    ]  # the group's other talk was never stored


async def test_a_reply_brings_the_replied_text_into_that_turns_context(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    env["GROUP_TRIGGER"] = "mention"
    async with running_bot(env, telegram):
        claim = telegram.message("The sky is green.", chat_id=GROUP, user_id=2, first_name="Bob")
        question = addressed(telegram, "is that true?", user_id=1)
        question["reply_to_message"] = claim
        telegram.push("message", question)
        await telegram.wait_for_messages(GROUP, 1)
        telegram.push("message", addressed(telegram, "thanks", user_id=1))
        await telegram.wait_for_messages(GROUP, 2)
    first, second = llm.conversations
    assert first[-1]["content"] == "[Replying to: The sky is green.]\n\nis that true?"
    # the quote was for that turn: the next one sees the question as stored
    assert [m["content"] for m in second[1:]] == [
        "is that true?",
        "echo: [Replying to: The sky is green.]\n\nis that true?",  # the answer, as stored
        "thanks",
    ]


async def test_with_group_trigger_all_every_text_is_answered(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    env["GROUP_TRIGGER"] = "all"
    async with running_bot(env, telegram):
        telegram.send("no mention needed", chat_id=GROUP)
        assert await telegram.wait_for_messages(GROUP, 1) == ["echo: no mention needed"]

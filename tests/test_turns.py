"""The turn pipeline through the real bot: per-chat order, tracked delivery, recovery, /clear
racing an answer, forum topics. Real PostgreSQL, real HTTP to the stand-ins, the real dispatcher."""

from __future__ import annotations

import asyncio

from bench.standins import LLMStandIn, TelegramStandIn
from services import database
from services.database import Pool
from tests.harness import fetch, history_of, running_bot, store_question

BLOCKED = (403, "Forbidden: bot was blocked by the user")


async def test_messages_of_one_chat_are_answered_in_arrival_order(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    llm.delay = 0.3  # slower than the messages arrive, so they queue behind each other
    texts = ["A", "B", "C", "D", "E"]
    async with running_bot(env, telegram):
        for text in texts:
            telegram.send(text)
            await asyncio.sleep(0.05)
        await telegram.wait_for_messages(1, 5)
        telegram.send("F")
        await telegram.wait_for_messages(1, 6)
    assert telegram.messages_to(1) == [f"echo: {t}" for t in [*texts, "F"]]
    assert await fetch(pool, "SELECT content FROM messages WHERE role = 'user' ORDER BY id") == [
        (t,) for t in [*texts, "F"]
    ]
    # each turn saw the previous turn's answer: never a later question before an earlier answer
    assert history_of(llm.conversations[1]) == ["A", "echo: A", "B"]
    assert history_of(llm.conversations[-1]) == [
        "A", "echo: A", "B", "echo: B", "C", "echo: C", "D", "echo: D", "E", "echo: E", "F",
    ]  # fmt: skip


async def test_flood_control_delays_but_delivers_each_answer_once(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    telegram.fail_next_sends = 3  # 429, retry after 1 s, three sends in a row
    async with running_bot(env, telegram):
        telegram.send("one", user_id=1)
        telegram.send("two", user_id=2)
        telegram.send("three", user_id=1)
        await telegram.wait_for(lambda: len(telegram.messages_to(1)) == 2 and len(telegram.messages_to(2)) == 1)
        telegram.send("/help", user_id=3)  # a marker: everything before it has settled
        await telegram.wait_for_messages(3, 1)
    assert telegram.messages_to(1) == ["echo: one", "echo: three"]
    assert telegram.messages_to(2) == ["echo: two"]
    assert len([s for s in telegram.calls("sendMessage") if s.status == 429]) == 3
    accepted = {s.message_id for s in telegram.calls("sendMessage") if s.status == 200}
    rows = await fetch(
        pool, "SELECT delivered_at IS NOT NULL, sent_message_ids FROM messages WHERE role = 'assistant' ORDER BY id"
    )
    assert [delivered for delivered, _ in rows] == [True, True, True]
    assert {ids[0] for _, ids in rows} <= accepted and all(len(ids) == 1 for _, ids in rows)


async def test_recovery_answers_every_chat_despite_one_that_blocked_the_bot(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    for chat in (1, 2, 3):
        await store_question(pool, chat, chat, f"left unanswered in {chat}", message_id=10)
    telegram.refused_chats[2] = BLOCKED
    async with running_bot(env, telegram):
        await telegram.wait_for(lambda: telegram.messages_to(1) != [] and telegram.messages_to(3) != [])
        telegram.send("/help", user_id=4)
        await telegram.wait_for_messages(4, 1)
    assert telegram.messages_to(1) == ["echo: left unanswered in 1"]
    assert telegram.messages_to(3) == ["echo: left unanswered in 3"]
    assert telegram.messages_to(2) == []
    assert await fetch(
        pool,
        "SELECT c.telegram_chat_id, m.delivered_at IS NOT NULL, m.failed_at IS NOT NULL"
        " FROM messages m JOIN chats c ON c.id = m.chat_id WHERE role = 'assistant' ORDER BY 1",
    ) == [(1, True, False), (2, False, True), (3, True, False)]
    # ended for good: the next start does not try the blocked chat again
    assert [t.telegram_chat_id for t in await database.run(pool, database.fetch_unfinished_turns, max_age_s=600)] == []


async def test_recovery_and_a_new_message_of_the_same_chat_answer_each_once_in_order(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    await store_question(pool, 1, 1, "asked before the crash", message_id=10)
    telegram.send("asked after the restart")  # waits in Telegram: the first update the bot sees
    async with running_bot(env, telegram):
        await telegram.wait_for_messages(1, 2)
        telegram.send("/help", user_id=4)
        await telegram.wait_for_messages(4, 1)
    assert telegram.messages_to(1) == ["echo: asked before the crash", "echo: asked after the restart"]
    assert [history_of(c) for c in llm.conversations] == [
        ["asked before the crash"],
        ["asked before the crash", "echo: asked before the crash", "asked after the restart"],
    ]


async def test_an_answer_stored_but_never_sent_is_sent_without_asking_the_llm_again(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    # the state a crash between storing the answer and sending it leaves behind
    question = await store_question(pool, 1, 1, "question", message_id=10)
    await database.run(pool, database.add_answer, question_id=question, content="the stored answer")
    async with running_bot(env, telegram):
        await telegram.wait_for_messages(1, 1)
        telegram.send("/help", user_id=4)
        await telegram.wait_for_messages(4, 1)
    assert telegram.messages_to(1) == ["the stored answer"]
    assert llm.requests == []
    [sent] = [s for s in telegram.calls("sendMessage") if s.chat_id == 1]
    assert sent.params["reply_parameters"]["message_id"] == 10  # a late answer quotes its question
    assert await fetch(
        pool, "SELECT delivered_at IS NOT NULL, sent_message_ids FROM messages WHERE role = 'assistant'"
    ) == [(True, [sent.message_id])]


async def test_clear_during_a_slow_answer_means_no_old_answer_ever_arrives(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    llm.delays = [30]
    async with running_bot(env, telegram):
        telegram.send("an old question")
        await asyncio.wait_for(llm.started.wait(), 15)
        telegram.send("/clear")
        await telegram.wait_for_messages(1, 1)
        telegram.send("a new question")
        await telegram.wait_for_messages(1, 2)
    assert telegram.messages_to(1) == ["Done: I forgot 1 message(s). Let's start over.", "echo: a new question"]
    assert history_of(llm.conversations[-1]) == ["a new question"]
    assert await fetch(pool, "SELECT role, content, deleted_at IS NOT NULL FROM messages ORDER BY id") == [
        ("user", "an old question", True),
        ("user", "a new question", False),
        ("assistant", "echo: a new question", False),
    ]


async def test_clear_drops_the_queued_questions_of_its_user_only(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    group = -100500
    llm.delays = [30]
    async with running_bot(env, telegram):
        telegram.send("first", user_id=1, chat_id=group)
        await asyncio.wait_for(llm.started.wait(), 15)
        telegram.send("queued", user_id=1, chat_id=group)
        telegram.send("someone else's", user_id=2, chat_id=group)
        telegram.send("/clear", user_id=1, chat_id=group)
        await telegram.wait_for_messages(group, 2)
    assert telegram.messages_to(group) == [
        "Done: I forgot 2 message(s). Let's start over.",
        "echo: someone else's",
    ]
    assert [history_of(c) for c in llm.conversations[1:]] == [["someone else's"]]


async def test_replies_stay_in_the_forum_topic_of_the_question(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    forum = -100777
    llm.reply = lambda messages: "\n\n".join(f"Paragraph {i}: " + "word " * 300 for i in range(4))  # two parts
    async with running_bot(env, telegram):
        telegram.send("tell me a lot", chat_id=forum, message_thread_id=42, is_topic_message=True)
        await telegram.wait_for_messages(forum, 2)
        telegram.send("/help", chat_id=forum, message_thread_id=42, is_topic_message=True)
        await telegram.wait_for_messages(forum, 3)
    to_forum = [s for s in telegram.sent if s.method in ("sendMessage", "sendChatAction") and s.chat_id == forum]
    assert {s.method for s in to_forum} == {"sendMessage", "sendChatAction"}
    assert [int(s.params.get("message_thread_id", 0)) for s in to_forum] == [42] * len(to_forum)

"""Issue 21, item 4: an answer the LLM writes to break the renderer is still delivered, through
the real bot (its drafts while it streams, then the final messages), and a restart sends
nothing of it twice."""

from __future__ import annotations

from typing import Any

from bench.standins import LLMStandIn, TelegramStandIn
from services import database
from services.database import Pool
from tests.harness import running_bot, store_question

STARS = "*" * 500 + "x" + "*" * 500  # once raised RecursionError in render: stored, never sent
QUOTES = "> " * 25 + "deep text"  # once rendered to nothing: the user got no message at all
SURROGATE = "broken \ud800 half"  # a lone surrogate in a streamed chunk once broke the draft
ANSWERS = {"stars": STARS, "quotes": QUOTES, "surrogate": SURROGATE}
CHATS = {"stars": 1, "quotes": 2, "surrogate": 3}  # private chats: the answer streams as drafts


async def answers(pool: Pool) -> list[tuple[str, bool]]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT content, delivered_at IS NOT NULL FROM messages WHERE role = 'assistant'")
        return await cur.fetchall()


async def test_hostile_answers_are_delivered_once_across_a_restart(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    def reply(messages: list[dict[str, Any]]) -> str:
        question = str(messages[-1]["content"])
        return ANSWERS.get(question, f"echo: {question}")

    llm.reply = reply
    llm.chunk = 3  # the surrogate arrives in a chunk of its own, and every answer shows drafts
    llm.pace = 0.005  # streamed, not one burst: the drafts a burst needs no longer are sent
    async with running_bot(env, telegram):
        for question, chat in CHATS.items():
            telegram.send(question, user_id=chat)
        await telegram.wait_for(lambda: all(telegram.messages_to(chat) for chat in CHATS.values()))
    delivered = {chat: telegram.messages_to(chat) for chat in CHATS.values()}
    assert delivered == {
        CHATS["stars"]: [STARS],  # past the nesting bound: plain text, as written
        CHATS["quotes"]: [QUOTES],
        CHATS["surrogate"]: ["broken \ufffd half"],  # cleaned as the stored text is
    }
    drafts = [s for s in telegram.calls("sendMessageDraft") if s.chat_id == CHATS["surrogate"]]
    assert drafts and all("\ud800" not in s.text for s in drafts)
    assert [s for s in telegram.sent if s.status != 200] == []  # every draft and message was accepted
    assert sorted(await answers(pool)) == sorted([(STARS, True), (QUOTES, True), ("broken \ufffd half", True)])

    asked = len(llm.requests)
    async with running_bot(env, telegram):
        # The markers: a recovered turn of these chats would be queued ahead of them, and sent first.
        for chat in CHATS.values():
            telegram.send("and now?", user_id=chat)
        await telegram.wait_for(lambda: all(len(telegram.messages_to(chat)) == 2 for chat in CHATS.values()))
    assert {chat: telegram.messages_to(chat) for chat in CHATS.values()} == {
        chat: [*texts, "echo: and now?"] for chat, texts in delivered.items()
    }
    assert [c[-1]["content"] for c in llm.conversations[asked:]] == ["and now?"] * 3


async def test_hostile_answers_stored_but_never_sent_are_sent_once_by_the_next_start(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    # As an earlier version left them: the answer stored, its delivery failing at every start.
    stuck = {CHATS["stars"]: STARS, CHATS["quotes"]: QUOTES}
    for chat, answer in stuck.items():
        question = await store_question(pool, chat, chat, "be nasty", message_id=10 + chat)
        await database.run(pool, database.add_answer, question_id=question, content=answer)

    async def start_and_mark(starts: int) -> None:
        async with running_bot(env, telegram):
            # The markers: a recovered turn of these chats is queued ahead of them, and sent first.
            for chat in stuck:
                telegram.send("and now?", user_id=chat)
            await telegram.wait_for(lambda: all(len(telegram.messages_to(chat)) > starts for chat in stuck))
        assert {chat: telegram.messages_to(chat) for chat in stuck} == {
            chat: [answer] + ["echo: and now?"] * starts for chat, answer in stuck.items()
        }

    await start_and_mark(1)
    await start_and_mark(2)  # the restart: nothing left to send again
    assert [c[-1]["content"] for c in llm.conversations] == ["and now?"] * 4  # the stored answers were not asked again
    assert sorted(await answers(pool)) == sorted([(STARS, True), (QUOTES, True), *[("echo: and now?", True)] * 4])

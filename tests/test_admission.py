"""One admission path, through the real bot on real PostgreSQL over real HTTP to the stand-ins:
/retry and edits pass the rate limit and the daily token budget as a new question does, /clear
and /undo count against the rate limit, a summary's tokens are counted, and in a shared group
/undo never brings back a summary that holds words another user has cleared since."""

from __future__ import annotations

from typing import Any

import pytest

from bench.standins import LLMStandIn, TelegramStandIn
from handlers.messages import SLOW_DOWN
from services.database import Pool
from services.llm.budget import SUMMARY_LABEL
from services.llm.summaries import INSTRUCTIONS
from services.turn.turn import SUMMARY_NOTICE
from tests.harness import command, edit, fetch, history_in, running_bot
from tests.test_daily_budget import REFUSED, USAGE, spent
from tests.test_settings import reply

GROUP = -100444
SUMMARY_PREFIX = INSTRUCTIONS.split("{")[0]
NEXT_MINUTE = "UPDATE rate_limits SET window_start = window_start - interval '1 minute'"
NEXT_DAY = "UPDATE token_usage SET day = day - 1"
ANSWERS = "SELECT content, deleted_reason FROM messages WHERE role = 'assistant' ORDER BY id"
QUESTIONS = "SELECT content, deleted_reason, edited_at IS NOT NULL FROM messages WHERE role = 'user' ORDER BY id"


async def test_retry_and_edits_over_the_rate_limit_make_no_llm_request(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    env["RATE_LIMIT_PER_MINUTE"] = "2"
    async with running_bot(env, telegram):
        sent = telegram.send("Q1")  # hit 1
        await telegram.wait_for_messages(1, 1)
        command(telegram, "/retry")  # hit 2: within the limit, answered again
        await telegram.wait_for_messages(1, 2)
        for n in range(6):  # hits 3..8: each refused as a new question would be
            command(telegram, "/retry")
            await telegram.wait_for_messages(1, 3 + n)
        for n in range(4):
            edit(telegram, sent, f"Q1, edited {n}")
            await telegram.wait_for_messages(1, 9 + n)
        assert len(llm.requests) == 2
        await fetch(pool, NEXT_MINUTE)
        # a later allowed message, answered: every update before it was handled, and no turn
        # a refused /retry or edit could have queued runs before it
        assert await reply(telegram, 1, "marker") == "echo: marker"
    assert telegram.messages_to(1) == ["echo: Q1", "echo: Q1", *[SLOW_DOWN] * 10, "echo: marker"]
    assert len(llm.requests) == 3
    assert history_in(llm.requests[-1]) == ["Q1", "echo: Q1", "marker"]  # the question kept its text
    assert await fetch(pool, QUESTIONS) == [("Q1", None, False), ("marker", None, False)]
    assert await fetch(pool, ANSWERS) == [("echo: Q1", "retry"), ("echo: Q1", None), ("echo: marker", None)]
    assert await fetch(pool, "SELECT hits FROM rate_limits") == [(1,)]  # the marker's new window


async def test_retry_and_edits_over_the_budget_make_no_llm_request(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    env["DAILY_TOKEN_BUDGET_PER_USER"] = "50"
    async with running_bot(env, telegram):
        assert await reply(telegram, 1, "hello") == "echo: hello"  # 31 tokens: under 50
        last = telegram.send("again")  # 47 more: past it once answered
        await telegram.wait_for_messages(1, 2)
        replies = [await reply(telegram, 1, "/retry") for _ in range(6)]
        for n in range(4):
            edit(telegram, last, f"again, edited {n}")
            replies.append((await telegram.wait_for_messages(1, 9 + n))[-1])
        assert all(REFUSED.fullmatch(r) for r in replies), replies
        assert len(llm.requests) == 2
        await fetch(pool, NEXT_DAY)
        assert await reply(telegram, 1, "new day") == "echo: new day"  # the marker
    assert len(llm.requests) == 3
    assert history_in(llm.requests[-1]) == ["hello", "echo: hello", "again", "echo: again", "new day"]
    assert await fetch(pool, ANSWERS) == [("echo: hello", None), ("echo: again", None), ("echo: new day", None)]
    assert await fetch(pool, USAGE) == [(spent(llm),)]


async def test_clear_and_undo_over_the_rate_limit_change_nothing(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    env["RATE_LIMIT_PER_MINUTE"] = "1"
    async with running_bot(env, telegram):
        llm.gate.clear()  # the answer is being written while the refused commands come
        telegram.send("Q1")  # hit 1
        await llm.started.wait()
        command(telegram, "/clear")  # hit 2
        command(telegram, "/undo")  # hit 3
        assert await telegram.wait_for_messages(1, 2) == [SLOW_DOWN, SLOW_DOWN]
        llm.gate.set()  # the answer they did not stop
        await telegram.wait_for_messages(1, 3)
        await fetch(pool, NEXT_MINUTE)
        assert await reply(telegram, 1, "Q2") == "echo: Q2"  # the marker
    assert telegram.messages_to(1) == [SLOW_DOWN, SLOW_DOWN, "echo: Q1", "echo: Q2"]
    assert history_in(llm.requests[-1]) == ["Q1", "echo: Q1", "Q2"]  # nothing cleared, nothing undone
    assert await fetch(pool, "SELECT count(*) FROM messages WHERE deleted_at IS NOT NULL") == [(0,)]


async def test_a_summarys_tokens_are_counted_for_the_user_whose_turn_made_it(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    llm.reply = lambda messages: (
        "SUMMARY" if str(messages[0]["content"]).startswith(SUMMARY_PREFIX) else f"echo: {messages[-1]['content']}"
    )
    async with running_bot({**env, "SUMMARIES": "true", "HISTORY_LIMIT": "6"}, telegram):
        for n in range(4):
            assert await reply(telegram, 1, f"q{n}") == f"echo: q{n}"
        await telegram.wait_for(lambda: telegram.messages_to(1)[-1] == SUMMARY_NOTICE)
    summaries = [r for r in llm.requests if str(r["messages"][0]["content"]).startswith(SUMMARY_PREFIX)]
    assert len(summaries) == 1 and len(llm.usages) == 5
    assert await fetch(
        pool, "SELECT u.telegram_user_id, t.tokens FROM token_usage t JOIN users u ON u.id = t.user_id"
    ) == [(1, spent(llm))]


@pytest.mark.parametrize(
    ("steps", "restored"),
    [
        ([(1, "/clear"), (2, "/clear"), (1, "/undo")], False),
        ([(2, "/clear"), (1, "/clear"), (2, "/undo")], False),
        ([(1, "/clear"), (2, "/clear"), (2, "/undo"), (1, "/undo")], False),
        ([(1, "/clear"), (1, "/undo")], True),  # no one else cleared: it comes back
    ],
    ids=["ann-bob-ann", "bob-ann-bob", "both-undo", "ann-alone"],
)
async def test_undo_in_a_shared_group_never_brings_back_words_another_user_cleared(
    steps: list[tuple[int, str]], restored: bool, env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn,
    pool: Pool,
) -> None:  # fmt: skip
    def answer(messages: list[dict[str, Any]]) -> str:
        if str(messages[0]["content"]).startswith(SUMMARY_PREFIX):
            return "SUMMARY of " + str(messages[-1]["content"]).replace("\n", " | ")
        return f"echo: {messages[-1]['content']}"

    llm.reply = answer
    names = {1: "Ann", 2: "Bob", 3: "Cid"}
    live = "SELECT content FROM summaries WHERE deleted_at IS NULL"
    async with running_bot({**env, "GROUP_CONTEXT": "shared", "SUMMARIES": "true", "HISTORY_LIMIT": "6"}, telegram):
        for n, user in enumerate((1, 2, 1, 2)):
            await reply(telegram, GROUP, f"{names[user]} says secret{n}", user_id=user, first_name=names[user])
        await telegram.wait_for(lambda: telegram.messages_to(GROUP)[-1] == SUMMARY_NOTICE)
        [(summary,)] = await fetch(pool, live)
        assert "Ann says secret0" in summary and "Bob says secret1" in summary  # it holds both users' words
        for user, text in steps:
            await reply(telegram, GROUP, text, user_id=user, first_name=names[user])
        after = await fetch(pool, live)
        await reply(telegram, GROUP, "what do you know?", user_id=3, first_name="Cid")
    context = history_in(llm.requests[-1])
    if restored:
        assert after == [(summary,)]
        assert context[0] == SUMMARY_LABEL + summary
    else:
        assert after == []
        last = {user: text for user, text in steps}  # each user's last command
        cleared = [names[user] for user, text in last.items() if text == "/clear"]
        assert not [m for m in context for name in cleared if f"{name} says" in m], context

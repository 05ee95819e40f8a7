"""The context budget: token estimates, the running-sum read in SQL, each model's room and its
calibration, rolling summaries, /context and a group's shared history; unit tests on the budget,
then the real bot over real HTTP on real PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bench.standins import LLMStandIn, TelegramStandIn
from services import context, database, records
from services.database import Pool
from services.llm.budget import SUMMARY_LABEL, ContextBudget, dialog_of
from services.llm.summaries import INSTRUCTIONS
from services.llm.tokens import estimate_tokens
from services.records import DialogContext
from services.turn.turn import SUMMARY_NOTICE
from tests.harness import BUSY_CHAT, fetch, history_in, running_bot
from tests.test_settings import buttons, keyboard_of, press, reply

GROUP = -100555
SUMMARY = {"through_id": 1, "covered": 1, "content": "s", "tokens": 5, "prompt_tokens": 1, "completion_tokens": 1}
SUMMARY_PREFIX = INSTRUCTIONS.split("{")[0]


async def no_list() -> dict[str, int]:
    return {}


def budget(context_tokens: int = 4096, max_tokens: int = 1024) -> ContextBudget:
    return ContextBudget(context_tokens=context_tokens, max_tokens=max_tokens, models=["m"], model_list=no_list)


# -- estimates and the choice ------------------------------------------------------------------


def test_estimates_follow_utf8_bytes() -> None:
    assert estimate_tokens("") == 4
    assert estimate_tokens("abcd") == 5 and estimate_tokens("abcde") == 6
    assert estimate_tokens("Привет") == 7  # 12 bytes: Cyrillic takes twice the tokens of Latin letters
    assert estimate_tokens("你好") == 6  # 6 bytes
    assert estimate_tokens("a\x00b") == 5  # a NUL is a byte like any other


SIZES = [3, 700, 40, 1500, 5, 260, 90, 2000, 12, 333, 48, 1200, 7, 64, 900, 25, 41]  # characters, mixed


def mixed_dialog() -> DialogContext:
    messages: list[Any] = [
        {"role": "user" if n % 2 == 0 else "assistant", "content": f"{n}:" + "x" * size} for n, size in enumerate(SIZES)
    ]
    return dialog_of(messages)


@pytest.mark.parametrize("room", [512, 600, 900, 1300, 2500])
async def test_the_newest_messages_that_fit_are_chosen_never_more(room: int) -> None:
    dialog = mixed_dialog()
    chooser = budget(context_tokens=room + 1024)
    window = await chooser.choose(dialog, model="m", system_prompt="Be brief.", history_limit=100)
    assert window.room == room
    sent = [m["content"] for m in window.messages]
    every = [m.content for m in reversed(dialog.history)]
    assert sent == every[len(every) - len(sent) :]  # a run of the newest, in order
    assert sent[-1] == every[-1]  # the question is kept
    assert window.messages[0]["role"] == "user"  # never opens on an answer
    assert window.used == estimate_tokens("Be brief.") + sum(estimate_tokens(text) for text in sent) <= room
    if len(sent) < len(every):  # the message before the window did not fit (or it was an answer)
        before = every[len(every) - len(sent) - 1]
        if dialog.history[len(sent)].role == "user":
            assert window.used + estimate_tokens(before) > room
        assert window.crowded


async def test_the_question_is_kept_even_alone_over_the_room() -> None:
    dialog = dialog_of([{"role": "user", "content": "old"}, {"role": "user", "content": "q" * 5000}])
    window = await budget(context_tokens=1536).choose(dialog, model="m", system_prompt="", history_limit=10)
    assert [m["content"] for m in window.messages] == ["q" * 5000] and window.crowded


async def test_the_history_limit_summary_and_quote_count() -> None:
    dialog = mixed_dialog()
    chooser = budget(context_tokens=100_000)
    window = await chooser.choose(dialog, model="m", system_prompt="", history_limit=4)
    # the newest 4 open on an answer, whose question is past the limit: it is left out
    assert [m["content"] for m in window.messages] == [m.content for m in reversed(dialog.history[:3])]
    summary = records.Summary(through_id=1, covered=9, content="notes", tokens=300)
    with_summary = DialogContext(dialog.history, summary, dialog.read)
    small = budget(context_tokens=1024 + 512)
    plain = await small.choose(dialog, model="m", system_prompt="", history_limit=100)
    summarised = await small.choose(with_summary, model="m", system_prompt="", history_limit=100)
    assert summarised.messages[0] == {"role": "system", "content": SUMMARY_LABEL + "notes"}
    assert summarised.used <= 512 and summarised.in_full < plain.in_full
    quoted = await small.choose(dialog, model="m", system_prompt="", history_limit=100, quoted="z" * 1000)
    assert quoted.used <= 512 and quoted.in_full < plain.in_full


async def test_calibration_moves_the_room_with_what_the_endpoint_reports() -> None:
    chooser = budget(context_tokens=2048, max_tokens=1024)
    assert await chooser.room("m") == 1024
    chooser.calibrate("m", estimated=100, reported=300)  # the first report is taken as it is
    assert chooser.ratio("m") == 3.0 and await chooser.room("m") == 341
    chooser.calibrate("m", estimated=100, reported=100)
    assert chooser.ratio("m") == pytest.approx(2.4)  # later ones move it by 30%
    chooser.calibrate("m", estimated=100, reported=None)  # not reported: nothing learnt
    chooser.calibrate("m", estimated=10, reported=100_000)  # an outlier counts as 4
    assert chooser.ratio("m") == pytest.approx(2.88)
    assert chooser.ratio("other") == 1.0


async def test_the_context_length_comes_from_the_setting_or_the_model_list() -> None:
    asked: list[float] = []
    now = [0.0]

    async def listing() -> dict[str, int]:
        asked.append(now[0])
        if len(asked) == 1:
            raise ConnectionError("down")
        return {"m": 32_000}

    fixed = ContextBudget(context_tokens=9000, max_tokens=1000, models=["m"], model_list=listing)
    assert await fixed.context_length("m") == 9000 and asked == []
    listed = ContextBudget(context_tokens=0, max_tokens=1000, models=["m"], model_list=listing, clock=lambda: now[0])
    assert await listed.context_length("m") == 8192  # the list failed: the default
    now[0] = 60.0
    assert await listed.context_length("m") == 8192 and asked == [0.0]  # not asked again at once
    now[0] = 3601.0
    assert await listed.context_length("m") == 32_000 and asked == [0.0, 3601.0]
    assert await listed.context_length("unlisted") == 8192
    # turns starting together wait for one request (none takes the default meanwhile)
    fresh = ContextBudget(context_tokens=0, max_tokens=1000, models=["m"], model_list=listing, clock=lambda: now[0])
    assert list(await asyncio.gather(fresh.context_length("m"), fresh.context_length("m"))) == [32_000, 32_000]
    assert asked == [0.0, 3601.0, 3601.0]


# -- the running sum in SQL --------------------------------------------------------------------


async def store(pool: Pool, user: int, chat: int, texts: list[str]) -> list[int]:
    """Store ``texts`` as questions and answers in turn, in (user, chat); their ids."""
    ids: list[int] = []
    for n, text in enumerate(texts):
        if n % 2 == 0:
            added = await context.add_question(
                pool,
                telegram_user_id=user,
                first_name=f"U{user}",
                telegram_chat_id=chat,
                telegram_message_id=1000 + n,
                telegram_thread_id=None,
                content=text,
            )
            ids.append(added.id)
        else:
            answer = await context.add_answer(pool, question_id=ids[-1], content=text)
            assert answer is not None
            ids.append(answer)
    return ids


@pytest.mark.parametrize("bound", [0, 10, 300, 1000, 2600, 100_000])
async def test_the_read_stops_at_the_bound_and_keeps_the_newest(pool: Pool, bound: int) -> None:
    texts = [f"{n}:" + "y" * size for n, size in enumerate(SIZES)]  # ends with a question
    ids = await store(pool, 1, 1, texts)
    start = await database.run(pool, database.fetch_turn_start, question_id=ids[-1], history_limit=50, budget=bound)
    assert start is not None and start.answer is None
    history = start.dialog.history
    assert [m.id for m in history] == ids[::-1][: len(history)]  # the newest, newest first
    assert [m.tokens for m in history] == [estimate_tokens(t) for t in texts[::-1][: len(history)]]
    assert [m.running for m in history] == [sum(m.tokens for m in history[: i + 1]) for i in range(len(history))]
    assert all(m.running <= bound for m in history[1:])  # past the newest, never over the bound
    if len(history) < len(texts):
        assert history[-1].running + estimate_tokens(texts[-len(history) - 1]) > bound
    assert start.dialog.read == len(texts)


async def test_rows_from_before_the_estimates_count_one_token_per_character(pool: Pool) -> None:
    ids = await store(pool, 1, 1, ["old question", "old answer", "new question"])
    await fetch(pool, "UPDATE messages SET tokens = NULL WHERE id = ANY(%s)", (ids[:2],))
    start = await database.run(pool, database.fetch_turn_start, question_id=ids[-1], history_limit=50, budget=10**6)
    assert start is not None
    assert [m.tokens for m in start.dialog.history] == [estimate_tokens("new question"), 10, 12]


@pytest.mark.parametrize(
    ("statement", "params", "index"),
    [
        (database.FETCH_TURN_START_SHARED, {"question_id": 0, "limit": 20, "budget": 8000}, "messages_chat_turn_idx"),
        (
            database.FETCH_NEXT_CONTEXT,
            {"telegram_user_id": 1, "telegram_chat_id": GROUP, "limit": 20, "budget": 8000},
            "messages_turn_idx",
        ),
        (
            database.FETCH_SUMMARY_SOURCE,
            {"question_id": 0, "before": 10**9, "budget": 8000, "limit": 1000},
            "messages_turn_idx",
        ),
        (
            database.ADD_SUMMARY,
            {**SUMMARY, "question_id": 0},
            "summaries_dialog_idx",
        ),
    ],
    ids=["turn-start-shared", "next-context", "summary-source", "insert-summary"],
)
async def test_context_statements_read_through_indexes(
    pool: Pool, statement: str, params: dict[str, int], index: str
) -> None:
    # 50 users in one group, one of them with 1000 messages, and a summary for each
    await store(pool, 1, GROUP, ["q", "a"])
    await fetch(
        pool,
        BUSY_CHAT + " INSERT INTO chats (telegram_chat_id) SELECT -n FROM generate_series(2, 3000) n;"
        " INSERT INTO summaries (user_id, chat_id, through_id, covered, content, tokens)"
        " SELECT owner, c.id, 1, 1, 's', 5 FROM chats c, (VALUES (1), (NULL)) AS o (owner);"
        " ANALYZE messages; ANALYZE summaries",
    )
    if "question_id" in params:
        [(newest,)] = await fetch(pool, "SELECT max(id) FROM messages WHERE user_id = 1")
        params = {**params, "question_id": newest}
    plan = "\n".join(row[0] for row in await fetch(pool, "EXPLAIN " + statement, params))
    assert index in plan, plan
    assert "Seq Scan on messages" not in plan and "Seq Scan on summaries" not in plan, plan


# -- through the bot ---------------------------------------------------------------------------


def is_summary_request(request: dict[str, Any]) -> bool:
    return str(request["messages"][0]["content"]).startswith(SUMMARY_PREFIX)


async def talk(telegram: TelegramStandIn, chat_id: int, texts: list[str], **kwargs: Any) -> None:
    for text in texts:
        answer = await reply(telegram, chat_id, text, **kwargs)
        assert answer.startswith("echo: "), answer


async def test_the_llm_gets_the_newest_history_that_fits_its_model(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    llm.report_usage = False  # no calibration here: the estimate is what counts
    llm.context_lengths = {"stand-in": 1280, "big-model": 100_000}  # as OpenRouter's model list says
    texts = [f"question {n} " + "z" * 380 for n in range(8)]
    async with running_bot({**env, "ALLOWED_MODELS": "stand-in,big-model", "HISTORY_LIMIT": "50"}, telegram):
        await talk(telegram, 1, texts)
        small = llm.requests[-1]
        await reply(telegram, 1, "/model")
        keyboard = keyboard_of(telegram, 1)
        await press(telegram, keyboard, buttons(keyboard)["big-model"], user_id=1)
        await talk(telegram, 1, ["and now?"])
        big = llm.requests[-1]
    sent = history_in(small)
    whole = [m for text in texts for m in (text, f"echo: {text}")][:-1]
    assert sent == whole[len(whole) - len(sent) :] and 1 < len(sent) < len(whole)
    assert sum(estimate_tokens(m["content"]) for m in small["messages"]) <= 1280 - 256
    assert big["model"] == "big-model" and history_in(big) == [*whole, f"echo: {texts[-1]}", "and now?"]


async def test_calibration_makes_what_the_endpoint_counts_fit(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    # The stand-in counts a token per character: about four times the estimate for these letters.
    texts = [f"question {n} " + "z" * 300 for n in range(8)]
    settings = {**env, "CONTEXT_TOKENS": "1280", "HISTORY_LIMIT": "50"}
    llm.report_usage = False
    async with running_bot(settings, telegram):  # nothing reported: the estimate alone decides
        await talk(telegram, 2, texts, user_id=2)
    uncalibrated = sum(len(m["content"]) for m in llm.requests[-1]["messages"])
    llm.report_usage = True
    async with running_bot(settings, telegram):
        await talk(telegram, 1, texts)
    assert uncalibrated > 1280 - 256  # past the model's room as it counts
    assert len(llm.usages) == len(texts) and all(prompt <= 1280 - 256 for prompt, _ in llm.usages)


async def test_a_long_dialog_is_summarised_cleared_and_undone(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    summaries = 0

    def answer(messages: list[dict[str, Any]]) -> str:
        nonlocal summaries
        if str(messages[0]["content"]).startswith(SUMMARY_PREFIX):
            summaries += 1
            return f"SUMMARY {summaries}"
        return f"echo: {messages[-1]['content']}"

    llm.reply = answer
    live = "SELECT content, covered FROM summaries WHERE deleted_at IS NULL"
    async with running_bot({**env, "SUMMARIES": "true", "HISTORY_LIMIT": "6"}, telegram):
        for n in range(4):
            assert await reply(telegram, 1, f"q{n}") == f"echo: q{n}"
        assert await telegram.wait_for_messages(1, 5) and telegram.messages_to(1)[-1] == SUMMARY_NOTICE
        [request] = [r for r in llm.requests if is_summary_request(r)]
        assert "q0" in request["messages"][1]["content"] and "q3" not in request["messages"][1]["content"]
        assert await fetch(pool, live) == [("SUMMARY 1", 4)]  # q0, a0, q1, a1
        assert await reply(telegram, 1, "q4") == "echo: q4"
        with_summary = [SUMMARY_LABEL + "SUMMARY 1", "q2", "echo: q2", "q3", "echo: q3", "q4"]
        assert history_in(llm.requests[-1]) == with_summary
        assert await reply(telegram, 1, "/retry") == "echo: q4"  # asked again: the same context
        assert history_in(llm.requests[-1]) == with_summary
        context_reply = await reply(telegram, 1, "/context")
        assert "A summary" in context_reply and "4 older message(s)" in context_reply, context_reply
        await reply(telegram, 1, "/clear")
        assert await fetch(pool, live) == []
        assert await reply(telegram, 1, "/undo") and await fetch(pool, live) == [("SUMMARY 1", 4)]
        for _ in range(3):  # q4, q3, q2: /undo reaches the summary's range with the next one
            await reply(telegram, 1, "/undo")
        assert await fetch(pool, live) == [("SUMMARY 1", 4)]
        await reply(telegram, 1, "/undo")  # q1, inside the summary: it goes
        assert await fetch(pool, live) == []
        assert await reply(telegram, 1, "again") == "echo: again"
    assert history_in(llm.requests[-1]) == ["q0", "echo: q0", "again"]


async def test_context_says_what_the_next_turn_takes(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    llm.report_usage = False
    async with running_bot({**env, "CONTEXT_TOKENS": "1280", "HISTORY_LIMIT": "50"}, telegram):
        first = await reply(telegram, 1, "/context")
        await talk(telegram, 1, ["one", "two"])
        second = await reply(telegram, 1, "/context")
        await talk(telegram, 1, ["three"])
        after = history_in(llm.requests[-1])
        await talk(telegram, 1, ["x" * 3000, "y" * 3000])
        crowded = await reply(telegram, 1, "/context")
    assert first.startswith("Model stand-in: 1,280 tokens of context, 256 of them kept for the answer.")
    assert "0 message(s) in full" in first and "Nothing is left out" in first
    assert "4 message(s) in full" in second and "Nothing is left out" in second
    assert after == ["one", "echo: one", "two", "echo: two", "three"]  # the 4 it said, and the new question
    assert "Older messages no longer fit and are left out." in crowded


async def test_a_shared_group_history_shows_every_member_by_name(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    async with running_bot({**env, "GROUP_CONTEXT": "shared"}, telegram):
        await talk(telegram, GROUP, ["I like green tea"], user_id=1, first_name="Ann")
        await talk(telegram, GROUP, ["What does Ann like?"], user_id=2, first_name="Bob")
        shared = history_in(llm.requests[-1])
        await talk(telegram, 2, ["and in private?"], user_id=2, first_name="Bob")
        private = history_in(llm.requests[-1])
        await reply(telegram, GROUP, "/clear", user_id=1, first_name="Ann")
        await talk(telegram, GROUP, ["Still there?"], user_id=2, first_name="Bob")
        cleared = history_in(llm.requests[-1])
    assert shared == ["Ann: I like green tea", "echo: Ann: I like green tea", "Bob: What does Ann like?"]
    assert private == ["and in private?"]  # a private chat is one person's
    assert cleared == ["Bob: What does Ann like?", "echo: Bob: What does Ann like?", "Bob: Still there?"]


async def test_a_group_history_is_per_user_by_default(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    async with running_bot(env, telegram):
        await talk(telegram, GROUP, ["I like green tea"], user_id=1, first_name="Ann")
        await talk(telegram, GROUP, ["What does Ann like?"], user_id=2, first_name="Bob")
    assert history_in(llm.requests[-1]) == ["What does Ann like?"]

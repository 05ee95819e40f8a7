"""Memories the user controls (issue 26): the statements against the real PostgreSQL of the
session, the turn's context read carrying them, their plans; then /remember, /memory, its
"Forget" buttons and the groups setting through the real bot, over real HTTP to the stand-ins."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import psycopg
import pytest

from bench.standins import LLMStandIn, TelegramStandIn
from handlers.errors import NO_HISTORY
from handlers.memory import (
    FULL,
    GROUPS_SET,
    IN_GROUPS,
    MEMORY_USAGE,
    NOT_YOURS,
    NOTHING_REMEMBERED,
    PRIVATE_LIST,
    REMEMBER_USAGE,
    MemoryForget,
    forgot_report,
    too_long,
)
from services import context, database
from services.database import MAX_MEMORIES, Pool
from services.records import DialogContext, TurnStart
from tests.harness import BUSY_CHAT, command, fetch, running_bot, store_question, until
from tests.test_settings import buttons, keyboard_of, press, reply

ANN, BOB = 1, 2  # Telegram user ids; each one's private chat has the same id
GROUP = -100555


async def remember(pool: Pool, user: int, text: str) -> int | None:
    return await database.run(pool, database.add_memory, telegram_user_id=user, first_name="Ann", content=text)


async def memories_of(pool: Pool, user: int) -> list[str]:
    return [m.content for m in await database.run(pool, database.list_memories, telegram_user_id=user)]


async def answered(pool: Pool) -> bool:
    return bool(await fetch(pool, "SELECT 1 FROM messages WHERE role = 'assistant' AND delivered_at IS NOT NULL"))


async def turn_start(pool: Pool, question: int, *, shared: bool = False) -> TurnStart:
    start = await database.run(
        pool, database.fetch_turn_start, question_id=question, history_limit=20, budget=10_000, shared=shared
    )
    assert start is not None
    return start


async def next_context(pool: Pool, user: int, chat: int, *, shared: bool = False) -> DialogContext:
    return await database.run(
        pool, database.fetch_next_context, telegram_user_id=user, telegram_chat_id=chat, history_limit=20,
        budget=10_000, shared=shared,
    )  # fmt: skip


async def allow_in_groups(pool: Pool, user: int, allowed: bool) -> None:
    await database.run(pool, database.set_memories_in_groups, telegram_user_id=user, allowed=allowed)


# -- the statements ------------------------------------------------------------------------------


async def test_a_memory_registers_its_user_and_the_list_is_oldest_first(pool: Pool) -> None:
    first = await remember(pool, ANN, "I am vegetarian")
    second = await remember(pool, ANN, "My cat is called Tom")
    assert isinstance(first, int) and isinstance(second, int) and first < second
    assert await fetch(pool, "SELECT telegram_user_id, first_name, memories_in_groups FROM users") == [
        (ANN, "Ann", False)
    ]
    listed = await database.run(pool, database.list_memories, telegram_user_id=ANN)
    assert [(m.id, m.content) for m in listed] == [(first, "I am vegetarian"), (second, "My cat is called Tom")]
    assert all(isinstance(m.created_at, datetime) and m.created_at.tzinfo is not None for m in listed)
    assert await memories_of(pool, BOB) == []  # a user never seen has none


async def test_forgetting_one_takes_only_the_users_own_and_keeps_the_row(pool: Pool) -> None:
    anns = [await remember(pool, ANN, text) for text in ("a1", "a2")]
    bobs = await remember(pool, BOB, "b1")
    assert anns[0] is not None and bobs is not None

    async def forget(user: int, memory: int) -> bool:
        return await database.run(pool, database.forget_memory, telegram_user_id=user, memory_id=memory)

    assert not await forget(BOB, anns[0])  # not his
    assert await forget(ANN, anns[0])
    assert not await forget(ANN, anns[0])  # forgotten already
    assert await memories_of(pool, ANN) == ["a2"] and await memories_of(pool, BOB) == ["b1"]
    kept = await fetch(pool, "SELECT content, deleted_at IS NOT NULL FROM memories ORDER BY id")
    assert kept == [("a1", True), ("a2", False), ("b1", False)]  # soft delete: the row stays


async def test_forgetting_all_counts_them_and_leaves_other_users_alone(pool: Pool) -> None:
    for text in ("a1", "a2", "a3"):
        await remember(pool, ANN, text)
    await remember(pool, BOB, "b1")
    await database.run(pool, database.forget_memory, telegram_user_id=ANN, memory_id=1)

    async def forget_all(user: int) -> int:
        return await database.run(pool, database.forget_memories, telegram_user_id=user)

    assert [await forget_all(ANN), await forget_all(ANN), await forget_all(99)] == [2, 0, 0]
    assert await memories_of(pool, ANN) == [] and await memories_of(pool, BOB) == ["b1"]
    assert await fetch(pool, "SELECT count(*) FROM memories") == [(4,)]


async def test_past_the_limit_a_memory_is_refused_until_one_is_forgotten(pool: Pool) -> None:
    kept = [await remember(pool, ANN, f"fact {n}") for n in range(MAX_MEMORIES)]
    assert None not in kept
    assert await remember(pool, ANN, "one too many") is None
    assert await remember(pool, BOB, "another user's first") is not None  # the limit is per user
    assert len(await memories_of(pool, ANN)) == MAX_MEMORIES
    assert kept[0] is not None
    await database.run(pool, database.forget_memory, telegram_user_id=ANN, memory_id=kept[0])
    assert await remember(pool, ANN, "room again") is not None
    assert (await memories_of(pool, ANN))[-1] == "room again"
    assert await fetch(pool, "SELECT count(*) FROM memories WHERE content = 'one too many'") == [(0,)]


@pytest.mark.parametrize("content", ["", "я" * 501], ids=["empty", "501-characters"])
async def test_the_schema_refuses_a_memory_out_of_bounds(pool: Pool, content: str) -> None:
    assert await remember(pool, ANN, "я" * 500) is not None  # characters, not bytes
    with pytest.raises(psycopg.errors.CheckViolation):
        await remember(pool, ANN, content)


async def test_the_groups_setting_registers_a_new_user_and_is_theirs_alone(pool: Pool) -> None:
    async def in_groups(user: int) -> bool:
        return await database.run(pool, database.get_memories_in_groups, telegram_user_id=user)

    assert not await in_groups(ANN)  # never seen
    await allow_in_groups(pool, ANN, True)
    await remember(pool, BOB, "b1")
    assert [await in_groups(ANN), await in_groups(BOB)] == [True, False]
    await store_question(pool, ANN, ANN, "hi")  # the first question fills in the name
    assert await fetch(pool, "SELECT first_name, memories_in_groups FROM users WHERE telegram_user_id = 1") == [
        ("Ann", True)
    ]
    await allow_in_groups(pool, ANN, False)
    assert not await in_groups(ANN)


# -- the turn's context read -----------------------------------------------------------------------


async def test_a_private_turn_reads_the_users_live_memories_oldest_first(pool: Pool) -> None:
    for text in ("I am vegetarian", "forget me", "My cat is called Tom"):
        await remember(pool, ANN, text)
    await remember(pool, BOB, "Bob's own")
    await database.run(pool, database.forget_memory, telegram_user_id=ANN, memory_id=2)
    question = await store_question(pool, ANN, ANN, "What should I cook?", message_id=1)
    expected = ("I am vegetarian", "My cat is called Tom")
    start = await turn_start(pool, question)
    assert start.memories == expected and start.dialog.memories == expected
    assert [m.content for m in start.dialog.history] == ["What should I cook?"]  # the history as before
    assert (await next_context(pool, ANN, ANN)).memories == expected  # what /context reads
    # with an answer stored but not yet delivered, the memories still ride the first row
    assert await database.run(pool, database.add_answer, question_id=question, content="Lentils") is not None
    answered = await turn_start(pool, question)
    assert answered.answer is not None and answered.memories == expected
    # read with the question in one round trip, as an idle chat's turn is
    added = await database.run(
        pool, database.add_question, telegram_user_id=ANN, first_name="Ann", telegram_chat_id=ANN, content="And?",
        telegram_message_id=2, read=database.StartRead(history_limit=20, budget=10_000),
    )  # fmt: skip
    assert added.start is not None and added.start.memories == expected


@pytest.mark.parametrize("shared", [False, True], ids=["per-user", "shared"])
async def test_a_group_turn_reads_the_askers_memories_only_when_they_allowed_it(pool: Pool, shared: bool) -> None:
    await remember(pool, ANN, "Ann's secret")
    await remember(pool, BOB, "Bob's fact")
    anns = await store_question(pool, ANN, GROUP, "hello group", message_id=1)
    bobs = await store_question(pool, BOB, GROUP, "hi all", message_id=2)
    assert (await turn_start(pool, anns, shared=shared)).memories == ()
    assert (await next_context(pool, ANN, GROUP, shared=shared)).memories == ()
    await allow_in_groups(pool, ANN, True)
    assert (await turn_start(pool, anns, shared=shared)).memories == ("Ann's secret",)
    assert (await next_context(pool, ANN, GROUP, shared=shared)).memories == ("Ann's secret",)
    # Bob's turn in the same group carries none of Ann's, and none of his own until he allows it
    assert (await turn_start(pool, bobs, shared=shared)).memories == ()
    await allow_in_groups(pool, BOB, True)
    assert (await turn_start(pool, bobs, shared=shared)).memories == ("Bob's fact",)
    # the private chat reads them whatever the setting
    await allow_in_groups(pool, ANN, False)
    private = await store_question(pool, ANN, ANN, "and here?", message_id=3)
    assert (await turn_start(pool, private)).memories == ("Ann's secret",)


async def test_a_turn_reads_at_most_the_limit_the_oldest(pool: Pool) -> None:
    question = await store_question(pool, ANN, ANN, "q", message_id=1)
    await fetch(  # more than /remember lets in (two committed at once can pass it): the read is bounded
        pool,
        "INSERT INTO memories (user_id, content) SELECT 1, 'fact ' || n FROM generate_series(1, %s) n",
        (MAX_MEMORIES + 20,),
    )
    start = await turn_start(pool, question)
    assert start.memories == tuple(f"fact {n}" for n in range(1, MAX_MEMORIES + 1))
    assert len(await memories_of(pool, ANN)) == MAX_MEMORIES  # what /memory lists is what a turn reads


async def test_a_turn_without_memories_reads_none(pool: Pool) -> None:
    question = await store_question(pool, ANN, ANN, "q", message_id=1)
    assert (await turn_start(pool, question)).memories == ()


# -- the plans ---------------------------------------------------------------------------------------

# 1,000 other users with 20 memories each, 5 of them forgotten, and the asking user's (internal id 1)
# with statistics; the chat as busy as test_database.py's history reads make it.
MEMORIES_ONLY = (
    " INSERT INTO users (telegram_user_id) SELECT 9000 + n FROM generate_series(1, 1000) n;"
    " INSERT INTO memories (user_id, content, deleted_at)"
    " SELECT u.id, 'fact ' || n, CASE WHEN n <= 5 THEN now() END FROM users u, generate_series(1, 20) n;"
    " ANALYZE users; ANALYZE memories; ANALYZE messages"
)
MANY_MEMORIES = BUSY_CHAT + MEMORIES_ONLY
OF_ANN = {"telegram_user_id": ANN}


def sorts(plan: str) -> set[str]:
    """What the plan sorts by: a user's few live memories (at most MAX_MEMORIES rows) may be read
    by a bitmap scan of their index and sorted; nothing else may be."""
    return set(re.findall(r"Sort Key: (.+)", plan))


@pytest.mark.parametrize(
    ("statement", "params", "expected"),
    [
        (database.ADD_MEMORY, {**OF_ANN, "first_name": "Ann", "content": "x"}, "memories_user_idx"),
        (database.LIST_MEMORIES, OF_ANN, "memories_user_idx"),
        (database.FORGET_MEMORY, {**OF_ANN, "memory_id": 3}, "memories_pkey|memories_user_idx"),
        (database.FORGET_MEMORIES, OF_ANN, "memories_user_idx"),
        (database.GET_MEMORIES_IN_GROUPS, OF_ANN, "users_telegram_user_id_key"),
        (database.SET_MEMORIES_IN_GROUPS, {**OF_ANN, "allowed": True}, "Conflict Arbiter Indexes: users_telegram"),
    ],
    ids=["add", "list", "forget", "forget-all", "get-setting", "set-setting"],
)
async def test_memory_statements_read_through_indexes(
    pool: Pool, statement: str, params: dict[str, Any], expected: str
) -> None:
    await store_question(pool, ANN, ANN, "x", message_id=1)
    await fetch(pool, MANY_MEMORIES)
    plan = "\n".join(row[0] for row in await fetch(pool, "EXPLAIN " + statement, params))
    assert any(index in plan for index in expected.split("|")), plan
    assert "Seq Scan on memories" not in plan and "Seq Scan on users" not in plan, plan
    assert sorts(plan) <= {"memories.id"}, plan


@pytest.mark.parametrize(
    ("statement", "params"),
    [
        (database.FETCH_TURN_START, {"question_id": 0, "limit": 20, "budget": 8000}),
        (database.FETCH_TURN_START_SHARED, {"question_id": 0, "limit": 20, "budget": 8000}),
        (
            database.FETCH_FRESH_TURN_START,
            {"telegram_chat_id": ANN, "telegram_message_id": 1, "limit": 20, "budget": 8000},
        ),
        (database.FETCH_NEXT_CONTEXT, {"telegram_user_id": ANN, "telegram_chat_id": ANN, "limit": 20, "budget": 8000}),
    ],
    ids=["turn-start", "turn-start-shared", "fresh-turn-start", "next-context"],
)
async def test_the_context_read_finds_the_memories_through_their_index(
    pool: Pool, statement: str, params: dict[str, Any]
) -> None:
    question = await store_question(pool, ANN, ANN, "x", message_id=1)
    if "question_id" in params:
        params = {**params, "question_id": question}
    await fetch(pool, BUSY_CHAT + " ANALYZE messages")
    before = "\n".join(row[0] for row in await fetch(pool, "EXPLAIN " + statement, params))
    await fetch(pool, MEMORIES_ONLY)
    plan = "\n".join(row[0] for row in await fetch(pool, "EXPLAIN " + statement, params))
    assert re.search(r"(Bitmap )?Index Scan (using|on) memories_user_idx", plan), plan
    assert "Seq Scan on memories" not in plan and "Seq Scan on users" not in plan, plan
    assert "Seq Scan on chats" not in plan and "Seq Scan on messages" not in plan, plan
    # the history is read as before (by its index, backwards); the memories add at most their own sort
    history = re.findall(r"Index Scan Backward using messages_\w+", before)
    assert history and re.findall(r"Index Scan Backward using messages_\w+", plan) == history, plan
    assert sorts(plan) <= sorts(before) | {"memories.id"}, plan


# -- through the bot -----------------------------------------------------------------------------------


async def test_remember_list_read_by_the_next_turn_and_forget_by_button(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        assert await reply(telegram, ANN, "/remember") == REMEMBER_USAGE
        assert await reply(telegram, ANN, "/remember " + "я" * 501) == too_long(501)
        assert await reply(telegram, ANN, "/remember I am vegetarian") == "📝 Noted: I am vegetarian"
        assert await reply(telegram, ANN, "/remember My cat is Tom") == "📝 Noted: My cat is Tom"
        assert await reply(telegram, ANN, "/memory") == (
            f"What I remember about you (2 of {MAX_MEMORIES}):\n1. I am vegetarian\n2. My cat is Tom\n\n"
            + IN_GROUPS[False]
        )
        listed = keyboard_of(telegram, ANN)  # /memory's list
        assert list(buttons(listed)) == ["Forget 1", "Forget 2"]

        llm.gate.clear()  # the next turn stays mid-LLM: its start is there to read
        telegram.send("What should I cook?")
        await llm.started.wait()
        [(question,)] = await fetch(pool, "SELECT id FROM messages WHERE content = 'What should I cook?'")
        start = await turn_start(pool, question)
        assert start.memories == ("I am vegetarian", "My cat is Tom")
        llm.gate.set()
        await telegram.wait_for_messages(ANN, 6)

        # Bob presses a button of Ann's list (forged: he never sees it): nothing is forgotten
        refused = await press(telegram, listed, buttons(listed)["Forget 1"], user_id=BOB)
        assert refused.params["text"] == NOT_YOURS
        answered = await press(telegram, listed, buttons(listed)["Forget 1"], user_id=ANN)
        assert answered.params["text"] == "Forgotten."
        await telegram.wait_for(lambda: bool(telegram.calls("editMessageText")))
        edited = telegram.calls("editMessageText")[-1]
        assert (
            edited.text == f"What I remember about you (1 of {MAX_MEMORIES}):\n1. My cat is Tom\n\n" + IN_GROUPS[False]
        )
        assert [b["text"] for row in edited.params["reply_markup"]["inline_keyboard"] for b in row] == ["Forget 1"]
        again = await press(telegram, listed, buttons(listed)["Forget 1"], user_id=ANN)  # the old list's button
        assert again.params["text"] == "That one was forgotten already."
        assert await reply(telegram, ANN, "hi") == "echo: hi"
    assert await fetch(pool, "SELECT content, deleted_at IS NOT NULL FROM memories ORDER BY id") == [
        ("I am vegetarian", True),
        ("My cat is Tom", False),
    ]
    assert (await next_context(pool, ANN, ANN)).memories == ("My cat is Tom",)


async def test_forget_all_the_groups_setting_and_memories_follow_the_user(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        # kept in a group, they are the user's: the private chat lists them
        assert await reply(telegram, GROUP, "/remember I like tea", user_id=ANN) == "📝 Noted: I like tea"
        assert await reply(telegram, GROUP, "/memory", user_id=ANN) == PRIVATE_LIST  # no list in a group
        telegram.send("hello group", chat_id=GROUP, user_id=ANN)
        await until(lambda: answered(pool))
        assert (await next_context(pool, ANN, GROUP)).memories == ()  # off by default
        assert (await reply(telegram, ANN, "/memory")).startswith(
            f"What I remember about you (1 of {MAX_MEMORIES}):\n1. I like tea\n\n"
        )

        assert await reply(telegram, ANN, "/memory groups on") == GROUPS_SET[True]
        assert await reply(telegram, ANN, "/memory groups") == IN_GROUPS[True]
        assert (await reply(telegram, ANN, "/memory")).endswith(IN_GROUPS[True])
        assert (await next_context(pool, ANN, GROUP)).memories == ("I like tea",)
        assert await reply(telegram, GROUP, "/memory groups off", user_id=ANN) == GROUPS_SET[False]
        assert (await next_context(pool, ANN, GROUP)).memories == ()

        assert await reply(telegram, ANN, "/memory whatever") == MEMORY_USAGE
        assert await reply(telegram, ANN, "/remember I like coffee too") == "📝 Noted: I like coffee too"
        assert await reply(telegram, ANN, "/memory forget") == forgot_report(2)
        assert forgot_report(2) == "Done: I forgot 2 memories about you."
        assert await reply(telegram, ANN, "/memory forget") == "There was nothing to forget."
        assert await reply(telegram, ANN, "/memory") == f"{NOTHING_REMEMBERED}\n\n{IN_GROUPS[False]}"
    assert await fetch(pool, "SELECT count(*) FILTER (WHERE deleted_at IS NULL), count(*) FROM memories") == [(0, 2)]
    assert await fetch(pool, "SELECT memories_in_groups FROM users WHERE telegram_user_id = %s", (ANN,)) == [(False,)]


async def test_a_full_list_fits_one_message_and_refuses_one_more(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    await store_question(pool, ANN, ANN, "hi")
    await fetch(  # the longest memories there can be, astral characters (two UTF-16 units each) in them
        pool,
        "INSERT INTO memories (user_id, content)"
        " SELECT 1, n || ' ' || repeat('😀я', 240) FROM generate_series(1, %s) n",
        (MAX_MEMORIES,),
    )
    async with running_bot(env, telegram):
        assert await reply(telegram, ANN, "/remember one more") == FULL
        shown = await reply(telegram, ANN, "/memory")
    assert sum(2 if ord(c) > 0xFFFF else 1 for c in shown) <= 4096  # Telegram's limit, in UTF-16 units
    lines = shown.split("\n")
    assert lines[0] == f"What I remember about you ({MAX_MEMORIES} of {MAX_MEMORIES}):"
    assert [line.split(" ")[:2] for line in lines[1 : MAX_MEMORIES + 1]] == [
        [f"{n}.", str(n)] for n in range(1, MAX_MEMORIES + 1)
    ]
    assert all(line.endswith("…") for line in lines[1 : MAX_MEMORIES + 1])
    keyboard = keyboard_of(telegram, ANN).params["reply_markup"]["inline_keyboard"]
    assert [len(row) for row in keyboard] == [5] * (MAX_MEMORIES // 5)
    assert MemoryForget.unpack(keyboard[-1][-1]["callback_data"]) == MemoryForget(user_id=ANN, memory_id=MAX_MEMORIES)


async def test_memory_commands_without_a_database_say_so(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    env["DATABASE_ENABLED"] = "false"
    async with running_bot(env, telegram):
        for text in ("/remember I am vegetarian", "/memory", "/memory forget", "/memory groups on"):
            command(telegram, text)
        assert await telegram.wait_for_messages(ANN, 4) == [NO_HISTORY] * 4


async def test_the_services_run_the_same_statements(pool: Pool) -> None:
    """What the handlers call: each statement through ``context.call``."""
    memory = await context.add_memory(pool, telegram_user_id=ANN, first_name="Ann", content="via the service")
    assert memory is not None
    assert [m.content for m in await context.list_memories(pool, telegram_user_id=ANN)] == ["via the service"]
    await context.set_memories_in_groups(pool, telegram_user_id=ANN, allowed=True)
    assert await context.get_memories_in_groups(pool, telegram_user_id=ANN)
    assert await context.forget_memory(pool, telegram_user_id=ANN, memory_id=memory)
    assert await context.forget_memories(pool, telegram_user_id=ANN) == 0
    assert await context.list_memories(pool, telegram_user_id=ANN) == []

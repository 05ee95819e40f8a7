"""services.database against the real PostgreSQL of the session."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import tempfile
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import pq

from services import database, records
from services.cluster import leases
from services.cluster import signals as chat_signals
from services.database import Connection, Pool
from services.fallback.memory import RecentHistory
from services.fallback.storage import Storage
from tests.harness import BUSY_CHAT, LIVE_HISTORY, live_history, store_question

USER_A, USER_B = 111, 222
CHAT_X, CHAT_Y = 111, -1001234567890  # a private chat and a supergroup (beyond 32 bits)
DIALOG = {"telegram_user_id": USER_A, "telegram_chat_id": CHAT_X}
ADMITTED = {**DIALOG, "rate_limit": 30, "token_budget": 100_000}  # a dialog's statement with limits on


async def register(pool: Pool, user: int, chat: int, first_name: str | None = "Ann") -> None:
    await database.run(
        pool, database.upsert_user_and_chat, telegram_user_id=user, first_name=first_name, telegram_chat_id=chat
    )


async def answer(pool: Pool, question: int, content: str) -> int | None:
    return await database.run(pool, database.add_answer, question_id=question, content=content)


BUDGET = 100_000  # estimated tokens: more than any history here


def oldest_first(start: records.TurnStart) -> list[records.ContextMessage]:
    return start.dialog.history[::-1]


async def rows(pool: Pool, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if cur.description else []


async def test_upsert_user_registers_once_and_tracks_first_name(pool: Pool) -> None:
    await register(pool, USER_A, CHAT_X, "Ann")
    await register(pool, USER_A, CHAT_X, "Ann")
    assert await rows(pool, "SELECT telegram_user_id, first_name FROM users") == [(USER_A, "Ann")]
    xmin_before = await rows(pool, "SELECT xmin::text FROM users")
    await register(pool, USER_A, CHAT_X, "Ann")
    assert await rows(pool, "SELECT xmin::text FROM users") == xmin_before  # unchanged name: no write
    await register(pool, USER_A, CHAT_X, "Anna")
    assert await rows(pool, "SELECT id, first_name FROM users") == [(1, "Anna")]
    assert await rows(pool, "SELECT telegram_chat_id FROM chats") == [(CHAT_X,)]


async def test_concurrent_first_contacts_register_one_user(pool: Pool) -> None:
    await asyncio.gather(*(register(pool, USER_A, CHAT_Y, f"name{i % 2}") for i in range(20)))
    assert await rows(pool, "SELECT count(*) FROM users") == [(1,)]
    assert await rows(pool, "SELECT count(*) FROM chats") == [(1,)]


async def test_add_question_and_history_oldest_first(pool: Pool) -> None:
    await register(pool, USER_A, CHAT_X)
    ids: list[int | None] = []
    for i in range(5):
        if i % 2 == 0:
            ids.append(await store_question(pool, USER_A, CHAT_X, f"m{i}"))
        else:
            ids.append(await answer(pool, ids[-1] or 0, f"m{i}"))
    got = await live_history(pool, USER_A, CHAT_X, limit=3)
    assert [m.content for m in got] == ["m2", "m3", "m4"]
    assert [m.id for m in got] == ids[2:]
    assert [m.role for m in got] == ["user", "assistant", "user"]


async def test_history_is_in_turn_order_when_a_question_overtakes_an_answer(pool: Pool) -> None:
    # B is stored while A is still being answered: A's answer must still come before B.
    a = await store_question(pool, USER_A, CHAT_X, "A")
    b = await store_question(pool, USER_A, CHAT_X, "B")
    await answer(pool, a, "echo: A")
    await answer(pool, b, "echo: B")
    assert [m.content for m in await live_history(pool, USER_A, CHAT_X)] == ["A", "echo: A", "B", "echo: B"]
    start = await database.run(pool, database.fetch_turn_start, question_id=b, history_limit=10, budget=BUDGET)
    assert start is not None and start.answer is not None and start.answer.content == "echo: B"
    assert [m.content for m in oldest_first(start)] == ["A", "echo: A", "B"]


async def test_add_question_registers_user_and_chat_on_first_contact(pool: Pool) -> None:
    assert await store_question(pool, USER_B, CHAT_Y, "first words") == 1
    assert await rows(pool, "SELECT telegram_user_id, first_name FROM users") == [(USER_B, "Ann")]
    assert await rows(pool, "SELECT telegram_chat_id FROM chats") == [(CHAT_Y,)]


async def test_created_at_and_length_in_characters(pool: Pool) -> None:
    await register(pool, USER_A, CHAT_X)
    texts = ["hello", "Привет, мир", "👍🏽 ok", "👨‍👩‍👧", "a\u0301", ""]
    for text in texts:
        await store_question(pool, USER_A, CHAT_X, text)
    got = await live_history(pool, USER_A, CHAT_X)
    assert [m.length for m in got] == [len(t) for t in texts] == [5, 11, 5, 5, 2, 0]
    assert all(m.created_at.tzinfo is not None for m in got)
    [(now,)] = await rows(pool, "SELECT now()")
    assert all(abs((now - m.created_at).total_seconds()) < 60 for m in got)


async def test_length_cannot_be_written_by_hand(pool: Pool) -> None:
    await register(pool, USER_A, CHAT_X)
    with pytest.raises(psycopg.errors.GeneratedAlways):
        await rows(
            pool, "INSERT INTO messages (user_id, chat_id, role, content, length) VALUES (1, 1, 'user', 'x', 99)"
        )


async def test_same_millisecond_inserts_keep_insertion_order(pool: Pool) -> None:
    await register(pool, USER_A, CHAT_X)

    async def burst(conn: Connection) -> None:
        # one transaction: every row gets the very same created_at
        async with conn.transaction():
            for i in range(30):
                await database.add_question(
                    conn, telegram_user_id=USER_A, first_name="Ann", telegram_chat_id=CHAT_X, content=f"{i:02}"
                )

    await database.run(pool, burst)
    got = await live_history(pool, USER_A, CHAT_X)
    assert len({m.created_at for m in got}) == 1
    assert [m.content for m in got] == [f"{i:02}" for i in range(30)]


async def test_sql_looking_and_unusual_text_is_stored_verbatim(pool: Pool) -> None:
    await register(pool, USER_A, CHAT_X)
    texts = ["'; DROP TABLE messages; --", "%(content)s %s $1 {}", "\\x00 \\\\", "שלום עולם ‏", "<b>bold</b> *md*"]
    for text in texts:
        await store_question(pool, USER_A, CHAT_X, text)
    assert [m.content for m in await live_history(pool, USER_A, CHAT_X)] == texts
    assert await rows(pool, "SELECT count(*) FROM users") == [(1,)]


async def test_nul_byte_is_refused_by_postgresql_without_storing_anything(pool: Pool) -> None:
    # PostgreSQL text cannot hold U+0000; the context service strips it before storing (see
    # test_context); at this layer the refusal is a clean DataError and no row is written.
    await register(pool, USER_A, CHAT_X)
    with pytest.raises(psycopg.DataError):
        await store_question(pool, USER_A, CHAT_X, "a\x00b")
    assert await rows(pool, "SELECT count(*) FROM messages") == [(0,)]
    assert await store_question(pool, USER_A, CHAT_X, "still works") > 0


async def test_redelivered_telegram_message_is_stored_once_and_recognised(pool: Pool) -> None:
    async def store(chat: int) -> database.AddedQuestion:
        return await database.run(
            pool, database.add_question, telegram_user_id=USER_A, first_name=None, telegram_chat_id=chat,
            content="hi", telegram_message_id=7,
        )  # fmt: skip

    first = await store(CHAT_X)
    again = await store(CHAT_X)  # a redelivery, or a retry of a statement whose reply was lost
    assert first.new and not again.new and again.id == first.id and not again.set_aside
    other_chat = await store(CHAT_Y)  # Telegram message ids are per chat
    assert other_chat.new and other_chat.id != first.id
    assert await rows(pool, "SELECT count(*) FROM messages") == [(2,)]


async def test_add_answer_links_to_the_question_once(pool: Pool) -> None:
    await register(pool, USER_A, CHAT_X)
    question = await store_question(pool, USER_A, CHAT_X, "2+2?", message_id=1)
    assert await answer(pool, question, "4") is not None
    assert await answer(pool, question, "four") is None
    got = await live_history(pool, USER_A, CHAT_X)
    assert [(m.role, m.content) for m in got] == [("user", "2+2?"), ("assistant", "4")]
    cleared = await store_question(pool, USER_A, CHAT_X, "cleared before its answer")
    await database.run(pool, database.soft_delete_messages, telegram_user_id=USER_A, telegram_chat_id=CHAT_X)
    assert await answer(pool, cleared, "too late") is None  # a cleared question gets no answer


async def test_the_rate_limit_is_decided_by_the_storing_statement(pool: Pool) -> None:
    async def store(message_id: int) -> database.AddedQuestion:
        return await database.run(
            pool, database.add_question, telegram_user_id=USER_B, first_name=None, telegram_chat_id=CHAT_Y,
            content=f"m{message_id}", telegram_message_id=message_id, rate_limit=2,
        )  # fmt: skip

    stored = [await store(i) for i in range(1, 5)]
    assert [s.set_aside for s in stored] == [False, False, True, True]
    assert await rows(pool, "SELECT hits FROM rate_limits") == [(4,)]
    # set aside in the same row: out of the history, never awaiting an answer
    assert [m.content for m in await live_history(pool, USER_B, CHAT_Y)] == ["m1", "m2"]
    assert [t.question_id for t in await database.run(pool, database.fetch_unfinished_turns, max_age_s=60)] == [
        stored[0].id,
        stored[1].id,
    ]


async def test_retry_edit_clear_and_undo_are_admitted_by_their_own_statements(pool: Pool) -> None:
    question = await store_question(pool, USER_A, CHAT_X, "q", message_id=1)
    await answer(pool, question, "a")
    limited: dict[str, Any] = {**DIALOG, "rate_limit": 2}

    async def state() -> list[tuple[Any, ...]]:
        return await rows(pool, "SELECT content, deleted_reason, failed_at IS NULL FROM messages ORDER BY id")

    retried = await database.run(pool, database.retry_last_turn, **limited)  # hit 1
    assert (retried.id, retried.rate_limited) == (question, False)
    edited = await database.run(pool, database.edit_question, **limited, telegram_message_id=1, content="q2")  # hit 2
    assert edited is not None and edited.last and not edited.rate_limited
    before = await state()
    # over the limit from here on: each is refused, and changes nothing
    refused = database.RetriedQuestion(None, None, None, rate_limited=True)
    assert await database.run(pool, database.retry_last_turn, **limited) == refused
    edited = await database.run(pool, database.edit_question, **limited, telegram_message_id=1, content="q3")
    assert edited is not None and edited.rate_limited
    assert await database.run(pool, database.soft_delete_messages, **limited) == database.Cleared(0, rate_limited=True)
    assert (await database.run(pool, database.undo_last_turn, **limited)).rate_limited
    # the edit of a message that is not a stored question is no hit
    assert await database.run(pool, database.edit_question, **limited, telegram_message_id=9, content="x") is None
    assert await state() == before == [("q2", None, True), ("a", "retry", True)]
    assert await rows(pool, "SELECT hits FROM rate_limits") == [(6,)]


async def test_the_budget_refuses_a_retry_and_an_edit_of_the_last_question_only(pool: Pool) -> None:
    older = await store_question(pool, USER_A, CHAT_X, "older", message_id=1)
    await answer(pool, older, "a1")
    last = await store_question(pool, USER_A, CHAT_X, "last", message_id=2)
    usage: dict[str, Any] = {"prompt_tokens": 60, "completion_tokens": 40}
    await database.run(pool, database.add_answer, question_id=last, content="a2", **usage)
    spent: dict[str, Any] = {**DIALOG, "token_budget": 100}
    assert (await database.run(pool, database.retry_last_turn, **spent)).over_budget
    edited = await database.run(pool, database.edit_question, **spent, telegram_message_id=2, content="last!")
    assert edited is not None and edited.over_budget
    # an older question is not answered again: its edit needs no budget
    edited = await database.run(pool, database.edit_question, **spent, telegram_message_id=1, content="older!")
    assert edited is not None and not edited.last and not edited.over_budget
    assert await rows(pool, "SELECT content, deleted_reason FROM messages ORDER BY id") == [
        ("older!", None), ("a1", None), ("last", None), ("a2", None),
    ]  # fmt: skip
    assert (await database.run(pool, database.retry_last_turn, **DIALOG)).id == last  # no budget: asked again


async def test_a_turn_start_tells_what_is_left_to_do(pool: Pool) -> None:
    async def start(question: int) -> records.TurnStart | None:
        return await database.run(pool, database.fetch_turn_start, question_id=question, history_limit=2, budget=BUDGET)

    first = await store_question(pool, USER_A, CHAT_X, "first")
    unanswered = await start(first)
    assert unanswered is not None and unanswered.answer is None
    assert [m.content for m in oldest_first(unanswered)] == ["first"]
    reply = await answer(pool, first, "part one and part two")
    assert reply is not None
    await database.run(pool, database.record_sent_part, answer_id=reply, telegram_message_id=501, last=False)
    half_sent = await start(first)
    assert half_sent is not None and half_sent.answer == records.Answer(reply, "part one and part two", 1)
    await database.run(pool, database.record_sent_part, answer_id=reply, telegram_message_id=502, last=True)
    assert await start(first) is None  # delivered: nothing left
    assert await rows(pool, "SELECT sent_message_ids FROM messages WHERE id = %s", (reply,)) == [([501, 502],)]

    second = await store_question(pool, USER_A, CHAT_X, "second")
    third = await store_question(pool, USER_A, CHAT_X, "third")
    later = await start(second)  # the history stops at its question and keeps the limit
    assert later is not None and [m.content for m in oldest_first(later)] == ["part one and part two", "second"]
    await database.run(pool, database.set_failed, message_id=second)
    assert await start(second) is None  # failed: the user was told
    await database.run(pool, database.soft_delete_messages, telegram_user_id=USER_A, telegram_chat_id=CHAT_X)
    assert await start(third) is None  # cleared


async def test_soft_delete_keeps_rows_and_hides_them(pool: Pool) -> None:
    await register(pool, USER_A, CHAT_X)
    for i in range(3):
        await store_question(pool, USER_A, CHAT_X, f"old{i}")
    params: dict[str, Any] = {"telegram_user_id": USER_A, "telegram_chat_id": CHAT_X}
    assert await database.run(pool, database.soft_delete_messages, **params) == database.Cleared(3)
    assert await database.run(pool, database.soft_delete_messages, **params) == database.Cleared(0)
    assert await live_history(pool, USER_A, CHAT_X) == []
    assert await rows(pool, "SELECT count(*) FROM messages WHERE deleted_at IS NOT NULL") == [(3,)]
    await store_question(pool, USER_A, CHAT_X, "new")
    assert [m.content for m in await live_history(pool, USER_A, CHAT_X)] == ["new"]
    counts = await database.run(pool, database.count_messages, **params)
    assert counts == database.MessageCounts(live=1, deleted=3)


async def test_users_and_chats_are_isolated(pool: Pool) -> None:
    for user in (USER_A, USER_B):
        for chat in (CHAT_X, CHAT_Y):
            await register(pool, user, chat)
            await store_question(pool, user, chat, f"{user}@{chat}")
    for user in (USER_A, USER_B):
        for chat in (CHAT_X, CHAT_Y):
            assert [m.content for m in await live_history(pool, user, chat)] == [f"{user}@{chat}"]
    await database.run(pool, database.soft_delete_messages, telegram_user_id=USER_A, telegram_chat_id=CHAT_Y)
    assert await live_history(pool, USER_A, CHAT_Y) == []
    assert len(await live_history(pool, USER_B, CHAT_Y)) == 1
    assert len(await live_history(pool, USER_A, CHAT_X)) == 1


async def test_unfinished_turns_are_recent_unanswered_or_undelivered(pool: Pool) -> None:
    delivered = await store_question(pool, USER_A, CHAT_X, "delivered", message_id=1)
    reply = await answer(pool, delivered, "yes")
    assert reply is not None
    await database.run(pool, database.record_sent_part, answer_id=reply, telegram_message_id=9, last=True)
    undelivered = await store_question(pool, USER_A, CHAT_X, "answered, never sent", message_id=2)
    await answer(pool, undelivered, "stored only")
    unanswered = await store_question(pool, USER_A, CHAT_X, "unanswered", message_id=3)
    failed = await store_question(pool, USER_A, CHAT_X, "the LLM failed", message_id=4)
    await database.run(pool, database.set_failed, message_id=failed)
    refused = await store_question(pool, USER_B, CHAT_Y, "Telegram refused the answer", message_id=5)
    refused_answer = await answer(pool, refused, "blocked")
    assert refused_answer is not None
    await database.run(pool, database.set_failed, message_id=refused_answer)
    old = await store_question(pool, USER_B, CHAT_X, "too old", message_id=6)
    await rows(pool, "UPDATE messages SET created_at = now() - interval '1 hour' WHERE id = %s", (old,))
    got = await database.run(pool, database.fetch_unfinished_turns, max_age_s=600)
    assert got == [
        database.UnfinishedTurn(undelivered, USER_A, CHAT_X, 2, None),
        database.UnfinishedTurn(unanswered, USER_A, CHAT_X, 3, None),
    ]
    everything = await database.run(pool, database.fetch_unfinished_turns, max_age_s=7200)
    assert [t.question_id for t in everything] == [undelivered, unanswered, old]


async def test_purge_removes_only_long_deleted_messages(pool: Pool) -> None:
    await register(pool, USER_A, CHAT_X)
    for text in ("keep-live", "keep-recently-deleted", "purge"):
        await store_question(pool, USER_A, CHAT_X, text)
    await rows(pool, "UPDATE messages SET deleted_at = now() WHERE content = 'keep-recently-deleted'")
    await rows(
        pool,
        "UPDATE messages SET created_at = now() - interval '40 days',"
        " deleted_at = now() - interval '31 days' WHERE content = 'purge'",
    )
    assert await database.run(pool, database.purge_deleted_messages, days=30, limit=10) == 1
    assert await rows(pool, "SELECT content FROM messages ORDER BY id") == [("keep-live",), ("keep-recently-deleted",)]


async def test_a_purge_batch_deletes_at_most_its_limit_oldest_first(pool: Pool) -> None:
    for n in range(5):
        await store_question(pool, USER_A, CHAT_X, f"m{n}")
    await rows(pool, "UPDATE messages SET deleted_at = now() - (50 - id) * interval '1 day'")  # m0 oldest
    assert await database.run(pool, database.purge_deleted_messages, days=30, limit=2) == 2
    assert await rows(pool, "SELECT content FROM messages ORDER BY id") == [("m2",), ("m3",), ("m4",)]
    assert await database.run(pool, database.purge_deleted_messages, days=30, limit=2) == 2
    assert await database.run(pool, database.purge_deleted_messages, days=30, limit=2) == 1
    assert await database.run(pool, database.purge_deleted_messages, days=30, limit=2) == 0


async def test_purge_finds_soft_deleted_rows_through_their_partial_index(pool: Pool) -> None:
    await register(pool, USER_A, CHAT_X)
    # a table where a quarter of the rows were cleared long ago, with statistics, as in production
    await rows(
        pool,
        "INSERT INTO messages (user_id, chat_id, role, content, created_at, deleted_at)"
        " SELECT 1, 1, 'user', 'x', now() - interval '90 days',"
        "        CASE WHEN n % 4 = 0 THEN now() - interval '60 days' + n * interval '1 second' END"
        " FROM generate_series(1, 20000) n",
    )
    await rows(pool, "ANALYZE messages")
    async with pool.connection() as conn:
        cur = await conn.execute("EXPLAIN " + database.PURGE_DELETED_MESSAGES, {"days": 30, "limit": 1000})
        plan = "\n".join(row[0] for row in await cur.fetchall())
    # the batch's rows come oldest first straight from the partial index, then go by primary key:
    # no scan of the table, no sort, whatever its size
    assert "Index Scan using messages_deleted_idx" in plan and "Index Scan using messages_pkey" in plan, plan
    assert "Seq Scan" not in plan and "Sort" not in plan, plan
    index = await rows(pool, "SELECT indexdef FROM pg_indexes WHERE indexname = 'messages_deleted_idx'")
    assert index == [("CREATE INDEX messages_deleted_idx ON public.messages USING btree (deleted_at)"
                      " WHERE (deleted_at IS NOT NULL)",)]  # fmt: skip


async def test_purge_of_rate_limits_keeps_the_current_window(pool: Pool) -> None:
    await rows(
        pool,
        "INSERT INTO rate_limits (telegram_user_id, window_start, hits) VALUES"
        " (1, date_trunc('minute', now()), 3), (2, date_trunc('minute', now()) - interval '2 minutes', 5),"
        " (3, now() - interval '1 day', 1)",
    )
    assert await database.run(pool, database.purge_rate_limits) == 2
    assert await rows(pool, "SELECT telegram_user_id FROM rate_limits") == [(1,)]


USAGE_ROWS = """
    SELECT u.telegram_user_id, t.day, t.tokens FROM token_usage t JOIN users u ON u.id = t.user_id
    ORDER BY u.telegram_user_id, t.day
"""


async def test_stored_answers_count_their_tokens_per_user_and_utc_day(pool: Pool) -> None:
    async def answer_in(zone: str, question: int, prompt: int | None, completion: int | None) -> int | None:
        async def work(conn: Connection) -> int | None:
            await conn.execute("SELECT set_config('TimeZone', %s, false)", (zone,))
            try:
                return await database.add_answer(
                    conn, question_id=question, content="a", prompt_tokens=prompt, completion_tokens=completion
                )
            finally:
                await conn.execute("RESET TimeZone")

        return await database.run(pool, work)

    q1, q2, q3 = [await store_question(pool, USER_A, CHAT_X, f"q{n}", message_id=n) for n in (1, 2, 3)]
    other = await store_question(pool, USER_B, CHAT_Y, "q", message_id=1)
    # at any hour, one of these zones is on another date than UTC: the day must be UTC's
    assert await answer_in("Pacific/Kiritimati", q1, 10, 5) is not None  # UTC+14
    assert await answer_in("Pacific/Kiritimati", q1, 100, 100) is None  # answered already: nothing counted
    assert await answer_in("Pacific/Pago_Pago", q2, None, None) is not None  # UTC-11; no usage reported
    assert await answer_in("Pacific/Pago_Pago", q3, 7, None) is not None
    assert await answer_in("UTC", other, 1, 1) is not None
    today = datetime.now(UTC).date()
    assert await rows(pool, USAGE_ROWS) == [(USER_A, today, 22), (USER_B, today, 2)]


async def test_an_answer_or_summary_not_stored_still_counts_its_tokens(pool: Pool) -> None:
    today = datetime.now(UTC).date()
    group = await store_question(pool, USER_B, CHAT_Y, "a turn in a shared group", message_id=1)
    summary: dict[str, Any] = {"through_id": group, "covered": 1, "content": "notes"}
    summary |= {"prompt_tokens": 20, "completion_tokens": 5}
    assert await database.run(pool, database.add_summary, question_id=group, shared=True, **summary)
    assert await rows(pool, USAGE_ROWS) == [(USER_B, today, 25)]  # charged to the user whose turn made it
    question = await store_question(pool, USER_A, CHAT_X, "cleared while answered", message_id=1)
    await database.run(pool, database.soft_delete_messages, telegram_user_id=USER_A, telegram_chat_id=CHAT_X)
    dropped: dict[str, Any] = {"content": "a", "prompt_tokens": 7, "completion_tokens": 3}
    assert await database.run(pool, database.add_answer, question_id=question, **dropped) is None
    assert not await database.run(pool, database.add_summary, question_id=question, shared=False, **summary)
    assert not await database.run(  # the LLM wrote nothing: no summary, its tokens count
        pool, database.add_summary, question_id=group, shared=True, **{**summary, "content": ""}
    )
    assert await rows(pool, USAGE_ROWS) == [(USER_A, today, 35), (USER_B, today, 50)]
    assert await rows(pool, "SELECT content FROM summaries WHERE deleted_at IS NULL") == [("notes",)]
    assert await rows(pool, "SELECT count(*) FROM messages WHERE role = 'assistant'") == [(0,)]


async def test_a_written_back_answer_counts_once_on_the_day_it_was_made(pool: Pool) -> None:
    await store_question(pool, USER_A, CHAT_X, "asked during an outage, yesterday", message_id=7)
    made = datetime.now(UTC) - timedelta(days=1)
    for _ in range(2):  # as after a crash in the middle of a write-back
        await database.run(
            pool, database.write_back_answer, telegram_chat_id=CHAT_X, telegram_message_id=7, content="a",
            created_at=made, prompt_tokens=30, completion_tokens=12,
        )  # fmt: skip
    assert await rows(pool, USAGE_ROWS) == [(USER_A, made.date(), 42)]
    assert await rows(pool, "SELECT count(*) FROM messages WHERE role = 'assistant'") == [(1,)]


async def test_the_token_budget_is_decided_by_the_storing_statement(pool: Pool) -> None:
    async def store(message_id: int, budget: int) -> database.AddedQuestion:
        return await database.run(
            pool, database.add_question, telegram_user_id=USER_A, first_name=None, telegram_chat_id=CHAT_X,
            content=f"m{message_id}", telegram_message_id=message_id, token_budget=budget,
        )  # fmt: skip

    def kept(added: database.AddedQuestion) -> tuple[bool, bool, bool]:
        return added.new, added.set_aside, added.over_budget

    assert kept(await store(1, 100)) == (True, False, False)  # a first contact has spent nothing
    await rows(
        pool,
        "INSERT INTO token_usage (user_id, day, tokens) VALUES"
        " (1, (now() AT TIME ZONE 'UTC')::date - 1, 1000), (1, (now() AT TIME ZONE 'UTC')::date, 99)",
    )
    assert kept(await store(2, 100)) == (True, False, False)  # yesterday's tokens do not count
    await rows(pool, "UPDATE token_usage SET tokens = 100 WHERE day = (now() AT TIME ZONE 'UTC')::date")
    assert kept(await store(3, 100)) == (True, True, True)
    assert kept(await store(3, 100)) == (False, True, False)  # redelivered: stored and told once
    assert kept(await store(4, 0)) == (True, False, False)  # no budget
    assert await rows(pool, "SELECT content, deleted_reason FROM messages ORDER BY id") == [
        ("m1", None), ("m2", None), ("m3", "rate_limit"), ("m4", None),
    ]  # fmt: skip
    assert await rows(pool, "SELECT sum(tokens) FROM token_usage") == [(1100,)]  # a question spends nothing


async def test_purge_of_token_usage_keeps_the_last_three_utc_days(pool: Pool) -> None:
    await register(pool, USER_A, CHAT_X)
    await rows(
        pool,
        "INSERT INTO token_usage (user_id, day, tokens)"
        " SELECT 1, (now() AT TIME ZONE 'UTC')::date - n, n FROM unnest(ARRAY[0, 1, 2, 3, 10]) n",
    )
    assert await database.run(pool, database.purge_token_usage) == 2
    assert await rows(pool, "SELECT tokens FROM token_usage ORDER BY day DESC") == [(0,), (1,), (2,)]


@pytest.mark.parametrize(
    ("statement", "params", "expected"),
    [
        (
            database.ADD_QUESTION,
            {"telegram_user_id": 5001, "first_name": None, "telegram_chat_id": 5001, "content": "q", "tokens": 5,
             "quoted": None, "attachments": None, "telegram_message_id": 1, "telegram_thread_id": None,
             "rate_limit": 0, "token_budget": 100, "created_at": None, "holder": None, "lease_ttl_s": 0},
            "Index Scan using token_usage_pkey on token_usage",
        ),
        (
            database.ADMIT,
            {"telegram_user_id": 5001, "rate_limit": 0, "token_budget": 100},
            "Index Scan using token_usage_pkey on token_usage",
        ),
        (
            database.ADD_ANSWER,
            {"question_id": 1, "content": "a", "tokens": 5, "finish_reason": None, "prompt_tokens": 1,
             "completion_tokens": 1},
            "Conflict Arbiter Indexes: token_usage_pkey",
        ),
        (
            database.WRITE_BACK_ANSWER,
            {"telegram_chat_id": CHAT_X, "telegram_message_id": 1, "content": "a", "tokens": 5,
             "created_at": "2026-11-24", "finish_reason": None, "prompt_tokens": 1, "completion_tokens": 1},
            "Conflict Arbiter Indexes: token_usage_pkey",
        ),
        (database.FETCH_STATS, DIALOG, "Index Scan using token_usage_pkey on token_usage"),
        (database.RETRY_LAST_TURN, ADMITTED, "Index Scan using token_usage_pkey on token_usage"),
        (
            database.EDIT_QUESTION,
            {**ADMITTED, "telegram_message_id": 1, "content": "new", "tokens": 5},
            "Index Scan using token_usage_pkey on token_usage",
        ),
        (
            database.ADD_SUMMARY,
            {"question_id": 1, "through_id": 1, "covered": 1, "content": "s", "tokens": 5, "prompt_tokens": 1,
             "completion_tokens": 1},
            "Conflict Arbiter Indexes: token_usage_pkey",
        ),
    ],
    ids=["add-question", "admit", "insert-answer", "write-back-answer", "stats", "retry", "edit", "insert-summary"],
)  # fmt: skip
async def test_token_usage_is_read_and_written_by_its_primary_key(
    pool: Pool, statement: str, params: dict[str, object], expected: str
) -> None:
    # 1000 users with three days of use each, with statistics, as the daily purge leaves it
    await store_question(pool, USER_A, CHAT_X, "x", message_id=1)
    await rows(
        pool,
        "INSERT INTO users (telegram_user_id) SELECT 5000 + n FROM generate_series(1, 1000) n;"
        " INSERT INTO token_usage (user_id, day, tokens)"
        " SELECT u.id, (now() AT TIME ZONE 'UTC')::date - d, 100 FROM users u, generate_series(0, 2) d;"
        " ANALYZE token_usage",
    )
    async with pool.connection() as conn:
        cur = await conn.execute("EXPLAIN " + statement, params)
        plan = "\n".join(row[0] for row in await cur.fetchall())
    assert expected in plan, plan
    assert "Seq Scan on token_usage" not in plan, plan


async def test_schema_version_is_head(pool: Pool) -> None:
    assert await database.run(pool, database.fetch_schema_version) == "014"


async def test_schema_version_of_an_unmigrated_database(admin_url: str) -> None:
    from tests.conftest import create_database

    empty = await database.init_db(create_database(admin_url, "llmbot_empty"), size=1)
    try:
        assert await database.run(empty, database.fetch_schema_version) is None
    finally:
        await database.close_db(empty)


@pytest.mark.parametrize(
    ("statement", "params"),
    [
        (LIVE_HISTORY, {"telegram_user_id": USER_A, "telegram_chat_id": CHAT_X, "limit": 20}),
        (database.FETCH_TURN_START, {"question_id": 1, "limit": 20, "budget": BUDGET}),
        (
            database.FETCH_FRESH_TURN_START,
            {"telegram_chat_id": CHAT_X, "telegram_message_id": 1, "limit": 20, "budget": BUDGET},
        ),
    ],
    ids=["history", "turn-start", "fresh-turn-start"],
)
async def test_history_reads_are_index_scans_without_sort(pool: Pool, statement: str, params: dict[str, int]) -> None:
    # 50 users in one chat, the question the newest of its user's 1000 messages: the dialog's
    # index (user, chat, turn) must win over the chat's, read backwards with no sort
    await store_question(pool, USER_A, CHAT_X, "x")
    await rows(pool, BUSY_CHAT + " ANALYZE messages")
    if "question_id" in params:
        params = {**params, "question_id": (await rows(pool, "SELECT max(id) FROM messages"))[0][0]}
    if "telegram_message_id" in params:
        newest = "SELECT telegram_message_id FROM messages ORDER BY id DESC LIMIT 1"
        params = {**params, "telegram_message_id": (await rows(pool, newest))[0][0]}
    async with pool.connection() as conn:
        cur = await conn.execute("EXPLAIN " + statement, params)
        plan = "\n".join(row[0] for row in await cur.fetchall())
    assert "Index Scan Backward using messages_turn_idx" in plan, plan
    assert "Sort" not in plan, plan


DIALOG_OF_A_CHAT = (database.RETRY_LAST_TURN, database.UNDO_LAST_TURN, database.SOFT_DELETE_MESSAGES)


@pytest.mark.parametrize(
    ("statement", "params", "indexes"),
    [
        (
            database.SEARCH_MESSAGES,
            {**DIALOG, "query": "кошки", "everything": True, "limit": 10, "options": ""},
            ["messages_search_idx|messages_telegram_message_key"],  # empty table: see the test below
        ),
        (database.RETRY_LAST_TURN, ADMITTED, ["messages_turn_idx", "_answer_key|messages_reply_to_idx"]),
        (
            database.UNDO_LAST_TURN,
            ADMITTED,
            ["messages_turn_idx", "messages_dialog_deleted_idx", "summaries_cleared_idx", "summaries_dialog_idx"],
        ),
        (
            database.EDIT_QUESTION,
            {**ADMITTED, "telegram_message_id": 1, "content": "new", "tokens": 5},
            ["messages_telegram_message_key", "_answer_key|messages_reply_to_idx"],
        ),
        (
            database.SOFT_DELETE_MESSAGES,
            {**ADMITTED, "before": None},
            ["messages_turn_idx|messages_history_idx", "summaries_cleared_idx", "summaries_dialog_idx"],
        ),
        (database.FETCH_STATS, DIALOG, ["messages_search_idx"]),
        (database.DIALOG_MESSAGES, DIALOG, ["messages_search_idx|messages_telegram_message_key"]),
    ],
    ids=["search", "retry", "undo", "edit", "clear", "stats", "export"],
)
async def test_history_commands_read_through_indexes(
    pool: Pool, statement: str, params: dict[str, object], indexes: list[str]
) -> None:
    await store_question(pool, USER_A, CHAT_X, "Мои кошки", message_id=1)
    if statement in DIALOG_OF_A_CHAT:
        # One user's turns in a chat: the planner must see a busy chat (many users' messages), as a
        # real group gives it, to choose the dialog's index whatever earlier tests left.
        await rows(pool, BUSY_CHAT + " ANALYZE messages, summaries")
    async with pool.connection() as conn:
        await conn.execute("SET enable_seqscan = off")  # an empty table would otherwise be seq-scanned
        try:
            cur = await conn.execute("EXPLAIN " + statement, params)
            plan = "\n".join(row[0] for row in await cur.fetchall())
        finally:
            await conn.execute("RESET enable_seqscan")
    assert "Seq Scan on messages" not in plan and "Seq Scan on summaries" not in plan, plan
    assert "Seq Scan on rate_limits" not in plan and "Seq Scan on token_usage" not in plan, plan
    for choices in indexes:  # "a|b": either index serves
        assert any(index in plan for index in choices.split("|")), plan


@pytest.mark.parametrize("statement", [database.SOFT_DELETE_MESSAGES, database.UNDO_LAST_TURN], ids=["clear", "undo"])
async def test_the_summaries_a_clear_set_aside_are_found_by_chat(pool: Pool, statement: str) -> None:
    # A group member's /clear or /undo withholds (and an /undo brings back) its chat's summaries
    # that a /clear set aside: by chat, among thousands set aside in other chats.
    await store_question(pool, USER_A, CHAT_Y, "x", message_id=1)
    await rows(
        pool,
        "INSERT INTO chats (telegram_chat_id) SELECT -n FROM generate_series(2, 3000) n;"
        " INSERT INTO summaries (user_id, chat_id, through_id, covered, content, tokens, deleted_at, deleted_reason)"
        " SELECT NULL, c.id, 1, 1, 's', 5, now() - make_interval(secs => r.n), r.reason"
        " FROM chats c, (VALUES (1, 'clear'), (2, 'replaced'), (3, 'undo')) AS r (n, reason);"
        " ANALYZE summaries",
    )
    params = {"telegram_user_id": USER_A, "telegram_chat_id": CHAT_Y, "rate_limit": 0, "token_budget": 0}
    plan = "\n".join(row[0] for row in await rows(pool, "EXPLAIN " + statement, {**params, "before": None}))
    assert "summaries_cleared_idx" in plan and "Seq Scan on summaries" not in plan, plan


async def test_search_in_a_busy_group_reads_only_the_users_rows(pool: Pool) -> None:
    for user in range(50):
        await store_question(pool, 1000 + user, CHAT_Y, "hello")
    # 50 users in one group, 200 messages each, every fifth one about cats
    await rows(
        pool,
        "INSERT INTO messages (user_id, chat_id, role, content)"
        " SELECT 1 + n % 50, 1, 'user', CASE WHEN n % 5 = 0 THEN 'кошки и молоко ' ELSE 'погода и дождь ' END || n"
        " FROM generate_series(1, 10000) n",
    )
    await rows(pool, "ANALYZE messages")
    params = {"telegram_user_id": 1007, "telegram_chat_id": CHAT_Y, "query": "кошка", "everything": False}
    async with pool.connection() as conn:
        cur = await conn.execute("EXPLAIN " + database.SEARCH_MESSAGES, {**params, "limit": 10, "options": ""})
        plan = "\n".join(row[0] for row in await cur.fetchall())
    # by (user, chat) through an index of one dialog's rows (here the live history's; at scale the
    # GIN index of all rows: doc/guides/06-DATABASE.md), never by chat alone (every user's
    # messages in the group) nor the whole table
    assert "Index Scan on messages_turn_idx" in plan or "Index Scan on messages_search_idx" in plan, plan
    assert "messages_telegram_message_key" not in plan and "Seq Scan on messages" not in plan, plan


async def test_init_db_fails_fast_when_nothing_listens() -> None:
    from services.ops.local_postgres import free_port

    with pytest.raises(psycopg.OperationalError):
        await database.init_db(f"postgresql://bot:bot@127.0.0.1:{free_port()}/none", size=1, timeout_s=0.5)


async def test_waiters_that_time_out_together_share_one_probe_of_the_server(
    pool: Pool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    probes = 0

    async def counting_probe(probed: Pool) -> str | None:
        nonlocal probes
        probes += 1
        await asyncio.sleep(0.05)
        return None

    monkeypatch.setattr(database, "_new_connection_error", counting_probe)
    monkeypatch.setattr(database, "_probes", type(database._probes)())
    with caplog.at_level(logging.INFO, logger="services.database"):
        answers = await asyncio.gather(*(database._server_answers_shared(pool) for _ in range(50)))
    assert answers == [True] * 50 and probes == 1
    assert ["every database connection is busy" in r.message for r in caplog.records] == [True]  # said once
    monkeypatch.setattr(database, "PROBE_SHARED_S", 0.0)
    await asyncio.sleep(0.01)
    assert await database._server_answers_shared(pool) and probes == 2  # a stale answer is asked again


LEASE = {"telegram_chat_id": CHAT_X, "holder": "a", "ttl_s": 30}


@pytest.mark.parametrize(
    ("statement", "params", "indexes"),
    [
        (
            leases.NEXT_QUESTION,
            {**LEASE, "finished": None},
            [
                "chats_telegram_chat_id_key",
                "chat_leases_pkey",
                "messages_chat_turn_idx",
                "_answer_key|messages_reply_to_idx",
            ],
        ),
        (leases.TAKE, {**LEASE, "question_id": 1}, ["chats_telegram_chat_id_key", "chat_leases_pkey"]),
        (leases.TAKE_EXPIRED, {"holder": "a", "ttl_s": 30, "limit": 100}, ["chat_leases_expired_idx"]),
        (leases.RENEW, {"telegram_chat_ids": [CHAT_X], "holder": "a", "ttl_s": 30}, ["chat_leases_pkey"]),
        (leases.EXPIRE_MINE, {"holder": "a"}, []),  # at start-up and shutdown only
        (
            chat_signals.NOTIFY_HOLDER,
            {
                "kind": "stop",
                "telegram_chat_id": CHAT_X,
                "telegram_user_id": USER_A,
                "ident": None,
                "holder": "a",
                "channel": "x",
            },
            ["chats_telegram_chat_id_key", "chat_leases_pkey"],
        ),
        (
            database.ADD_QUESTION,
            {
                "telegram_user_id": USER_A,
                "first_name": "Ann",
                "telegram_chat_id": CHAT_X,
                "content": "x",
                "tokens": 5,
                "quoted": None,
                "attachments": None,
                "telegram_message_id": 2,
                "telegram_thread_id": None,
                "rate_limit": 0,
                "token_budget": 0,
                "created_at": None,
                "holder": "a",
                "lease_ttl_s": 30,
            },
            ["messages_chat_turn_idx"],  # the first lease of a chat starts past its history
        ),
    ],
    ids=["next-question", "take", "take-expired", "renew", "expire-mine", "notify-holder", "add-question"],
)
async def test_lease_statements_read_through_indexes(
    pool: Pool, statement: str, params: dict[str, object], indexes: list[str]
) -> None:
    await store_question(pool, USER_A, CHAT_X, "hello", message_id=1)
    # 5,000 chats with leases, half of them held, and statistics: on an empty table the planner
    # takes any index at all once sequential scans are off (it took chat_leases_expired_idx
    # for a lookup by key in one CI run)
    await rows(
        pool,
        "INSERT INTO chats (telegram_chat_id) SELECT -n FROM generate_series(1, 5000) n;"
        " INSERT INTO chat_leases (chat_id, holder, expires_at, done_through)"
        " SELECT id, CASE WHEN id % 2 = 0 THEN 'b' END, now() + interval '30 seconds', 0 FROM chats;"
        " ANALYZE chats; ANALYZE chat_leases",
    )
    async with pool.connection() as conn:
        await conn.execute("SET enable_seqscan = off")  # messages holds one row: it would be seq-scanned
        try:
            cur = await conn.execute("EXPLAIN " + statement, params)
            plan = "\n".join(row[0] for row in await cur.fetchall())
        finally:
            await conn.execute("RESET enable_seqscan")
    assert "Seq Scan on messages" not in plan and "Seq Scan on chat_leases" not in plan, plan
    for choices in indexes:
        assert any(index in plan for index in choices.split("|")), plan


async def traced_turn(database_url: str, message_id: int, *, read: database.StartRead | None) -> str:
    """libpq's trace of the database work of one returning user's text message, as the turn
    pipeline does it through the storage (``read``: the turn's start read with the question,
    the chat being idle), on a pool of one connection."""
    pool = await database.init_db(database_url, size=1)
    storage = Storage(pool, history=RecentHistory(10_000, per_dialog=20), spool=None)

    async def turn(message: int) -> None:
        question = await storage.add_question(
            user_id=1, first_name="A", chat_id=1, message_id=message, thread_id=None, content="q", rate_limit=60,
            read=read,
        )  # fmt: skip
        start = question.start or await storage.start_turn(question, history_limit=20, budget=7_168)
        assert start is not None and start.dialog.history[0].content == "q"
        answer = await storage.add_answer(question, "a")
        assert answer is not None
        await storage.record_sent_part(question, answer, sent_message_id=message + 1000, last=True)

    try:
        await turn(message_id - 1)  # the user and the chat are registered: a returning user's turn
        with tempfile.TemporaryFile("w+") as trace:
            async with pool.connection() as conn:
                conn.pgconn.trace(trace.fileno())
                conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
            await turn(message_id)
            conn.pgconn.untrace()  # directly: taking it from the pool again would be traced too
            trace.seek(0)
            return trace.read()
    finally:
        await database.close_db(pool)


def round_trips(trace: str) -> int:
    """How often the client sent and then waited for the server (F lines, then B lines)."""
    directions = [line[0] for line in trace.splitlines() if line[:1] in ("F", "B")]
    return sum(1 for sent, back in itertools.pairwise(directions) if (sent, back) == ("F", "B"))


async def test_a_fresh_turn_in_an_idle_chat_costs_its_three_commits_and_no_more_round_trips(
    pool: Pool, database_url: str
) -> None:
    """ADR-04: the question (with the turn's start read in the same round trip), the answer,
    the delivery. A turn queued behind another reads its start on its own: four."""
    idle = await traced_turn(database_url, 2, read=database.StartRead(history_limit=20, budget=7_168))
    queued = await traced_turn(database_url, 12, read=None)
    assert [round_trips(idle), round_trips(queued)] == [3, 4]
    executes = re.compile(r"^F\s+\d+\s+Execute", flags=re.MULTILINE)
    assert [len(executes.findall(idle)), len(executes.findall(queued))] == [4, 4]  # the same statements

"""Property: however users, chats, messages and /clear interleave, each (user, chat) sees
exactly its own live messages, in order, and every message is stored once."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services import context, database
from tests.harness import live_history

USERS = st.sampled_from([1, 2, 3])
CHATS = st.sampled_from([1, 2, -1001])
OPS = st.lists(
    st.tuples(USERS, CHATS, st.sampled_from(["say", "say", "say", "clear"]), st.integers(0, 3)),
    min_size=1,
    max_size=40,
)


async def play(url: str, ops: list[tuple[int, int, str, int]]) -> None:
    pool = await database.init_db(url, size=4)
    try:
        async with pool.connection() as conn:
            await conn.execute("TRUNCATE messages, chats, users, rate_limits, update_claims RESTART IDENTITY CASCADE")
        expected: dict[tuple[int, int], list[str]] = defaultdict(list)
        per_key: dict[tuple[int, int], list[tuple[str, int, int]]] = defaultdict(list)
        for index, (user, chat, op, pause) in enumerate(ops):
            per_key[user, chat].append((op, index, pause))
            if op == "clear":
                expected[user, chat].clear()
            else:
                expected[user, chat].append(f"{user}/{chat}/{index}")

        async def run_key(user: int, chat: int, steps: list[tuple[str, int, int]]) -> None:
            for op, index, pause in steps:
                for _ in range(pause):  # lets other keys' steps run in between
                    await asyncio.sleep(0)
                if op == "clear":
                    await context.soft_delete_messages(pool, telegram_user_id=user, telegram_chat_id=chat)
                else:
                    await context.add_question(
                        pool,
                        telegram_user_id=user,
                        first_name=None,
                        telegram_chat_id=chat,
                        telegram_message_id=index,
                        telegram_thread_id=None,
                        content=f"{user}/{chat}/{index}",
                    )

        await asyncio.gather(*(run_key(user, chat, steps) for (user, chat), steps in per_key.items()))
        for user, chat in per_key:
            got = await live_history(pool, user, chat, limit=1000)
            assert [m.content for m in got] == expected[user, chat]
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT count(*), count(DISTINCT content) FROM messages")
            says = sum(op == "say" for _, _, op, _ in ops)
            assert await cur.fetchone() == (says, says)
    finally:
        await database.close_db(pool)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_interleaved_dialogs_never_mix(database_url: str, ops: list[tuple[int, int, str, int]]) -> None:
    asyncio.run(play(database_url, ops))

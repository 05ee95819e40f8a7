"""The failure model (services/failures.py, ADR-08) through the real bot and the real PostgreSQL:
one user's input, a broken connection or a quick restart never takes the service into outage
mode; only a server that refuses new connections does, and it is found out at once."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import psycopg
import pytest
from psycopg_pool import PoolTimeout

from bench.standins import LLMStandIn, TelegramStandIn
from services import context, database
from services.database import Pool
from services.failures import BadRequest, Failure, classify
from services.fallback.memory import RecentHistory
from services.fallback.storage import Storage
from services.ops.local_postgres import LocalPostgres, free_port
from services.turn.turn import DB_APOLOGY, HISTORY_MISSING
from tests.harness import bot_command, fetch, fetch_after_outage, running_bot
from tests.test_health import get

GUARD_APP = "llmbot-under-test"  # the bot's connections, which the killer below ends


async def error_of(pool: Pool, query: str, params: Any) -> psycopg.Error:
    async with pool.connection() as conn:
        try:
            await conn.execute(query, params)
        except psycopg.Error as error:
            return error
    raise AssertionError("the statement succeeded")


async def test_each_error_postgresql_raises_has_its_class(pool: Pool, database_url: str) -> None:
    assert classify(await error_of(pool, "SELECT %s::real", (1e-50,))) is Failure.BAD_REQUEST  # 22003
    assert classify(await error_of(pool, "SELECT %s::text", ("a\x00b",))) is Failure.BAD_REQUEST  # the driver's
    assert classify(await error_of(pool, "INSERT INTO users (telegram_user_id) VALUES (NULL)", None)) is (
        Failure.BAD_REQUEST  # 23502
    )
    assert classify(await error_of(pool, "SELECT no_such_column FROM users", None)) is Failure.BUG  # 42703
    tsquery = "SELECT websearch_to_tsquery('english', %s)"
    assert classify(await error_of(pool, tsquery, ("-" * 100 + "x",))) is Failure.BUG  # XX000: an edge's job
    assert classify(PoolTimeout()) is Failure.OUTAGE
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as victim:
        pid = victim.info.backend_pid
        await fetch(pool, "SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError) as ended:
            await victim.execute("SELECT 1")
        assert classify(ended.value) is Failure.BROKEN


async def test_input_the_database_refuses_is_a_bad_request_and_the_storage_stays_healthy(pool: Pool) -> None:
    storage = Storage(pool, history=RecentHistory(1000, per_dialog=10), spool=None)
    with pytest.raises(BadRequest, match="22003"):
        async with storage.database() as stored:
            await context.set_chat_setting(
                stored, telegram_chat_id=1, name="temperature", value=1e-50, telegram_user_id=1
            )
    assert not storage.degraded
    async with storage.database() as stored:
        assert (await context.get_chat_settings(stored, telegram_chat_id=1)).temperature is None


async def test_one_users_odd_commands_leave_everyone_else_served(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    env = {**env, "METRICS_PORT": str(free_port())}
    odd = ["/search " + "-" * 100 + "x", "/search " + "- " * 60 + "x", "/temperature 1e-50"]
    async with running_bot(env, telegram) as dp:
        telegram.send("my cat is called Tom", user_id=2)
        await telegram.wait_for_messages(2, 1)
        for text in odd:
            telegram.send(text, user_id=1, entities=bot_command(text))
        replies = await telegram.wait_for_messages(1, len(odd))
        assert (await get(env, "/healthz"))[0] == 200
        telegram.send("what is my cat called?", user_id=2)
        answers = await telegram.wait_for_messages(2, 2)
        assert not dp["dialog_store"].degraded
        assert (await get(env, "/healthz"))[0] == 200
    assert DB_APOLOGY not in replies and replies[2].startswith("Temperature in this chat: 0.")
    assert answers == ["echo: my cat is called Tom", "echo: what is my cat called?"]  # no HISTORY_MISSING
    assert [m["content"] for m in llm.conversations[-1][1:]] == [
        "my cat is called Tom", "echo: my cat is called Tom", "what is my cat called?",
    ]  # fmt: skip


async def test_names_postgresql_cannot_store_are_cleaned_at_the_edge(
    env: dict[str, str], telegram: TelegramStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram) as dp:
        telegram.send("hi", user_id=1, first_name="A\x00nn")
        telegram.send("hey\x00", user_id=2, first_name="\ud800Bo")
        telegram.send("hello", user_id=3)  # the marker: the next user is served too
        assert await telegram.wait_for_messages(1, 1) == ["echo: hi"]
        assert await telegram.wait_for_messages(2, 1) == ["echo: hey\ufffd"]
        assert await telegram.wait_for_messages(3, 1) == ["echo: hello"]
        assert not dp["dialog_store"].degraded and dp["dialog_store"].spooled == 0
    names = await fetch(pool, "SELECT telegram_user_id, first_name FROM users ORDER BY 1")
    assert names == [(1, "A\ufffdnn"), (2, "\ufffdBo"), (3, "Ann")]
    rows = await fetch(
        pool, "SELECT u.telegram_user_id, m.content FROM messages m JOIN users u ON u.id = m.user_id"
        " WHERE m.role = 'user' ORDER BY 1",
    )  # fmt: skip
    assert rows == [(1, "hi"), (2, "hey\ufffd"), (3, "hello")]  # each once


async def kill_backends(database_url: str, every_s: float, for_s: float) -> int:
    """End every backend of the bot's every ``every_s`` for ``for_s``; how many were ended."""
    ended = 0
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        loop = asyncio.get_running_loop()
        until = loop.time() + for_s
        while loop.time() < until:
            cur = await conn.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (GUARD_APP,),
            )
            ended += (await cur.fetchone() or (0,))[0]
            await asyncio.sleep(every_s)
    return ended


@pytest.mark.slow
@pytest.mark.parametrize("run", range(5))
async def test_backends_ended_under_a_burst_are_replaced_without_an_outage(
    run: int, env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool, database_url: str
) -> None:
    env = {**env, "DATABASE_URL": f"{database_url}?application_name={GUARD_APP}", "DB_POOL_TIMEOUT_S": "10"}
    llm.delay = 0.2
    users = range(1, 21)
    async with running_bot(env, telegram) as dp:
        killer = asyncio.create_task(kill_backends(database_url, every_s=0.03, for_s=2.0))
        for user in users:
            telegram.send(f"question of {user}", user_id=user)
            await asyncio.sleep(0.05)  # the burst spreads over the killing
        answers = {user: await telegram.wait_for_messages(user, 1, timeout=30) for user in users}
        ended = await killer
        assert not dp["dialog_store"].degraded and dp["dialog_store"].spooled == 0
    assert ended > 0
    assert answers == {user: [f"echo: question of {user}"] for user in users}  # no notice, no apology
    stored = await fetch_after_outage(pool, "SELECT content, count(*) FROM messages GROUP BY content ORDER BY content")
    expected = sorted(text for user in users for text in (f"question of {user}", f"echo: question of {user}"))
    assert stored == [(text, 1) for text in expected]  # each stored once


async def test_a_quick_restart_of_postgresql_costs_the_next_turn_no_pool_timeout(
    env: dict[str, str], telegram: TelegramStandIn, pool: Pool, cluster: LocalPostgres
) -> None:
    # With the pool's connections checked as handed out, psycopg-pool waited longer after each
    # failed check (1 s, 2 s, 4 s...): the next turn came 7 s later here, 20 s in a deployment.
    timeout_s = 15.0
    env = {**env, "DB_POOL_TIMEOUT_S": str(timeout_s), "DB_POOL_SIZE": "4"}
    async with running_bot(env, telegram) as dp:
        telegram.send("before")
        await telegram.wait_for_messages(1, 1)
        await asyncio.to_thread(cluster.stop)
        await asyncio.to_thread(cluster.start)
        telegram.send("after")
        # The back-off alone took 1 + 2 + 4 s; now the stale connections are dropped at once.
        assert (await telegram.wait_for_messages(1, 2, timeout=timeout_s / 5))[1] == "echo: after"
        assert not dp["dialog_store"].degraded


async def test_a_server_that_refuses_connections_is_an_outage_at_once(
    env: dict[str, str], telegram: TelegramStandIn, pool: Pool, cluster: LocalPostgres
) -> None:
    # Before, the first user waited the whole pool timeout before the bot called it an outage.
    timeout_s = 15.0
    env = {**env, "DB_POOL_TIMEOUT_S": str(timeout_s)}
    async with running_bot(env, telegram) as dp:
        telegram.send("before")
        await telegram.wait_for_messages(1, 1)
        await asyncio.to_thread(cluster.stop)
        try:
            telegram.send("during")
            answers = await telegram.wait_for_messages(1, 2, timeout=timeout_s * 0.6)
            assert answers[1] == "echo: during" and dp["dialog_store"].degraded  # from memory, no notice
        finally:
            await asyncio.to_thread(cluster.start)
        with contextlib.suppress(Exception):
            await pool.check()
    assert HISTORY_MISSING not in answers


async def test_a_busy_pool_is_waited_for_not_taken_for_an_outage(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    probed = asyncio.Event()
    ask = database._new_connection_error

    async def probe(probed_pool: Pool) -> str | None:
        answer = await ask(probed_pool)
        probed.set()
        return answer

    monkeypatch.setattr(database, "_new_connection_error", probe)
    monkeypatch.setattr(database, "_probes", type(database._probes)())
    held = [await pool.getconn() for _ in range(pool.max_size)]
    try:
        waiting = asyncio.ensure_future(database.run(pool, database.fetch_schema_version))
        await asyncio.wait_for(probed.wait(), 10)  # kept waiting, it asked the server, which answers
    finally:
        for conn in held:
            await pool.putconn(conn)
    assert await waiting is not None  # served once a connection freed up, not refused as an outage

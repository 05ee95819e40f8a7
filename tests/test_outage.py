"""A database outage loses nothing: the real PostgreSQL is stopped and started under the real
bot; the bot answers from memory, spools what it must write, and writes it back in order."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from aiogram import Dispatcher

from bench.standins import LLMStandIn, TelegramStandIn
from services.database import Pool
from services.ops.local_postgres import LocalPostgres
from services.turn.turn import DB_APOLOGY, HISTORY_MISSING
from tests.harness import BotProcess, fetch_after_outage, history_of, outage, running_bot, until


async def delivered(pool: Pool, count: int) -> bool:
    return await fetch_after_outage(pool, "SELECT count(*) FROM messages WHERE delivered_at IS NOT NULL") == [(count,)]


async def back_to_the_database(dp: Dispatcher, telegram: TelegramStandIn) -> None:
    store = dp["dialog_store"]
    await telegram.wait_for(lambda: not store.degraded, timeout=30)


def spooled_lines(env: dict[str, str]) -> int:
    spool = Path(env["SPOOL_PATH"])
    return spool.read_text().count("\n") if spool.exists() else 0


def last_request_of(llm: LLMStandIn, text: str) -> list[str]:
    return next(history_of(c) for c in reversed(llm.conversations) if c[-1]["content"] == text)


DIALOGS = """
    SELECT u.telegram_user_id, m.content, m.deleted_at IS NOT NULL
    FROM messages m JOIN users u ON u.id = m.user_id
    ORDER BY u.telegram_user_id, coalesce(m.reply_to_id, m.id), m.id
"""


async def test_three_users_converse_across_an_outage_and_nothing_is_lost(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool, cluster: LocalPostgres
) -> None:
    async with running_bot(env, telegram) as dp:
        for user in (1, 2):
            telegram.send(f"{user}: before", user_id=user)
            await telegram.wait_for_messages(user, 1)
        await until(lambda: delivered(pool, 2))  # the delivery record follows the send
        with outage(cluster):
            telegram.send("1: during", user_id=1)
            assert await telegram.wait_for_messages(1, 2, timeout=30) == ["echo: 1: before", "echo: 1: during"]
            telegram.send("/clear", user_id=2)
            await telegram.wait_for_messages(2, 2, timeout=30)
            telegram.send("2: after the clear", user_id=2)
            await telegram.wait_for_messages(2, 3, timeout=30)
            telegram.send("3: hello, I am new", user_id=3)
            await telegram.wait_for_messages(3, 2, timeout=30)
            assert dp["dialog_store"].degraded and dp["dialog_store"].spooled > 0
        await back_to_the_database(dp, telegram)
        for user in (1, 2, 3):
            telegram.send(f"{user}: back", user_id=user)
        await telegram.wait_for(lambda: all(len(telegram.messages_to(u)) == n for u, n in ((1, 3), (2, 4), (3, 3))))

    assert last_request_of(llm, "1: during") == ["1: before", "echo: 1: before", "1: during"]  # from memory
    assert telegram.messages_to(2)[1] == "Done: I forgot 2 message(s). Let's start over."
    assert last_request_of(llm, "2: after the clear") == ["2: after the clear"]
    assert telegram.messages_to(3) == [HISTORY_MISSING, "echo: 3: hello, I am new", "echo: 3: back"]
    # after the return: the whole history, from the database
    assert last_request_of(llm, "1: back") == [
        "1: before", "echo: 1: before", "1: during", "echo: 1: during", "1: back",
    ]  # fmt: skip
    assert last_request_of(llm, "2: back") == ["2: after the clear", "echo: 2: after the clear", "2: back"]
    assert last_request_of(llm, "3: back") == ["3: hello, I am new", "echo: 3: hello, I am new", "3: back"]
    assert await fetch_after_outage(pool, DIALOGS) == [
        (1, "1: before", False), (1, "echo: 1: before", False), (1, "1: during", False),
        (1, "echo: 1: during", False), (1, "1: back", False), (1, "echo: 1: back", False),
        (2, "2: before", True), (2, "echo: 2: before", True), (2, "2: after the clear", False),
        (2, "echo: 2: after the clear", False), (2, "2: back", False), (2, "echo: 2: back", False),
        (3, "3: hello, I am new", False), (3, "echo: 3: hello, I am new", False), (3, "3: back", False),
        (3, "echo: 3: back", False),
    ]  # fmt: skip
    undelivered = await fetch_after_outage(
        pool, "SELECT count(*) FROM messages WHERE role = 'assistant' AND delivered_at IS NULL"
    )
    assert undelivered == [(0,)]


async def test_a_restart_during_the_outage_keeps_the_spool(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool, cluster: LocalPostgres
) -> None:
    first = BotProcess(env, telegram)
    await first.start()
    telegram.send("before")
    await telegram.wait_for_messages(1, 1)
    with outage(cluster):
        telegram.send("during")
        await telegram.wait_for_messages(1, 2, timeout=30)
        assert await first.stop(signal.SIGTERM) == 0, first.output()
        assert spooled_lines(env) >= 3  # question, answer, delivery
    second = BotProcess(env, telegram)
    await second.start()

    async def written_back() -> bool:
        return "write-back finished" in second.output()

    await until(written_back)
    telegram.send("after")
    await telegram.wait_for_messages(1, 3, timeout=30)
    assert await second.stop() == 0, second.output()
    assert telegram.messages_to(1) == ["echo: before", "echo: during", "echo: after"]
    assert history_of(llm.conversations[-1]) == ["before", "echo: before", "during", "echo: during", "after"]
    assert await fetch_after_outage(pool, "SELECT content, delivered_at IS NOT NULL FROM messages ORDER BY id") == [
        ("before", False), ("echo: before", True), ("during", False), ("echo: during", True),
        ("after", False), ("echo: after", True),
    ]  # fmt: skip
    assert spooled_lines(env) == 0  # written back, then removed


async def test_a_full_spool_apologises_and_keeps_what_it_holds(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool, cluster: LocalPostgres
) -> None:
    env["SPOOL_MAX_ITEMS"] = "3"  # one turn: its question, its answer, its delivery
    async with running_bot(env, telegram) as dp:
        with outage(cluster):
            telegram.send("kept")
            await telegram.wait_for_messages(1, 2, timeout=30)  # "older messages unavailable", the answer
            telegram.send("no room for this one")
            await telegram.wait_for_messages(1, 3, timeout=30)
        await back_to_the_database(dp, telegram)
    assert telegram.messages_to(1) == [HISTORY_MISSING, "echo: kept", DB_APOLOGY]
    assert await fetch_after_outage(pool, "SELECT content FROM messages ORDER BY id") == [("kept",), ("echo: kept",)]
    assert [history_of(c) for c in llm.conversations] == [["kept"]]


async def test_without_a_database_the_bot_converses_from_memory(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    env["DATABASE_ENABLED"] = "false"
    env["DATABASE_URL"] = "postgresql://nobody:nothing@127.0.0.1:1/none"  # never used
    async with running_bot(env, telegram):
        telegram.send("/start")
        await telegram.wait_for_messages(1, 1)
        for text in ("one", "two"):
            telegram.send(text)
        await telegram.wait_for_messages(1, 3)
        telegram.send("/clear")
        await telegram.wait_for_messages(1, 4)
        telegram.send("three")
        replies = await telegram.wait_for_messages(1, 5)
    assert replies[1:] == ["echo: one", "echo: two", "Done: I forgot 4 message(s). Let's start over.", "echo: three"]
    assert [history_of(c) for c in llm.conversations] == [["one"], ["one", "echo: one", "two"], ["three"]]
    assert HISTORY_MISSING not in replies  # nothing is missing: memory is all there is
    assert await fetch_after_outage(pool, "SELECT count(*) FROM messages") == [(0,)]
    assert spooled_lines(env) == 0


async def test_spooled_writes_written_back_twice_store_nothing_twice(pool: Pool, tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from services import database
    from services.fallback import spool
    from services.fallback.spool import Spool, Spooled

    t0 = datetime.now(UTC) - timedelta(minutes=5)
    items = [
        Spooled("question", 1, 1, t0, 10, "Ann", None, "q1"),
        Spooled("answer", 1, 1, t0 + timedelta(seconds=1), 10, text="a1"),
        Spooled("sent", 1, 1, t0 + timedelta(seconds=2), 10, sent_message_id=500, last=True),
        Spooled("clear", 1, 1, t0 + timedelta(seconds=3)),
        Spooled("question", 1, 1, t0 + timedelta(seconds=4), 11, "Ann", None, "q2"),
        Spooled("failed", 1, 1, t0 + timedelta(seconds=5), 11),
    ]
    file = Spool(tmp_path / "writes.jsonl", max_items=10)
    for item in items:
        file.add(item)
    assert Spool(tmp_path / "writes.jsonl", max_items=10).load() == items  # survives a restart

    async def write_all(conn: database.Connection) -> None:
        for item in items:
            await spool.write_back(conn, item)

    for _ in range(2):  # as after a crash in the middle of a write-back
        await database.run(pool, write_all)
    assert await fetch_after_outage(
        pool,
        "SELECT content, deleted_at IS NOT NULL, delivered_at IS NOT NULL, sent_message_ids, failed_at IS NOT NULL"
        " FROM messages ORDER BY id",
    ) == [
        ("q1", True, False, None, False),
        ("a1", True, True, [500], False),
        ("q2", False, False, None, True),
    ]


async def test_a_spooled_write_the_database_refuses_is_set_aside_and_the_rest_written_back(
    pool: Pool, tmp_path: Path
) -> None:
    from services.fallback.memory import RecentHistory
    from services.fallback.spool import Spool, Spooled, now
    from services.fallback.storage import Storage
    from services.ops.metrics import REGISTRY

    path = tmp_path / "writes.jsonl"
    left = Spool(path, max_items=10)  # what a process stopped during an outage left
    left.add(Spooled("question", 7, 7, now(), message_id=1, first_name="Ann", text="poison \x00"))
    left.add(Spooled("question", 7, 7, now(), message_id=2, first_name="Ann", text="fine"))
    before = REGISTRY.get_sample_value("llmbot_spool_set_aside_total") or 0.0
    storage = Storage(pool, history=RecentHistory(10_000, per_dialog=10), spool=Spool(path, 10), probe_every_s=0.05)
    try:
        assert len(storage.resume_spool()) == 2
        await until(lambda: asyncio.sleep(0, not storage.degraded))
    finally:
        await storage.close()
    assert storage.spooled == 0 and not path.exists()
    assert await fetch_after_outage(pool, "SELECT telegram_message_id, content FROM messages ORDER BY id") == [
        (2, "fine")
    ]
    assert REGISTRY.get_sample_value("llmbot_spool_set_aside_total") == before + 1

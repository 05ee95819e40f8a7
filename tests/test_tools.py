"""make db-seed and make db-purge, in-process and through their command lines."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services import database
from services.database import Pool
from services.ops import retention, seed
from services.ops.local_postgres import free_port
from tests.harness import ROOT


async def test_seed_is_idempotent(pool: Pool) -> None:
    first = await database.run(pool, seed.seed)
    assert first == sum(len(texts) for *_, texts in seed.DIALOGS)
    assert await database.run(pool, seed.seed) == 0
    counts = await database.run(pool, database.count_messages, telegram_user_id=seed.ANN, telegram_chat_id=seed.ANN)
    assert counts == database.MessageCounts(live=4, deleted=0)


async def test_purge_deletes_old_soft_deleted_messages(pool: Pool) -> None:
    await database.run(pool, seed.seed)
    async with pool.connection() as conn:  # a summary for each of Bob's and Ann's private chats
        await conn.execute(
            "INSERT INTO summaries (user_id, chat_id, through_id, covered, content, tokens)"
            " SELECT u.id, c.id, 1, 1, 'notes', 5 FROM users u JOIN chats c ON c.telegram_chat_id = u.telegram_user_id"
            " WHERE u.telegram_user_id = ANY(%s)",
            ([seed.ANN, seed.BOB],),
        )
    await database.run(pool, database.soft_delete_messages, telegram_user_id=seed.BOB, telegram_chat_id=seed.BOB)
    assert await retention.purge(pool, days=1) == 0  # deleted just now: kept
    assert await retention.purge(pool, days=0) == 2
    async with pool.connection() as conn:  # Bob's summary went with his messages, Ann's stays
        left = await (await conn.execute("SELECT content, deleted_at IS NULL FROM summaries")).fetchall()
    assert left == [("notes", True)]


async def test_purge_deletes_in_batches_until_none_is_left(pool: Pool) -> None:
    await database.run(pool, seed.seed)
    for user, chat in ((seed.ANN, seed.ANN), (seed.ANN, seed.GROUP), (seed.BOB, seed.GROUP)):
        await database.run(pool, database.soft_delete_messages, telegram_user_id=user, telegram_chat_id=chat)
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO rate_limits (telegram_user_id, window_start, hits)"
            " VALUES (1, now() - interval '5 minutes', 9), (2, date_trunc('minute', now()), 1)"
        )
    assert await retention.purge(pool, days=0, batch=3) == 8  # batches of 3, 3 and 2
    counts = await database.run(pool, database.count_messages, telegram_user_id=seed.BOB, telegram_chat_id=seed.BOB)
    assert counts == database.MessageCounts(live=2, deleted=0)
    async with pool.connection() as conn:
        left = await (await conn.execute("SELECT telegram_user_id FROM rate_limits")).fetchall()
    assert left == [(2,)]  # the past window is gone, the current one kept


async def test_purge_without_retention_keeps_messages_and_clears_past_token_counts(pool: Pool) -> None:
    await database.run(pool, seed.seed)
    await database.run(pool, database.soft_delete_messages, telegram_user_id=seed.BOB, telegram_chat_id=seed.BOB)
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO token_usage (user_id, day, tokens)"
            " SELECT id, (now() AT TIME ZONE 'UTC')::date - d, 5 FROM users, unnest(ARRAY[0, 3]) d"
        )
    assert await retention.purge(pool, days=None) == 0
    counts = await database.run(pool, database.count_messages, telegram_user_id=seed.BOB, telegram_chat_id=seed.BOB)
    assert counts.deleted == 2
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT DISTINCT (now() AT TIME ZONE 'UTC')::date - day FROM token_usage")
        days = await cur.fetchall()
    assert days == [(0,)]


def run_tool(module: str, *args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


async def test_command_lines(pool: Pool, database_url: str) -> None:
    seeded = run_tool("services.ops.seed", database_url=database_url)
    assert seeded.returncode == 0, seeded.stderr
    assert "seeded 10 new message(s); Ann's private chat holds 4 live message(s)" in seeded.stdout
    purged = run_tool("services.ops.retention", "--days", "30", database_url=database_url)
    assert purged.returncode == 0, purged.stderr
    assert "purged 0 message(s)" in purged.stdout
    refused = run_tool("services.ops.retention", "--days", "-1", database_url=database_url)
    assert refused.returncode == 2 and "--days must be 0 or more" in refused.stderr


@pytest.mark.parametrize(
    "tool", [["services.ops.seed"], ["services.ops.retention", "--days", "30"]], ids=["seed", "purge"]
)
def test_command_lines_without_a_database_say_so_in_one_line(tool: list[str]) -> None:
    nowhere = f"postgresql://bot:bot@127.0.0.1:{free_port()}/llmbot"  # nothing listens: refused at once
    failed = run_tool(*tool, database_url=nowhere)
    assert failed.returncode == 1
    assert failed.stderr == (
        "error: cannot connect to the database at DATABASE_URL: is PostgreSQL running? (`make db-up`)\n"
    )
    assert failed.stdout == ""


def test_a_bad_database_url_is_one_line_too() -> None:
    failed = run_tool("services.ops.seed", database_url="mysql://bot@localhost/llmbot")
    assert failed.returncode == 1
    assert failed.stderr.startswith("error: ") and failed.stderr.count("\n") == 1, failed.stderr
    assert "DATABASE_URL" in failed.stderr

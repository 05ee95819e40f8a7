"""The real bot behind Debian's PgBouncer, started here in front of the suite's cluster, in
transaction mode (DB_PREPARED_STATEMENTS=false, DATABASE_DIRECT_URL at the server itself for what
needs a whole session) and in session mode (everything through PgBouncer, nothing set): a turn, a
burst of users, a process killed mid-answer, and two webhook instances with their leases and a
stop passed from one to the other."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import psycopg
import pytest

from bench.standins import LLMStandIn, TelegramStandIn
from services import database
from services.database import Pool
from tests.harness import (
    SECRET_HEADER,
    WEBHOOK_SECRET,
    BotProcess,
    fetch,
    free_port,
    running_bot,
    serving,
    store_question,
    webhook_env,
    webhook_of,
)

BINARY = shutil.which("pgbouncer") or next(
    (path for path in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(path).exists()), None
)
UNPRIVILEGED = "nobody"  # PgBouncer refuses to run as root
LONG = " ".join(f"word{i}" for i in range(60))  # streamed over seconds at the stand-in's pace below


@dataclass
class PgBouncer:
    """A PgBouncer in ``mode`` on 127.0.0.1:``port``, forwarding every database to the suite's server."""

    mode: str
    port: int
    process: subprocess.Popen[bytes]
    folder: Path

    def url_for(self, database_url: str) -> str:
        """``database_url`` (the server's) through this PgBouncer."""
        parts = urlsplit(database_url)
        return parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{self.port}").geturl()

    def env(self, env: dict[str, str]) -> dict[str, str]:
        """The bot's settings ``env`` with the bot behind this PgBouncer, as the deployment guide says."""
        direct = env["DATABASE_URL"]
        behind = {**env, "DATABASE_URL": self.url_for(direct)}
        if self.mode == "transaction":
            behind |= {"DATABASE_DIRECT_URL": direct, "DB_PREPARED_STATEMENTS": "false"}
        return behind

    def output(self) -> str:
        return (self.folder / "pgbouncer.log").read_text(errors="replace")


def start_pgbouncer(mode: str, server_url: str) -> PgBouncer:
    """PgBouncer 1.18 in ``mode``, run as an unprivileged user when we are root, in front of the
    server of ``server_url`` (its user and password in the auth file, used to log in there)."""
    assert BINARY is not None
    server = urlsplit(server_url)
    folder = Path(tempfile.mkdtemp(prefix=f"pgbouncer-{mode}-"))
    port = free_port()
    user, password = unquote(server.username or ""), unquote(server.password or "")
    (folder / "userlist.txt").write_text(f'"{user}" "{password}"\n')
    (folder / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={server.hostname} port={server.port or 5432}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = scram-sha-256\n"
        f"auth_file = {folder / 'userlist.txt'}\n"
        f"pool_mode = {mode}\n"
        "max_client_conn = 500\n"
        # Transaction mode: fewer server connections than the bots have clients, as in production.
        # Session mode: one per client connection, for two instances and the tests' own.
        f"default_pool_size = {4 if mode == 'transaction' else 60}\n"
        f"logfile = {folder / 'pgbouncer.log'}\n"
    )
    command = [BINARY, str(folder / "pgbouncer.ini")]
    if os.geteuid() == 0:
        account = pwd.getpwnam(UNPRIVILEGED)
        for path in (folder, *folder.iterdir()):
            os.chown(path, account.pw_uid, account.pw_gid)
        command = ["runuser", "-u", UNPRIVILEGED, "--", *command]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    bouncer = PgBouncer(mode, port, process, folder)
    deadline = time.monotonic() + 15
    while True:
        try:
            with psycopg.connect(bouncer.url_for(server_url), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return bouncer
        except psycopg.OperationalError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"pgbouncer did not start:\n{bouncer.output()}") from None
            time.sleep(0.1)


@pytest.fixture(scope="module", params=["transaction", "session"])
def pgbouncer(request: pytest.FixtureRequest, database_url: str) -> Iterator[PgBouncer]:
    if BINARY is None:
        pytest.skip("the pgbouncer binary is not installed (Debian/Ubuntu: `apt-get install pgbouncer`)")
    bouncer = start_pgbouncer(request.param, database_url)
    try:
        yield bouncer
    finally:
        bouncer.process.terminate()
        bouncer.process.wait(10)
        shutil.rmtree(bouncer.folder, ignore_errors=True)


async def advisory_locks(pool: Pool) -> list[Any]:
    """The advisory locks held in the test database, by any session (a PgBouncer's too)."""
    return await fetch(
        pool,
        "SELECT objid FROM pg_locks WHERE locktype = 'advisory'"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )


@pytest.mark.parametrize("prepared", [True, False])
async def test_db_prepared_statements_decides_whether_the_pool_prepares_even_the_hot_statements(
    database_url: str, pool: Pool, prepared: bool
) -> None:
    """``add_question`` runs with ``prepare=True``; with DB_PREPARED_STATEMENTS=false the server
    sees no prepared statement at all, on the pool's connections nor on a session of its own."""
    counted = "SELECT count(*) FROM pg_prepared_statements"
    own = await database.init_db(database_url, size=1, prepared_statements=prepared)
    try:
        for n in range(6):  # past psycopg's automatic threshold (5) too
            await store_question(own, 1, 1, f"question {n}")
        async with own.connection() as conn:
            [(on_pool,)] = await (await conn.execute(counted)).fetchall()
        async with await database.connect_session(own) as session:
            for _ in range(6):
                cur = await session.execute(counted)
            [(on_session,)] = await cur.fetchall()
    finally:
        await database.close_db(own)
    assert (on_pool > 0, on_session > 0) == (prepared, prepared)


# -- polling --------------------------------------------------------------------------------


async def test_a_turn_is_answered_and_stored_behind_pgbouncer(
    pgbouncer: PgBouncer, env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(pgbouncer.env(env), telegram) as dp:
        telegram.send("hello", message_id=1)
        assert await telegram.wait_for_messages(1, 1) == ["echo: hello"]
        telegram.send("and again", message_id=2)  # its context: the first turn, read back
        assert await telegram.wait_for_messages(1, 2) == ["echo: hello", "echo: and again"]
        assert not dp["dialog_store"].degraded, "the bot answered from memory"
    assert [m["content"] for m in llm.conversations[-1][1:]] == ["hello", "echo: hello", "and again"]
    assert await fetch(
        pool, "SELECT role, content, delivered_at IS NOT NULL FROM messages WHERE role = 'assistant' ORDER BY id"
    ) == [("assistant", "echo: hello", True), ("assistant", "echo: and again", True)]
    # The recovery lock was taken and let go with its session: none is left on a server connection.
    assert await advisory_locks(pool) == []


async def test_twenty_users_at_once_are_each_answered_and_stored_once_behind_pgbouncer(
    pgbouncer: PgBouncer, env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    users = range(1, 21)
    for user in users:  # queued before the bot starts: one getUpdates batch, handled together
        telegram.send(f"I am user {user}", user_id=user, message_id=1)
    async with running_bot(pgbouncer.env(env), telegram):
        await telegram.wait_for(lambda: len(telegram.calls("sendMessage")) >= 20, timeout=60)
        for user in users:  # the markers: an extra answer to the burst would come before these
            telegram.send("marker", user_id=user, message_id=2)
        await telegram.wait_for(lambda: all(telegram.messages_to(u)[-1:] == ["echo: marker"] for u in users))
    for user in users:
        assert telegram.messages_to(user) == [f"echo: I am user {user}", "echo: marker"]
    assert await fetch(
        pool,
        "SELECT count(*), count(DISTINCT (chat_id, telegram_message_id)) FROM messages WHERE role = 'user'",
    ) == [(40, 40)]
    assert await fetch(pool, "SELECT count(*) FROM messages WHERE role = 'assistant' AND delivered_at IS NOT NULL") == [
        (40,)
    ]
    assert len(llm.requests) == 40


async def test_a_process_killed_mid_answer_finishes_the_turn_once_after_a_restart_behind_pgbouncer(
    pgbouncer: PgBouncer, env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    env = pgbouncer.env(env)
    llm.gate.clear()  # the answer is held mid-LLM until the process is gone
    first = BotProcess(env, telegram)
    await first.start()
    telegram.send("a question that outlives the process", message_id=77)
    await asyncio.wait_for(llm.started.wait(), 15)
    assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert telegram.messages_to(1) == []
    llm.gate.set()

    second = BotProcess(env, telegram)
    await second.start()
    assert await telegram.wait_for_messages(1, 1, timeout=30) == ["echo: a question that outlives the process"]
    telegram.send("marker", message_id=78)  # a second answer to the killed turn would come before this one
    await telegram.wait_for(lambda: telegram.messages_to(1)[-1:] == ["echo: marker"], timeout=30)
    assert await second.stop() == 0, second.output()
    assert telegram.messages_to(1) == ["echo: a question that outlives the process", "echo: marker"]
    assert "recovered 1 unfinished turn(s)" in second.output(), second.output()
    assert await fetch(pool, "SELECT role, telegram_message_id FROM messages ORDER BY id") == [
        ("user", 77),
        ("assistant", None),
        ("user", 78),
        ("assistant", None),
    ]
    assert await advisory_locks(pool) == []


# -- webhook mode, two instances ------------------------------------------------------------


async def post(url: str, body: dict[str, Any]) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json=body, headers={SECRET_HEADER: WEBHOOK_SECRET}) as response,
    ):
        assert response.status == 200, await response.text()


def logged(bot: BotProcess, line: str) -> Callable[[], bool]:
    """Whether ``bot`` has logged ``line`` yet."""
    return lambda: line in bot.output()


async def until(condition: Callable[[], Awaitable[bool]], what: str, log: BotProcess, timeout: float = 30) -> None:
    """Until ``condition()`` holds; bounded, failing with the end of ``log``'s output."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; its log ends:\n{log.output()[-3000:]}")
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_two_webhook_instances_renew_and_sweep_leases_and_pass_a_stop_on_behind_pgbouncer(
    pgbouncer: PgBouncer, env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    """Instance A writes, B gets the stop button; A holds a chat longer than its lease lasts
    (renewed, not swept); then A is killed holding a chat, which B sweeps and answers once."""
    envs = [webhook_env(pgbouncer.env(env), INSTANCE_ID=name, LEASE_TTL_S="3") for name in ("a", "b")]
    bots = [BotProcess(e, telegram) for e in envs]
    ids = iter(range(1, 1000))

    def update(text: str, chat: int) -> dict[str, Any]:
        return {"update_id": next(ids), "message": telegram.message(text, user_id=chat, message_id=next(ids))}

    def drafts_of(message_id: int) -> list[str]:
        return [
            s.params["draft_id"] for s in telegram.calls("sendMessageDraft") if s.params["draft_id"] == str(message_id)
        ]

    try:
        for bot in bots:
            await bot.start()
            await serving(bot.env)
            # Logged once it has set the webhook, or left it to the instance holding the lock.
            await telegram.wait_for(logged(bot, "webhook mode: listening"))
        assert len(telegram.calls("setWebhook")) == 1  # the advisory lock let one instance set it
        a, b = (webhook_of(e) for e in envs)

        # A stop posted to B reaches A, which is writing the answer (LISTEN/NOTIFY).
        llm.reply = lambda messages: (
            LONG if messages[-1]["content"] == "tell me" else f"echo: {messages[-1]['content']}"
        )
        llm.chunk, llm.pace = 5, 0.2
        asked = update("tell me", 1)
        await post(a, asked)
        await telegram.wait_for(lambda: len(drafts_of(asked["message"]["message_id"])) >= 2)
        button = {"chat": asked["message"]["chat"], "draft_id": drafts_of(asked["message"]["message_id"])[0]}
        await post(b, {"update_id": next(ids), "stopped_message_generation": button})
        [stopped] = await telegram.wait_for_messages(1, 1)
        assert LONG.startswith(stopped) and 0 < len(stopped) < len(LONG), stopped
        llm.chunk, llm.pace = 1000, 0

        # A holds chat 2 past the lease's TTL: renewed (its expiry moves on), never swept by B.
        llm.gate.clear()
        asked_llm = len(llm.requests)
        await post(a, update("held", 2))
        await telegram.wait_for(lambda: len(llm.requests) > asked_llm)

        async def first_expiry() -> list[Any]:
            return await fetch(
                pool,
                "SELECT l.expires_at FROM chat_leases l JOIN chats c ON c.id = l.chat_id"
                " WHERE c.telegram_chat_id = 2 AND l.holder = 'a'",
            )

        [(taken_until,)] = await first_expiry()

        async def renewed_twice() -> bool:
            rows = await first_expiry()
            return bool(rows) and (rows[0][0] - taken_until).total_seconds() >= 2  # two renewals a second apart

        await until(renewed_twice, "chat 2's lease to be renewed", bots[0])
        llm.gate.set()
        assert await telegram.wait_for_messages(2, 1) == ["echo: held"]

        # A dies holding chat 3: B sweeps the lease once it expires and answers the question once.
        llm.gate.clear()
        asked_llm = len(llm.requests)
        await post(a, update("orphan", 3))
        await telegram.wait_for(lambda: len(llm.requests) > asked_llm)
        assert await bots[0].stop(signal.SIGKILL) == -signal.SIGKILL
        llm.gate.set()
        assert await telegram.wait_for_messages(3, 1, timeout=30) == ["echo: orphan"]
        for chat in (2, 3):  # markers, answered by B: a duplicate answer would come before them
            await post(b, update("marker", chat))
        await telegram.wait_for(lambda: all(telegram.messages_to(c)[-1:] == ["echo: marker"] for c in (2, 3)))
        assert await bots[1].stop() == 0, bots[1].output()
    finally:
        for bot in bots:
            if bot.process is not None and bot.process.poll() is None:
                bot.process.kill()
                bot.process.wait()

    assert telegram.messages_to(2) == ["echo: held", "echo: marker"]
    assert telegram.messages_to(3) == ["echo: orphan", "echo: marker"]
    assert "took 1 expired chat lease(s)" in bots[1].output(), bots[1].output()
    assert "expired chat lease(s)" not in bots[0].output(), bots[0].output()
    assert await fetch(pool, "SELECT finish_reason FROM messages WHERE role = 'assistant' ORDER BY id") == [
        ("stopped",),
        (None,),
        (None,),
        (None,),
        (None,),
    ]
    assert await advisory_locks(pool) == []

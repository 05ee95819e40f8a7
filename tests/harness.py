"""Run the real bot against the stand-ins: in this process (for coverage) or as a child process
(for restarts, SIGTERM and SIGKILL)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiogram import Dispatcher
from psycopg.abc import Params
from psycopg.rows import class_row

from bench.standins import LLMStandIn, Sent, TelegramStandIn
from bot import create_bot, create_dispatcher, create_pool, poll, serve_webhook
from config import load_config
from services import database
from services.database import Pool
from services.llm.client import create_llm
from services.ops.local_postgres import LocalPostgres
from services.records import FinishReason, Role
from services.text.formatting import render, split

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "123456:TEST-token-abcdefghijklmnopqrstuvwxyz"


def bot_env(database_url: str, telegram: TelegramStandIn, llm: LLMStandIn, **overrides: str) -> dict[str, str]:
    """Every setting the bot reads, pointed at the stand-ins and the test database."""
    env = {
        "TELEGRAM_BOT_TOKEN": TOKEN,
        "OPENAI_API_KEY": "sk-test-key-never-logged",
        "OPENAI_BASE_URL": llm.url,
        "TELEGRAM_API_URL": telegram.url,
        "DATABASE_URL": database_url,
        "LLM_MODEL": "stand-in",
        "LLM_TEMPERATURE": "0.5",
        "LLM_MAX_TOKENS": "256",
        "LLM_TIMEOUT_S": "5",
        "SYSTEM_PROMPT": "You are a test.",
        "DB_POOL_SIZE": "4",
        "DB_POOL_TIMEOUT_S": "2",
        "MAX_TURNS_IN_FLIGHT": "100",
        "HISTORY_LIMIT": "20",
        "CONTEXT_TOKENS": "0",
        # Summaries make LLM calls of their own, which the suite's request counts do not expect;
        # tests/test_summaries.py turns them on.
        "SUMMARIES": "false",
        "RECALL": "false",  # a look-back adds a message the suite's counts do not expect: tests/test_recall.py
        "GROUP_CONTEXT": "per_user",
        "PENDING_REPLY_MAX_AGE_S": "600",
        "SHUTDOWN_TIMEOUT_S": "20",
        "RATE_LIMIT_PER_MINUTE": "0",
        "ALLOWED_USER_IDS": "",
        "RETENTION_DAYS": "0",
        "LOG_LEVEL": "INFO",
        # The suite's group tests talk to the bot without mentioning it; tests/test_groups.py
        # checks the default, "mention".
        "GROUP_TRIGGER": "all",
        "SPOOL_PATH": str(Path(tempfile.mkdtemp(prefix="llmbot-spool-")) / "writes.jsonl"),
    }
    env.update(overrides)
    return env


@asynccontextmanager
async def running_bot(env: dict[str, str], telegram: TelegramStandIn) -> AsyncIterator[Dispatcher]:
    """The bot polling in this event loop until the block ends."""
    config = load_config(env)
    pool = None
    if config.database_enabled:
        pool = await create_pool(config)
    bot = create_bot(config)
    dp = create_dispatcher(config, pool, create_llm(config), bot)
    # Started once setMyCommands is asked, accepted or refused as unknown (the stand-in records
    # both): the start-up's last Telegram call before recovery and the first getUpdates.
    started = len(telegram.calls("setMyCommands"))
    polling = asyncio.create_task(poll(dp, bot, config, handle_signals=False, polling_timeout=1))
    try:
        await telegram.wait_for(lambda: len(telegram.calls("setMyCommands")) > started or polling.done())
        yield dp
    finally:
        if not polling.done():
            await dp.stop_polling()
        await polling
        if pool is not None:
            await database.close_db(pool)


def free_port() -> int:
    """A TCP port nobody listens on right now, for a bot to listen on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


WEBHOOK_SECRET = "test-webhook-secret_0123456789"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


def webhook_env(env: dict[str, str], **overrides: str) -> dict[str, str]:
    """``env`` in webhook mode, listening on a free port of its own."""
    return {
        **env,
        "BOT_MODE": "webhook",
        "WEBHOOK_URL": "https://bot.example.test/telegram/webhook",
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "WEBHOOK_PORT": str(free_port()),
        **overrides,
    }


def webhook_of(env: dict[str, str]) -> str:
    """The URL the bot of ``env`` (in webhook mode) takes updates on."""
    return f"http://127.0.0.1:{env['WEBHOOK_PORT']}/telegram/webhook"


async def serving(env: dict[str, str], timeout: float = 30) -> None:
    """Until the process answers /healthz (200) on its webhook port."""
    url = webhook_of(env).replace("/telegram/webhook", "/healthz")
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        return
                    detail = await response.text()
            except aiohttp.ClientConnectionError as error:
                detail = str(error)
            if time.monotonic() > deadline:
                raise AssertionError(f"no healthy /healthz on {url}: {detail}")
            await asyncio.sleep(0.2)


@asynccontextmanager
async def running_webhook_bot(env: dict[str, str], telegram: TelegramStandIn) -> AsyncIterator[Dispatcher]:
    """The bot in webhook mode in this event loop, until the block ends; entered once it listens
    and has set the webhook or left it to the instance that did (``dp["webhook_owner"]``)."""
    config = load_config(env)
    pool = None
    if config.database_enabled:
        pool = await create_pool(config)
    bot = create_bot(config)
    dp = create_dispatcher(config, pool, create_llm(config), bot)
    stop = asyncio.Event()
    serving = asyncio.create_task(serve_webhook(dp, bot, config, stop))
    try:
        await telegram.wait_for(lambda: "webhook_owner" in dp.workflow_data or serving.done())
        if serving.done():
            serving.result()  # its start-up error
        yield dp
    finally:
        stop.set()
        await serving
        if pool is not None:
            await database.close_db(pool)


# 49 more users in the chat of user 1 (user and chat ids 1, as the first stored question leaves them),
# 100 messages each, and 1000 of user 1's: a busy group, where a dialog's index must win over
# the chat's. SQL to run after that first question.
BUSY_CHAT = (
    "INSERT INTO users (telegram_user_id) SELECT 5000 + n FROM generate_series(1, 49) n;"
    " INSERT INTO messages (user_id, chat_id, role, content)"
    " SELECT u.id, 1, 'user', 'hello ' || n FROM users u, generate_series(1, 100) n WHERE u.id > 1;"
    " INSERT INTO messages (user_id, chat_id, role, content) SELECT 1, 1, 'user', 'x' || n"
    " FROM generate_series(1, 1000) n;"
)


async def store_question(pool: Pool, user: int, chat: int, text: str, message_id: int | None = None) -> int:
    """Store a question as the bot would (user "Ann"); its id."""
    added = await database.run(
        pool,
        database.add_question,
        telegram_user_id=user,
        first_name="Ann",
        telegram_chat_id=chat,
        content=text,
        telegram_message_id=message_id,
    )
    return added.id


# -- what the bot stored, read on the suite's pool ----------------------------------------------


async def fetch(pool: Pool, query: str, params: Params | None = None) -> list[Any]:
    """The rows of ``query`` (none for a statement that returns none)."""
    async with pool.connection() as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if cur.description else []


async def fetch_after_outage(pool: Pool, query: str, params: Params | None = None) -> list[Any]:
    """``fetch``, once the pool has replaced the connections an outage (in this test) left dead;
    the ``pool`` fixture does so before each test."""
    await pool.check()
    return await fetch(pool, query, params)


async def stored(pool: Pool) -> list[tuple[str, str]]:
    """Every stored message as (role, content), oldest first."""
    return await fetch(pool, "SELECT role, content FROM messages ORDER BY id")


async def questions(pool: Pool) -> list[str]:
    """The contents of the stored questions, oldest first."""
    return [row[0] for row in await fetch(pool, "SELECT content FROM messages WHERE role = 'user' ORDER BY id")]


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    """Poll ``condition`` until it holds (a state to reach, not an absence to prove)."""
    for _ in range(int(timeout / 0.05)):
        if await condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the condition never held")


# -- what users send and what the stand-ins saw ------------------------------------------------


def bot_command(text: str) -> list[dict[str, Any]]:
    """The entity Telegram puts on a message that starts with a command (``/cmd`` or ``/cmd@bot``)."""
    return [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]


def command(telegram: TelegramStandIn, text: str, **kwargs: Any) -> dict[str, Any]:
    """Send ``text`` as Telegram sends a command: with its bot_command entity."""
    return telegram.send(text, entities=bot_command(text), **kwargs)


def edit(telegram: TelegramStandIn, sent: dict[str, Any], text: str) -> None:
    """The user edits the message ``sent`` to ``text``."""
    telegram.push("edited_message", {**sent, "text": text, "edit_date": sent["date"] + 1})


def history_of(messages: list[dict[str, Any]]) -> list[str]:
    """The contents of an LLM conversation's messages after its system prompt."""
    return [m["content"] for m in messages[1:]]


def history_in(request: dict[str, Any]) -> list[str]:
    """The contents of a chat request's messages after its system prompt."""
    return history_of(request["messages"])


def accepted(telegram: TelegramStandIn, method: str, chat: int) -> list[Sent]:
    """The calls of ``method`` for ``chat`` the Bot API stand-in answered 200."""
    return [s for s in telegram.calls(method) if s.chat_id == chat and s.status == 200]


def final_texts(answer: str) -> list[str]:
    """The texts of the final messages ``answer`` is delivered as."""
    return [part.text for part in split(render(answer))]


@contextmanager
def outage(cluster: LocalPostgres) -> Iterator[None]:
    """PostgreSQL stopped for the block, started again after it."""
    cluster.stop()
    try:
        yield
    finally:
        cluster.start()


def new_log_file() -> Path:
    """An empty file of its own for one bot process's output."""
    fd, path = tempfile.mkstemp(prefix="llmbot-", suffix=".log")
    os.close(fd)
    return Path(path)


@dataclass
class BotProcess:
    """``python bot.py`` as a child process with ``env``; its output goes to ``log``."""

    env: dict[str, str]
    telegram: TelegramStandIn
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=lambda: new_log_file())

    async def start(self) -> None:
        started = len(self.telegram.calls("setMyCommands"))
        process = self._spawn()
        await self.telegram.wait_for(
            lambda: len(self.telegram.calls("setMyCommands")) > started or process.poll() is not None,
            timeout=30,
        )
        assert process.poll() is None, self.output()

    async def run_to_exit(self, timeout: float = 30) -> int:
        """Start it and wait until it exits by itself (a start-up that fails); the exit status."""
        process = self._spawn()
        for _ in range(int(timeout * 10)):
            if process.poll() is not None:
                return process.returncode
            await asyncio.sleep(0.1)
        process.kill()
        raise AssertionError(f"bot did not exit within {timeout}s:\n{self.output()}")

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1", **self.env}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "bot.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        return self.process

    async def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig`` and wait for the exit; the exit status."""
        assert self.process is not None
        self.process.send_signal(sig)
        for _ in range(int(timeout * 10)):
            if self.process.poll() is not None:
                return self.process.returncode
            await asyncio.sleep(0.1)
        self.process.kill()
        raise AssertionError(f"bot did not exit within {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")


# -- a dialog's live history, read back as it is stored ----------------------------------------


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One live message of a dialog, as ``live_history`` reads it."""

    id: int
    role: Role
    content: str
    length: int
    created_at: datetime
    finish_reason: FinishReason | None


# Newest first so the partial index (messages_turn_idx) is read backwards with LIMIT and no
# sort; ``live_history`` reverses.
LIVE_HISTORY = """
    SELECT id, role, content, length, created_at, finish_reason
    FROM messages
    WHERE user_id = (SELECT id FROM users WHERE telegram_user_id = %(telegram_user_id)s::bigint)
      AND chat_id = (SELECT id FROM chats WHERE telegram_chat_id = %(telegram_chat_id)s::bigint)
      AND deleted_at IS NULL
    ORDER BY coalesce(reply_to_id, id) DESC, id DESC
    LIMIT %(limit)s::integer
"""


async def live_history(pool: Pool, user: int, chat: int, limit: int = 50) -> list[StoredMessage]:
    """The last ``limit`` live messages of (user, chat) in turn order, oldest first."""
    async with pool.connection() as conn:
        cur = conn.cursor(row_factory=class_row(StoredMessage))
        params = {"telegram_user_id": user, "telegram_chat_id": chat, "limit": limit}
        await cur.execute(LIVE_HISTORY, params, prepare=True)
        return (await cur.fetchall())[::-1]

"""The bot as 1, 2 and 3 webhook processes on one database, as behind a load balancer.

Each process is ``python bot.py`` (BOT_MODE=webhook, the default configuration otherwise); the
Telegram and LLM stand-ins run in this process. N chats each send ``turns`` messages one after
another, the next as soon as the answer to the previous one is accepted, each message posted
to the next process in turn (round-robin), so consecutive messages of one chat land on
different processes and the chat lease hands the chat over. turns/s is the answered turns over
the time from the first post to the last answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import replies
from bench.standins import LLMStandIn, Sent, TelegramStandIn
from bench.whole_bot import STALL_S, until_done_or_stalled

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-webhook-secret-0123456789"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Driver:
    """The chats: each posts its next message when the previous answer is accepted."""

    telegram: TelegramStandIn
    http: aiohttp.ClientSession
    urls: list[str]
    chats: list[int]
    turns: int
    sent: dict[int, int] = field(default_factory=dict)  # chat -> messages posted
    answers: dict[int, list[str]] = field(default_factory=dict)
    received: int = 0
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    failed_posts: int = 0
    notices: int = 0  # a summary written: no answer, so no next message

    def start(self) -> None:
        self.telegram.on_accepted = self.accepted
        for chat in self.chats:
            self.sent[chat], self.answers[chat] = 0, []
            self.ask(chat)

    def ask(self, chat: int) -> None:
        self.sent[chat] += 1
        turn = self.sent[chat]
        body = {
            "update_id": chat * 1000 + turn,
            "message": self.telegram.message(f"chat {chat} turn {turn}", user_id=chat, message_id=turn),
        }
        task = asyncio.create_task(self.post(self.urls[(chat + turn) % len(self.urls)], body))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def post(self, url: str, body: dict[str, Any]) -> None:
        for _ in range(20):
            try:
                async with self.http.post(url, json=body, headers={SECRET_HEADER: SECRET}) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        self.failed_posts += 1

    def accepted(self, sent: Sent) -> None:
        answers = self.answers.get(sent.chat_id)
        if answers is None:
            return
        if replies.kind(sent.text) == "notice":
            self.notices += 1
            return
        answers.append(sent.text)
        self.received += 1
        if self.sent[sent.chat_id] < self.turns:
            self.ask(sent.chat_id)
        elif self.received >= len(self.chats) * self.turns:
            self.finished.set()


async def healthy(url: str, process: subprocess.Popen[bytes], within_s: float = 60) -> None:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"a bot process did not come up ({url})")


async def instances(
    database_url: str, token: str, processes: int, chats: list[int], turns: int, llm_delay_s: float
) -> dict[str, Any]:
    """One run with ``processes`` webhook processes; turns/s and what went wrong, if anything."""
    telegram, llm = TelegramStandIn(), LLMStandIn(delay=llm_delay_s)
    await telegram.start()
    await llm.start()
    spool_dir = Path(tempfile.mkdtemp(prefix="llmbot-bench-instances-"))
    bots: list[subprocess.Popen[bytes]] = []
    ports = [free_port() for _ in range(processes)]
    try:
        for n, port in enumerate(ports):
            env = {
                "PATH": os.environ.get("PATH", ""),
                "TELEGRAM_BOT_TOKEN": token,
                "OPENAI_API_KEY": "sk-bench",
                "OPENAI_BASE_URL": llm.url,
                "TELEGRAM_API_URL": telegram.url,
                "DATABASE_URL": database_url,
                "BOT_MODE": "webhook",
                "WEBHOOK_URL": "https://bench.example.test/telegram/webhook",
                "WEBHOOK_SECRET": SECRET,
                "WEBHOOK_PORT": str(port),
                "INSTANCE_ID": f"bench-{n}",
                "SPOOL_PATH": str(spool_dir / f"{n}.jsonl"),
                "LOG_LEVEL": "WARNING",
            }
            bots.append(
                subprocess.Popen(  # noqa: ASYNC220 - started, not waited for
                    [sys.executable, "bot.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
        for port, bot in zip(ports, bots, strict=True):
            await healthy(f"http://127.0.0.1:{port}/healthz", bot)
        urls = [f"http://127.0.0.1:{port}/telegram/webhook" for port in ports]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=400)) as http:
            driver = Driver(telegram, http, urls, chats, turns)
            started = time.monotonic()
            driver.start()
            await until_done_or_stalled(driver.finished, lambda: driver.received, llm_delay_s + STALL_S)
            elapsed = time.monotonic() - started
    finally:
        for bot in bots:
            bot.terminate()
        for bot in bots:
            try:
                bot.wait(timeout=60)
            except subprocess.TimeoutExpired:
                bot.kill()
        await llm.stop()
        await telegram.stop()
    expected = {chat: [f"echo: chat {chat} turn {turn}" for turn in range(1, turns + 1)] for chat in chats}
    in_order = sum(driver.answers[chat] == expected[chat] for chat in chats)
    return {
        "processes": processes,
        "chats": len(chats),
        "turns": len(chats) * turns,
        "llm_delay_s": llm_delay_s,
        "turns_per_s": driver.received / elapsed if elapsed > 0 else 0.0,
        "answers": driver.received,
        "chats_in_order": in_order,
        "llm_requests": len(llm.requests),
        "failed_posts": driver.failed_posts,
        "summary_notices": driver.notices,
    }

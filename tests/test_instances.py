"""Three bot processes in webhook mode on one database, as behind a load balancer: every update is
handled once, every chat answered in order, and the chats of a process killed mid-turn go on
in the others once its leases expire, each question answered once."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from bench.standins import LLMStandIn, Sent, TelegramStandIn
from services.database import Pool
from tests.harness import (
    SECRET_HEADER,
    WEBHOOK_SECRET,
    BotProcess,
    running_webhook_bot,
    serving,
    webhook_env,
    webhook_of,
)

pytestmark = pytest.mark.slow  # several bot processes each

CHATS = int(os.environ.get("INSTANCES_TEST_CHATS", "1000"))
TURNS = 5
LEASE_TTL_S = "4"  # short, so the killed process's chats move on soon; renewed every third of it


class Answers:
    """The texts Telegram accepted per chat, in order, counted as they arrive."""

    def __init__(self, telegram: TelegramStandIn) -> None:
        self.by_chat: dict[int, list[str]] = {}
        self.total = 0
        telegram.on_accepted = self.accepted

    def accepted(self, sent: Sent) -> None:
        self.by_chat.setdefault(sent.chat_id, []).append(sent.text)
        self.total += 1

    async def wait(self, condition: Any, timeout: float, what: str) -> None:
        """Until ``condition()`` holds (bounded: a lost turn fails here, it does not hang)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; {self.total} answers so far")
            await asyncio.sleep(0.1)


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> None:
    for _ in range(50):  # a busy process may refuse a connection for a moment: Telegram retries too
        try:
            async with http.post(url, json=body, headers={SECRET_HEADER: WEBHOOK_SECRET}) as response:
                assert response.status == 200, await response.text()
                return
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.2)
    raise AssertionError(f"{url} never took update {body['update_id']}")


@asynccontextmanager
async def three_processes(env: dict[str, str], telegram: TelegramStandIn) -> AsyncIterator[list[BotProcess]]:
    envs = [
        webhook_env(
            env,
            INSTANCE_ID=f"bot-{n}",
            LEASE_TTL_S=LEASE_TTL_S,
            DB_POOL_SIZE="6",
            # The default, as ADR-07 advises with several processes: the suite's 2 s (quick outage
            # tests) lets one overloaded process take a slow database for a lost one.
            DB_POOL_TIMEOUT_S="10",
            MAX_TURNS_IN_FLIGHT="1000",
        )
        for n in range(3)
    ]
    bots = [BotProcess(e, telegram) for e in envs]
    try:
        for bot in bots:
            await bot.start()
            await serving(bot.env, timeout=60)
        yield bots
    finally:
        for bot in bots:
            if bot.process is not None and bot.process.poll() is None:
                bot.process.kill()
                bot.process.wait()


def message(telegram: TelegramStandIn, chat: int, message_id: int, text: str) -> dict[str, Any]:
    return {
        "update_id": chat * 100 + message_id,
        "message": telegram.message(text, user_id=chat, message_id=message_id),
    }


async def test_three_processes_answer_every_chat_once_and_in_order_and_survive_a_kill(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    """1000 chats × 5 messages posted round-robin over three processes as fast as they take
    them (each chat's next message once the previous one was accepted, so the chat has an order
    to keep), every seventh also to another process at the same time. Then one process is
    killed while it is waiting for the LLM on 20 chats, each of which gets one more message at
    another process meanwhile. INSTANCES_TEST_CHATS sets a smaller size for a quick run."""
    answers = Answers(telegram)
    async with three_processes(env, telegram) as bots:
        urls = [webhook_of(bot.env) for bot in bots]
        connector = aiohttp.TCPConnector(limit=300)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def chat_talks(chat: int) -> None:
                for turn in range(1, TURNS + 1):
                    body = message(telegram, chat, turn, f"chat {chat} turn {turn}")
                    target = (chat + turn) % 3
                    if (chat * TURNS + turn) % 7 == 0:  # the same update to two processes at once
                        await asyncio.gather(post(http, urls[target], body), post(http, urls[(target + 1) % 3], body))
                    else:
                        await post(http, urls[target], body)

            chats = list(range(1, CHATS + 1))
            await asyncio.gather(*(chat_talks(chat) for chat in chats))
            await answers.wait(lambda: answers.total >= CHATS * TURNS, 240 + CHATS * TURNS / 20, "every answer")

            # -- one process dies mid-turn --------------------------------------------------
            victim, others = bots[0], bots[1:]
            held = list(range(5001, 5021))
            llm.gate.clear()
            asked = len(llm.requests)
            await asyncio.gather(*(post(http, urls[0], message(telegram, chat, 1, f"held {chat}")) for chat in held))
            await answers.wait(lambda: len(llm.requests) >= asked + len(held), 60, "the victim's LLM calls")
            await asyncio.gather(*(post(http, urls[1], message(telegram, chat, 2, f"after {chat}")) for chat in held))
            assert await victim.stop(signal.SIGKILL) == -signal.SIGKILL
            llm.gate.set()
            await answers.wait(
                lambda: all(len(answers.by_chat.get(chat, [])) >= 2 for chat in held), 60, "the killed chats"
            )
            # Markers: a later message in each chat, answered after anything still on its way
            # there, so a duplicate would have arrived before the marker's answer.
            markers = [*held, *chats[:50]]
            await asyncio.gather(
                *(post(http, urls[2], message(telegram, chat, 9, f"marker {chat}")) for chat in markers)
            )
            await answers.wait(
                lambda: all(answers.by_chat.get(chat, [""])[-1] == f"echo: marker {chat}" for chat in markers),
                60,
                "the markers",
            )
        for bot in others:
            assert await bot.stop(signal.SIGTERM) == 0, bot.output()

    for chat in chats:
        expected = [f"echo: chat {chat} turn {turn}" for turn in range(1, TURNS + 1)]
        if chat in markers:
            expected.append(f"echo: marker {chat}")
        assert answers.by_chat.get(chat) == expected, (chat, answers.by_chat.get(chat))
    for chat in held:
        assert answers.by_chat[chat] == [f"echo: held {chat}", f"echo: after {chat}", f"echo: marker {chat}"]
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*), count(DISTINCT (chat_id, telegram_message_id)) FROM messages WHERE role = 'user'"
        )
        stored = await cur.fetchone()
        cur = await conn.execute("SELECT count(*) FROM messages WHERE role = 'assistant' AND delivered_at IS NOT NULL")
        delivered = await cur.fetchone()
        cur = await conn.execute("SELECT count(*) FROM chat_leases WHERE holder IS NOT NULL")
        still_held = await cur.fetchone()
    questions = CHATS * TURNS + 3 * len(held) + len(markers) - len(held)
    assert stored == (questions, questions)
    assert delivered == (questions,)
    assert still_held == (0,)  # every chat was handed over to the end, or released at shutdown
    # The LLM was asked once per question, but again for the ones the victim was waiting on.
    assert len(llm.requests) == questions + len(held)


async def test_a_command_posted_to_two_processes_runs_once(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    first_env, second_env = webhook_env(env, INSTANCE_ID="one"), webhook_env(env, INSTANCE_ID="two")
    async with (
        running_webhook_bot(first_env, telegram),
        running_webhook_bot(second_env, telegram),
        aiohttp.ClientSession() as http,
    ):
        await post(http, webhook_of(first_env), message(telegram, 1, 1, "hello"))
        await telegram.wait_for_messages(1, 1)
        retry = {"update_id": 500, "message": telegram.message("/retry", user_id=1, message_id=2)}
        await asyncio.gather(post(http, webhook_of(first_env), retry), post(http, webhook_of(second_env), retry))
        await telegram.wait_for_messages(1, 2)
        clear = {"update_id": 501, "message": telegram.message("/clear", user_id=1, message_id=3)}
        await asyncio.gather(post(http, webhook_of(second_env), clear), post(http, webhook_of(first_env), clear))
        await post(http, webhook_of(second_env), message(telegram, 1, 4, "marker"))
        await telegram.wait_for(lambda: telegram.messages_to(1)[-1:] == ["echo: marker"])
    sent = telegram.messages_to(1)
    assert sent[:2] == ["echo: hello", "echo: hello"]
    assert len(sent) == 4 and sent[3] == "echo: marker", sent  # one answer to /clear between
    assert len(llm.requests) == 3

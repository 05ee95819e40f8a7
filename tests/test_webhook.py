"""Webhook mode: the real bot receives updates POSTed over HTTP, refuses requests without the
secret, sets the webhook once however many instances start, and keeps recovery and drain."""

from __future__ import annotations

import asyncio
import itertools
import signal
from typing import Any

import aiohttp
import pytest

from bench.standins import LLMStandIn, TelegramStandIn
from config import ConfigError, load_config
from services.database import Pool
from services.ops import metrics
from tests.harness import (
    SECRET_HEADER,
    TOKEN,
    WEBHOOK_SECRET,
    BotProcess,
    questions,
    running_webhook_bot,
    store_question,
    webhook_env,
    webhook_of,
)

LONG = " ".join(f"word{i}" for i in range(60))  # streamed over seconds at the stand-in's pace below
_update_ids = itertools.count(1)


def update(telegram: TelegramStandIn, text: str, **kwargs: Any) -> dict[str, Any]:
    """A message update as Telegram would post it."""
    return {"update_id": next(_update_ids), "message": telegram.message(text, **kwargs)}


async def post(url: str, body: dict[str, Any], secret: str | None = WEBHOOK_SECRET) -> int:
    """POST ``body`` as Telegram does (with ``secret`` in its header, unless None); the status."""
    headers = {SECRET_HEADER: secret} if secret is not None else {}
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as response:
        return response.status


def refused() -> float:
    return metrics.REGISTRY.get_sample_value("llmbot_webhook_refused_total") or 0.0


async def test_posted_updates_are_answered_and_requests_without_the_secret_change_nothing(
    env: dict[str, str], telegram: TelegramStandIn, pool: Pool
) -> None:
    env = webhook_env(env)
    refused_before = refused()
    async with running_webhook_bot(env, telegram):
        url = webhook_of(env)
        assert await post(url, update(telegram, "hello", user_id=1)) == 200
        assert await telegram.wait_for_messages(1, 1) == ["echo: hello"]

        assert await post(url, update(telegram, "no secret", user_id=2), secret=None) == 401
        assert await post(url, update(telegram, "wrong secret", user_id=2), secret="x" + WEBHOOK_SECRET) == 401
        assert await post(url, update(telegram, "valid", user_id=2)) == 200
        # The valid update came after the refused ones and is answered: they were not merely slow.
        assert await telegram.wait_for_messages(2, 1) == ["echo: valid"]

        async with aiohttp.ClientSession() as http, http.get(url.replace("/telegram/webhook", "/healthz")) as health:
            assert health.status == 200, await health.text()
    assert await questions(pool) == ["hello", "valid"]
    assert [s.text for s in telegram.calls("sendMessage")] == ["echo: hello", "echo: valid"]
    assert refused() == refused_before + 2


async def test_two_instances_on_one_database_set_the_webhook_once(
    env: dict[str, str], telegram: TelegramStandIn, pool: Pool
) -> None:
    first_env, second_env = webhook_env(env), webhook_env(env)
    async with running_webhook_bot(first_env, telegram) as first, running_webhook_bot(second_env, telegram) as second:
        assert (first["webhook_owner"], second["webhook_owner"]) == (True, False)
        [call] = telegram.calls("setWebhook")
        assert call.params["url"] == "https://bot.example.test/telegram/webhook"
        assert call.params["secret_token"] == WEBHOOK_SECRET
        assert sorted(call.params["allowed_updates"]) == sorted(first.resolve_used_update_types())
        assert "message" in call.params["allowed_updates"]
        assert call.params.get("drop_pending_updates") in (None, False, "false")
        # Both serve: each answers what is posted to it.
        assert await post(webhook_of(first_env), update(telegram, "to the first", user_id=1)) == 200
        assert await post(webhook_of(second_env), update(telegram, "to the second", user_id=2)) == 200
        assert await telegram.wait_for_messages(1, 1) == ["echo: to the first"]
        assert await telegram.wait_for_messages(2, 1) == ["echo: to the second"]
    assert len(telegram.calls("setWebhook")) == 1


async def test_a_webhook_process_recovers_before_serving_and_finishes_turns_on_sigterm(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    await store_question(pool, 1, 1, "left unanswered by a crash", message_id=7)
    env = webhook_env(env)
    bot = BotProcess(env, telegram)
    await bot.start()  # returns once its start-up (recovery included) has begun
    assert await telegram.wait_for_messages(1, 1) == ["echo: left unanswered by a crash"]
    await telegram.wait_for(lambda: len(telegram.calls("setWebhook")) == 1)  # listening
    llm.delay = 1.0
    assert await post(webhook_of(env), update(telegram, "slow one", user_id=2)) == 200
    await telegram.wait_for(lambda: len(llm.requests) == 2)
    assert await bot.stop(signal.SIGTERM) == 0, bot.output()
    assert telegram.messages_to(2) == ["echo: slow one"]
    assert "webhook mode: listening" in bot.output()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, "WEBHOOK_URL is required; WEBHOOK_SECRET is required"),
        ({"WEBHOOK_URL": "http://bot.example.test/hook", "WEBHOOK_SECRET": WEBHOOK_SECRET}, "WEBHOOK_URL must be"),
        ({"WEBHOOK_URL": "https://bot.example.test/hook", "WEBHOOK_SECRET": "short"}, "WEBHOOK_SECRET must be"),
        (
            {"WEBHOOK_URL": "https://b.example.test/", "WEBHOOK_SECRET": "bad secret with spaces!"},
            "WEBHOOK_SECRET must",
        ),
        (
            {"WEBHOOK_URL": "https://b.example.test/", "WEBHOOK_SECRET": WEBHOOK_SECRET, "WEBHOOK_PORT": "0"},
            "WEBHOOK_PORT",
        ),
        (
            {"WEBHOOK_URL": "https://b.example.test/", "WEBHOOK_SECRET": WEBHOOK_SECRET, "METRICS_PORT": "8080"},
            "METRICS_PORT must differ from WEBHOOK_PORT",
        ),
    ],
)
def test_bad_webhook_settings_are_named_at_start_up(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config({"TELEGRAM_BOT_TOKEN": TOKEN, "OPENAI_API_KEY": "k", "BOT_MODE": "webhook", **overrides})
    assert str(error.value).startswith(message)
    assert "bad secret" not in str(error.value)


def test_webhook_settings_are_read_in_webhook_mode_only() -> None:
    base = {"TELEGRAM_BOT_TOKEN": TOKEN, "OPENAI_API_KEY": "k", "WEBHOOK_SECRET": "short"}
    polling = load_config(base)
    assert (polling.bot_mode, polling.webhook_url, polling.metrics_port) == ("polling", None, 0)
    with pytest.raises(ConfigError, match="BOT_MODE must be polling or webhook"):
        load_config({**base, "BOT_MODE": "push"})
    webhook = load_config(
        {**base, "BOT_MODE": "Webhook", "WEBHOOK_URL": "https://b.example.test/tg/hook", "WEBHOOK_SECRET": "s" * 16}
    )
    assert (webhook.bot_mode, webhook.webhook_path, webhook.webhook_port) == ("webhook", "/tg/hook", 8080)
    assert "s" * 16 not in repr(webhook)


def turns_ended(outcome: str) -> float:
    return metrics.REGISTRY.get_sample_value("llmbot_turns_total", {"outcome": outcome}) or 0.0


async def test_a_process_that_stalled_past_its_chat_lease_neither_stores_nor_sends_the_answer(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    """The process waits for the LLM while its renewals cannot get through (the lease row is
    locked); its lease expires and another process takes the chat, as a sweeper would. When the
    LLM answers, the turn finds the lease gone and stops: the new holder answers the question."""
    env = webhook_env(env, LEASE_TTL_S="2")
    lost_before = turns_ended("lease_lost")
    async with running_webhook_bot(env, telegram):
        llm.gate.clear()
        assert await post(webhook_of(env), update(telegram, "held", user_id=1)) == 200
        await telegram.wait_for(lambda: len(llm.requests) == 1)
        async with pool.connection() as sweeper, sweeper.transaction():
            await sweeper.execute("SELECT FROM chat_leases FOR UPDATE")  # no renewal gets through
            for _ in range(200):
                cur = await sweeper.execute("SELECT expires_at < clock_timestamp() FROM chat_leases")
                if (await cur.fetchone()) == (True,):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the lease never expired")
            await sweeper.execute(
                "UPDATE chat_leases SET holder = 'other', version = version + 1, expires_at = now() + interval '1 hour'"
            )
        llm.gate.set()
        await telegram.wait_for(lambda: turns_ended("lease_lost") > lost_before)
    assert telegram.messages_to(1) == []
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT role, content FROM messages ORDER BY id")
        assert await cur.fetchall() == [("user", "held")]
        cur = await conn.execute("SELECT holder FROM chat_leases")
        assert await cur.fetchall() == [("other",)]


async def test_a_stop_posted_to_another_process_stops_the_answer_where_it_is_written(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    """Behind a load balancer the draft's stop button, or /cancel, may reach a process that does
    not hold the chat: it passes the stop on to the one writing the answer."""
    llm.reply = lambda messages: LONG
    llm.chunk, llm.pace = 5, 0.2
    writer_env, other_env = webhook_env(env), webhook_env(env)

    def drafts_of(message_id: int) -> list[str]:
        return [
            s.params["draft_id"] for s in telegram.calls("sendMessageDraft") if s.params["draft_id"] == str(message_id)
        ]

    async with running_webhook_bot(writer_env, telegram), running_webhook_bot(other_env, telegram):
        writer, other = webhook_of(writer_env), webhook_of(other_env)
        asked = update(telegram, "tell me", user_id=1)
        assert await post(writer, asked) == 200
        await telegram.wait_for(lambda: len(drafts_of(asked["message"]["message_id"])) >= 2)
        button = {"chat": asked["message"]["chat"], "draft_id": drafts_of(asked["message"]["message_id"])[0]}
        assert await post(other, {"update_id": next(_update_ids), "stopped_message_generation": button}) == 200
        [first] = await telegram.wait_for_messages(1, 1)

        again = update(telegram, "and again", user_id=1)
        assert await post(writer, again) == 200
        await telegram.wait_for(lambda: len(drafts_of(again["message"]["message_id"])) >= 2)
        assert await post(other, update(telegram, "/cancel", user_id=1)) == 200
        replies = await telegram.wait_for_messages(1, 2)
    assert replies[0] == first
    for partial in replies:  # and no "There is no answer being written to stop." from the other process
        assert LONG.startswith(partial) and 0 < len(partial) < len(LONG)
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT finish_reason FROM messages WHERE role = 'assistant' ORDER BY id")
        assert await cur.fetchall() == [("stopped",), ("stopped",)]


async def test_a_clear_posted_to_another_process_cancels_the_answer_being_written(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    llm.reply = lambda messages: LONG if messages[-1]["content"] == "tell me" else "short"
    llm.chunk, llm.pace = 5, 0.2
    writer_env, other_env = webhook_env(env), webhook_env(env)
    async with running_webhook_bot(writer_env, telegram), running_webhook_bot(other_env, telegram):
        writer, other = webhook_of(writer_env), webhook_of(other_env)
        assert await post(writer, update(telegram, "tell me", user_id=1)) == 200
        await telegram.wait_for(lambda: len(telegram.calls("sendMessageDraft")) >= 2)
        assert await post(other, update(telegram, "/clear", user_id=1)) == 200
        assert await telegram.wait_for_messages(1, 1) == ["Done: I forgot 1 message(s). Let's start over."]
        assert await post(other, update(telegram, "next", user_id=1)) == 200  # the marker
        replies = await telegram.wait_for_messages(1, 2)
    assert replies == ["Done: I forgot 1 message(s). Let's start over.", "short"]
    assert len(llm.stream_ended_at) == 1  # only "next" was read to its end: the long one was closed
    assert [m["content"] for m in llm.conversations[-1][1:]] == ["next"]


async def test_a_question_answered_by_another_process_keeps_the_text_it_replies_to(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    """The reply's quoted text comes only with the update, at the process that stored the
    question; the process holding the chat answers it from what was stored."""
    writer_env, other_env = webhook_env(env), webhook_env(env)
    async with running_webhook_bot(writer_env, telegram), running_webhook_bot(other_env, telegram):
        llm.gate.clear()
        assert await post(webhook_of(writer_env), update(telegram, "first", user_id=1)) == 200
        await telegram.wait_for(lambda: len(llm.requests) == 1)
        reply = update(telegram, "what about this?", user_id=1)
        reply["message"]["reply_to_message"] = telegram.message("the line it replies to", user_id=1, message_id=3)
        assert await post(webhook_of(other_env), reply) == 200  # stored there, left to the writer
        llm.gate.set()
        await telegram.wait_for_messages(1, 2)
    quoting = "[Replying to: the line it replies to]\n\nwhat about this?"
    assert llm.conversations[-1][-1]["content"] == quoting
    assert telegram.messages_to(1) == ["echo: first", f"echo: {quoting}"]
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT quoted FROM messages WHERE role = 'user' ORDER BY id")
        assert await cur.fetchall() == [(None,), ("the line it replies to",)]

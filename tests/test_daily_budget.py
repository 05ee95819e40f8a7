"""The daily token budget (DAILY_TOKEN_BUDGET_PER_USER) through the real bot: tokens the LLM
stand-in reports are counted as answers are stored (written back after an outage too), and the
question after the budget is spent is set aside with a reply, until the UTC day ends; on real
PostgreSQL, over real HTTP to the stand-ins."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import pytest

from bench.standins import LLMStandIn, TelegramStandIn
from config import ConfigError, load_config
from handlers.commands import HELP
from handlers.messages import over_budget_reply, until_next_utc_day
from services.database import Pool
from services.ops.local_postgres import LocalPostgres
from tests.harness import ROOT, TOKEN, fetch, fetch_after_outage, outage, running_bot, until
from tests.test_settings import reply

REFUSED = re.compile(r"You've used today's token budget\. It resets at 00:00 UTC, in about \d+ (minute|hour)s?\.")
# The stand-in reports one token per character: the system prompt ("You are a test.", 15) and the
# history read, then the answer ("echo: " + the question).
USAGE = "SELECT sum(tokens) FROM token_usage"
MESSAGES = "SELECT content, deleted_at IS NOT NULL, deleted_reason FROM messages ORDER BY id"


def spent(llm: LLMStandIn) -> int:
    """The tokens the stand-in reported, all requests together."""
    return sum(prompt + completion for prompt, completion in llm.usages)


async def test_the_question_after_the_budget_is_spent_is_set_aside_until_the_next_utc_day(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    env["DAILY_TOKEN_BUDGET_PER_USER"] = "50"
    async with running_bot(env, telegram):
        assert await reply(telegram, 1, "hello") == "echo: hello"  # 20 + 11 tokens: under 50
        assert await fetch(pool, USAGE) == [(31,)]
        assert await reply(telegram, 1, "again") == "echo: again"  # still under 50 when asked
        assert await fetch(pool, USAGE) == [(spent(llm),)] == [(31 + 36 + 11,)]
        payload = telegram.send("one more", message_id=500)
        refused = (await telegram.wait_for_messages(1, 3))[2]
        assert REFUSED.fullmatch(refused), refused
        # the same update delivered again: no second reply, nothing changes
        before = await fetch(pool, MESSAGES), await fetch(pool, "SELECT * FROM token_usage")
        telegram.push("message", payload)
        assert await reply(telegram, 1, "/help") == HELP  # the chat's updates are handled in order
        assert (await fetch(pool, MESSAGES), await fetch(pool, "SELECT * FROM token_usage")) == before
        # the next UTC day: the budget is whole again, and the refused question is not in the history
        await fetch(pool, "UPDATE token_usage SET day = day - 1")
        assert await reply(telegram, 1, "new day") == "echo: new day"
    assert telegram.messages_to(1) == ["echo: hello", "echo: again", refused, HELP, "echo: new day"]
    assert len(llm.requests) == 3
    assert [m["content"] for m in llm.conversations[-1][1:]] == [
        "hello", "echo: hello", "again", "echo: again", "new day",
    ]  # fmt: skip
    assert await fetch(pool, MESSAGES) == [
        ("hello", False, None), ("echo: hello", False, None), ("again", False, None), ("echo: again", False, None),
        ("one more", True, "rate_limit"), ("new day", False, None), ("echo: new day", False, None),
    ]  # fmt: skip
    assert await fetch(pool, "SELECT count(*) FROM token_usage WHERE day = (now() AT TIME ZONE 'UTC')::date") == [(1,)]


async def test_stats_show_todays_tokens_against_the_budget(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):  # no budget: not shown
        await reply(telegram, 1, "hi")
        assert "daily tokens" not in await reply(telegram, 1, "/stats")
    async with running_bot({**env, "DAILY_TOKEN_BUDGET_PER_USER": "100000"}, telegram):
        stats = await reply(telegram, 1, "/stats")
    assert stats.splitlines()[-1] == (
        f"Today (UTC): {spent(llm):,} of your 100,000 daily tokens; it resets at 00:00 UTC."
    )


async def test_tokens_are_counted_with_the_budget_off_and_count_once_it_is_on(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    assert "DAILY_TOKEN_BUDGET_PER_USER" not in env  # the default: off
    async with running_bot(env, telegram):
        await reply(telegram, 1, "first")
        assert await fetch(pool, USAGE) == [(spent(llm),)]
        await fetch(pool, "UPDATE token_usage SET tokens = 1000000000000")
        assert await reply(telegram, 1, "no budget, no limit") == "echo: no budget, no limit"
    # a budget turned on mid-day counts what was spent before it
    async with running_bot({**env, "DAILY_TOKEN_BUDGET_PER_USER": "1000"}, telegram):
        assert REFUSED.fullmatch(await reply(telegram, 1, "now over"))
        assert await reply(telegram, 2, "another user", user_id=2) == "echo: another user"  # the budget is per user
    assert len(llm.requests) == 3


async def test_an_answer_written_back_after_an_outage_counts_once(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool, cluster: LocalPostgres
) -> None:
    env["DAILY_TOKEN_BUDGET_PER_USER"] = "60"
    async with running_bot(env, telegram) as dp:
        assert await reply(telegram, 1, "before") == "echo: before"  # 21 + 12 tokens
        with outage(cluster):
            # degraded: answered from memory, no budget checked, the usage spooled with the answer
            assert await reply(telegram, 1, "during") == "echo: during"  # 39 + 12 tokens
        store = dp["dialog_store"]
        await telegram.wait_for(lambda: not store.degraded, timeout=30)
        assert await fetch_after_outage(pool, USAGE) == [(spent(llm),)] == [(33 + 51,)]
        assert REFUSED.fullmatch(await reply(telegram, 1, "after"))
    assert len(llm.requests) == 2


async def test_the_bot_clears_past_token_counts_even_without_retention(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    assert env["RETENTION_DAYS"] == "0"  # messages are kept
    async with running_bot(env, telegram):
        await reply(telegram, 1, "hi")
        await reply(telegram, 1, "/clear")
    await fetch(pool, "INSERT INTO token_usage (user_id, day, tokens) VALUES (1, '2020-01-01', 5)")

    async def purged() -> bool:
        return await fetch(pool, "SELECT count(*) FROM token_usage WHERE day = '2020-01-01'") == [(0,)]

    async with running_bot(env, telegram):  # the purge runs at start-up, in the background
        await until(purged)
    assert await fetch(pool, "SELECT day FROM token_usage") == [(datetime.now(UTC).date(),)]
    # gone after the messages' turn in the same purge: the cleared messages were kept
    assert await fetch(pool, "SELECT count(*) FROM messages WHERE deleted_at IS NOT NULL") == [(2,)]


def test_over_budget_reply_says_roughly_when_the_utc_day_ends() -> None:
    def at(hour: int, minute: int, second: int = 0, tz: timezone = UTC) -> str:
        return over_budget_reply(datetime(2026, 11, 24, hour, minute, second, tzinfo=tz))

    prefix = "You've used today's token budget. It resets at 00:00 UTC, in "
    assert at(0, 0) == prefix + "about 24 hours."
    assert at(12, 0) == prefix + "about 12 hours."
    assert at(22, 45) == prefix + "about 1 hour."
    assert at(23, 10) == prefix + "about 50 minutes."
    assert at(23, 59, 30) == prefix + "about 1 minute."
    assert at(1, 0, tz=timezone(timedelta(hours=3))) == prefix + "about 2 hours."  # 22:00 UTC the day before
    assert until_next_utc_day(datetime(2026, 11, 24, 23, 0, tzinfo=UTC)) == timedelta(hours=1)


@pytest.mark.parametrize("value", ["-1", "lots", "1.5", "1e3"])
def test_a_bad_budget_stops_the_start_naming_the_variable(value: str) -> None:
    env = {"TELEGRAM_BOT_TOKEN": TOKEN, "OPENAI_API_KEY": "k", "DAILY_TOKEN_BUDGET_PER_USER": value}
    with pytest.raises(ConfigError, match="DAILY_TOKEN_BUDGET_PER_USER must be a whole number of tokens ≥ 0"):
        load_config(env)


def test_a_bad_budget_stops_the_bot_before_it_starts() -> None:
    env = {"TELEGRAM_BOT_TOKEN": TOKEN, "OPENAI_API_KEY": "k", "DAILY_TOKEN_BUDGET_PER_USER": "-5"}
    result = subprocess.run(
        [sys.executable, "bot.py"], cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("configuration error: DAILY_TOKEN_BUDGET_PER_USER must be")


def test_the_budget_is_off_by_default() -> None:
    base = {"TELEGRAM_BOT_TOKEN": TOKEN, "OPENAI_API_KEY": "k"}
    assert load_config(base).daily_token_budget_per_user == 0
    assert load_config({**base, "DAILY_TOKEN_BUDGET_PER_USER": " 200000 "}).daily_token_budget_per_user == 200_000

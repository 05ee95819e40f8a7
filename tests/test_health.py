"""/metrics and /healthz of the real bot: the metrics parse as Prometheus text and move with real
turns; the health check fails while the real PostgreSQL is stopped and passes once it is back."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.standins import LLMStandIn, TelegramStandIn
from services.database import Pool
from services.ops import metrics
from services.ops.local_postgres import LocalPostgres
from tests.harness import free_port, outage, running_bot, until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def metrics_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, "METRICS_PORT": str(free_port())}


async def get(env: dict[str, str], path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{env['METRICS_PORT']}{path}") as response,
    ):
        return response.status, await response.text()


def parse(text: str) -> Samples:
    """Every sample of a scrape, by name and labels; the parser rejects anything not Prometheus text."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def now(name: str, **labels: str) -> float:
    """A sample of this process's registry, read directly (before any scrape)."""
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


async def test_metrics_parse_and_move_with_real_turns(
    metrics_env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    env = {**metrics_env, "LLM_STREAM": "false"}  # whole completions: the stage is timed per call
    before = {
        "answered": now("llmbot_turns_total", outcome="answered"),
        "llm_failed": now("llmbot_turns_total", outcome="llm_failed"),
        "turns": now("llmbot_turn_seconds_count"),
        "database": now("llmbot_stage_seconds_count", stage="database"),
        "llm": now("llmbot_stage_seconds_count", stage="llm"),
        "telegram": now("llmbot_stage_seconds_count", stage="telegram"),
        "tokens": now("llmbot_llm_tokens_total", kind="completion"),
        "updates": now("llmbot_updates_total"),
    }
    async with running_bot(env, telegram):
        for user in (1, 2):
            telegram.send(f"question {user}", user_id=user)
        await telegram.wait_for(lambda: all(telegram.messages_to(user) for user in (1, 2)))
        llm.status = 500
        telegram.send("this one fails", user_id=1)
        await telegram.wait_for_messages(1, 2)

        # The outcome is counted once the turn has recorded its delivery, just after the send.
        scraped: dict[str, Any] = {}

        async def scrape() -> bool:
            status, text = await get(env, "/metrics")
            assert status == 200
            scraped["samples"] = parse(text)
            return sample(scraped["samples"], "llmbot_turns_total", outcome="llm_failed") >= before["llm_failed"] + 1

        await until(scrape)
    samples = scraped["samples"]
    assert sample(samples, "llmbot_turns_total", outcome="answered") == before["answered"] + 2
    assert sample(samples, "llmbot_turns_total", outcome="llm_failed") == before["llm_failed"] + 1
    assert sample(samples, "llmbot_turn_seconds_count") == before["turns"] + 3
    assert sample(samples, "llmbot_turns_in_flight") == 0
    assert sample(samples, "llmbot_updates_total") == before["updates"] + 3
    assert sample(samples, "llmbot_last_update_timestamp_seconds") > 0
    # each turn: at least its question, its turn start and its answer's record; an LLM call; a send
    assert sample(samples, "llmbot_stage_seconds_count", stage="database") >= before["database"] + 3 * 3
    assert sample(samples, "llmbot_stage_seconds_count", stage="llm") >= before["llm"] + 3
    assert sample(samples, "llmbot_stage_errors_total", stage="llm", error="InternalServerError") >= 1
    assert sample(samples, "llmbot_stage_seconds_count", stage="telegram") >= before["telegram"] + 3
    reported = sum(completion for _, completion in llm.usages)
    assert len(llm.usages) == 2 and sample(samples, "llmbot_llm_tokens_total", kind="completion") == (
        before["tokens"] + reported
    )
    assert sample(samples, "llmbot_db_pool_size") == 4  # DB_POOL_SIZE of the test settings
    assert sample(samples, "llmbot_db_pool_in_use") >= 0
    assert sample(samples, "llmbot_db_pool_waiting") == 0
    assert sample(samples, "llmbot_storage_degraded") == 0
    # Tables emptied by TRUNCATE are never analyzed yet, so these are counted, exactly.
    assert sample(samples, "llmbot_db_users") == 2
    assert sample(samples, "llmbot_db_chats") == 2
    assert sample(samples, "llmbot_db_live_messages") == 5  # 3 questions, 2 answers
    assert sample(samples, "llmbot_db_database_bytes") > 1_000_000


async def test_healthz_fails_while_the_database_is_down_and_passes_when_it_is_back(
    metrics_env: dict[str, str], telegram: TelegramStandIn, pool: Pool, cluster: LocalPostgres
) -> None:
    async with running_bot(metrics_env, telegram):
        status, body = await get(metrics_env, "/healthz")
        assert status == 200, body
        checks = json.loads(body)["checks"]
        assert {name for name, check in checks.items() if check["ok"]} == {
            "database", "schema", "pool", "storage", "telegram", "updates",
        }  # fmt: skip
        assert checks["schema"]["version"] == checks["schema"]["head"]

        with outage(cluster):
            status, body = await get(metrics_env, "/healthz")
            assert status == 503, body
            checks = json.loads(body)["checks"]
            assert not checks["database"]["ok"] and checks["telegram"]["ok"]

        async def healthy() -> bool:
            return (await get(metrics_env, "/healthz"))[0] == 200

        await until(healthy)

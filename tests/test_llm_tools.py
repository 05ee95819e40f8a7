"""Tools through the real bot: the LLM stand-in streams tool calls as OpenAI does, the bot runs
them (``search_history`` over the dialog's older live messages, ``remember``), sends the results
back as ``tool`` messages and delivers the answer that follows; bad calls and loops are bounded."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from bench.standins import LLMStandIn, TelegramStandIn, tool_results, tools_offered
from services.database import Pool
from services.turn.tools import MAX_ROUNDS
from tests.harness import fetch, running_bot
from tests.test_recall import grown, recall_in


def search(query: Any) -> dict[str, Any]:
    return {"name": "search_history", "arguments": json.dumps({"query": query})}


@pytest.fixture
def tooled(env: dict[str, str]) -> dict[str, str]:
    env.update(RECALL="true", LLM_TOOLS="true", HISTORY_LIMIT="4")  # two turns in the window
    return env


async def test_the_model_searches_the_history_beyond_its_window_and_answers_from_the_result(
    tooled: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    async with running_bot(tooled, telegram):
        await grown(telegram)
        llm.tool_calls = [[search("favourite book"), search("secret word")]]
        telegram.send("Which book did I say?")
        replies = await telegram.wait_for_messages(1, 8)
    today = datetime.now(UTC)
    asked, answered = llm.requests[-2:]
    assert tools_offered(asked) == ["search_history", "remember"]
    assert asked["stream"] is True
    [found, nothing] = tool_results(answered)
    assert "My favourite book is Solaris." in found["content"]
    assert "Dune" not in found["content"] and "pelican" not in found["content"]
    assert json.loads(nothing["content"]) == {"found": []}  # taken back: never found
    assert replies[6:] == [f"🔎 Looked back to {today.day} {today:%B %Y}.", f"echo: {nothing['content']}"]
    assert recall_in(asked) is None  # with tools, no automatic recall


async def test_while_the_history_fits_only_remember_is_offered(
    tooled: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    async with running_bot(tooled, telegram):
        telegram.send("hello")
        await telegram.wait_for_messages(1, 1)
    assert tools_offered(llm.requests[0]) == ["remember"]


async def test_an_endpoint_that_refuses_tools_gets_none_again_and_the_turn_recalls_by_itself(
    tooled: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    async with running_bot(tooled, telegram):
        llm.refuse_tools = True
        await grown(telegram)
        telegram.send("Which favourite book did I mention?")
        replies = await telegram.wait_for_messages(1, 8)
    refused = [r for r in llm.requests if r.get("tools")]
    assert len(refused) == 1  # found out once
    assert "My favourite book is Solaris." in (recall_in(llm.requests[-1]) or "")
    assert replies[-1] == "echo: Which favourite book did I mention?"


@pytest.mark.parametrize(
    "call",
    [
        {"name": "search_history", "arguments": "not json"},
        search(5),
        search("x" * 201),
        {"name": "delete_everything", "arguments": "{}"},
        {"name": "remember", "arguments": json.dumps({"fact": ""})},
    ],
    ids=["not-json", "not-text", "too-long", "unknown-tool", "empty-fact"],
)
async def test_a_bad_tool_call_is_answered_with_an_error_and_the_turn_goes_on(
    call: dict[str, Any], tooled: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(tooled, telegram):
        await grown(telegram)
        llm.tool_calls = [[call]]
        telegram.send("Which book?")
        replies = await telegram.wait_for_messages(1, 7)
    [result] = tool_results(llm.requests[-1])
    assert set(json.loads(result["content"])) == {"error"}
    assert replies[6] == f"echo: {result['content']}"
    assert await fetch(pool, "SELECT count(*) FROM memories") == [(0,)]


async def test_a_model_that_keeps_calling_tools_is_stopped_at_the_bound(
    tooled: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    async with running_bot(tooled, telegram):
        await grown(telegram)
        before = len(llm.requests)
        llm.always_tool_calls = [search("book")]
        telegram.send("Which book?")
        replies = await telegram.wait_for_messages(1, 7 + MAX_ROUNDS)
    asked = llm.requests[before:]
    assert [bool(r.get("tools")) for r in asked] == [True] * MAX_ROUNDS + [False]
    assert len(tool_results(asked[-1])) == MAX_ROUNDS
    assert replies[-1].startswith("echo: ")


async def test_the_model_remembers_a_fact_the_user_asks_it_to_keep(
    tooled: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(tooled, telegram):
        llm.tool_calls = [[{"name": "remember", "arguments": json.dumps({"fact": "The user is vegetarian."})}]]
        telegram.send("Remember that I'm vegetarian.")
        replies = await telegram.wait_for_messages(1, 2)
        telegram.send("What should I cook?")
        await telegram.wait_for_messages(1, 3)
    assert replies == ["📝 Noted: The user is vegetarian.", 'echo: {"saved": true}']
    assert await fetch(pool, "SELECT content FROM memories WHERE deleted_at IS NULL") == [("The user is vegetarian.",)]
    system = llm.requests[-1]["messages"][0]["content"]
    assert "The user is vegetarian." in system

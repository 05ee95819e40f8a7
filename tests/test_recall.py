"""Recall beyond the window through the real bot: a turn whose history has outgrown its window
finds the older messages its words match, from the same full-text search as /search, and shows
them to the model before the history; never cleared ones, never another user's."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bench.standins import LLMStandIn, TelegramStandIn
from services import database
from services.database import Pool
from services.llm.recall import RECALL_LABEL, looked_back, recall_block, recall_query
from tests.harness import command, fetch, running_bot, store_question

GROUP = -1001234567890


def recall_in(request: dict[str, object]) -> str | None:
    """The recall message of a chat request, if it has one."""
    messages = request["messages"]
    assert isinstance(messages, list)
    return next((m["content"] for m in messages if m["role"] == "system" and RECALL_LABEL in m["content"]), None)


async def grown(telegram: TelegramStandIn) -> None:
    """User 1's dialog past a window of two turns: a taken-back turn, one about a book, another
    user's about a book, then three turns with no word in common with anything (6 replies)."""
    telegram.send("The secret word is pelican.")
    await telegram.wait_for_messages(1, 1)
    command(telegram, "/undo")  # taken back: never recalled
    await telegram.wait_for_messages(1, 2)
    telegram.send("My favourite book is Solaris.", user_id=1)
    telegram.send("My favourite book is Dune.", user_id=2)  # another user's
    await telegram.wait_for_messages(1, 3)
    for filler in ("alpha", "bravo", "charlie"):
        telegram.send(filler)
    await telegram.wait_for_messages(1, 6)


@pytest.fixture
def recalling(env: dict[str, str]) -> dict[str, str]:
    env.update(RECALL="true", LLM_TOOLS="false", HISTORY_LIMIT="4")  # two turns in the window; no tools
    return env


async def test_an_old_message_beyond_the_window_is_recalled_and_the_user_told(
    recalling: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    async with running_bot(recalling, telegram):
        await grown(telegram)
        telegram.send("Which favourite book and secret word did I mention?")
        replies = await telegram.wait_for_messages(1, 8)
    today = datetime.now(UTC)
    assert replies[6:] == [
        f"🔎 Looked back to {today.day} {today:%B %Y}.",
        "echo: Which favourite book and secret word did I mention?",
    ]
    block = recall_in(llm.requests[-1])
    assert block is not None
    assert "My favourite book is Solaris." in block
    assert "Dune" not in block and "pelican" not in block
    assert "alpha" not in block
    assert all(recall_in(r) is None for r in llm.requests[:-1])  # nothing was left out before


async def test_no_recall_while_the_whole_history_fits(
    recalling: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    async with running_bot(recalling, telegram):
        telegram.send("My favourite book is Solaris.")
        await telegram.wait_for_messages(1, 1)
        telegram.send("Which favourite book did I mention?")
        replies = await telegram.wait_for_messages(1, 2)
    assert replies == ["echo: My favourite book is Solaris.", "echo: Which favourite book did I mention?"]
    assert recall_in(llm.requests[-1]) is None


def test_the_query_takes_the_words_worth_searching_and_the_block_fits_its_room() -> None:
    assert recall_query("What was the name of the BOOK I mentioned?") == "what or name or book or mentioned"
    assert recall_query("a b c?") is None
    found = [
        database.Recalled("user", datetime(2026, 3, 12, tzinfo=UTC), "the book is Solaris " * 10),
        database.Recalled("assistant", datetime(2026, 3, 1, tzinfo=UTC), "noted: Solaris"),
    ]
    text, shown = recall_block(found, room=10_000) or ("", [])
    assert text.startswith(RECALL_LABEL) and text.index("[2026-03-01, you]") < text.index("[2026-03-12, user]")
    assert looked_back(shown) == "🔎 Looked back to 1 March 2026."
    assert recall_block(found, room=100) is None or len(recall_block(found, room=100)[1]) == 1  # type: ignore[index]
    assert recall_block(found, room=10) is None


@pytest.mark.parametrize(
    ("statement", "indexes"),
    [
        (database.RECALL_EARLIER, ("messages_search_idx", "messages_turn_idx")),
        (database.RECALL_EARLIER_SHARED, ("messages_search_idx", "messages_chat_turn_idx")),
    ],
    ids=["per-user", "shared"],
)
async def test_recall_in_a_busy_group_reads_through_an_index_of_the_dialog(
    pool: Pool, statement: str, indexes: tuple[str, ...]
) -> None:
    for user in range(50):
        await store_question(pool, 1000 + user, GROUP, "hello")
    # 50 users in one group, 200 messages each, every fifth one about books
    await fetch(
        pool,
        "INSERT INTO messages (user_id, chat_id, role, content)"
        " SELECT 1 + n % 50, 1, 'user', CASE WHEN n % 5 = 0 THEN 'a book about space ' ELSE 'rain today ' END || n"
        " FROM generate_series(1, 10000) n; ANALYZE messages",
    )
    params = {"telegram_user_id": 1007, "telegram_chat_id": GROUP, "query": "book or space", "before_turn": 9000,
              "limit": 3, "chars": 400}  # fmt: skip
    plan = "\n".join(row[0] for row in await fetch(pool, "EXPLAIN " + statement, params))
    assert any(f"Index Scan on {index}" in plan or f"using {index}" in plan for index in indexes), plan
    assert "Seq Scan on messages" not in plan, plan


async def test_recall_finds_the_dialogs_own_live_messages_or_a_shared_groups_and_nothing_else(pool: Pool) -> None:
    mine = await store_question(pool, 1, GROUP, "my book is Solaris", message_id=1)
    theirs = await store_question(pool, 2, GROUP, "their book is Dune", message_id=2)
    await store_question(pool, 1, 1, "a private book, Ubik", message_id=3)
    cleared = await store_question(pool, 1, GROUP, "a cleared book, Stalker", message_id=4)
    await fetch(pool, "UPDATE messages SET deleted_at = now(), deleted_reason = 'clear' WHERE id = %s", (cleared,))
    later = await store_question(pool, 1, GROUP, "a book in the window, Eden", message_id=5)

    async def recalled(shared: bool) -> list[str]:
        found = await database.run(
            pool, database.recall_earlier, telegram_user_id=1, telegram_chat_id=GROUP, query="book",
            before_turn=later, limit=10, chars=400, shared=shared,
        )  # fmt: skip
        return sorted(message.content for message in found)

    assert await recalled(shared=False) == ["my book is Solaris"]
    assert await recalled(shared=True) == ["my book is Solaris", "their book is Dune"]
    assert mine < theirs < later


async def test_a_query_with_a_run_of_negations_is_searched_not_refused(pool: Pool) -> None:
    later = await store_question(pool, 1, 1, "a book", message_id=1)
    await store_question(pool, 1, 1, "now", message_id=2)
    found = await database.run(
        pool, database.recall_earlier, telegram_user_id=1, telegram_chat_id=1, query="book " + "-" * 100 + "x",
        before_turn=later + 1, limit=3, chars=400,
    )  # fmt: skip
    assert [message.content for message in found] == ["a book"]

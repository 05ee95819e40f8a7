"""History the user controls, through the real bot: /retry, /undo, edits, /search, /export and
/stats in private and group chats, on real PostgreSQL, over real HTTP to the stand-ins."""

from __future__ import annotations

import json
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bench.standins import LLMStandIn, TelegramStandIn
from handlers.history import NOTHING_TO_EXPORT, NOTHING_TO_RETRY, NOTHING_TO_UNDO, SEARCH_USAGE
from services import context
from services.database import Pool
from services.text.export import export_dialog
from services.text.formatting import utf16_slice
from tests.harness import command, edit, fetch, history_of, running_bot, store_question, until
from tests.test_outage import delivered

GROUP = -100123


def numbered(llm: LLMStandIn) -> None:
    """Each LLM answer says which request it answers, in their order of arrival: "answer 1"..."""
    llm.reply = lambda messages: f"answer {len(llm.requests)}"


async def test_retry_replaces_the_last_answer_and_can_be_repeated(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    numbered(llm)
    async with running_bot(env, telegram):
        question = telegram.send("Q1")
        await telegram.wait_for_messages(1, 1)
        command(telegram, "/retry")
        await telegram.wait_for_messages(1, 2)
        command(telegram, "/retry")
        await telegram.wait_for_messages(1, 3)
        telegram.send("Q2")
        replies = await telegram.wait_for_messages(1, 4)
    assert replies == ["answer 1", "answer 2", "answer 3", "answer 4"]
    # every retry asked the same question with the same history; the next turn sees the last answer
    assert [history_of(c) for c in llm.conversations] == [["Q1"], ["Q1"], ["Q1"], ["Q1", "answer 3", "Q2"]]
    retried = [s for s in telegram.calls("sendMessage") if s.text in ("answer 2", "answer 3")]
    assert all(s.params["reply_parameters"]["message_id"] == question["message_id"] for s in retried)
    assert await fetch(pool, "SELECT content, deleted_reason FROM messages WHERE role = 'assistant' ORDER BY id") == [
        ("answer 1", "retry"),
        ("answer 2", "retry"),
        ("answer 3", None),
        ("answer 4", None),
    ]


async def test_retry_with_nothing_to_retry_or_while_answering(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    numbered(llm)
    async with running_bot(env, telegram):
        command(telegram, "/retry")
        assert await telegram.wait_for_messages(1, 1) == [NOTHING_TO_RETRY]
        llm.delays = [30]  # the first answer takes long
        telegram.send("slow one")
        await llm.started.wait()
        command(telegram, "/retry")  # stops that answer and writes a new one
        assert await telegram.wait_for_messages(1, 2) == [NOTHING_TO_RETRY, "answer 2"]
        telegram.send("next")
        await telegram.wait_for_messages(1, 3)
    assert [history_of(c) for c in llm.conversations] == [["slow one"], ["slow one"], ["slow one", "answer 2", "next"]]
    assert telegram.messages_to(1)[1:] == ["answer 2", "answer 3"]  # the dropped first answer never came


async def test_undo_takes_back_turns_one_by_one(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        for text in ("Q1", "Q2"):
            telegram.send(text)
            await telegram.wait_for(lambda: f"echo: {text}" in telegram.messages_to(1))  # noqa: B023
        command(telegram, "/undo")
        assert (await telegram.wait_for_messages(1, 3))[-1] == (
            "Undone: your message “Q2” and my answer. /undo again goes further back."
        )
        telegram.send("Q3")
        await telegram.wait_for_messages(1, 4)
        command(telegram, "/undo")
        command(telegram, "/undo")
        command(telegram, "/undo")
        replies = await telegram.wait_for_messages(1, 7)
    assert history_of(llm.conversations[-1]) == ["Q1", "echo: Q1", "Q3"]  # Q2 and its answer are gone
    assert replies[-3:] == [
        "Undone: your message “Q3” and my answer. /undo again goes further back.",
        "Undone: your message “Q1” and my answer. /undo again goes further back.",
        NOTHING_TO_UNDO,
    ]
    assert await fetch(pool, "SELECT count(*), count(*) FILTER (WHERE deleted_reason = 'undo') FROM messages") == [
        (6, 6)
    ]  # nothing removed, everything set aside


async def test_undo_right_after_clear_brings_back_only_the_last_clear(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        telegram.send("first life")
        await telegram.wait_for_messages(1, 1)
        command(telegram, "/clear")
        await telegram.wait_for_messages(1, 2)
        telegram.send("second life")
        await telegram.wait_for_messages(1, 3)
        command(telegram, "/clear")
        command(telegram, "/undo")
        assert (await telegram.wait_for_messages(1, 5))[-1] == "Brought back the 2 message(s) you had cleared."
        telegram.send("go on")
        await telegram.wait_for_messages(1, 6)
        for _ in range(3):
            command(telegram, "/undo")
        replies = await telegram.wait_for_messages(1, 9)
    assert history_of(llm.conversations[-1]) == ["second life", "echo: second life", "go on"]
    assert replies[-3:] == [
        "Undone: your message “go on” and my answer. /undo again goes further back.",
        "Undone: your message “second life” and my answer. /undo again goes further back.",
        NOTHING_TO_UNDO,  # the earlier clear ("first life") is not brought back
    ]
    assert await fetch(pool, "SELECT content, deleted_reason FROM messages WHERE role = 'user' ORDER BY id") == [
        ("first life", "clear"),
        ("second life", "undo"),
        ("go on", "undo"),
    ]


async def test_undo_drops_the_answer_being_written(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    llm.delays = [30]
    async with running_bot(env, telegram):
        telegram.send("never mind")
        await llm.started.wait()
        command(telegram, "/undo")
        undone = "Undone: your message “never mind”. /undo again goes further back."
        assert await telegram.wait_for_messages(1, 1) == [undone]
        telegram.send("marker")  # answered after the undo: the dropped turn can no longer send
        await telegram.wait_for(lambda: "echo: marker" in telegram.messages_to(1))
    assert "echo: never mind" not in telegram.messages_to(1)
    assert history_of(llm.conversations[-1]) == ["marker"]
    assert await fetch(pool, "SELECT content, deleted_reason FROM messages ORDER BY id") == [
        ("never mind", "undo"),
        ("marker", None),
        ("echo: marker", None),
    ]


async def test_editing_the_last_question_answers_it_again_in_the_same_message(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        sent = telegram.send("wht is PostgreSQL")
        await telegram.wait_for_messages(1, 1)
        first = telegram.calls("sendMessage")[-1].message_id
        edit(telegram, sent, "what is PostgreSQL")
        await telegram.wait_for(lambda: telegram.shown(1) == ["echo: what is PostgreSQL"])
        telegram.send("thanks")
        await telegram.wait_for_messages(1, 2)
    assert [history_of(c) for c in llm.conversations] == [
        ["wht is PostgreSQL"],
        ["what is PostgreSQL"],
        ["what is PostgreSQL", "echo: what is PostgreSQL", "thanks"],
    ]
    assert int(telegram.calls("editMessageText")[-1].params["message_id"]) == first  # edited in place
    assert await fetch(
        pool, "SELECT role, content, deleted_reason, edited_at IS NOT NULL FROM messages ORDER BY id"
    ) == [
        ("user", "what is PostgreSQL", None, True),
        ("assistant", "echo: wht is PostgreSQL", "edit", False),
        ("assistant", "echo: what is PostgreSQL", None, False),
        ("user", "thanks", None, False),
        ("assistant", "echo: thanks", None, False),
    ]


async def test_an_answer_that_cannot_be_edited_is_sent_anew(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        sent = telegram.send("typo")
        await telegram.wait_for_messages(1, 1)
        telegram.refuse_edits = True  # the old answer was deleted, say
        edit(telegram, sent, "fixed")
        replies = await telegram.wait_for_messages(1, 2)
    assert replies == ["echo: typo", "echo: fixed"]


async def test_editing_an_older_question_updates_its_text_only(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        older = telegram.send("old text")
        await telegram.wait_for_messages(1, 1)
        telegram.send("newer")
        await telegram.wait_for_messages(1, 2)
        edit(telegram, older, "old text, edited")
        edit(telegram, telegram.message("never stored", message_id=424242), "still unknown")
        telegram.send("marker")  # its turn starts after both edits were handled
        await telegram.wait_for_messages(1, 3)
    assert len(llm.requests) == 3  # no answer again for an older question, none for an unknown one
    assert history_of(llm.conversations[-1]) == ["old text, edited", "echo: old text", "newer", "echo: newer", "marker"]
    assert telegram.calls("editMessageText") == []


async def test_history_commands_never_touch_another_users_turns_in_a_group(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        telegram.send("Ann asks about кошки", user_id=1, chat_id=GROUP)
        await telegram.wait_for_messages(GROUP, 1)
        telegram.send("Bob asks about собаки", user_id=2, chat_id=GROUP)
        # Delivered, not just shown: a group's first message is the stream's preview, sent before
        # the answer is stored, and an /undo then would find no answer to take back.
        await until(lambda: delivered(pool, 2))
        command(telegram, "/undo", user_id=2, chat_id=GROUP)
        command(telegram, "/search кошки", user_id=2, chat_id=GROUP)
        command(telegram, "/stats", user_id=2, chat_id=GROUP)
        command(telegram, "/retry", user_id=2, chat_id=GROUP)  # Bob's only turn is undone: nothing
        command(telegram, "/search кошки", user_id=1, chat_id=GROUP)
        command(telegram, "/export json", user_id=2, chat_id=GROUP)
        replies = await telegram.wait_for_messages(GROUP, 7)
        await telegram.wait_for(lambda: len(telegram.documents(GROUP)) == 1)
    assert replies[2] == "Undone: your message “Bob asks about собаки” and my answer. /undo again goes further back."
    assert replies[3] == "Nothing found for “кошки”."
    assert replies[4].startswith("In this chat: 2 message(s) (2 cleared)")
    assert replies[5] == NOTHING_TO_RETRY
    assert replies[6].startswith("Found 2 for “кошки”") and "Ann asks about кошки" in replies[6]
    assert await fetch(pool, "SELECT content FROM messages WHERE deleted_at IS NULL ORDER BY id") == [
        ("Ann asks about кошки",),
        ("echo: Ann asks about кошки",),
    ]
    [bobs] = exported(telegram, GROUP)  # Bob's own messages only
    assert [(m["text"], m["cleared"]) for m in bobs] == [
        ("Bob asks about собаки", True),
        ("echo: Bob asks about собаки", True),
    ]


# -- /search ------------------------------------------------------------------------------------


def bold(call: Any) -> list[str]:
    text = call.params["text"]
    return [utf16_slice(text, e["offset"], e["length"]) for e in call.params.get("entities", []) if e["type"] == "bold"]


async def test_search_matches_russian_and_english_word_forms_and_phrases(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    llm.reply = lambda messages: "Noted."
    async with running_bot(env, telegram):
        for text in ("Мои кошки любят молоко", "I was running in the park", "secret banana plan"):
            telegram.send(text)
        await telegram.wait_for_messages(1, 3)
        command(telegram, "/clear")  # everything so far is cleared...
        await telegram.wait_for_messages(1, 4)
        telegram.send("Кошка спит, the dog runs")  # ...but this
        await telegram.wait_for_messages(1, 5)
        telegram.send("Кошка", user_id=2)  # another user's words, in their own chat
        await telegram.wait_for_messages(2, 1)
        searches = [
            "/search кошка",
            "/search all кошки",
            "/search run",
            '/search all "кошки любят"',
            '/search all "любят кошки"',
            "/search banana",
            "/search all banana -plan",
            "/search all banana",
        ]
        for text in searches:
            command(telegram, text)
        await telegram.wait_for_messages(1, 5 + len(searches))
    results = [s for s in telegram.calls("sendMessage") if s.chat_id == 1][-len(searches) :]
    texts = [r.text for r in results]
    assert texts[0].startswith("Found 1 for “кошка”") and bold(results[0]) == ["Кошка"]
    assert texts[1].startswith("Found 2 for “кошки”") and sorted(bold(results[1])) == ["Кошка", "кошки"]
    assert texts[1].count(", cleared") == 1
    assert texts[2].startswith("Found 1 for “run”") and bold(results[2]) == ["runs"]
    assert texts[3].startswith('Found 1 for “"кошки любят"”') and bold(results[3]) == ["кошки", "любят"]
    assert texts[4] == 'Nothing found for “"любят кошки"”.'  # a phrase keeps its word order
    assert texts[5] == "Nothing found for “banana”."  # cleared messages only with "all"
    assert texts[6] == "Nothing found for “banana -plan”."
    assert texts[7].startswith("Found 1 for “banana”") and ", cleared" in texts[7]
    assert all("UTC, you" in t or "UTC, me" in t for t in texts if t.startswith("Found"))


@pytest.mark.parametrize(
    "query",
    ["'); DROP TABLE messages; --", ":*", "&|!", "x" * 4000, "кошка & | ! <-> :* 'a'", "the of and"],
    ids=["sql", "prefix", "operators", "4000-chars", "mixed", "stop-words"],
)
async def test_search_takes_hostile_input_as_words(
    query: str, env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        telegram.send("кошка and the DROP of a table")
        await telegram.wait_for_messages(1, 1)
        command(telegram, f"/search {query}")
        reply = (await telegram.wait_for_messages(1, 2))[-1]
    assert reply.startswith(("Nothing found for", "Found "))
    assert await fetch(pool, "SELECT count(*) FROM messages") == [(2,)]


async def test_search_without_words_explains_itself(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    async with running_bot(env, telegram):
        command(telegram, "/search")
        command(telegram, "/search all")
        assert await telegram.wait_for_messages(1, 2) == [SEARCH_USAGE, SEARCH_USAGE]


# -- /export and /stats -------------------------------------------------------------------------


def exported(telegram: TelegramStandIn, chat: int) -> list[Any]:
    """The JSON documents the chat was sent, parsed."""
    return [json.loads(upload.content) for upload in telegram.documents(chat) if upload.filename.endswith(".json")]


async def test_export_of_nothing_one_message_and_json_that_round_trips(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        command(telegram, "/export")
        assert await telegram.wait_for_messages(1, 1) == [NOTHING_TO_EXPORT]
        command(telegram, "/retry")  # nothing stored by a command
        await telegram.wait_for_messages(1, 2)
        telegram.send("only *one* message\nwith 'quotes' and \"more\"")
        await telegram.wait_for_messages(1, 3)
        command(telegram, "/export")
        await telegram.wait_for(lambda: len(telegram.documents(1)) == 1)
        command(telegram, "/clear")
        await telegram.wait_for_messages(1, 4)
        command(telegram, "/export json")
        await telegram.wait_for(lambda: len(telegram.documents(1)) == 2)
    markdown = telegram.documents(1)[0]
    assert markdown.filename.endswith(".md")
    assert "only *one* message\nwith 'quotes' and \"more\"" in markdown.content.decode()
    assert "## You · " in markdown.content.decode() and "## Assistant · " in markdown.content.decode()
    [document] = exported(telegram, 1)
    rows = await fetch(pool, "SELECT role, content, created_at, deleted_at IS NOT NULL FROM messages ORDER BY id")
    assert [(m["role"], m["text"], datetime.fromisoformat(m["created_at"]), m["cleared"]) for m in document] == rows
    assert [m["cleared"] for m in document] == [True, True]


async def test_export_of_100000_messages_is_whole_and_in_order(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        telegram.send("the first")
        await telegram.wait_for_messages(1, 1)
        await fetch(
            pool,
            "INSERT INTO messages (user_id, chat_id, role, content)"
            " SELECT 1, 1, CASE WHEN n % 2 = 0 THEN 'user' ELSE 'assistant' END, 'message number ' || n"
            " FROM generate_series(1, 99998) n",
        )
        command(telegram, "/export json")
        await telegram.wait_for(lambda: len(telegram.documents(1)) >= 1, timeout=120)
    messages = [m for document in exported(telegram, 1) for m in document]
    assert len(messages) == 100_000
    assert [m["text"] for m in messages[2:5]] == ["message number 1", "message number 2", "message number 3"]
    assert messages[-1]["text"] == "message number 99998"


async def test_stats_count_messages_characters_and_tokens_here_and_everywhere(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        command(telegram, "/stats")
        assert await telegram.wait_for_messages(1, 1) == ["I have no messages of yours yet."]
        telegram.send("hello")
        await telegram.wait_for_messages(1, 2)
        telegram.send("in the group", chat_id=GROUP)
        await until(lambda: delivered(pool, 2))  # stored, not just previewed: /stats counts it
        command(telegram, "/clear")
        await telegram.wait_for_messages(1, 3)
        command(telegram, "/stats")
        stats = (await telegram.wait_for_messages(1, 4))[-1]
    here = len("hello") + len("echo: hello")
    everywhere = here + len("in the group") + len("echo: in the group")
    (p1, c1), (p2, c2) = llm.usages
    [(first_contact,)] = await fetch(pool, "SELECT created_at FROM users WHERE telegram_user_id = 1")
    assert stats.split("\n") == [
        f"In this chat: 2 message(s) (2 cleared), {here} characters.",
        f"In all 2 chat(s): 4 message(s) (2 cleared), {everywhere} characters.",
        f"We first talked on {first_contact:%Y-%m-%d}.",
        f"Tokens in this chat: {p1} read, {c1} written; in all chats: {p1 + p2} read, {c1 + c2} written.",
    ]


async def test_history_commands_without_a_database_say_so(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    from handlers.errors import NO_HISTORY

    env["DATABASE_ENABLED"] = "false"
    async with running_bot(env, telegram):
        for text in ("/search x", "/undo", "/retry", "/stats", "/export"):
            command(telegram, text)
        assert await telegram.wait_for_messages(1, 5) == [NO_HISTORY] * 5


async def test_export_holds_one_batch_at_a_time_and_splits_below_the_upload_limit(pool: Pool, tmp_path: Path) -> None:
    await store_question(pool, 1, 1, "the first")
    await fetch(
        pool,
        "INSERT INTO messages (user_id, chat_id, role, content)"
        " SELECT 1, 1, 'user', n || ' ' || repeat('я', 2000) FROM generate_series(1, 20000) n",
    )
    limit = 5_000_000
    tracemalloc.start()
    try:
        paths = await export_dialog(
            lambda write: context.dialog_messages(pool, telegram_user_id=1, telegram_chat_id=1, write=write),
            tmp_path,
            chat_id=1,
            fmt="json",
            now=datetime.now(UTC),
            max_bytes=limit,
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    sizes = [path.stat().st_size for path in paths]
    assert sum(sizes) > 80_000_000 and all(size <= limit for size in sizes)  # 2,000 Cyrillic letters: 4 KB each
    assert peak < 10_000_000, f"peak {peak:,} bytes"  # far below the 80 MB exported
    texts = [m["text"] for path in paths for m in json.loads(path.read_bytes())]
    assert texts[0] == "the first" and [t.split()[0] for t in texts[1:]] == [str(n) for n in range(1, 20001)]


async def test_markdown_parts_each_have_their_heading(pool: Pool, tmp_path: Path) -> None:
    for n in range(30):
        await store_question(pool, 1, 1, f"question {n} " + "x" * 100)
    paths = await export_dialog(
        lambda write: context.dialog_messages(pool, telegram_user_id=1, telegram_chat_id=1, write=write),
        tmp_path,
        chat_id=1,
        fmt="markdown",
        now=datetime(2026, 11, 24, 12, 0, tzinfo=UTC),
        max_bytes=1000,
    )
    documents = [path.read_text() for path in paths]
    assert len(paths) > 3 and all(path.stat().st_size <= 1000 for path in paths)
    assert documents[0].startswith("# Conversation in chat 1, exported 2026-11-24 12:00 UTC\n")
    assert documents[1].startswith("# Conversation in chat 1, exported 2026-11-24 12:00 UTC (part 2)\n")
    assert [line for d in documents for line in d.splitlines() if line.startswith("question")] == [
        f"question {n} " + "x" * 100 for n in range(30)
    ]

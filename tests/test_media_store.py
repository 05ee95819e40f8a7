"""Attachments in the data layer, against the real PostgreSQL: stored by reference with their
message (revision 013), counted in its tokens, read back by a turn's context, carried by the
spool through an outage, and refused when malformed."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from services import database
from services.database import Pool
from services.fallback import spool
from services.fallback.spool import Spool, Spooled
from services.llm.tokens import estimate_tokens, image_tokens
from services.records import Attachment, described
from tests.harness import fetch

PHOTO = Attachment("photo", "file-1", "unique-1", "image/jpeg", 12_345, 1280, 960)
VOICE = Attachment("voice", "file-2", "unique-2", "audio/ogg", 4_000, duration=65)
BUDGET = 100_000


async def add(
    pool: Pool, message_id: int, content: str, *attachments: Attachment, read: database.StartRead | None = None
) -> database.AddedQuestion:
    """User 1's question in their private chat, with ``attachments`` (``read``: its turn's start too)."""
    return await database.run(
        pool,
        database.add_question,
        telegram_user_id=1,
        first_name="Ann",
        telegram_chat_id=1,
        telegram_message_id=message_id,
        content=content,
        attachments=attachments,
        read=read,
    )


async def ask(pool: Pool, message_id: int, content: str, *attachments: Attachment) -> int:
    return (await add(pool, message_id, content, *attachments)).id


async def test_attachments_are_stored_with_their_message_and_read_back_by_the_turn(pool: Pool) -> None:
    await ask(pool, 1, "plain text")
    question = await ask(pool, 2, "what is this?", PHOTO, VOICE)
    assert await fetch(pool, "SELECT attachments, tokens FROM messages ORDER BY id") == [
        (None, estimate_tokens("plain text")),
        ([PHOTO.stored(), VOICE.stored()], estimate_tokens("what is this?") + image_tokens(1280, 960)),
    ]
    start = await database.run(pool, database.fetch_turn_start, question_id=question, history_limit=20, budget=BUDGET)
    assert start is not None
    newest, older = start.dialog.history
    assert [Attachment.from_stored(a) for a in newest.attachments or ()] == [PHOTO, VOICE]
    assert newest.images == [PHOTO] and older.attachments is None


async def test_a_fresh_question_reads_its_attachments_in_the_round_trip_that_stores_it(pool: Pool) -> None:
    added = await add(pool, 1, "", PHOTO, read=database.StartRead(20, BUDGET))
    assert added.start is not None
    [question] = added.start.dialog.history
    assert question.images == [PHOTO]


def test_a_message_with_attachments_reads_as_lines_before_its_text() -> None:
    assert described("the text", [PHOTO, VOICE]) == "[photo]\n[voice message, 1:05]\nthe text"
    # a document's text is the message's, under its own "[file a.pdf]" line
    assert (
        described("[file a.pdf]\ntext", [Attachment("document", "f", "u", file_name="a.pdf")]) == "[file a.pdf]\ntext"
    )
    assert described("", [Attachment("document", "f", "u", "image/png", file_name="a.png")]) == "[file a.png]"
    assert described("only text", []) == "only text"


@pytest.mark.parametrize(
    "attachments",
    [
        '{"kind": "photo"}',  # not an array
        "[]",  # empty: NULL says "none"
        '[{"kind": "sticker", "file_id": "x"}]',  # not a kind the bot reads
        '[{"file_id": "x"}]',  # no kind
        "[1]",
    ],
)
async def test_malformed_attachments_are_refused_by_the_schema(pool: Pool, attachments: str) -> None:
    await ask(pool, 1, "registers the dialog")
    with pytest.raises(psycopg.errors.CheckViolation):
        async with pool.connection() as conn:
            await conn.execute(
                "INSERT INTO messages (user_id, chat_id, role, content, attachments)"
                " SELECT user_id, chat_id, 'user', 'x', %s::jsonb FROM messages LIMIT 1",
                (attachments,),
            )


async def test_a_spooled_question_keeps_its_attachments_through_a_restart_and_the_write_back(
    pool: Pool, tmp_path: Path
) -> None:
    item = Spooled("question", 1, 1, datetime.now(UTC), 10, "Ann", None, "caption", attachments=[PHOTO.stored()])
    Spool(tmp_path / "writes.jsonl", max_items=10).add(item)
    [loaded] = Spool(tmp_path / "writes.jsonl", max_items=10).load()
    assert loaded == item
    await database.run(pool, spool.write_back, loaded)
    assert await fetch(pool, "SELECT content, attachments FROM messages") == [("caption", [PHOTO.stored()])]

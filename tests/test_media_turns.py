"""Photos, voice messages and files through the real bot: the Telegram stand-in serves getFile and
the file URL with real bytes, the LLM stand-in takes image parts and transcribes; what the model
was sent, what is stored, what the user is told, and what the next turn's context shows.

``tests/media/voice.ogg`` is a real Ogg Opus stream (RFC 7845) of one second of silence, mono
48 kHz as Telegram's voice notes are: its three pages (OpusHead, OpusTags, 50 silent 20 ms CELT
frames ``f8 ff fe``) were written with their CRCs by a short script, no encoder needed. The
images are described in ``tests/test_media.py``."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from bench.standins import LLMStandIn, TelegramStandIn, images_in
from handlers.media import ALBUM_WAIT_S
from services.database import Pool
from services.media.intake import NOT_HEARD, TOO_BIG
from services.ops.local_postgres import LocalPostgres
from services.turn.turn import NO_VISION
from tests.harness import command, fetch, fetch_after_outage, outage, running_bot
from tests.test_media import text_pdf

MEDIA = Path(__file__).resolve().parent / "media"
JPEG = (MEDIA / "photo.jpg").read_bytes()
PDF = text_pdf("Hello from a PDF")
VOICE = (MEDIA / "voice.ogg").read_bytes()


def variant(jpeg: bytes, n: int) -> bytes:
    """Another JPEG's bytes: ``jpeg`` with ``n`` bytes of padding before its end marker."""
    return jpeg[:-2] + bytes(n) + b"\xff\xd9"


def data_url(data: bytes, mime_type: str = "image/jpeg") -> str:
    return f"data:{mime_type};base64,{base64.b64encode(data).decode()}"


def user_texts(request: dict[str, Any]) -> list[str]:
    """The text of each user message of a chat request (of a list of parts, its text parts)."""
    texts = []
    for message in request["messages"]:
        if message["role"] != "user":
            continue
        content = message["content"]
        texts.append(
            content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")
        )
    return texts


async def stored_questions(pool: Pool) -> list[tuple[str, Any]]:
    return await fetch(pool, "SELECT content, attachments FROM messages WHERE role = 'user' ORDER BY id")


async def test_a_photo_is_shown_with_its_caption_stored_by_reference_and_shown_again_in_the_window(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    env["IMAGE_MAX_SIDE"] = "800"  # of the sizes 90, 320, 1280 wide: the 320 one
    async with running_bot(env, telegram):
        photo = telegram.photo_sizes([variant(JPEG, 1), JPEG, variant(JPEG, 2)])  # each its own bytes
        telegram.send(None, photo=photo, caption="What is in this picture?")
        await telegram.wait_for_messages(1, 1)
        downloads = len(telegram.downloads)
        telegram.send("And what colour is it?")
        await telegram.wait_for_messages(1, 2)
        assert len(telegram.downloads) == downloads  # shown again from memory, not downloaded again
    first, second = llm.requests
    assert images_in(first) == [data_url(JPEG)]
    assert user_texts(first) == ["[photo]\nWhat is in this picture?"]
    assert images_in(second) == [data_url(JPEG)]  # still in the window
    assert user_texts(second)[-1] == "And what colour is it?"
    [(content, attachments), _] = await stored_questions(pool)
    assert content == "What is in this picture?"
    assert attachments == [
        {
            "kind": "photo",
            "file_id": photo[1]["file_id"],
            "file_unique_id": photo[1]["file_unique_id"],
            "mime_type": "image/jpeg",
            "file_size": len(JPEG),
            "width": 320,
            "height": 240,
        }
    ]
    assert JPEG.hex() not in json.dumps(await fetch(pool, "SELECT row_to_json(m)::text FROM messages m"))


async def test_a_restarted_bot_fetches_an_image_again_by_its_id_and_older_images_become_lines(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    env["CONTEXT_IMAGES"] = "1"
    async with running_bot(env, telegram):
        telegram.send(None, photo=telegram.photo_sizes(JPEG, sizes=((64, 48),)), caption="first")
        await telegram.wait_for_messages(1, 1)
    other = variant(JPEG, 1)  # another image: another file, other bytes
    async with running_bot(env, telegram):  # a new process: nothing in memory
        telegram.send(None, photo=telegram.photo_sizes(other, sizes=((64, 48),)), caption="second")
        await telegram.wait_for_messages(1, 2)
        telegram.send("compare them")
        await telegram.wait_for_messages(1, 3)
    assert images_in(llm.requests[1]) == [data_url(other)]  # the newest image only (CONTEXT_IMAGES=1)
    assert user_texts(llm.requests[1]) == ["[photo]\nfirst", "[photo]\nsecond"]
    assert images_in(llm.requests[2]) == [data_url(other)]
    env["CONTEXT_IMAGES"] = "4"
    async with running_bot(env, telegram):
        downloads = len(telegram.downloads)
        telegram.send("and again")
        await telegram.wait_for_messages(1, 4)
        assert len(telegram.downloads) == downloads + 2  # both fetched again by file_id
    assert images_in(llm.requests[3]) == [data_url(JPEG), data_url(other)]


async def test_an_album_is_one_question(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    other = variant(JPEG, 1)
    async with running_bot(env, telegram):
        album = {"media_group_id": "album-1"}
        telegram.send(None, photo=telegram.photo_sizes(JPEG, sizes=((64, 48),)), caption="two cats", **album)
        telegram.send(None, photo=telegram.photo_sizes(other, sizes=((64, 48),)), **album)
        telegram.send("marker")  # after the album's wait: answered after it
        replies = await telegram.wait_for_messages(1, 2, timeout=15 + ALBUM_WAIT_S)
    assert replies == ["echo: [photo]\n[photo]\ntwo cats [+2 images]", "echo: marker"]
    assert images_in(llm.requests[0]) == [data_url(JPEG), data_url(other)]
    [(content, attachments), (marker, _)] = await stored_questions(pool)
    assert (content, [a["kind"] for a in attachments], marker) == ("two cats", ["photo", "photo"], "marker")


async def test_a_model_that_refuses_images_gets_the_caption_and_the_user_is_told_once(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    llm.refuse_images = True
    async with running_bot(env, telegram):
        telegram.send(None, photo=telegram.photo_sizes(JPEG, sizes=((64, 48),)), caption="what is it?")
        first = await telegram.wait_for_messages(1, 2)
        telegram.send(None, photo=telegram.photo_sizes(JPEG, sizes=((64, 48),)), caption="and this?")
        replies = await telegram.wait_for_messages(1, 4)
    assert first == [NO_VISION, "echo: [photo]\nwhat is it?"]
    assert replies[2:] == [NO_VISION, "echo: [photo]\nand this?"]  # one line, no refused request again
    assert [len(images_in(r)) for r in llm.requests] == [1, 0, 0]


async def test_a_model_outside_vision_models_is_never_sent_an_image(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    env["VISION_MODELS"] = "some/vision-model"
    async with running_bot(env, telegram):
        telegram.send(None, photo=telegram.photo_sizes(JPEG, sizes=((64, 48),)), caption="see?")
        replies = await telegram.wait_for_messages(1, 2)
    assert replies == [NO_VISION, "echo: [photo]\nsee?"]
    assert telegram.downloads and all(not images_in(r) for r in llm.requests)


@pytest.fixture
def hearing(env: dict[str, str], llm: LLMStandIn) -> dict[str, str]:
    env.update(TRANSCRIPTION_MODEL="whisper-1", TRANSCRIPTION_BASE_URL=llm.url, VOICE_MAX_SECONDS="60")
    return env


async def test_a_voice_message_is_transcribed_shown_stored_and_found(
    hearing: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    llm.transcript = "Remind me to water the begonias."
    async with running_bot(hearing, telegram):
        telegram.send(None, voice=telegram.voice(VOICE, duration=3))
        replies = await telegram.wait_for_messages(1, 2)
        command(telegram, "/search begonias")
        found = (await telegram.wait_for_messages(1, 3))[2]
    assert replies == [
        "🎤 Remind me to water the begonias.",
        "echo: [voice message, 0:03]\nRemind me to water the begonias.",
    ]
    [transcription] = llm.transcriptions
    assert transcription["file"] == VOICE and transcription["model"] == "whisper-1"
    [(content, attachments), *_] = await stored_questions(pool)
    assert content == "Remind me to water the begonias."
    assert [(a["kind"], a["duration"]) for a in attachments] == [("voice", 3)]
    assert "begonias" in found


@pytest.mark.parametrize(
    ("voice", "reply"),
    [
        ({"duration": 0}, NOT_HEARD),
        ({"duration": 7200}, "That recording is too long for me: I listen to 1 minute at most."),
    ],
)
async def test_a_voice_message_it_cannot_take_gets_one_line_and_nothing_is_stored(
    voice: dict[str, Any], reply: str, hearing: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(hearing, telegram):
        telegram.send(None, voice=telegram.voice(VOICE, **voice))
        telegram.send("marker")
        replies = await telegram.wait_for_messages(1, 2)
    assert replies == [reply, "echo: marker"]
    assert llm.transcriptions == []
    assert [c for c, _ in await stored_questions(pool)] == ["marker"]


async def test_an_empty_transcript_and_a_failed_transcription_get_one_line_each(
    hearing: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    llm.transcript = "   "
    async with running_bot(hearing, telegram):
        telegram.send(None, voice=telegram.voice(VOICE))
        await telegram.wait_for_messages(1, 1)
        llm.transcription_status = 500
        telegram.send(None, voice=telegram.voice(VOICE))
        telegram.send("marker")
        replies = await telegram.wait_for_messages(1, 3)
    assert replies[0] == NOT_HEARD
    assert replies[1].startswith("Sorry, I couldn't make out that voice message")
    assert replies[2] == "echo: marker"
    assert [c for c, _ in await stored_questions(pool)] == ["marker"]


async def test_a_transcription_is_admitted_before_it_is_made(
    hearing: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    hearing["RATE_LIMIT_PER_MINUTE"] = "1"
    async with running_bot(hearing, telegram):
        telegram.send(None, voice=telegram.voice(VOICE))
        await telegram.wait_for_messages(1, 2)
        telegram.send(None, voice=telegram.voice(VOICE))
        replies = await telegram.wait_for_messages(1, 3)
    assert replies[2].startswith("You're writing faster than I can think")
    assert len(llm.transcriptions) == 1  # the refused one was never transcribed
    assert await fetch(pool, "SELECT hits FROM rate_limits") == [(2,)]  # each counted once


async def test_a_text_file_and_a_pdf_are_read_into_the_question(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        notes = b"# Plan\n\nBuy milk.\n"
        telegram.send(None, document=telegram.document(notes, file_name="plan.md", mime_type="text/markdown"),
                      caption="summarise")  # fmt: skip
        await telegram.wait_for_messages(1, 1)
        telegram.send(None, document=telegram.document(PDF, file_name="report.pdf", mime_type="application/pdf"))
        await telegram.wait_for_messages(1, 2)
    assert user_texts(llm.requests[0]) == ["summarise\n\n[file plan.md]\n# Plan\n\nBuy milk."]
    [(first, _), (second, attachments)] = await stored_questions(pool)
    assert first == "summarise\n\n[file plan.md]\n# Plan\n\nBuy milk."
    assert second == "[file report.pdf]\nHello from a PDF"
    assert [(a["kind"], a["file_name"], a["mime_type"]) for a in attachments] == [
        ("document", "report.pdf", "application/pdf")
    ]


async def test_a_long_file_is_cut_with_a_note(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    env["DOCUMENT_MAX_CHARS"] = "100"
    async with running_bot(env, telegram):
        telegram.send(None, document=telegram.document(("word " * 1000).encode(), file_name="long.txt"))
        await telegram.wait_for_messages(1, 1)
    [(content, _)] = await stored_questions(pool)
    assert content.endswith("[The file goes on; only its first 100 characters were read.]")
    assert len(content) < 250


@pytest.mark.parametrize(
    ("document", "reply"),
    [
        ({"data": b"\xff\xd8\xff\xe0 not really a jpeg", "file_name": "cat.jpg", "mime_type": "image/jpeg"},
         "I couldn't read that image."),
        ({"data": b"PK\x03\x04" + bytes(100), "file_name": "report.pdf", "mime_type": "application/pdf"}, None),
        ({"data": b"PK\x03\x04" + bytes(100), "file_name": "archive.zip", "mime_type": "application/zip"},
         "I can read text, Markdown, source code and PDF files, and images; not this kind of file."),
        ({"data": b"\x00\x01\x02binary", "file_name": "data.txt", "mime_type": "text/plain"}, None),
        ({"data": b"", "file_name": "big.txt", "mime_type": "text/plain", "reported_size": 25 * 1024 * 1024},
         TOO_BIG),
    ],
)  # fmt: skip
async def test_a_file_it_cannot_read_gets_one_line_and_nothing_is_stored(
    document: dict[str, Any], reply: str | None, env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn,
    pool: Pool,
) -> None:  # fmt: skip
    data = document.pop("data")
    async with running_bot(env, telegram):
        telegram.send(None, document=telegram.document(data, **document))
        telegram.send("marker")
        replies = await telegram.wait_for_messages(1, 2)
    assert replies[1] == "echo: marker" and len(replies) == 2
    if reply is not None:
        assert replies[0] == reply
    assert "\n" not in replies[0] and not replies[0].startswith("echo")
    assert [c for c, _ in await stored_questions(pool)] == ["marker"]
    assert [user_texts(r)[-1] for r in llm.requests] == ["marker"]


async def test_a_photo_caption_edit_retry_and_export_keep_the_attachment(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        sent = telegram.send(None, photo=telegram.photo_sizes(JPEG, sizes=((64, 48),)), caption="a dog?")
        await telegram.wait_for_messages(1, 1)
        telegram.push("edited_message", {**sent, "caption": "a cat?", "edit_date": sent["date"] + 1})
        await telegram.wait_for(lambda: len(llm.requests) == 2)
        command(telegram, "/retry")
        await telegram.wait_for(lambda: len(llm.requests) == 3)
        command(telegram, "/export json")
        await telegram.wait_for(lambda: len(telegram.documents(1)) == 1)
    assert [user_texts(r) for r in llm.requests] == [["[photo]\na dog?"], ["[photo]\na cat?"], ["[photo]\na cat?"]]
    assert [len(images_in(r)) for r in llm.requests] == [1, 1, 1]
    [export] = [json.loads(upload.content) for upload in telegram.documents(1)]
    assert export[0]["text"] == "a cat?"
    assert export[0]["attachments"] == [{"kind": "photo", "mime_type": "image/jpeg", "width": 64, "height": 48}]


async def test_during_an_outage_a_photo_is_answered_from_memory_and_written_back_with_its_attachment(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool, cluster: LocalPostgres
) -> None:
    async with running_bot(env, telegram) as dp:
        telegram.send("before")
        await telegram.wait_for_messages(1, 1)
        with outage(cluster):
            photo = telegram.photo_sizes(JPEG, sizes=((64, 48),))
            telegram.send(None, photo=photo, caption="during")
            assert (await telegram.wait_for_messages(1, 2, timeout=30))[1] == "echo: [photo]\nduring [+1 images]"
            assert dp["dialog_store"].degraded
        await telegram.wait_for(lambda: not dp["dialog_store"].degraded, timeout=30)
        telegram.send("after")
        await telegram.wait_for_messages(1, 3)
    assert user_texts(llm.requests[1]) == ["before", "[photo]\nduring"]  # from memory
    assert images_in(llm.requests[1]) == [data_url(JPEG)]
    assert images_in(llm.requests[2]) == [data_url(JPEG)]  # from the database, its id written back
    [_, (content, attachments), _] = await fetch_after_outage(
        pool, "SELECT content, attachments FROM messages WHERE role = 'user' ORDER BY id"
    )
    assert content == "during" and [a["file_id"] for a in attachments] == [photo[0]["file_id"]]

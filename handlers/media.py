"""Photos, voice messages and files: read into a question (``services.media.intake``), then asked
as a text message is. An album (a media group: one update per part) is one question."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiogram import Bot, Router
from aiogram.types import Message, User

from config import Config
from handlers.messages import address_of, asked, quoted_in
from handlers.unsupported import NOT_HEARD
from services.media.errors import Unreadable
from services.media.images import best_size
from services.media.intake import Intake, costs_a_call
from services.records import Attachment
from services.turn.turns import Turns

logger = logging.getLogger(__name__)
ALBUM_WAIT_S = 1.0  # Telegram sends an album's parts within a moment of each other
HEARD_CHARS = 300  # of a transcript shown back above the answer


class Albums:
    """The parts of each album being gathered: the first part waits ``wait_s`` for the others."""

    def __init__(self, wait_s: float = ALBUM_WAIT_S) -> None:
        self._wait_s = wait_s
        self._open: dict[tuple[int, str], list[Message]] = {}

    def opened(self, message: Message) -> bool:
        """Add an album's part: True for its first, whose handler asks for the whole album."""
        assert message.media_group_id is not None
        parts = self._open.setdefault((message.chat.id, message.media_group_id), [])
        parts.append(message)
        return len(parts) == 1

    async def gathered(self, first: Message) -> list[Message]:
        """The album of ``first`` once its other parts have had ``wait_s`` to arrive, in order."""
        assert first.media_group_id is not None
        try:
            await asyncio.sleep(self._wait_s)
        finally:
            parts = self._open.pop((first.chat.id, first.media_group_id))
        return sorted(parts, key=lambda part: part.message_id)


def attachments_of(message: Message, config: Config) -> list[Attachment]:
    """What ``message`` came with, as stored: of a photo, the largest size within the bounds."""
    if message.photo:
        sizes = message.photo
        chosen = best_size(
            [(s.width, s.height, s.file_size) for s in sizes],
            max_side=config.image_max_side,
            max_bytes=config.image_max_bytes,
        )
        assert chosen is not None  # a photo has at least one size
        size = sizes[chosen]
        return [
            Attachment(
                "photo", size.file_id, size.file_unique_id, "image/jpeg", size.file_size, size.width, size.height
            )
        ]
    if message.voice:
        voice = message.voice
        return [
            Attachment(
                "voice", voice.file_id, voice.file_unique_id, voice.mime_type, voice.file_size, duration=voice.duration
            )
        ]
    if message.audio:
        audio = message.audio
        return [
            Attachment(
                "audio", audio.file_id, audio.file_unique_id, audio.mime_type, audio.file_size,
                duration=audio.duration, file_name=audio.file_name,
            )
        ]  # fmt: skip
    if message.video_note:
        note = message.video_note
        return [
            Attachment(
                "video_note", note.file_id, note.file_unique_id, "video/mp4", note.file_size, duration=note.duration
            )
        ]
    if message.document:
        document = message.document
        return [
            Attachment(
                "document", document.file_id, document.file_unique_id, document.mime_type, document.file_size,
                file_name=document.file_name,
            )
        ]  # fmt: skip
    return []


async def has_attachment(message: Message) -> bool:
    """A photo, voice message, audio, video message or document (a coroutine: see ``has_text``)."""
    return bool(message.photo or message.voice or message.audio or message.video_note or message.document)


async def on_attachment(
    message: Message, event_from_user: User, bot: Bot, turns: Turns, intake: Intake, albums: Albums, config: Config
) -> None:
    if message.media_group_id is None:
        await _ask([message], event_from_user, bot, turns, intake, config)
        return
    # An album's parts come without the chat's intake (``ChatIntake``), so the others can join
    # the first while it holds the intake: the chat's next updates wait for the album's question.
    if albums.opened(message):
        async with turns.intake(message.chat.id):
            await _ask(await albums.gathered(message), event_from_user, bot, turns, intake, config)


async def _ask(parts: Sequence[Message], user: User, bot: Bot, turns: Turns, intake: Intake, config: Config) -> None:
    first = parts[0]
    attachments = [attachment for part in parts for attachment in attachments_of(part, config)]
    me = await bot.me()
    caption = next((text for part in parts if (text := asked(part, me).strip())), "")
    heard = costs_a_call(attachments)
    if heard and not intake.hears:
        await first.answer(NOT_HEARD)
        return
    if heard:  # the transcription is an API call: admitted before it is made, counted once
        await turns.admit(user_id=user.id)
    try:
        received = await intake.read(caption, attachments)
    except Unreadable as error:
        logger.info("chat %s: an attachment not read (%s)", first.chat.id, type(error).__name__)
        await first.answer(str(error))
        return
    if received.heard is not None:
        await first.answer(f"🎤 {_shortened(received.heard)}")
    await turns.ask(
        user_id=user.id,
        first_name=user.first_name,
        address=address_of(first),
        telegram_message_id=first.message_id,
        text=received.text,
        quoted=quoted_in(first),
        attachments=received.attachments,
        images=received.images,
        admitted=heard,
    )


def _shortened(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= HEARD_CHARS else line[: HEARD_CHARS - 1].rstrip() + "…"


def create_router() -> Router:
    router = Router(name=__name__)
    # Stored once by its own key, as a text message: no update claim needed.
    router.message.register(on_attachment, has_attachment, flags={"idempotent": True})
    return router

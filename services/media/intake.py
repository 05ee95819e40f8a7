"""A message's attachments read into a question: the image bytes the model is shown, the
transcript of a voice message, the text of a document. Everything is checked before anything is
stored, so an attachment the bot cannot read gets one clear line (``Unreadable``) and leaves no
half-stored question behind."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Final

from config import TELEGRAM_DOWNLOAD_LIMIT, Config
from services.media.documents import READABLE, is_readable_document, read_document
from services.media.errors import Unreadable
from services.media.files import FileGone, FileSource, FileTooBig, ImageCache
from services.media.images import dimensions, sniff
from services.media.transcription import Transcriber, TranscriptionFailed
from services.records import Attachment

logger = logging.getLogger(__name__)

TOO_BIG = "That file is too big for me: Telegram lets bots download files up to 20 MB."
NOT_DOWNLOADED = "I couldn't download that file from Telegram. Please send it again."
NOT_HEARD = "I couldn't hear any words in that voice message."
NOT_TRANSCRIBED = "Sorry, I couldn't make out that voice message just now. Please try again in a moment."
CUT = "\n[The file goes on; only its first {chars} characters were read.]"
AUDIO: Final = ("voice", "audio", "video_note")
FILE_NAMES = {"voice": "voice.ogg", "video_note": "video.mp4", "audio": "audio.mp3"}


@dataclass(frozen=True, slots=True)
class ShownImage:
    """An image a question came with, as the model is shown it."""

    unique_id: str
    data: bytes
    mime_type: str


@dataclass(frozen=True, slots=True)
class Received:
    """What a message with attachments asks: ``text`` (its caption, a transcript, a document's
    text), the attachments as stored, the images it shows, and what was heard in it (shown to
    the user above the answer)."""

    text: str
    attachments: list[Attachment]
    images: list[ShownImage] = field(default_factory=list)
    heard: str | None = None


def costs_a_call(attachments: Sequence[Attachment]) -> bool:
    """Whether reading them calls an API (a transcription), which must be admitted first."""
    return any(a.kind in AUDIO for a in attachments)


class Intake:
    """Reads attachments through Telegram (``source``), the transcriber and the document readers,
    within the configured bounds."""

    def __init__(self, source: FileSource, images: ImageCache, transcriber: Transcriber | None, config: Config) -> None:
        self._source = source
        self._images = images
        self._transcriber = transcriber
        self._config = config

    @property
    def hears(self) -> bool:
        """Whether voice messages are transcribed (TRANSCRIPTION_MODEL is set)."""
        return self._transcriber is not None

    async def close(self) -> None:
        """Close the transcriber's connections (at shutdown, after the handlers are done)."""
        if self._transcriber is not None:
            await self._transcriber.close()

    async def read(self, caption: str, attachments: Sequence[Attachment]) -> Received:
        """The question ``caption`` and ``attachments`` make; ``Unreadable`` with the line to tell."""
        texts = [caption] if caption else []
        stored: list[Attachment] = []
        images: list[ShownImage] = []
        heard: list[str] = []
        for attachment in attachments:
            if attachment.is_image:
                image, attachment = await self._image(attachment)
                images.append(image)
            elif attachment.kind in AUDIO:
                transcript = await self._transcript(attachment)
                heard.append(transcript)
                texts.append(transcript)
            else:
                texts.append(await self._document(attachment))
            stored.append(attachment)
        return Received("\n\n".join(texts), stored, images, "\n".join(heard) or None)

    async def _download(self, attachment: Attachment, max_bytes: int) -> bytes:
        if attachment.file_size is not None and attachment.file_size > max_bytes:
            raise Unreadable(TOO_BIG if max_bytes >= TELEGRAM_DOWNLOAD_LIMIT else _too_big(max_bytes))
        try:
            return await self._source.download(attachment.file_id, max_bytes=max_bytes)
        except FileTooBig:
            raise Unreadable(TOO_BIG if max_bytes >= TELEGRAM_DOWNLOAD_LIMIT else _too_big(max_bytes)) from None
        except FileGone:
            raise Unreadable(NOT_DOWNLOADED) from None

    async def _image(self, attachment: Attachment) -> tuple[ShownImage, Attachment]:
        data = await self._download(attachment, self._config.image_max_bytes)
        mime_type = sniff(data)  # Unreadable: not an image, or a broken one
        if attachment.width is None:
            width, height = dimensions(data) or (None, None)
            attachment = replace(attachment, width=width, height=height)
        attachment = replace(attachment, mime_type=mime_type, file_size=len(data))
        self._images.keep(attachment.file_unique_id, data)
        return ShownImage(attachment.file_unique_id, data, mime_type), attachment

    async def _transcript(self, attachment: Attachment) -> str:
        if self._transcriber is None:
            raise Unreadable(NOT_TRANSCRIBED)
        limit = self._config.voice_max_seconds
        if attachment.duration is not None and attachment.duration > limit:
            raise Unreadable(f"That recording is too long for me: I listen to {_duration(limit)} at most.")
        if attachment.duration == 0 or attachment.file_size == 0:
            raise Unreadable(NOT_HEARD)
        data = await self._download(attachment, TELEGRAM_DOWNLOAD_LIMIT)
        if not data:
            raise Unreadable(NOT_HEARD)
        name = attachment.file_name or FILE_NAMES[attachment.kind]
        try:
            transcript = await self._transcriber.transcribe(data, file_name=name, mime_type=attachment.mime_type)
        except TranscriptionFailed:
            raise Unreadable(NOT_TRANSCRIBED) from None
        if not transcript:
            raise Unreadable(NOT_HEARD)
        return transcript

    async def _document(self, attachment: Attachment) -> str:
        if not is_readable_document(attachment.file_name, attachment.mime_type):
            raise Unreadable(f"I can read {READABLE}, and images; not this kind of file.")
        data = await self._download(attachment, TELEGRAM_DOWNLOAD_LIMIT)
        config = self._config
        document = await asyncio.to_thread(
            read_document,
            data,
            file_name=attachment.file_name,
            mime_type=attachment.mime_type,
            max_chars=config.document_max_chars,
            max_pages=config.document_max_pages,
        )
        logger.info("read a document: %d bytes, %d chars, cut %s", len(data), len(document.text), document.cut)
        text = document.text.rstrip()
        return f"[{attachment.label}]\n{text}" + (CUT.format(chars=len(document.text)) if document.cut else "")


def _too_big(max_bytes: int) -> str:
    return f"That image is too big for me: I take images up to {max_bytes / 1_000_000:.0f} MB."


def _duration(seconds: int) -> str:
    minutes, seconds = divmod(seconds, 60)
    if not minutes:
        return f"{seconds} seconds"
    return f"{minutes} minute{'s' if minutes != 1 else ''}" + (f" {seconds} seconds" if seconds else "")

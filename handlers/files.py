"""Telegram's files for the conversation (``services.media.files.FileSource``): getFile, then the
file's bytes from the Bot API server, never more than asked for."""

from __future__ import annotations

import io
import logging

import aiohttp
from aiogram import Bot
from aiogram.exceptions import TelegramAPIError, TelegramBadRequest

from services.media.files import FileGone, FileTooBig

logger = logging.getLogger(__name__)
DOWNLOAD_TIMEOUT_S = 60


class _Bounded(io.BytesIO):
    """A buffer that refuses to grow past ``limit`` bytes: a server that sends more than the
    file's size (or a size it did not give) cannot fill the memory."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._limit = limit

    def write(self, data: object) -> int:
        if self.tell() + len(data) > self._limit:  # type: ignore[arg-type]  # bytes, as aiogram writes them
            raise FileTooBig
        return super().write(data)  # type: ignore[arg-type]


class TelegramFiles:
    """Downloads a file by its ``file_id`` through the bot's own Bot API session."""

    def __init__(self, bot: Bot) -> None:
        self._bot = bot

    async def download(self, file_id: str, *, max_bytes: int) -> bytes:
        try:
            file = await self._bot.get_file(file_id)
        except TelegramBadRequest as error:
            if "too big" in error.message.lower():
                raise FileTooBig from None
            logger.warning("getFile refused a file: %s", type(error).__name__)
            raise FileGone from None
        except TelegramAPIError as error:
            logger.warning("getFile failed: %s", type(error).__name__)
            raise FileGone from None
        if file.file_size is not None and file.file_size > max_bytes:
            raise FileTooBig
        if not file.file_path:
            raise FileGone
        buffer = _Bounded(max_bytes)
        try:
            await self._bot.download_file(file.file_path, buffer, timeout=DOWNLOAD_TIMEOUT_S)
        except (aiohttp.ClientError, TimeoutError, OSError) as error:  # the server's, or a local file's
            logger.warning("download of a file failed: %s", type(error).__name__)
            raise FileGone from None
        return buffer.getvalue()

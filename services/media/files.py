"""Telegram's files as the conversation needs them: downloaded by ``file_id`` when a turn needs
them, never stored; the images of recent turns kept in memory within a bound of bytes."""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol


class FileTooBig(Exception):
    """Telegram does not let a bot download the file (over its 20 MB limit), or it is over ours."""


class FileGone(Exception):
    """Telegram no longer gives the file (an id of another bot, a file deleted), or did not answer."""


class FileSource(Protocol):
    """Where files come from (Telegram's getFile and its file URL; ``handlers.files``)."""

    async def download(self, file_id: str, *, max_bytes: int) -> bytes:
        """The file's bytes; ``FileTooBig`` past ``max_bytes``, ``FileGone`` when not given."""
        ...


class ImageCache:
    """The images turns showed the model, by Telegram's ``file_unique_id``, newest used last, at
    most ``max_bytes`` in all: a dialog's next turns show them again without a download."""

    def __init__(self, source: FileSource, *, max_bytes: int, max_image_bytes: int) -> None:
        self._source = source
        self._max_bytes = max_bytes
        self._max_image_bytes = max_image_bytes
        self._held: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0

    def keep(self, unique_id: str, data: bytes) -> None:
        """Hold ``data`` (an image just received), dropping the least recently used past the bound."""
        if unique_id in self._held or len(data) > self._max_bytes:
            return
        self._held[unique_id] = data
        self._size += len(data)
        while self._size > self._max_bytes:
            _, dropped = self._held.popitem(last=False)
            self._size -= len(dropped)

    async def image(self, file_id: str, unique_id: str) -> bytes:
        """The image's bytes, from memory or downloaded again (``FileGone``, ``FileTooBig``)."""
        held = self._held.get(unique_id)
        if held is not None:
            self._held.move_to_end(unique_id)
            return held
        data = await self._source.download(file_id, max_bytes=self._max_image_bytes)
        self.keep(unique_id, data)
        return data

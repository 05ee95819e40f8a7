"""/export: a dialog's history as files, written as it is read from the database.

Markdown by default (for people), JSON on request (for programs: a list of ``role``, ``text``,
``created_at``, ``cleared``, and ``attachments`` for a message sent with any: each one's
``kind``, ``file_name``, ``mime_type``, ``duration``; a voice message's transcript and a
document's text are its ``text``). A history that would pass Telegram's upload limit is split into
parts, each a whole document of its own (valid JSON, a Markdown file with its heading). Memory
holds one message at a time, whatever the length of the history.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Literal

from services.database import ExportedMessage
from services.records import described

Format = Literal["markdown", "json"]
UPLOAD_LIMIT_BYTES = 50 * 1000 * 1000  # what the Bot API accepts from a bot, per file
ROLE_NAMES = {"user": "You", "assistant": "Assistant", "system": "System"}
# What an export says of an attachment: not Telegram's file ids, which only this bot can use.
EXPORTED_FIELDS = ("kind", "file_name", "mime_type", "duration", "width", "height")


class _Document:
    """How one format opens a part, writes a message into it, and closes it."""

    suffix: str

    def __init__(self, title: str) -> None:
        self.title = title

    def opening(self, part: int) -> bytes:
        raise NotImplementedError

    def entry(self, message: ExportedMessage, first: bool) -> bytes:
        raise NotImplementedError

    def closing(self) -> bytes:
        return b""


class _Markdown(_Document):
    suffix = ".md"

    def opening(self, part: int) -> bytes:
        heading = self.title if part == 1 else f"{self.title} (part {part})"
        return f"# {heading}\n".encode()

    def entry(self, message: ExportedMessage, first: bool) -> bytes:
        when = message.created_at.strftime("%Y-%m-%d %H:%M UTC")
        cleared = " · cleared" if message.cleared else ""
        text = described(message.content, message.attached)
        return f"\n## {ROLE_NAMES[message.role]} · {when}{cleared}\n\n{text}\n".encode()


class _Json(_Document):
    suffix = ".json"

    def opening(self, part: int) -> bytes:
        return b"["

    def entry(self, message: ExportedMessage, first: bool) -> bytes:
        fields: dict[str, object] = {
            "role": message.role,
            "text": message.content,
            "created_at": message.created_at.isoformat(),
            "cleared": message.cleared,
        }
        if message.attachments:
            fields["attachments"] = [{key: a[key] for key in EXPORTED_FIELDS if key in a} for a in message.attachments]
        return (b"\n" if first else b",\n") + json.dumps(fields, ensure_ascii=False).encode()

    def closing(self) -> bytes:
        return b"\n]\n"


class Exporter:
    """Writes messages into files named ``stem`` in ``directory``, starting a new part before
    one would pass ``max_bytes``. A single message longer than that gets a part of its own."""

    def __init__(self, directory: Path, stem: str, fmt: Format, *, title: str, max_bytes: int) -> None:
        self._directory = directory
        self._stem = stem
        self._document: _Document = _Json(title) if fmt == "json" else _Markdown(title)
        self._max_bytes = max_bytes
        self._file: BinaryIO | None = None
        self._size = 0
        self.paths: list[Path] = []

    async def write(self, message: ExportedMessage) -> None:
        """Add one message (async to be passed where the reader awaits it; it does not wait)."""
        entry = self._document.entry(message, first=False)
        closing = len(self._document.closing())
        # An open part holds at least one message (it is opened for one), so it can be closed.
        if self._file is not None and self._size + len(entry) + closing > self._max_bytes:
            self._close()
        if self._file is None:
            self._open()
            entry = self._document.entry(message, first=True)
        assert self._file is not None
        self._file.write(entry)
        self._size += len(entry)

    def finish(self) -> list[Path]:
        """Close the last part; the files written, in order (none for an empty history)."""
        if self._file is not None:
            self._close()
        return self.paths

    def _open(self) -> None:
        part = len(self.paths) + 1
        name = self._stem if part == 1 else f"{self._stem}-part{part}"
        path = self._directory / f"{name}{self._document.suffix}"
        self._file = path.open("wb")
        self.paths.append(path)
        opening = self._document.opening(part)
        self._file.write(opening)
        self._size = len(opening)

    def _close(self) -> None:
        assert self._file is not None
        self._file.write(self._document.closing())
        self._file.close()
        self._file = None


async def export_dialog(
    read: Callable[[Callable[[ExportedMessage], Awaitable[None]]], Awaitable[None]],
    directory: Path,
    *,
    chat_id: int,
    fmt: Format,
    now: datetime,
    max_bytes: int = UPLOAD_LIMIT_BYTES,
) -> list[Path]:
    """Write the dialog that ``read`` passes, message by message, into files in ``directory``;
    the files, in order. The caller owns ``directory`` and removes it, whatever happens."""
    stamp = now.strftime("%Y-%m-%d %H:%M UTC")
    exporter = Exporter(
        directory,
        f"chat-{chat_id}-history-{now:%Y%m%d-%H%M%S}",
        fmt,
        title=f"Conversation in chat {chat_id}, exported {stamp}",
        max_bytes=max_bytes,
    )
    try:
        await read(exporter.write)
    finally:
        paths = exporter.finish()
    return paths

"""Writes that wait for PostgreSQL: what an outage said and did, in order, bounded, in memory and
in an append-only file (one JSON object per line), so a restart during the outage keeps it.

Each kind of item is written back by one idempotent statement keyed by Telegram's ids (the
unique keys the schema already has), so a write-back repeated after a crash stores nothing twice.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from services import database
from services.database import Connection
from services.records import Attachment, FinishReason

logger = logging.getLogger(__name__)
SpooledKind = Literal["question", "answer", "sent", "failed", "clear"]


class SpoolFull(Exception):
    """The spool holds its maximum: the write cannot be kept."""


@dataclass(frozen=True, slots=True)
class Spooled:
    """One write of the outage. ``message_id`` is the question's Telegram id in ``chat_id``; the
    other fields are used by the kinds that need them."""

    kind: SpooledKind
    chat_id: int
    user_id: int
    at: datetime
    message_id: int = 0
    first_name: str | None = None
    thread_id: int | None = None
    text: str = ""
    quoted: str | None = None  # a question's: the text it replies to
    sent_message_id: int = 0
    last: bool = False
    answer: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    attachments: list[dict[str, Any]] | None = None  # a question's, as stored (``Attachment.stored``)

    def to_json(self) -> str:
        fields: dict[str, Any] = asdict(self)
        fields["at"] = self.at.isoformat()
        return json.dumps(fields, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Spooled:
        fields = json.loads(line)
        fields["at"] = datetime.fromisoformat(fields["at"])
        return cls(**fields)


def now() -> datetime:
    return datetime.now(UTC)


def _private(path: str, flags: int) -> int:
    """Opens a spool file readable by the bot's user alone: it holds message text. Also a file
    an older version created with the umask's mode."""
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    return fd


class Spool:
    """At most ``max_items`` writes, oldest first; ``path`` (None: memory only) mirrors them."""

    def __init__(self, path: Path | None, max_items: int) -> None:
        self.path = path
        self.max_items = max_items
        self.items: list[Spooled] = []

    def load(self) -> list[Spooled]:
        """Read what a previous process left in the file; a line torn by a crash is skipped."""
        if self.path is None or not self.path.exists():
            return []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                self.items.append(Spooled.from_json(line))
            except (ValueError, TypeError, KeyError):
                logger.error("spool %s: line %d is unreadable and skipped", self.path, number)
        return list(self.items)

    def add(self, item: Spooled) -> None:
        """Keep ``item`` (file first, then memory); ``SpoolFull`` when there is no room."""
        if len(self.items) >= self.max_items:
            raise SpoolFull
        if self.path is not None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8", opener=_private) as file:
                file.write(item.to_json() + "\n")
        self.items.append(item)

    def drop_first(self, count: int) -> None:
        """Forget the first ``count`` items (written back); the file keeps only the rest."""
        del self.items[:count]
        if self.path is None:
            return
        if not self.items:
            self.path.unlink(missing_ok=True)
            return
        partial = self.path.with_suffix(".tmp")
        with open(partial, "w", encoding="utf-8", opener=_private) as file:
            file.write("".join(item.to_json() + "\n" for item in self.items))
            file.flush()
            os.fsync(file.fileno())  # on disk before the rename: a power cut leaves the old file or the new
        partial.replace(self.path)
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself, so a power cut cannot bring back what was written back
        finally:
            os.close(folder)

    def __len__(self) -> int:
        return len(self.items)


async def write_back(conn: Connection, item: Spooled) -> None:
    """Apply one spooled write to the database."""
    key = {"telegram_chat_id": item.chat_id, "telegram_message_id": item.message_id}
    if item.kind == "question":
        await database.add_question(
            conn,
            telegram_user_id=item.user_id,
            first_name=item.first_name,
            telegram_chat_id=item.chat_id,
            content=item.text,
            telegram_message_id=item.message_id,
            telegram_thread_id=item.thread_id,
            quoted=item.quoted,
            attachments=[Attachment.from_stored(a) for a in item.attachments or ()],
            created_at=item.at,
        )
    elif item.kind == "answer":
        await database.write_back_answer(
            conn,
            **key,
            content=item.text,
            created_at=item.at,
            finish_reason=item.finish_reason,
            prompt_tokens=item.prompt_tokens,
            completion_tokens=item.completion_tokens,
        )
    elif item.kind == "sent":
        await database.write_back_sent_part(
            conn, **key, sent_message_id=item.sent_message_id, last=item.last, at=item.at
        )
    elif item.kind == "failed":
        await database.write_back_failure(conn, **key, answer=item.answer, at=item.at)
    else:
        await database.soft_delete_messages(
            conn, telegram_user_id=item.user_id, telegram_chat_id=item.chat_id, before=item.at
        )

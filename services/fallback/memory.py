"""The recent history of each active dialog, in process memory: what the bot answers from while
PostgreSQL is unavailable, or when it runs with no database at all.

Filled as turns pass (the history a turn reads, its question, its answer); bounded by the total
number of characters held, the least recently used dialog evicted first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from services.records import ChatMessage, Dialog


@dataclass(frozen=True, slots=True)
class Remembered:
    """One message: ``question`` is the Telegram message id of the question it is or answers."""

    role: str
    content: str
    question: int | None


@dataclass
class RecentHistory:
    """At most ``per_dialog`` messages per dialog and ``max_chars`` characters in all."""

    max_chars: int
    per_dialog: int
    chars: int = 0
    _dialogs: OrderedDict[Dialog, list[Remembered]] = field(default_factory=OrderedDict)

    def __contains__(self, dialog: Dialog) -> bool:
        return dialog in self._dialogs

    def remember(self, dialog: Dialog, messages: list[Remembered]) -> None:
        """Replace what is held for ``dialog`` (oldest first)."""
        self.forget(dialog)
        self._dialogs[dialog] = list(messages[-self.per_dialog :])
        self.chars += sum(len(m.content) for m in self._dialogs[dialog])
        self._evict()

    def append(self, dialog: Dialog, message: Remembered) -> None:
        """Add the newest message of ``dialog`` (a dialog not held starts with it)."""
        held = self._dialogs.setdefault(dialog, [])
        self._dialogs.move_to_end(dialog)
        if message.role == "assistant" and message.question is not None:
            # an answer goes right after its question, as in the database's turn order
            at = next((i + 1 for i, m in enumerate(held) if m.role == "user" and m.question == message.question), None)
            held.insert(len(held) if at is None else at, message)
        else:
            held.append(message)
        self.chars += len(message.content)
        while len(held) > self.per_dialog:
            self.chars -= len(held.pop(0).content)
        self._evict()

    def context(self, dialog: Dialog, question: int) -> list[ChatMessage]:
        """The dialog up to and including ``question``'s message (never a later question)."""
        held = self._dialogs.get(dialog, [])
        if held:
            self._dialogs.move_to_end(dialog)
        end = next((i + 1 for i, m in enumerate(held) if m.role == "user" and m.question == question), len(held))
        return [{"role": "assistant" if m.role == "assistant" else "user", "content": m.content} for m in held[:end]]

    def forget(self, dialog: Dialog) -> int:
        """Drop ``dialog``; how many messages were held."""
        held = self._dialogs.pop(dialog, [])
        self.chars -= sum(len(m.content) for m in held)
        return len(held)

    def _evict(self) -> None:
        while self.chars > self.max_chars and len(self._dialogs) > 1:
            _, held = self._dialogs.popitem(last=False)
            self.chars -= sum(len(m.content) for m in held)

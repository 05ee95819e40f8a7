"""What the turn pipeline needs from Telegram, in its own terms: where a reply goes, the calls it
makes, and what a refusal means. ``handlers.delivery`` implements it with aiogram; nothing in
``services`` imports Telegram's library."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from services.text.formatting import Part


class DeliveryRefused(Exception):
    """Telegram refused for good (bot blocked, chat gone, request rejected): retrying cannot help."""


class DeliveryFailed(Exception):
    """Telegram could not be reached, or kept asking to wait: the answer waits for recovery."""


@dataclass(frozen=True, slots=True)
class Address:
    """Where a turn's replies go: the chat, its forum topic, and the message the reply quotes."""

    chat_id: int
    thread_id: int | None = None
    reply_to: int | None = None


class DraftsUnavailable(Exception):
    """Telegram refused a draft here (not a private chat, or not offered): edit a message instead.
    ``server_wide``: the Bot API server has no drafts at all (said once, where that was found)."""

    def __init__(self, reason: str, *, server_wide: bool = False) -> None:
        super().__init__(reason)
        self.server_wide = server_wide


class Delivery(Protocol):
    """Telegram as the pipeline sees it (``handlers.delivery`` implements it). A part is at most
    one Telegram message (``services.text.formatting.split``); if Telegram refuses its entities, it
    goes out as plain text: an answer is never lost to formatting."""

    async def send(self, address: Address, part: Part, *, quote: bool) -> int:
        """Send one message; Telegram's id for it."""

    async def edit(self, address: Address, message_id: int, part: Part) -> None:
        """Replace the text of a message sent before (unchanged text is not an error)."""

    async def draft(self, address: Address, draft_id: int, part: Part) -> None:
        """Show ``part`` as the chat's draft ``draft_id`` (private chats), with a stop button;
        raises ``DraftsUnavailable`` where Telegram offers none."""

    def typing(self, address: Address) -> AbstractAsyncContextManager[None]:
        """Show "typing…" in the chat while the block runs."""

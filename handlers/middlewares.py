"""Per-update concerns: who may talk to the bot, which updates are still being handled, and
the order in which a chat's updates enter it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiogram import BaseMiddleware
from aiogram.dispatcher.flags import get_flag
from aiogram.enums import ChatType
from aiogram.types import CallbackQuery, Message, TelegramObject, Update

from handlers.filters import addressed
from services.cluster.leases import Leases
from services.failures import StorageUnavailable
from services.fallback.storage import Storage
from services.ops import metrics
from services.turn.turns import Turns

logger = logging.getLogger(__name__)
Handler = Callable[[TelegramObject, dict[str, Any]], Awaitable[Any]]

NOT_ALLOWED = "Sorry, this bot is private."


class AccessMiddleware(BaseMiddleware):
    """Lets through messages and button presses from people; drops other bots' messages and
    anonymous senders (channels), and refuses users outside ``allowed_user_ids`` when it is set
    (in a group, aloud only what they address to the bot). Nothing is stored for a message
    dropped here."""

    def __init__(self, allowed_user_ids: frozenset[int]) -> None:
        self.allowed_user_ids = allowed_user_ids

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        if isinstance(event, CallbackQuery):  # a button: pressed by a person, maybe not an allowed one
            if self.allowed_user_ids and event.from_user.id not in self.allowed_user_ids:
                logger.info("refused user %s: not in ALLOWED_USER_IDS", event.from_user.id)
                await event.answer(NOT_ALLOWED, show_alert=True)
                return None
            return await handler(event, data)
        assert isinstance(event, Message)
        user = event.from_user
        if user is None or user.is_bot or event.sender_chat is not None:
            logger.info("ignored message %s in chat %s: not from a person", event.message_id, event.chat.id)
            return None
        if self.allowed_user_ids and user.id not in self.allowed_user_ids:
            # In a group, what is not addressed to the bot is not a request: refusing each of
            # a member's messages would be spam, paid from the group's send quota.
            if event.chat.type == ChatType.PRIVATE or await addressed(event, data["bot"]):
                logger.info("refused user %s: not in ALLOWED_USER_IDS", user.id)
                await event.answer(NOT_ALLOWED)
            return None
        return await handler(event, data)


class InFlight(BaseMiddleware):
    """Tracks the tasks handling updates, so shutdown can let them finish.

    aiogram runs each update in its own task and does not wait for them when polling stops.
    """

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        metrics.update_received()
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return await handler(event, data)

    async def wait(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the tracked tasks (other than the caller) to finish."""
        others = self.tasks - {asyncio.current_task()}
        if not others:
            return
        logger.info("waiting up to %.0fs for %d update(s) being handled", timeout_s, len(others))
        _, pending = await asyncio.wait(others, timeout=timeout_s)
        if pending:
            logger.warning("%d update(s) were not handled within %.0fs", len(pending), timeout_s)


class ChatIntake(BaseMiddleware):
    """Handles a chat's updates in the order they arrived: each holds its chat's intake (see
    ``Turns.intake``) from before routing until its handler returns.

    Taken here, as the first thing the update's task does, because routing can suspend the task
    (aiogram runs plain-function filters such as ``F.text`` in a thread), which would let a later
    update of the chat (a /clear) overtake an earlier one.
    """

    def __init__(self, turns: Turns) -> None:
        self.turns = turns

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        assert isinstance(event, Update)
        message = event.message or event.edited_message
        if message is None or (event.message is not None and message.media_group_id is not None):
            return await handler(event, data)  # nothing of a chat, or an album's part (``handlers.media``)
        async with self.turns.intake(message.chat.id):
            return await handler(event, data)


class UpdateClaims(BaseMiddleware):
    """Runs an update's handler in the one process that claims its ``update_id`` first, so an
    update delivered twice (to two processes, or again after a restart) runs once.

    An inner middleware: it knows the handler, and a handler flagged ``idempotent`` (a text
    message, stored once by its own key and answered once by its chat's lease) goes without a
    claim, so the common update costs no extra statement. Commands, buttons and edits are
    claimed before they run: at most once. Without a database, or while degraded, nothing is
    claimed (there is no other process to agree with, or no way to): the handler runs.
    """

    def __init__(self, leases: Leases | None, storage: Storage) -> None:
        self.leases = leases
        self.storage = storage

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        update = data.get("event_update")
        if self.leases is None or update is None or get_flag(data, "idempotent") or self.storage.degraded:
            return await handler(event, data)
        try:
            first = await self.leases.claim(update.update_id)
        except StorageUnavailable:
            first = True  # run it: the handler meets the outage its own way
        if not first:
            logger.info("update %s was claimed before: not run again", update.update_id)
            return None
        return await handler(event, data)

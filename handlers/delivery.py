"""The one seam between the turn pipeline and Telegram: sending, typing, and what a refusal means.

Telegram's own limits are handled below this, in the session (``handlers.flood``): by the time
an error reaches here, waiting has been tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from aiogram import Bot
from aiogram.enums import ChatAction
from aiogram.exceptions import TelegramAPIError, TelegramBadRequest, TelegramForbiddenError, TelegramNotFound
from aiogram.types import MessageEntity, ReplyParameters

from handlers.unknown_methods import MethodUnknown
from services.text.formatting import Part
from services.turn.delivery import Address, DeliveryFailed, DeliveryRefused, DraftsUnavailable

T = TypeVar("T")

logger = logging.getLogger(__name__)
TYPING_EVERY_S = 4.5  # Telegram shows an action for 5 s


class TelegramDelivery:
    """``services.turn.delivery.Delivery`` over an aiogram ``Bot``. Formatting travels as message
    entities, never a parse mode; a part whose entities Telegram refuses is sent again as plain
    text, so no answer is lost to formatting."""

    def __init__(self, bot: Bot) -> None:
        self._bot = bot

    async def send(self, address: Address, part: Part, *, quote: bool) -> int:
        reply = None
        if quote and address.reply_to is not None:
            reply = ReplyParameters(message_id=address.reply_to, allow_sending_without_reply=True)

        async def send_message(entities: list[MessageEntity] | None) -> int:
            message = await self._bot.send_message(
                address.chat_id,
                part.text,
                message_thread_id=address.thread_id,
                reply_parameters=reply,
                entities=entities,
            )
            return message.message_id

        return await _with_plain_fallback(send_message, part)

    async def edit(self, address: Address, message_id: int, part: Part) -> None:
        async def edit_message(entities: list[MessageEntity] | None) -> None:
            try:
                await self._bot.edit_message_text(
                    text=part.text, chat_id=address.chat_id, message_id=message_id, entities=entities
                )
            except TelegramBadRequest as error:
                if "message is not modified" not in error.message:
                    raise

        await _with_plain_fallback(edit_message, part)

    async def draft(self, address: Address, draft_id: int, part: Part) -> None:
        async def send_draft(entities: list[MessageEntity] | None) -> None:
            await self._bot.send_message_draft(
                chat_id=address.chat_id,
                draft_id=draft_id,
                message_thread_id=address.thread_id,
                text=part.text,
                entities=entities,
                can_stop=True,
            )

        try:
            await _with_plain_fallback(send_draft, part)
        except DeliveryRefused as refused:
            server_wide = isinstance(refused.__cause__, MethodUnknown)  # not asked again until restart
            raise DraftsUnavailable(str(refused), server_wide=server_wide) from refused

    @asynccontextmanager
    async def typing(self, address: Address) -> AsyncIterator[None]:
        # Not aiogram's ChatActionSender: its task dies with an unretrieved exception when the
        # chat refuses the action (a blocked bot), and the refusal is the answer's to report.
        task = asyncio.create_task(self._keep_typing(address))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _keep_typing(self, address: Address) -> None:
        with contextlib.suppress(TelegramAPIError):
            while True:
                await self._bot.send_chat_action(
                    address.chat_id, ChatAction.TYPING, message_thread_id=address.thread_id
                )
                await asyncio.sleep(TYPING_EVERY_S)


def _entities(part: Part) -> list[MessageEntity] | None:
    return [
        MessageEntity(type=e.type, offset=e.offset, length=e.length, url=e.url, language=e.language)
        for e in part.entities
    ] or None


async def _with_plain_fallback(call: Callable[[list[MessageEntity] | None], Awaitable[T]], part: Part) -> T:
    """``call`` with the part's entities; if Telegram refuses the request (400) and there were
    entities, once more as plain text. Refusals and failures in Telegram's terms become ours."""
    entities = _entities(part)
    try:
        try:
            return await call(entities)
        except TelegramBadRequest as error:
            if entities is None:
                raise
            logger.warning("Telegram refused the formatting (%s): sending plain text", error.message[:80])
            return await call(None)
    except (TelegramForbiddenError, TelegramBadRequest, TelegramNotFound) as error:
        raise DeliveryRefused(type(error).__name__) from error
    except TelegramAPIError as error:
        raise DeliveryFailed(type(error).__name__) from error

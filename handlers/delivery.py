"""The one seam between the turn pipeline and Telegram: sending, typing, and what a refusal means.

Telegram's own limits are handled below this, in the session (``handlers.flood``): by the time
an error reaches here, waiting has been tried.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiogram import Bot
from aiogram.enums import ChatAction
from aiogram.exceptions import TelegramAPIError, TelegramBadRequest, TelegramForbiddenError, TelegramNotFound
from aiogram.types import ReplyParameters

from services.turns import Address, DeliveryFailed, DeliveryRefused

TYPING_EVERY_S = 4.5  # Telegram shows an action for 5 s


class TelegramDelivery:
    """``services.turns.Delivery`` over an aiogram ``Bot``; answers go out as plain text (no
    parse mode), so nothing an LLM writes can be rejected as bad markup."""

    def __init__(self, bot: Bot) -> None:
        self._bot = bot

    async def send(self, address: Address, text: str, *, quote: bool) -> int:
        reply = None
        if quote and address.reply_to is not None:
            reply = ReplyParameters(message_id=address.reply_to, allow_sending_without_reply=True)
        try:
            message = await self._bot.send_message(
                address.chat_id, text, message_thread_id=address.thread_id, reply_parameters=reply
            )
        except (TelegramForbiddenError, TelegramBadRequest, TelegramNotFound) as error:
            raise DeliveryRefused(type(error).__name__) from error
        except TelegramAPIError as error:
            raise DeliveryFailed(type(error).__name__) from error
        return message.message_id

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

"""Telegram's flood control, obeyed for every request the bot makes (a client-session middleware).

On 429 the request waits ``retry_after`` and is tried again, as often as needed while the total
wait stays within a bound. While it waits, the other requests to that chat wait too (Telegram's
limit is per chat); a 429 on a request for no chat pauses every request. The error reaches the
caller only once the bound is spent.
"""

from __future__ import annotations

import asyncio
import logging

from aiogram import Bot
from aiogram.client.session.middlewares.base import BaseRequestMiddleware, NextRequestMiddlewareType
from aiogram.exceptions import TelegramRetryAfter
from aiogram.methods import Response, TelegramMethod
from aiogram.methods.base import TelegramType

logger = logging.getLogger(__name__)
EVERY_CHAT = 0  # the pause key of requests that name no chat


class FloodControl(BaseRequestMiddleware):
    """Waits out 429s per chat, up to ``max_wait_s`` in total per request."""

    def __init__(self, max_wait_s: float = 120.0) -> None:
        self.max_wait_s = max_wait_s
        self._resume_at: dict[int | str, float] = {}

    def _resume_time(self, key: int | str) -> float:
        return max(self._resume_at.get(key, 0.0), self._resume_at.get(EVERY_CHAT, 0.0))

    async def _wait_for(self, key: int | str) -> None:
        delay = self._resume_time(key) - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            self._resume_at.pop(key, None)

    async def __call__(
        self, make_request: NextRequestMiddlewareType[TelegramType], bot: Bot, method: TelegramMethod[TelegramType]
    ) -> Response[TelegramType]:
        key: int | str = getattr(method, "chat_id", None) or EVERY_CHAT
        waited = 0.0
        while True:
            await self._wait_for(key)
            try:
                return await make_request(bot, method)
            except TelegramRetryAfter as error:
                waited += error.retry_after
                if waited > self.max_wait_s:
                    logger.error("Telegram still asks chat %s to wait after %.0fs: giving up", key, waited)
                    raise
                logger.warning("Telegram asks chat %s to wait %ss (%s)", key, error.retry_after, type(method).__name__)
                resume_at = asyncio.get_running_loop().time() + error.retry_after
                self._resume_at[key] = max(self._resume_at.get(key, 0.0), resume_at)

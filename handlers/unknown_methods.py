"""Methods the Bot API server does not know, asked once per process (a client-session middleware).

A self-hosted ``telegram-bot-api`` older than Telegram's, or an emulator, answers a method it
does not know with 404 "Not Found" (some say "method not found"). Such a method is remembered
until the process restarts, with one warning: each later call fails at once, without a request,
as ``MethodUnknown``, a ``TelegramNotFound``, so every caller already handles it as the refusal
it is (a draft falls back to edits, "typing…" is left out, the command menu is skipped).
"""

from __future__ import annotations

import logging

from aiogram import Bot
from aiogram.client.session.middlewares.base import BaseRequestMiddleware, NextRequestMiddlewareType
from aiogram.exceptions import TelegramAPIError, TelegramNetworkError, TelegramNotFound
from aiogram.methods import Response, TelegramMethod
from aiogram.methods.base import TelegramType

logger = logging.getLogger(__name__)
# Asked again whatever they answered: they tell whether the server is there at all (start-up,
# polling, the health check), and not asking would hide that it came back.
PROBES = frozenset({"getMe", "getUpdates"})


class MethodUnknown(TelegramNotFound):
    """The Bot API server does not know this method: it said so, now or earlier in this process."""


class UnknownMethods(BaseRequestMiddleware):
    """Remembers the methods the server said it does not know, and does not ask them again.

    Registered first, so it sits outside ``FloodControl`` and ``BotApiMonitor``: a method
    already known to be missing waits for no flood control and counts as no request.
    """

    def __init__(self) -> None:
        self.unknown: set[str] = set()

    async def __call__(
        self, make_request: NextRequestMiddlewareType[TelegramType], bot: Bot, method: TelegramMethod[TelegramType]
    ) -> Response[TelegramType]:
        name = method.__api_method__
        if name in self.unknown:
            raise MethodUnknown(method=method, message=f"Not Found (asked before: the server does not know {name})")
        try:
            return await make_request(bot, method)
        except TelegramAPIError as error:
            if name in PROBES or not _not_known(error):
                raise
            self.unknown.add(name)
            logger.warning("the Bot API server does not know %s (%s): not asked again until restart", name,
                           error.message[:80])  # fmt: skip
            raise MethodUnknown(method=method, message=error.message) from error


def _not_known(error: TelegramAPIError) -> bool:
    """Whether ``error`` says the method itself is unknown (Telegram's refusals of a request
    that names a missing chat or message are 400s, never 404s)."""
    if isinstance(error, TelegramNetworkError):
        return False
    description = error.message.strip().lower()
    return isinstance(error, TelegramNotFound) or description == "not found" or "method not found" in description

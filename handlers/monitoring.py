"""What the Bot API requests tell the metrics and the health check, and the models their answers
are parsed with, built once (client-session middlewares)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiogram import Bot
from aiogram.client.session.middlewares.base import BaseRequestMiddleware, NextRequestMiddlewareType
from aiogram.exceptions import TelegramNetworkError, TelegramRetryAfter
from aiogram.methods import GetUpdates, Response, TelegramMethod
from aiogram.methods.base import TelegramType

from services.ops import metrics


class ResponseModels(BaseRequestMiddleware):
    """Keeps the ``Response[...]`` model of each result type alive for the process.

    aiogram parses every answer with ``Response[method.__returning__]``; pydantic holds such a
    parametrised model only weakly, so once the garbage collector has taken it, the next call
    builds it again: milliseconds of CPU, hundreds of times a minute under load. Holding each
    (a few dozen types at most) makes every later call find it in pydantic's cache.
    """

    def __init__(self) -> None:
        self.models: dict[Any, type[Response[Any]]] = {}

    async def __call__(
        self, make_request: NextRequestMiddlewareType[TelegramType], bot: Bot, method: TelegramMethod[TelegramType]
    ) -> Response[TelegramType]:
        returning = method.__returning__
        if returning not in self.models:
            self.models[returning] = Response[returning]  # type: ignore[valid-type]
        return await make_request(bot, method)


class BotApiMonitor(BaseRequestMiddleware):
    """Times each Bot API request, counts its failures and 429s, and notes that Telegram answered.

    Registered after ``FloodControl``, so it sits inside it and sees every attempt, 429s included.
    """

    async def __call__(
        self, make_request: NextRequestMiddlewareType[TelegramType], bot: Bot, method: TelegramMethod[TelegramType]
    ) -> Response[TelegramType]:
        started = time.perf_counter()
        error: Exception | None = None
        try:
            return await make_request(bot, method)
        except TelegramRetryAfter as refused:
            metrics.TELEGRAM_429.inc()
            error = refused
            raise
        except Exception as failed:
            error = failed
            raise
        finally:
            # A cancelled request (polling stopped) says nothing; an error answer (400, 403, 429)
            # still proves that Telegram is there, a network error does not.
            if error is not None or not _cancelled():
                if not isinstance(error, TelegramNetworkError):
                    metrics.telegram_answered()
                if not isinstance(method, GetUpdates):  # a long poll: its time is Telegram's wait
                    metrics.observe_stage("telegram", time.perf_counter() - started, error)


def _cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0

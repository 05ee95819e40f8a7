"""Webhook mode: Telegram posts updates to WEBHOOK_URL; aiogram's aiohttp integration feeds them
to the dispatcher, after checking the secret Telegram sends with each one.

An update is answered (HTTP 200) once its handler returned, that is once its question is stored
and queued (``handle_in_background=False``): a crash before that makes Telegram send it again,
and storing is idempotent. It also bounds the work: Telegram sends at most ``max_connections``
(default 40) updates at once to one URL.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Final

from aiogram import Bot, Dispatcher
from aiogram.exceptions import TelegramBadRequest
from aiogram.methods import TelegramMethod
from aiogram.types import Update
from aiogram.webhook.aiohttp_server import SimpleRequestHandler, setup_application
from aiohttp import web

from config import Config
from services import context
from services.database import Pool
from services.failures import StorageUnavailable
from services.ops import metrics

logger = logging.getLogger(__name__)
WEBHOOK_LOCK: Final = "llmbot.webhook"


class WebhookRefused(Exception):
    """Telegram refused WEBHOOK_URL (the message is Telegram's reason)."""


class CheckedWebhook(SimpleRequestHandler):
    """aiogram's handler (which refuses a missing or wrong secret with 401), counting refusals,
    and refusing a body that is not an update with 400: a client's mistake, not the bot's."""

    def verify_secret(self, telegram_secret_token: str, bot: Bot) -> bool:
        # compare_digest raises TypeError on non-ASCII text (a 500 per request); ours is ASCII.
        if telegram_secret_token.isascii() and super().verify_secret(telegram_secret_token, bot):
            return True
        metrics.WEBHOOK_REFUSED.inc()  # not logged one by one: anyone on the internet can send these
        return False

    async def _handle_request(self, bot: Bot, request: web.Request) -> web.Response:
        # aiogram's, with the update parsed and validated first: there, a bad body raises from
        # the handler (a 500 and a traceback whose pydantic text echoes the body's values).
        raw: Any = None
        try:
            raw = await request.json(loads=bot.session.json_loads)
            update = Update.model_validate(raw, context={"bot": bot})
        except (ValueError, RecursionError) as error:  # not UTF-8, not JSON, nested too deep, not an update
            ident = raw.get("update_id") if isinstance(raw, dict) else None
            shown = ident if isinstance(ident, int) else "unknown"  # never a value of the body
            logger.warning("webhook: refused a body that is not an update (update %s): %s", shown, type(error).__name__)
            return web.Response(status=400, text="Bad Request")
        result: TelegramMethod[Any] | None = await self.dispatcher.feed_webhook_update(bot, update, **self.data)
        return web.Response(body=self._build_response_writer(bot=bot, result=result))


def create_webhook_app(dp: Dispatcher, bot: Bot, config: Config) -> web.Application:
    """The aiohttp app: the webhook at WEBHOOK_URL's path; the dispatcher's start-up hooks run as
    the app starts (before it listens), its shutdown hooks as it stops (after it stopped listening)."""
    assert config.webhook_secret, "load_config requires WEBHOOK_SECRET in webhook mode"
    app = web.Application()
    # First, so the dispatcher's shutdown (draining the turns) runs before the handler closes the Bot's session.
    setup_application(app, dp, bot=bot)
    CheckedWebhook(dp, bot, handle_in_background=False, secret_token=config.webhook_secret).register(
        app, path=config.webhook_path
    )
    return app


@asynccontextmanager
async def webhook_set(pool: Pool | None, bot: Bot, config: Config, allowed_updates: list[str]) -> AsyncIterator[bool]:
    """Make this instance the one that calls ``setWebhook``, for as long as the block runs.

    The instance that takes the PostgreSQL advisory lock ``llmbot.webhook`` sets the webhook and
    holds the lock until it stops (or dies: the server releases it), so instances that start
    meanwhile leave Telegram alone. Yields whether this instance set it.
    """
    lock = AsyncExitStack()
    owner: bool | None = True  # no database, so no other instance to agree with
    if pool is not None:
        try:
            owner = await lock.enter_async_context(context.exclusive(pool, WEBHOOK_LOCK))
        except StorageUnavailable:
            logger.warning("the webhook lock is out of reach (database unavailable): setting the webhook anyway")
            owner = None  # a second setWebhook is harmless, none is not
    async with lock:
        if owner is False:
            logger.info("another instance set the webhook and holds it")
        else:
            await _set_webhook(bot, config, allowed_updates)
        yield owner is not False


async def _set_webhook(bot: Bot, config: Config, allowed_updates: list[str]) -> None:
    assert config.webhook_url is not None and config.webhook_secret is not None
    try:
        await bot.set_webhook(
            url=config.webhook_url,
            secret_token=config.webhook_secret,
            allowed_updates=allowed_updates,
            drop_pending_updates=False,  # updates that waited during a deploy are still answered
        )
    except TelegramBadRequest as error:
        raise WebhookRefused(f"Telegram refused WEBHOOK_URL: {error.message}") from None
    logger.info("webhook set: %d update type(s)", len(allowed_updates))

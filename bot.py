"""Entry point: read the configuration, open the database, poll Telegram until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import psycopg
from aiogram import Bot, Dispatcher
from aiogram.client.default import DefaultBotProperties
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import TelegramNetworkError, TelegramUnauthorizedError
from aiogram.types import ErrorEvent
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory

from config import Config, ConfigError, load_config
from handlers import create_routers
from handlers.commands import COMMANDS
from handlers.middlewares import AccessMiddleware, InFlight
from services import database, retention
from services.database import Pool
from services.dialog import answer_pending_questions
from services.llm import LLM, create_llm

logger = logging.getLogger("bot")
ROOT = Path(__file__).resolve().parent
APOLOGY = "Sorry, something went wrong on my side. Please try again."


class StartupError(Exception):
    """The bot cannot start; the message says why and what to do."""


def schema_head() -> str | None:
    """The newest Alembic revision in ``alembic/versions``."""
    return ScriptDirectory.from_config(AlembicConfig(str(ROOT / "alembic.ini"))).get_current_head()


async def open_database(config: Config) -> Pool:
    """The pool, once the database answers and is migrated to the newest revision."""
    try:
        pool = await database.init_db(config.database_url, size=config.db_pool_size, timeout_s=config.db_pool_timeout_s)
    except psycopg.OperationalError:
        raise StartupError(
            "cannot connect to the database at DATABASE_URL: is PostgreSQL running? (`make db-up`)"
        ) from None
    version = await database.run(pool, database.fetch_schema_version)
    head = schema_head()
    if version != head:
        await database.close_db(pool)
        raise StartupError(f"the database schema is at {version or 'nothing'}, not {head}: run `make db-migrate`")
    return pool


async def check_telegram(bot: Bot) -> None:
    """Fail with a clear message when Telegram refuses the token or cannot be reached."""
    try:
        me = await bot.me()  # cached: polling does not ask again
    except TelegramUnauthorizedError:
        raise StartupError("Telegram rejected TELEGRAM_BOT_TOKEN: check it with @BotFather") from None
    except TelegramNetworkError as error:
        raise StartupError(f"cannot reach the Telegram Bot API: {type(error).__name__}") from None
    logger.info("bot id=%s starting", me.id)


def create_bot(config: Config) -> Bot:
    """The Bot, talking to TELEGRAM_API_URL when set (a local Bot API server or a test stand-in)."""
    session = (
        AiohttpSession(api=TelegramAPIServer.from_base(config.telegram_api_url)) if config.telegram_api_url else None
    )
    # No parse mode: answers go out as plain text, so LLM output can never be rejected as bad markup.
    return Bot(config.telegram_bot_token, session=session, default=DefaultBotProperties(link_preview_is_disabled=True))


async def on_error(event: ErrorEvent) -> None:
    """Last resort: log the traceback (no message text) and apologise to the user."""
    update = event.update
    logger.error("update %s failed: %s", update.update_id, type(event.exception).__name__, exc_info=event.exception)
    if update.message is not None:
        with contextlib.suppress(Exception):
            await update.message.answer(APOLOGY)


def create_dispatcher(config: Config, pool: Pool, llm: LLM) -> Dispatcher:
    """The Dispatcher with every router, middleware, dependency and lifecycle hook."""
    in_flight = InFlight()
    dp = Dispatcher(config=config, pool=pool, llm=llm, in_flight=in_flight)
    dp.update.outer_middleware(in_flight)
    dp.message.outer_middleware(AccessMiddleware(config.allowed_user_ids))
    dp.include_routers(*create_routers())
    dp.errors.register(on_error)
    dp.startup.register(on_startup)
    dp.shutdown.register(on_shutdown)
    return dp


async def on_startup(
    bot: Bot, dispatcher: Dispatcher, config: Config, pool: Pool, llm: LLM, in_flight: InFlight
) -> None:
    await bot.set_my_commands(COMMANDS)
    in_flight.track(asyncio.create_task(answer_pending_questions(bot, pool, llm, config)))
    if config.retention_days:
        dispatcher["retention_task"] = asyncio.create_task(retention.purge_daily(pool, days=config.retention_days))


async def on_shutdown(dispatcher: Dispatcher, config: Config, in_flight: InFlight) -> None:
    # Polling has stopped; turns still running get their answer stored and sent before exit.
    await in_flight.wait(config.shutdown_timeout_s)
    task = dispatcher.workflow_data.get("retention_task")
    if task is not None:
        task.cancel()


async def main() -> None:
    try:
        config = load_config()
    except ConfigError as error:
        raise SystemExit(f"configuration error: {error}") from None
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        pool = await open_database(config)
    except StartupError as error:
        raise SystemExit(f"start-up error: {error}") from None
    bot = create_bot(config)
    try:
        await check_telegram(bot)
        dp = create_dispatcher(config, pool, create_llm(config))
        await dp.start_polling(bot, handle_signals=True)
    except StartupError as error:
        await bot.session.close()
        raise SystemExit(f"start-up error: {error}") from None
    finally:
        await database.close_db(pool)
    logger.info("stopped")


if __name__ == "__main__":
    asyncio.run(main())

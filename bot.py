"""Entry point: read the configuration, open the database, take Telegram's updates (long polling,
or a webhook with BOT_MODE=webhook) until told to stop.

``python bot.py`` checks the configuration before anything else: importing aiogram, openai and
psycopg takes seconds on a small machine, and a bad ``.env`` is reported without that wait. So
this module imports them inside the functions that use them (at the top only for type checking).
"""

from __future__ import annotations

import ast
import asyncio
import gc
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from aiogram import Bot, Dispatcher
    from aiohttp import web

    from handlers.middlewares import InFlight
    from services.database import Pool
    from services.fallback.storage import Storage
    from services.llm.client import LLM
    from services.media.intake import Intake
    from services.turn.turns import Turns

logger = logging.getLogger("bot")
ROOT = Path(__file__).resolve().parent
OUR_LOGGERS = ("bot", "config", "handlers", "services")


class StartupError(Exception):
    """The bot cannot start; the message says why and what to do."""


def schema_head(versions: Path = ROOT / "alembic" / "versions") -> str:
    """The newest Alembic revision in ``versions``: the one no other revision follows.

    Read from each file's ``revision = ...`` and ``down_revision = ...`` (a name, None, or a
    tuple after a merge), as Alembic reads them, without importing Alembic and SQLAlchemy.
    """
    follows: dict[str, tuple[str, ...]] = {}  # revision -> the revisions it follows
    for path in versions.glob("*.py"):
        assigned = {
            target.id: ast.literal_eval(node.value)
            for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.Assign)
            for target in node.targets
            if isinstance(target, ast.Name) and target.id in ("revision", "down_revision")
        }
        if "revision" in assigned:
            down = assigned.get("down_revision")
            follows[assigned["revision"]] = down if isinstance(down, tuple) else (down,) if down else ()
    heads = follows.keys() - {revision for downs in follows.values() for revision in downs}
    if len(heads) != 1:
        raise StartupError(f"alembic/versions has {len(heads)} heads, not one: {sorted(heads)}")
    return heads.pop()


async def create_pool(config: Config) -> Pool:
    """The pool of DATABASE_URL, with DB_PREPARED_STATEMENTS, and DATABASE_DIRECT_URL for what
    needs a whole session (advisory locks, LISTEN, lease tending); opened."""
    from services import database

    if not config.db_prepared_statements and config.database_direct_url == config.database_url:
        logger.warning(
            "DB_PREPARED_STATEMENTS=false without a DATABASE_DIRECT_URL: behind a transaction pooler the"
            " advisory locks, LISTEN and lease tending need one (the server itself, or a session pooler)"
        )
    return await database.init_db(
        config.database_url,
        size=config.db_pool_size,
        timeout_s=config.db_pool_timeout_s,
        session_url=config.database_direct_url,
        prepared_statements=config.db_prepared_statements,
    )


async def open_database(config: Config) -> Pool:
    """The pool, once the database answers and is migrated to the newest revision."""
    import psycopg

    from services import database

    head = schema_head()
    try:
        pool = await create_pool(config)
    except psycopg.OperationalError:
        raise StartupError(
            "cannot connect to the database at DATABASE_URL: is PostgreSQL running? (`make db-up`)"
        ) from None
    version = await database.run(pool, database.fetch_schema_version)
    if version != head:
        await database.close_db(pool)
        raise StartupError(f"the database schema is at {version or 'nothing'}, not {head}: run `make db-migrate`")
    return pool


async def check_telegram(bot: Bot) -> None:
    """Fail with a clear message when Telegram refuses the token, cannot be reached, or does
    not answer ``getMe`` as a Bot API server does (the bot cannot work without knowing itself)."""
    from aiogram.exceptions import ClientDecodeError, TelegramAPIError, TelegramNetworkError, TelegramUnauthorizedError

    try:
        me = await bot.me()  # cached: polling does not ask again
    except TelegramUnauthorizedError:
        raise StartupError("Telegram rejected TELEGRAM_BOT_TOKEN: check it with @BotFather") from None
    except TelegramNetworkError as error:
        raise StartupError(f"cannot reach the Telegram Bot API: {type(error).__name__}") from None
    except TelegramAPIError as error:  # a 404 from a server that is no Bot API server, a 5xx...
        raise StartupError(
            f"the Telegram Bot API refused getMe: {error.message[:80]} ({type(error).__name__});"
            " is TELEGRAM_API_URL a Bot API server?"
        ) from None
    except ClientDecodeError:
        raise StartupError(
            "the Telegram Bot API answered getMe with something else than a bot; is TELEGRAM_API_URL a Bot API server?"
        ) from None
    logger.info("bot id=%s starting", me.id)


def setup_logging(level: str) -> None:
    """Our loggers at ``level``; libraries at WARNING (aiogram at INFO, for its polling and
    per-update lines): below that, some print request bodies (message text) and request URLs
    (the bot token)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(level)
    logging.getLogger("aiogram").setLevel(max(logging.INFO, logging.getLevelNamesMapping()[level]))


def create_bot(config: Config) -> Bot:
    """The Bot, talking to TELEGRAM_API_URL when set (a local Bot API server or a test stand-in),
    every request obeying Telegram's flood control, and a method the server does not know asked
    once per process."""
    from aiogram import Bot
    from aiogram.client.default import DefaultBotProperties
    from aiogram.client.session.aiohttp import AiohttpSession
    from aiogram.client.telegram import PRODUCTION, TelegramAPIServer

    from handlers.flood import FloodControl
    from handlers.monitoring import BotApiMonitor, ResponseModels
    from handlers.unknown_methods import UnknownMethods
    from services.text.clean import storable_json

    api = TelegramAPIServer.from_base(config.telegram_api_url) if config.telegram_api_url else PRODUCTION
    session = AiohttpSession(api=api, json_loads=storable_json)  # input cleaned at the edge, once
    bot = Bot(config.telegram_bot_token, session=session, default=DefaultBotProperties(link_preview_is_disabled=True))
    bot.session.middleware(UnknownMethods())  # outermost: a method known to be missing is not asked at all
    bot.session.middleware(FloodControl())
    bot.session.middleware(BotApiMonitor())  # inside FloodControl: sees each attempt, 429s included
    bot.session.middleware(ResponseModels())  # each answer's model built once, not after every collection
    return bot


def create_storage(config: Config, pool: Pool | None) -> Storage:
    """PostgreSQL (``pool``; None with DATABASE_ENABLED=false), with the memory and the spool an
    outage falls back to."""
    from services.fallback.memory import RecentHistory
    from services.fallback.spool import Spool
    from services.fallback.storage import Storage

    history = RecentHistory(max_chars=config.memory_cache_chars, per_dialog=config.history_limit + 2)
    spool = Spool(config.spool_path, config.spool_max_items) if pool is not None else None
    return Storage(pool, history=history, spool=spool)


def create_dispatcher(config: Config, pool: Pool | None, llm: LLM, bot: Bot) -> Dispatcher:
    """The Dispatcher with every router, middleware, dependency and lifecycle hook."""
    from aiogram import Dispatcher

    from handlers import create_routers
    from handlers.delivery import TelegramDelivery
    from handlers.files import TelegramFiles
    from handlers.filters import AddressedInGroups
    from handlers.health import Health
    from handlers.media import Albums
    from handlers.middlewares import AccessMiddleware, ChatIntake, InFlight, UpdateClaims
    from handlers.settings import ChatAdmins
    from services.cluster.leases import Leases
    from services.cluster.ownership import Leased, Ownership, SingleProcess
    from services.media.files import ImageCache
    from services.media.intake import Intake
    from services.media.transcription import create_transcriber
    from services.ops.gauges import BotCollector
    from services.turn.turns import Turns

    storage = create_storage(config, pool)
    delivery = TelegramDelivery(bot)
    # Leases and claims order several processes; in polling mode there is one (Telegram answers
    # a second getUpdates consumer with 409 Conflict), so they would cost a commit per turn for nothing.
    leases = None
    owner: Ownership = SingleProcess()
    if pool is not None and config.bot_mode == "webhook":
        leases = Leases(pool, holder=config.instance_id, ttl_s=config.lease_ttl_s)
        owner = Leased(leases, degraded=lambda: storage.degraded)
    files = TelegramFiles(bot)
    images = ImageCache(files, max_bytes=config.media_cache_bytes, max_image_bytes=config.image_max_bytes)
    turns = Turns(storage, llm, delivery, config, owner, images)
    dp = Dispatcher(
        config=config, pool=pool, llm=llm, dialog_store=storage, turns=turns, delivery=delivery, in_flight=InFlight()
    )
    dp["intake"] = Intake(files, images, create_transcriber(config), config)
    dp["albums"] = Albums()
    dp["health"] = Health(pool, storage, bot, schema_head())
    dp["metrics"] = BotCollector(pool, storage)
    dp["chat_admins"] = ChatAdmins(bot)
    dp.update.outer_middleware(dp["in_flight"])
    dp.update.outer_middleware(ChatIntake(dp["turns"]))
    access = AccessMiddleware(config.allowed_user_ids)
    dp.message.outer_middleware(access)
    if config.group_trigger == "mention":
        dp.message.filter(AddressedInGroups())
    dp.edited_message.outer_middleware(access)
    dp.callback_query.outer_middleware(access)
    claims = UpdateClaims(leases, storage)
    for observer in (dp.message, dp.edited_message, dp.callback_query):
        observer.middleware(claims)
    dp.include_routers(*create_routers())
    dp.startup.register(on_startup)
    dp.shutdown.register(on_shutdown)
    return dp


async def poll(dp: Dispatcher, bot: Bot, config: Config, **options: Any) -> None:
    """Long-poll Telegram until stopped. At most MAX_TURNS_IN_FLIGHT updates are handled at
    once; past that, updates wait in Telegram."""
    await dp.start_polling(
        bot,
        allowed_updates=dp.resolve_used_update_types(),
        tasks_concurrency_limit=config.max_turns_in_flight,
        **options,
    )


async def serve_webhook(dp: Dispatcher, bot: Bot, config: Config, stop: asyncio.Event) -> None:
    """Serve Telegram's webhook on WEBHOOK_PORT (with /healthz) until ``stop`` is set.

    The dispatcher's start-up (recovery) runs before the port opens; ``setWebhook`` follows once
    it listens (by one instance: see ``webhook_set``); at ``stop`` the port closes first, then
    the turns in progress finish, as in polling mode.
    """
    from handlers.health import add_health
    from handlers.webhook import WebhookRefused, create_webhook_app, webhook_set

    app = create_webhook_app(dp, bot, config)
    add_health(app, dp["health"])
    runner = await listen(app, config.webhook_port, "WEBHOOK_PORT")
    try:
        async with webhook_set(dp["pool"], bot, config, dp.resolve_used_update_types()) as owner:
            dp["webhook_owner"] = owner
            logger.info("webhook mode: listening on port %d", config.webhook_port)
            await stop.wait()
    except WebhookRefused as error:
        raise StartupError(str(error)) from None
    finally:
        await runner.cleanup()


async def listen(app: web.Application, port: int, setting: str) -> web.AppRunner:
    """Serve ``app`` on ``port`` (every interface); a port in use is a start-up error naming ``setting``."""
    from handlers.health import serve

    try:
        return await serve(app, port)
    except OSError as error:
        raise StartupError(f"cannot listen on {setting}={port}: {error.strerror}") from None


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def on_startup(bot: Bot, dispatcher: Dispatcher, config: Config, pool: Pool | None, turns: Turns) -> None:
    from aiogram.exceptions import TelegramAPIError

    from handlers.commands import COMMANDS
    from handlers.unknown_methods import MethodUnknown
    from services.ops import retention

    if config.metrics_port:  # first: /healthz answers while the turns are recovered
        from aiohttp import web

        from handlers.health import add_health, add_metrics

        app = web.Application()
        add_health(app, dispatcher["health"])
        add_metrics(app, dispatcher["metrics"])
        dispatcher["metrics_runner"] = await listen(app, config.metrics_port, "METRICS_PORT")
    try:  # the menu of commands is a courtesy: the commands work without it
        await bot.set_my_commands(COMMANDS)
    except MethodUnknown:
        pass  # warned once, by UnknownMethods
    except TelegramAPIError as error:
        logger.warning("setMyCommands refused (%s: %s): starting without the command menu", type(error).__name__,
                       error.message[:80])  # fmt: skip
    await turns.recover()  # before the first update, so unfinished turns keep their place in line
    if pool is not None:  # expired counters go whatever RETENTION_DAYS; messages only with it
        days = config.retention_days or None
        dispatcher["retention_task"] = asyncio.create_task(retention.purge_daily(pool, days=days))


async def on_shutdown(
    dispatcher: Dispatcher,
    config: Config,
    in_flight: InFlight,
    turns: Turns,
    dialog_store: Storage,
    llm: LLM,
    intake: Intake,
) -> None:
    # Polling has stopped; questions being stored are stored, queued turns answered and sent
    # before exit, within SHUTDOWN_TIMEOUT_S; what is left resumes at the next start (a spool
    # not yet written back stays in its file).
    await in_flight.wait(config.shutdown_timeout_s)
    await turns.drain(config.shutdown_timeout_s)
    await llm.close()  # after the turns: a summary may still have been asking
    await intake.close()
    await dialog_store.close()
    task = dispatcher.workflow_data.get("retention_task")
    if task is not None:
        task.cancel()
    metrics_runner = dispatcher.workflow_data.get("metrics_runner")
    if metrics_runner is not None:  # last: /healthz and /metrics answer until the turns are done
        await metrics_runner.cleanup()


async def main() -> None:
    try:
        config = load_config()
    except ConfigError as error:
        raise SystemExit(f"configuration error: {error}") from None
    setup_logging(config.log_level)
    from services import database
    from services.llm.client import create_llm

    try:
        pool = await open_database(config) if config.database_enabled else None
    except StartupError as error:
        raise SystemExit(f"start-up error: {error}") from None
    if pool is None:
        logger.warning("DATABASE_ENABLED=false: conversations live in memory only and end with the process")
    bot = create_bot(config)
    try:
        await check_telegram(bot)
        dp = create_dispatcher(config, pool, create_llm(config), bot)
        # What start-up built (aiogram's Bot API models, some 250,000 objects) lives as long as
        # the process: moved out of the collector's sight, a full collection no longer walks it
        # (0.13 s each, a pause every turn in flight waits out).
        gc.freeze()
        if config.bot_mode == "webhook":
            await serve_webhook(dp, bot, config, stop_on_signals())
        else:
            await poll(dp, bot, config, handle_signals=True)
    except StartupError as error:
        raise SystemExit(f"start-up error: {error}") from None
    finally:
        await bot.session.close()  # whatever ended the process (polling closed it already: a no-op)
        if pool is not None:
            await database.close_db(pool)
    logger.info("stopped")


if __name__ == "__main__":
    asyncio.run(main())

"""What the user hears when handling an update fails: one place, by the type of the failure."""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime

from aiogram import Router
from aiogram.exceptions import TelegramAPIError
from aiogram.filters import ExceptionTypeFilter
from aiogram.types import ErrorEvent

from handlers.messages import SLOW_DOWN, over_budget_reply
from handlers.settings import SettingsRefused
from services.context import OverBudget, RateLimited
from services.failures import BadRequest, StorageUnavailable
from services.fallback.storage import HistoryDisabled
from services.turn.turn import APOLOGY, BAD_INPUT, DB_APOLOGY

logger = logging.getLogger(__name__)
NO_HISTORY = "This bot runs without a database, so there is no stored history to work with."


async def _answer(event: ErrorEvent, text: str) -> None:
    message = event.update.message or event.update.edited_message
    callback = event.update.callback_query
    with contextlib.suppress(TelegramAPIError):
        if message is not None:
            await message.answer(text)
        elif callback is not None:  # a button: the answer shows over the chat
            await callback.answer(text, show_alert=True)


async def on_history_disabled(event: ErrorEvent) -> None:
    """A history command in a bot with DATABASE_ENABLED=false."""
    await _answer(event, NO_HISTORY)


async def on_storage_unavailable(event: ErrorEvent) -> None:
    """The database is out: nothing was stored, so the user is asked to try again."""
    logger.warning("update %s: database unavailable", event.update.update_id)
    await _answer(event, DB_APOLOGY)


async def on_bad_request(event: ErrorEvent) -> None:
    """The database refused what this update asked of it: a line to its sender, nothing else."""
    logger.warning("update %s: the database refused its input (%s)", event.update.update_id, event.exception)
    await _answer(event, BAD_INPUT)


async def on_over_budget(event: ErrorEvent) -> None:
    """The user has spent today's token budget: a new question, a /retry or an edit of the last
    question was refused by the statement that would have stored or re-opened it."""
    logger.info("update %s: its user has spent today's token budget", event.update.update_id)
    await _answer(event, over_budget_reply(datetime.now(UTC)))


async def on_rate_limited(event: ErrorEvent) -> None:
    """The user is over the rate limit: a new question, a /retry, an edit, a /clear or an /undo
    was refused by its statement, which changed nothing."""
    logger.info("update %s: its user is over the rate limit", event.update.update_id)
    await _answer(event, SLOW_DOWN)


async def on_settings_refused(event: ErrorEvent) -> None:
    """A change of the chat's settings its sender may not make (``CanChangeSettings`` logged why)."""
    assert isinstance(event.exception, SettingsRefused)
    await _answer(event, event.exception.reply)


async def on_error(event: ErrorEvent) -> None:
    """Last resort: log the traceback (no message text) and apologise."""
    update = event.update
    logger.error("update %s failed: %s", update.update_id, type(event.exception).__name__, exc_info=event.exception)
    await _answer(event, APOLOGY)


def create_router() -> Router:
    router = Router(name=__name__)
    router.errors.register(on_history_disabled, ExceptionTypeFilter(HistoryDisabled))
    router.errors.register(on_storage_unavailable, ExceptionTypeFilter(StorageUnavailable))
    router.errors.register(on_bad_request, ExceptionTypeFilter(BadRequest))
    router.errors.register(on_over_budget, ExceptionTypeFilter(OverBudget))  # before its base class
    router.errors.register(on_rate_limited, ExceptionTypeFilter(RateLimited))
    router.errors.register(on_settings_refused, ExceptionTypeFilter(SettingsRefused))
    router.errors.register(on_error)
    return router

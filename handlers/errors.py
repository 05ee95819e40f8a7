"""What the user hears when handling an update fails: one place, by the type of the failure."""

from __future__ import annotations

import contextlib
import logging

from aiogram import Router
from aiogram.exceptions import TelegramAPIError
from aiogram.filters import ExceptionTypeFilter
from aiogram.types import ErrorEvent

from services.context import StorageUnavailable
from services.storage import HistoryDisabled
from services.turns import DB_APOLOGY

logger = logging.getLogger(__name__)
APOLOGY = "Sorry, something went wrong on my side. Please try again."
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


async def on_error(event: ErrorEvent) -> None:
    """Last resort: log the traceback (no message text) and apologise."""
    update = event.update
    logger.error("update %s failed: %s", update.update_id, type(event.exception).__name__, exc_info=event.exception)
    await _answer(event, APOLOGY)


def create_router() -> Router:
    router = Router(name=__name__)
    router.errors.register(on_history_disabled, ExceptionTypeFilter(HistoryDisabled))
    router.errors.register(on_storage_unavailable, ExceptionTypeFilter(StorageUnavailable))
    router.errors.register(on_error)
    return router

"""Text messages: the conversation itself."""

from __future__ import annotations

import logging

from aiogram import Bot, F, Router
from aiogram.enums import ChatType
from aiogram.types import Message, User

from config import Config
from services import context
from services.context import RateLimited, StorageUnavailable
from services.database import Pool
from services.dialog import DB_APOLOGY, answer_question, send_text
from services.llm import LLM
from services.text import storable

logger = logging.getLogger(__name__)
SLOW_DOWN = "You're writing faster than I can think. Please slow down and try again in a minute."


async def on_text(message: Message, user: User, bot: Bot, pool: Pool, llm: LLM, config: Config) -> None:
    text = storable(message.text or "")
    if not text.strip():
        await message.answer("Send me some text and I'll answer.")
        return
    chat_id = message.chat.id
    reply_to = message.message_id if message.chat.type != ChatType.PRIVATE else None
    try:
        turn = await context.add_user_message(
            pool,
            telegram_user_id=user.id,
            first_name=user.first_name,
            telegram_chat_id=chat_id,
            telegram_message_id=message.message_id,
            text=text,
            history_limit=config.history_limit,
            max_input_chars=config.max_input_chars,
            rate_limit_per_minute=config.rate_limit_per_minute,
        )
    except StorageUnavailable:
        await send_text(bot, chat_id, DB_APOLOGY, reply_to_message_id=reply_to)
        return
    except RateLimited:
        logger.info("user %s is over %d messages a minute", user.id, config.rate_limit_per_minute)
        await send_text(bot, chat_id, SLOW_DOWN, reply_to_message_id=reply_to)
        return
    if turn is None:
        logger.info("message %s in chat %s was delivered before; ignored", message.message_id, chat_id)
        return
    logger.info(
        "user %s in chat %s: message %s, %d chars, %d in context",
        user.id,
        chat_id,
        turn.question_id,
        len(text),
        len(turn.context),
    )
    await answer_question(
        bot, pool, llm,
        chat_id=chat_id,
        question_id=turn.question_id,
        history=turn.context,
        reply_to_message_id=reply_to,
    )  # fmt: skip


def create_router() -> Router:
    router = Router(name=__name__)
    router.message.register(on_text, F.text)
    return router

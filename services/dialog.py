"""One chat turn end to end: LLM answer, stored, then sent. Shared by the text handler and by
start-up recovery of questions a crash left unanswered."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiogram import Bot
from aiogram.exceptions import TelegramAPIError, TelegramRetryAfter
from aiogram.types import ReplyParameters
from aiogram.utils.chat_action import ChatActionSender

from config import Config
from services import context
from services.context import ChatMessage, StorageUnavailable
from services.database import Pool
from services.llm import LLM, LLMError
from services.text import split_message, storable

logger = logging.getLogger(__name__)

DB_APOLOGY = "Sorry, my memory is unavailable right now. Please try again in a minute."
LLM_APOLOGY = "Sorry, I couldn't come up with an answer just now. Please try again in a moment."


async def send_text(bot: Bot, chat_id: int, text: str, *, reply_to_message_id: int | None = None) -> None:
    """Send ``text`` as plain text (no parse mode, so nothing in it can be rejected as markup),
    split to Telegram's limit, waiting once if Telegram asks to slow down."""
    for index, part in enumerate(split_message(text)):
        reply = None
        if index == 0 and reply_to_message_id is not None:
            reply = ReplyParameters(message_id=reply_to_message_id, allow_sending_without_reply=True)
        try:
            await bot.send_message(chat_id, part, reply_parameters=reply)
        except TelegramRetryAfter as error:
            logger.warning("Telegram asks to wait %ss before sending to chat %s", error.retry_after, chat_id)
            await asyncio.sleep(error.retry_after)
            await bot.send_message(chat_id, part, reply_parameters=reply)


async def answer_question(
    bot: Bot,
    pool: Pool,
    llm: LLM,
    *,
    chat_id: int,
    question_id: int,
    history: Sequence[ChatMessage],
    reply_to_message_id: int | None,
) -> None:
    """Ask the LLM, store its answer, send it. An LLM failure sends an apology (the question
    stays stored); a database failure still delivers the answer."""
    try:
        async with ChatActionSender.typing(bot=bot, chat_id=chat_id):
            answer = await llm.complete(history)
    except LLMError:
        await send_text(bot, chat_id, LLM_APOLOGY, reply_to_message_id=reply_to_message_id)
        return
    try:
        if not await context.add_answer(pool, question_id=question_id, text=storable(answer)):
            logger.info("question %s was answered elsewhere; not sending twice", question_id)
            return
    except StorageUnavailable:
        logger.warning("answer to question %s delivered but not stored", question_id)
    await send_text(bot, chat_id, answer, reply_to_message_id=reply_to_message_id)
    logger.info("answered question %s in chat %s: %d chars", question_id, chat_id, len(answer))


async def answer_pending_questions(bot: Bot, pool: Pool, llm: LLM, config: Config) -> int:
    """Answer the questions a crash left unanswered (younger than the configured age)."""
    if config.pending_reply_max_age_s == 0:
        return 0
    answered = 0
    try:
        pending = await context.pending_questions(pool, max_age_s=config.pending_reply_max_age_s)
        for question in pending:
            history = await context.get_context(
                pool,
                telegram_user_id=question.telegram_user_id,
                telegram_chat_id=question.telegram_chat_id,
                history_limit=config.history_limit,
                max_input_chars=config.max_input_chars,
            )
            await answer_question(
                bot, pool, llm,
                chat_id=question.telegram_chat_id,
                question_id=question.id,
                history=history,
                reply_to_message_id=question.telegram_message_id,
            )  # fmt: skip
            answered += 1
    except (StorageUnavailable, TelegramAPIError) as error:
        logger.warning("recovery of pending questions stopped: %s", type(error).__name__)
    logger.info("recovered %d pending question(s)", answered)
    return answered

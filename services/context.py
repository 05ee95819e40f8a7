"""The dialog context service: what the handlers call to remember and recall a conversation.

Functional and stateless: every function takes the pool and Telegram ids, runs its SQL through
``services.database`` and returns plain values. Database failures surface as one exception,
``StorageUnavailable``, so callers need not know the driver.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, TypedDict, TypeVar

import psycopg

from services import database
from services.database import Connection, PendingQuestion, Pool, Role, StoredMessage

logger = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")


class ChatMessage(TypedDict):
    """One message in the shape chat-completion APIs take."""

    role: Role
    content: str


class StorageUnavailable(Exception):
    """The database could not be reached or refused the operation."""


class RateLimited(Exception):
    """The user sent more messages this minute than allowed; the message was set aside."""


@dataclass(frozen=True, slots=True)
class Turn:
    """A stored user message and the context to answer it with (oldest first, ending with it)."""

    question_id: int
    context: list[ChatMessage]


async def _call(
    pool: Pool, query: Callable[Concatenate[Connection, P], Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    try:
        return await database.run(pool, query, *args, **kwargs)
    except psycopg.Error as error:
        # The class only: a driver message can quote the text of the row it failed on.
        logger.warning("database call %s failed: %s", query.__name__, type(error).__name__)
        raise StorageUnavailable(type(error).__name__) from error


def fit_to_budget(history: Sequence[StoredMessage], max_chars: int) -> list[ChatMessage]:
    """The newest messages whose lengths sum to at most ``max_chars``, oldest first.

    The newest message is always kept, cut to ``max_chars`` if it alone is longer, so the
    LLM never receives more input than the budget allows.
    """
    kept: list[ChatMessage] = []
    remaining = max_chars
    for message in reversed(history):
        if message.length > remaining:
            if not kept:
                kept.append({"role": message.role, "content": message.content[:max_chars]})
            break
        kept.append({"role": message.role, "content": message.content})
        remaining -= message.length
    return kept[::-1]


async def register(pool: Pool, *, telegram_user_id: int, first_name: str | None, telegram_chat_id: int) -> None:
    """Register the user and the chat on first contact, keeping ``first_name`` current."""
    await _call(
        pool,
        database.upsert_user_and_chat,
        telegram_user_id=telegram_user_id,
        first_name=first_name,
        telegram_chat_id=telegram_chat_id,
    )


async def add_user_message(
    pool: Pool,
    *,
    telegram_user_id: int,
    first_name: str | None,
    telegram_chat_id: int,
    telegram_message_id: int | None,
    text: str,
    history_limit: int,
    max_input_chars: int,
    rate_limit_per_minute: int = 0,
) -> Turn | None:
    """Store the user's message (registering user and chat) and return the context to answer
    it with, in one round trip.

    Returns None when this Telegram message was stored before (a redelivered update): it is
    being or has been answered already. Raises ``RateLimited`` (after soft-deleting the
    message, so it neither enters the history nor awaits an answer) when the user is over
    ``rate_limit_per_minute`` (0: no limit).
    """
    turn = await _call(
        pool,
        database.add_message,
        telegram_user_id=telegram_user_id,
        first_name=first_name,
        telegram_chat_id=telegram_chat_id,
        role="user",
        content=text,
        telegram_message_id=telegram_message_id,
        history_limit=history_limit,
        count_hit=rate_limit_per_minute > 0,
    )
    if turn.message_id is None:
        return None
    if turn.hits is not None and turn.hits > rate_limit_per_minute:
        await _call(pool, database.soft_delete_message, message_id=turn.message_id)
        raise RateLimited
    return Turn(question_id=turn.message_id, context=fit_to_budget(turn.history, max_input_chars))


async def add_answer(pool: Pool, *, question_id: int, text: str) -> bool:
    """Store the assistant's answer to a question; False if it had been answered already."""
    return await _call(pool, database.add_answer, question_id=question_id, content=text) is not None


async def get_context(
    pool: Pool, *, telegram_user_id: int, telegram_chat_id: int, history_limit: int, max_input_chars: int
) -> list[ChatMessage]:
    """The last ``history_limit`` live messages of (user, chat), oldest first, within budget."""
    history = await _call(
        pool,
        database.fetch_history,
        telegram_user_id=telegram_user_id,
        telegram_chat_id=telegram_chat_id,
        limit=history_limit,
    )
    return fit_to_budget(history, max_input_chars)


async def clear_context(pool: Pool, *, telegram_user_id: int, telegram_chat_id: int) -> int:
    """Soft-delete the history of (user, chat); how many messages were cleared."""
    return await _call(
        pool, database.soft_delete_messages, telegram_user_id=telegram_user_id, telegram_chat_id=telegram_chat_id
    )


async def pending_questions(pool: Pool, *, max_age_s: int) -> list[PendingQuestion]:
    """Questions younger than ``max_age_s`` that never got an answer (e.g. a crash mid-turn)."""
    return await _call(pool, database.fetch_pending_questions, max_age_s=max_age_s)

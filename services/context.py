"""The dialog context service: what the turn pipeline calls to remember and recall a conversation.

Functional and stateless: every function takes the pool and Telegram ids, runs its SQL through
``services.database`` and returns plain values. Database failures surface by their class
(``services.failures``): ``StorageUnavailable`` (the database is out) or ``BadRequest`` (it
refused this request's input), so callers need not know the driver.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Concatenate, ParamSpec, TypeVar

import psycopg

from services import database
from services.database import (
    AddedQuestion,
    Connection,
    DialogStats,
    EditedQuestion,
    Pool,
    RetriedQuestion,
    SearchHit,
    SummarySource,
    Undone,
    UnfinishedTurn,
)
from services.failures import RETRY_LATER, BadRequest, Failure, StorageUnavailable, classify, reason
from services.records import NO_USAGE, ChatSettings, DialogContext, FinishReason, SettingName, TurnStart, Usage

logger = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")


class RateLimited(Exception):
    """The user sent more messages this minute than allowed; the message was set aside."""


class OverBudget(RateLimited):
    """The user has spent today's token budget (the day is UTC); the message was set aside, as
    over a rate limit, until the day ends."""


async def call(
    pool: Pool, query: Callable[Concatenate[Connection, P], Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    """``query(conn, ...)`` on a pooled connection (``database.run``, which runs it again on a
    fresh connection when one breaks), its failure routed by class (``services.failures``): an
    outage, or connections that keep breaking, raise ``StorageUnavailable``; input the database
    refused raises ``BadRequest``; anything else (a bug) is raised as it is."""
    try:
        return await database.run(pool, query, *args, **kwargs)
    except psycopg.Error as error:
        failure = classify(error)
        logger.warning("database call %s failed: %s, %s", query.__name__, failure.value, reason(error))
        if failure in RETRY_LATER:
            raise StorageUnavailable(type(error).__name__) from error
        if failure is Failure.BAD_REQUEST:
            raise BadRequest(error.sqlstate or type(error).__name__) from error
        raise


async def register(pool: Pool, *, telegram_user_id: int, first_name: str | None, telegram_chat_id: int) -> None:
    """Register the user and the chat on first contact, keeping ``first_name`` current."""
    await call(
        pool,
        database.upsert_user_and_chat,
        telegram_user_id=telegram_user_id,
        first_name=first_name,
        telegram_chat_id=telegram_chat_id,
    )


async def add_question(
    pool: Pool,
    *,
    telegram_user_id: int,
    first_name: str | None,
    telegram_chat_id: int,
    telegram_message_id: int | None,
    telegram_thread_id: int | None,
    text: str,
    quoted: str | None = None,
    rate_limit_per_minute: int = 0,
    daily_token_budget: int = 0,
    holder: str | None = None,
    lease_ttl_s: int = 0,
) -> AddedQuestion:
    """Store the user's message (registering user and chat) in one round trip; with ``holder``,
    taking or bumping the chat's lease in the same statement.

    Raises ``RateLimited`` when the user is over ``rate_limit_per_minute`` (0: no limit), and
    ``OverBudget`` when their tokens today have reached ``daily_token_budget`` (0: no budget):
    the message is then stored set aside, so it neither enters the history nor awaits an
    answer. A message stored before raises nothing: it was told once.
    """
    added = await call(
        pool,
        database.add_question,
        telegram_user_id=telegram_user_id,
        first_name=first_name,
        telegram_chat_id=telegram_chat_id,
        content=text,
        telegram_message_id=telegram_message_id,
        telegram_thread_id=telegram_thread_id,
        quoted=quoted,
        rate_limit=rate_limit_per_minute,
        token_budget=daily_token_budget,
        holder=holder,
        lease_ttl_s=lease_ttl_s,
    )
    refuse(rate_limited=added.new and added.set_aside, over_budget=added.over_budget)
    return added


def refuse(*, rate_limited: bool, over_budget: bool) -> None:
    """The admission's verdict, as the statement that stored or re-opened a question (or that
    would have cleared or undone) decided it: ``OverBudget`` before ``RateLimited``, as for a new
    question, so every refused door gets the same reply."""
    if over_budget:
        raise OverBudget
    if rate_limited:
        raise RateLimited


async def start_turn(
    pool: Pool, *, question_id: int, history_limit: int, budget: int, shared: bool = False
) -> TurnStart | None:
    """The context of a question's turn (``database.fetch_turn_start``), its stored answer and
    the chat's settings; None when nothing is left to do."""
    return await call(
        pool,
        database.fetch_turn_start,
        question_id=question_id,
        history_limit=history_limit,
        budget=budget,
        shared=shared,
    )


async def next_context(
    pool: Pool, *, telegram_user_id: int, telegram_chat_id: int, history_limit: int, budget: int, shared: bool
) -> DialogContext:
    """What the dialog's next turn would read."""
    return await call(
        pool,
        database.fetch_next_context,
        telegram_user_id=telegram_user_id,
        telegram_chat_id=telegram_chat_id,
        history_limit=history_limit,
        budget=budget,
        shared=shared,
    )


async def summary_source(
    pool: Pool, *, question_id: int, before: int, budget: int, limit: int, shared: bool
) -> SummarySource:
    """The previous summary of the question's dialog and the live messages after it, before
    turn ``before``, oldest first, up to ``limit`` and about ``budget`` estimated tokens."""
    return await call(
        pool,
        database.fetch_summary_source,
        question_id=question_id,
        before=before,
        budget=budget,
        limit=limit,
        shared=shared,
    )


async def add_summary(
    pool: Pool, *, question_id: int, through_id: int, covered: int, text: str, shared: bool, usage: Usage | None = None
) -> bool:
    """Store a summary of the question's dialog up to turn ``through_id``; False when the
    question was cleared or undone meanwhile. ``usage``: the tokens its LLM call was reported to
    take, counted for the question's user (the one whose turn made it) either way."""
    return await call(
        pool,
        database.add_summary,
        question_id=question_id,
        through_id=through_id,
        covered=covered,
        content=text,
        shared=shared,
        prompt_tokens=usage.prompt_tokens if usage is not None else None,
        completion_tokens=usage.completion_tokens if usage is not None else None,
    )


async def add_answer(
    pool: Pool, *, question_id: int, text: str, finish_reason: FinishReason | None = None, usage: Usage = NO_USAGE
) -> int | None:
    """Store the assistant's answer (``finish_reason``: cut short, and why; ``usage``: its
    tokens); its id, or None when the question was cleared or answered."""
    return await call(
        pool,
        database.add_answer,
        question_id=question_id,
        content=text,
        finish_reason=finish_reason,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
    )


async def record_sent_part(pool: Pool, *, answer_id: int, telegram_message_id: int, last: bool) -> None:
    """Record one part of an answer accepted by Telegram; the last one makes it delivered."""
    await call(pool, database.record_sent_part, answer_id=answer_id, telegram_message_id=telegram_message_id, last=last)


async def set_failed(pool: Pool, *, message_id: int) -> None:
    """End a turn for good: its question got no answer, or Telegram refused its answer."""
    await call(pool, database.set_failed, message_id=message_id)


async def clear_context(
    pool: Pool, *, telegram_user_id: int, telegram_chat_id: int, rate_limit_per_minute: int = 0
) -> int:
    """Soft-delete the history of (user, chat); how many messages were cleared. Raises
    ``RateLimited`` (nothing cleared) when the hit it counts is over ``rate_limit_per_minute``."""
    cleared = await call(
        pool,
        database.soft_delete_messages,
        telegram_user_id=telegram_user_id,
        telegram_chat_id=telegram_chat_id,
        rate_limit=rate_limit_per_minute,
    )
    refuse(rate_limited=cleared.rate_limited, over_budget=False)
    return cleared.cleared


async def retry(
    pool: Pool,
    *,
    telegram_user_id: int,
    telegram_chat_id: int,
    rate_limit_per_minute: int = 0,
    daily_token_budget: int = 0,
) -> RetriedQuestion | None:
    """Set aside the answer to the dialog's last question, to ask it again; None if there is
    none. Raises ``RateLimited`` or ``OverBudget`` as a new question would (nothing changed)."""
    retried = await call(
        pool,
        database.retry_last_turn,
        telegram_user_id=telegram_user_id,
        telegram_chat_id=telegram_chat_id,
        rate_limit=rate_limit_per_minute,
        token_budget=daily_token_budget,
    )
    refuse(rate_limited=retried.rate_limited, over_budget=retried.over_budget)
    return retried if retried.id is not None else None


async def undo(pool: Pool, *, telegram_user_id: int, telegram_chat_id: int, rate_limit_per_minute: int = 0) -> Undone:
    """Bring back the last /clear if nothing was said since, else take back the last turn.
    Raises ``RateLimited`` (nothing changed) when the hit it counts is over the limit."""
    undone = await call(
        pool,
        database.undo_last_turn,
        telegram_user_id=telegram_user_id,
        telegram_chat_id=telegram_chat_id,
        rate_limit=rate_limit_per_minute,
    )
    refuse(rate_limited=undone.rate_limited, over_budget=False)
    return undone


async def edit_question(
    pool: Pool,
    *,
    telegram_user_id: int,
    telegram_chat_id: int,
    telegram_message_id: int,
    text: str,
    rate_limit_per_minute: int = 0,
    daily_token_budget: int = 0,
) -> EditedQuestion | None:
    """Store the edited text of a question; None when the message is not a stored question.
    Raises ``RateLimited``, or (the last question, answered again) ``OverBudget``, as a new
    question would: nothing changed."""
    edited = await call(
        pool,
        database.edit_question,
        telegram_user_id=telegram_user_id,
        telegram_chat_id=telegram_chat_id,
        telegram_message_id=telegram_message_id,
        content=text,
        rate_limit=rate_limit_per_minute,
        token_budget=daily_token_budget,
    )
    if edited is not None:
        refuse(rate_limited=edited.rate_limited, over_budget=edited.over_budget)
    return edited


async def search(
    pool: Pool, *, telegram_user_id: int, telegram_chat_id: int, query: str, everything: bool, limit: int, options: str
) -> list[SearchHit]:
    """The dialog's best matches for ``query`` (``everything``: cleared messages too)."""
    return await call(
        pool,
        database.search_messages,
        telegram_user_id=telegram_user_id,
        telegram_chat_id=telegram_chat_id,
        query=query,
        everything=everything,
        limit=limit,
        options=options,
    )


async def stats(pool: Pool, *, telegram_user_id: int, telegram_chat_id: int) -> DialogStats:
    """The user's message, character and token counts, in this chat and in all."""
    return await call(pool, database.fetch_stats, telegram_user_id=telegram_user_id, telegram_chat_id=telegram_chat_id)


async def export(
    pool: Pool,
    *,
    telegram_user_id: int,
    telegram_chat_id: int,
    write: Callable[[database.ExportedMessage], Awaitable[None]],
) -> None:
    """Pass every message of the dialog, in turn order, to ``write`` as it is read."""

    async def read(conn: Connection) -> None:
        messages = database.dialog_messages(conn, telegram_user_id=telegram_user_id, telegram_chat_id=telegram_chat_id)
        async for message in messages:
            await write(message)

    await call(pool, read)


async def chat_settings(pool: Pool, *, telegram_chat_id: int) -> ChatSettings:
    """The chat's settings (None in a field: the configuration's default)."""
    return await call(pool, database.get_chat_settings, telegram_chat_id=telegram_chat_id)


async def set_chat_setting(
    pool: Pool, *, telegram_chat_id: int, name: SettingName, value: str | float | None, telegram_user_id: int
) -> ChatSettings:
    """Set one of the chat's settings (None: back to the default); the settings now."""
    return await call(
        pool,
        database.set_chat_setting,
        telegram_chat_id=telegram_chat_id,
        name=name,
        value=value,
        telegram_user_id=telegram_user_id,
    )


async def unfinished_turns(pool: Pool, *, max_age_s: int) -> list[UnfinishedTurn]:
    """Turns younger than ``max_age_s`` a crash or an outage left unanswered or undelivered."""
    return await call(pool, database.fetch_unfinished_turns, max_age_s=max_age_s)


@asynccontextmanager
async def exclusive(pool: Pool, name: str) -> AsyncIterator[bool]:
    """Try to become the one process doing ``name`` (a PostgreSQL advisory lock held for the
    block, released if the process dies); yields whether this process is."""
    async with AsyncExitStack() as stack:
        try:
            taken = await stack.enter_async_context(database.advisory_lock(pool, name))
        except psycopg.OperationalError as error:
            logger.warning("advisory lock %s: %s", name, type(error).__name__)
            raise StorageUnavailable(type(error).__name__) from error
        yield taken

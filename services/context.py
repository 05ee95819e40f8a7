"""The dialog context service: what the turn pipeline calls to remember and recall a conversation.

Functional and stateless: every function takes the pool, then the keyword arguments the
``services.database`` function it runs names, and returns plain values. Database failures
surface by their class (``services.failures``): ``StorageUnavailable`` (the database is out) or
``BadRequest`` (it refused this request's input), so callers need not know the driver.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Concatenate, ParamSpec, Protocol, TypeVar

import psycopg

from services import database
from services.database import (
    Connection,
    ExportedMessage,
    Pool,
)
from services.failures import RETRY_LATER, BadRequest, Failure, StorageUnavailable, classify, reason
from services.records import NO_USAGE, FinishReason, Usage

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


def refuse(*, rate_limited: bool, over_budget: bool) -> None:
    """The admission's verdict, as the statement that stored or re-opened a question (or that
    would have cleared or undone) decided it: ``OverBudget`` before ``RateLimited``, as for a new
    question, so every refused door gets the same reply."""
    if over_budget:
        raise OverBudget
    if rate_limited:
        raise RateLimited


def _service(
    query: Callable[Concatenate[Connection, P], Awaitable[T]],
) -> Callable[Concatenate[Pool, P], Awaitable[T]]:
    """``query(conn, **kw)`` as ``service(pool, **kw)`` through ``call``: same name, keywords
    and docstring."""

    @functools.wraps(query, assigned=("__name__", "__qualname__", "__doc__"))
    async def service(pool: Pool, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await call(pool, query, *args, **kwargs)

    return service


class Verdict(Protocol):
    """A statement's admission verdict, read from the row it returns."""

    @property
    def rate_limited(self) -> bool: ...

    @property
    def over_budget(self) -> bool: ...


V = TypeVar("V", bound="Verdict | None")


def _admitted(
    query: Callable[Concatenate[Connection, P], Awaitable[V]],
) -> Callable[Concatenate[Pool, P], Awaitable[V]]:
    """``query`` as a service, like ``_service``, that raises the admission's refusal the
    statement decided (``refuse``): the statements that store or re-open a question, and /clear
    and /undo, which count against the rate limit."""

    @functools.wraps(query, assigned=("__name__", "__qualname__", "__doc__"))
    async def service(pool: Pool, /, *args: P.args, **kwargs: P.kwargs) -> V:
        verdict = await call(pool, query, *args, **kwargs)
        if verdict is not None:
            refuse(rate_limited=verdict.rate_limited, over_budget=verdict.over_budget)
        return verdict

    return service


# -- reads and writes as the database runs them ---------------------------------------------------

upsert_user_and_chat = _service(database.upsert_user_and_chat)
fetch_turn_start = _service(database.fetch_turn_start)
fetch_next_context = _service(database.fetch_next_context)
fetch_summary_source = _service(database.fetch_summary_source)
record_sent_part = _service(database.record_sent_part)
set_failed = _service(database.set_failed)
search_messages = _service(database.search_messages)
recall_earlier = _service(database.recall_earlier)
fetch_stats = _service(database.fetch_stats)
get_chat_settings = _service(database.get_chat_settings)
set_chat_setting = _service(database.set_chat_setting)
add_memory = _service(database.add_memory)
list_memories = _service(database.list_memories)
forget_memory = _service(database.forget_memory)
forget_memories = _service(database.forget_memories)
set_memories_in_groups = _service(database.set_memories_in_groups)
get_memories_in_groups = _service(database.get_memories_in_groups)
fetch_unfinished_turns = _service(database.fetch_unfinished_turns)

# -- what the admission decides: refused, they raise ``OverBudget`` or ``RateLimited`` ----------

admit = _admitted(database.admit)
add_question = _admitted(database.add_question)
soft_delete_messages = _admitted(database.soft_delete_messages)
retry_last_turn = _admitted(database.retry_last_turn)
undo_last_turn = _admitted(database.undo_last_turn)
edit_question = _admitted(database.edit_question)


# -- what adds something: the tokens of a Usage, a streamed read -----------------------------------


async def add_answer(
    pool: Pool, *, question_id: int, content: str, finish_reason: FinishReason | None = None, usage: Usage = NO_USAGE
) -> int | None:
    """Store the assistant's answer (``finish_reason``: cut short, and why; ``usage``: its
    tokens); its id, or None when the question was cleared or answered."""
    return await call(
        pool,
        database.add_answer,
        question_id=question_id,
        content=content,
        finish_reason=finish_reason,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
    )


async def add_summary(
    pool: Pool, *, question_id: int, through_id: int, covered: int, content: str, shared: bool, usage: Usage = NO_USAGE
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
        content=content,
        shared=shared,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
    )


async def dialog_messages(
    pool: Pool,
    *,
    telegram_user_id: int,
    telegram_chat_id: int,
    write: Callable[[ExportedMessage], Awaitable[None]],
) -> None:
    """Pass every message of the dialog, in turn order, to ``write`` as it is read."""

    async def read(conn: Connection) -> None:
        messages = database.dialog_messages(conn, telegram_user_id=telegram_user_id, telegram_chat_id=telegram_chat_id)
        async for message in messages:
            await write(message)

    await call(pool, read)


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

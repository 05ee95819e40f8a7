"""Data access: a catalogue of parameterised SQL over a psycopg async connection pool.

Every function takes the connection first and binds its values server-side; none ever formats
a value into SQL. Connections are in autocommit mode: each statement is its own transaction,
so a write costs one round trip and one commit, and nothing holds a transaction open. Users
and chats are addressed by their Telegram ids; internal ids stay inside the database.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Concatenate, Final, Literal, NamedTuple, ParamSpec, TypeAlias, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import args_row, class_row, scalar_row, tuple_row
from psycopg_pool import AsyncConnectionPool

logger = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant"]
Connection: TypeAlias = AsyncConnection[Any]
Pool: TypeAlias = AsyncConnectionPool[Connection]
T = TypeVar("T")
P = ParamSpec("P")


class StoredMessage(NamedTuple):
    """One message as the history read returns it. A NamedTuple: one is built per history row
    on the hot path, and a tuple is the cheapest typed row to build."""

    id: int
    role: Role
    content: str
    length: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class MessageCounts:
    """Messages of one (user, chat): still visible and soft-deleted."""

    live: int
    deleted: int


@dataclass(frozen=True, slots=True)
class PendingQuestion:
    """A user message that was stored but never answered."""

    id: int
    telegram_user_id: int
    telegram_chat_id: int
    telegram_message_id: int | None


@dataclass(frozen=True, slots=True)
class AddedMessage:
    """The stored message's id (``None`` when Telegram delivered it before), the history ending
    with it, and the user's messages this minute (``None`` when not counted)."""

    message_id: int | None
    history: list[StoredMessage]
    hits: int | None


# -- the pool -------------------------------------------------------------------------------


async def init_db(url: str, *, size: int = 10, timeout_s: float = 5.0) -> Pool:
    """Open a pool of ``size`` autocommit connections; raise ``PoolTimeout`` if none connects.

    ``timeout_s`` bounds how long a caller waits for a connection, so an outage reaches the
    user as a quick apology rather than a hang.
    """
    pool: Pool = AsyncConnectionPool(
        url,
        min_size=size,
        max_size=size,
        open=False,
        timeout=timeout_s,
        # Give up background reconnection quickly: its backoff doubles up to this bound, which
        # would delay recovery long after the server is back. A waiting caller regrows the pool
        # at once instead.
        reconnect_timeout=timeout_s,
        kwargs={"autocommit": True},
        name="llmbot",
    )
    try:
        await pool.open(wait=True, timeout=timeout_s)
    except BaseException:
        await pool.close()
        raise
    return pool


async def close_db(pool: Pool) -> None:
    """Close every connection of the pool."""
    await pool.close()


async def run(
    pool: Pool, work: Callable[Concatenate[Connection, P], Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    """``work(conn, ...)`` on a pooled connection, once more on a fresh one if the first was dead.

    After a server restart every idle connection in the pool is dead; the first statement on
    each finds out. Checking the pool then drops the dead ones, so the retry gets a live
    connection and the caller never sees the restart. The bot's writes carry a unique key (the
    Telegram message id; the question an answer replies to), so even a retry after a commit
    whose reply was lost stores nothing twice.
    """
    conn: Connection | None = None
    try:
        async with pool.connection() as conn:
            return await work(conn, *args, **kwargs)
    except psycopg.OperationalError:
        if conn is None or not conn.broken:
            raise
        logger.warning("database connection lost; checking the pool and retrying once")
        await pool.check()
        async with pool.connection() as conn:
            return await work(conn, *args, **kwargs)


# -- SQL --------------------------------------------------------------------------------------
# Parameters are cast to their column types: whatever width psycopg picks for a Python int,
# the comparison is bigint = bigint and the unique indexes apply.

# Registration of the user and the chat, as CTEs shared by the statements below. The common
# case (known user, same first name, known chat) only reads: no row lock, no WAL, no identity
# value burnt. A first contact racing another resolves through ON CONFLICT, whose DO UPDATE
# (not DO NOTHING) returns the id the other transaction committed.
_REGISTER_CTES: Final = """
    known_user AS (
        SELECT id, first_name FROM users WHERE telegram_user_id = %(telegram_user_id)s::bigint
    ),
    new_user AS (
        INSERT INTO users (telegram_user_id, first_name)
        SELECT %(telegram_user_id)s::bigint, %(first_name)s::text
        WHERE NOT EXISTS (SELECT FROM known_user WHERE first_name IS NOT DISTINCT FROM %(first_name)s::text)
        ON CONFLICT (telegram_user_id) DO UPDATE SET first_name = EXCLUDED.first_name
        RETURNING id
    ),
    user_row AS (SELECT id FROM new_user UNION ALL SELECT id FROM known_user LIMIT 1),
    known_chat AS (
        SELECT id FROM chats WHERE telegram_chat_id = %(telegram_chat_id)s::bigint
    ),
    new_chat AS (
        INSERT INTO chats (telegram_chat_id)
        SELECT %(telegram_chat_id)s::bigint
        WHERE NOT EXISTS (SELECT FROM known_chat)
        ON CONFLICT (telegram_chat_id) DO UPDATE SET telegram_chat_id = EXCLUDED.telegram_chat_id
        RETURNING id
    ),
    chat_row AS (SELECT id FROM new_chat UNION ALL SELECT id FROM known_chat LIMIT 1)
"""

REGISTER: Final = (
    "WITH" + _REGISTER_CTES + "SELECT (SELECT id FROM user_row) AS user_id, (SELECT id FROM chat_row) AS chat_id"
)

# The first half of a chat turn as one statement: register, count a rate-limit hit (a fixed
# one-minute window per user, only when asked), store the message, and read the history
# before it. The history comes from the statement's snapshot, which does not hold the new
# row yet, so the new row is returned first and the caller puts it last.
ADD_MESSAGE: Final = (
    "WITH"
    + _REGISTER_CTES
    + """,
    rate AS (
        INSERT INTO rate_limits AS r (telegram_user_id, window_start, hits)
        SELECT %(telegram_user_id)s::bigint, date_trunc('minute', now()), 1
        WHERE %(count_hit)s::boolean
        ON CONFLICT (telegram_user_id) DO UPDATE
        SET hits = CASE WHEN r.window_start = EXCLUDED.window_start THEN r.hits + 1 ELSE 1 END,
            window_start = EXCLUDED.window_start
        RETURNING hits
    ),
    added AS (
        INSERT INTO messages (user_id, chat_id, role, content, telegram_message_id)
        SELECT (SELECT id FROM user_row), (SELECT id FROM chat_row),
               %(role)s::text, %(content)s::text, %(telegram_message_id)s::bigint
        ON CONFLICT ON CONSTRAINT messages_telegram_message_key DO NOTHING
        RETURNING id, role, content, length, created_at
    )
    SELECT true AS added, (SELECT hits FROM rate) AS hits, id, role, content, length, created_at
    FROM added
    UNION ALL
    (
        SELECT false, NULL, id, role, content, length, created_at
        FROM messages
        WHERE user_id = (SELECT id FROM user_row)
          AND chat_id = (SELECT id FROM chat_row)
          AND deleted_at IS NULL
        ORDER BY id DESC
        LIMIT %(limit)s::integer
    )
"""
)

INSERT_ANSWER: Final = """
    INSERT INTO messages (user_id, chat_id, role, content, reply_to_id)
    SELECT user_id, chat_id, 'assistant', %(content)s::text, id
    FROM messages
    WHERE id = %(question_id)s::bigint
    ON CONFLICT ON CONSTRAINT messages_reply_to_key DO NOTHING
    RETURNING id
"""

# Newest first so the partial index is read backwards with LIMIT and no sort; callers reverse.
SELECT_HISTORY: Final = """
    SELECT id, role, content, length, created_at
    FROM messages
    WHERE user_id = (SELECT id FROM users WHERE telegram_user_id = %(telegram_user_id)s::bigint)
      AND chat_id = (SELECT id FROM chats WHERE telegram_chat_id = %(telegram_chat_id)s::bigint)
      AND deleted_at IS NULL
    ORDER BY id DESC
    LIMIT %(limit)s::integer
"""

SOFT_DELETE_MESSAGES: Final = """
    UPDATE messages SET deleted_at = now()
    WHERE user_id = (SELECT id FROM users WHERE telegram_user_id = %(telegram_user_id)s::bigint)
      AND chat_id = (SELECT id FROM chats WHERE telegram_chat_id = %(telegram_chat_id)s::bigint)
      AND deleted_at IS NULL
"""

COUNT_MESSAGES: Final = """
    SELECT count(*) FILTER (WHERE deleted_at IS NULL) AS live,
           count(*) FILTER (WHERE deleted_at IS NOT NULL) AS deleted
    FROM messages
    WHERE user_id = (SELECT id FROM users WHERE telegram_user_id = %(telegram_user_id)s::bigint)
      AND chat_id = (SELECT id FROM chats WHERE telegram_chat_id = %(telegram_chat_id)s::bigint)
"""

# A question is pending when nothing answers it and nothing came after it in its dialog:
# a question followed by a newer one is answered, in context, by the newer one's answer.
SELECT_PENDING_QUESTIONS: Final = """
    SELECT q.id, u.telegram_user_id, c.telegram_chat_id, q.telegram_message_id
    FROM messages q
    JOIN users u ON u.id = q.user_id
    JOIN chats c ON c.id = q.chat_id
    WHERE q.role = 'user'
      AND q.deleted_at IS NULL
      AND q.created_at > now() - make_interval(secs => %(max_age_s)s::integer)
      AND NOT EXISTS (SELECT FROM messages a WHERE a.reply_to_id = q.id)
      AND NOT EXISTS (
          SELECT FROM messages later
          WHERE later.user_id = q.user_id AND later.chat_id = q.chat_id
            AND later.deleted_at IS NULL AND later.id > q.id
      )
    ORDER BY q.id
"""

SOFT_DELETE_MESSAGE: Final = """
    UPDATE messages SET deleted_at = now() WHERE id = %(message_id)s::bigint AND deleted_at IS NULL
"""

# deleted_at >= created_at, so the created_at bound is implied; it lets the BRIN index skip
# every block of recent rows.
PURGE_DELETED: Final = """
    DELETE FROM messages
    WHERE deleted_at < now() - make_interval(days => %(days)s::integer)
      AND created_at < now() - make_interval(days => %(days)s::integer)
"""


# -- functions ------------------------------------------------------------------------------


async def upsert_user_and_chat(
    conn: Connection, *, telegram_user_id: int, first_name: str | None, telegram_chat_id: int
) -> None:
    """Register a user (keeping ``first_name`` current) and a chat; writes nothing if both are known."""
    params = {"telegram_user_id": telegram_user_id, "first_name": first_name, "telegram_chat_id": telegram_chat_id}
    await conn.execute(REGISTER, params, prepare=True)


async def add_message(
    conn: Connection,
    *,
    telegram_user_id: int,
    first_name: str | None,
    telegram_chat_id: int,
    role: Role,
    content: str,
    telegram_message_id: int | None = None,
    history_limit: int = 0,
    count_hit: bool = False,
) -> AddedMessage:
    """Store a message, registering its user and chat, in one round trip and one transaction.

    Also returns the last ``history_limit`` live messages of (user, chat) ending with this one,
    and, with ``count_hit``, the user's rate-limit hits this minute. ``message_id`` is None when
    this Telegram message was stored before.
    """
    cur = conn.cursor(row_factory=tuple_row)
    await cur.execute(
        ADD_MESSAGE,
        {
            "telegram_user_id": telegram_user_id,
            "first_name": first_name,
            "telegram_chat_id": telegram_chat_id,
            "role": role,
            "content": content,
            "telegram_message_id": telegram_message_id,
            "count_hit": count_hit,
            "limit": history_limit,
        },
        prepare=True,
    )
    new: StoredMessage | None = None
    hits: int | None = None
    older: list[StoredMessage] = []
    for added, row_hits, *message in await cur.fetchall():
        if added:
            new, hits = StoredMessage(*message), row_hits
        else:
            older.append(StoredMessage(*message))
    older.sort(reverse=True)  # newest first, by id (the first field)
    if new is None:
        return AddedMessage(message_id=None, history=older[::-1], hits=None)
    history = older[: max(history_limit - 1, 0)][::-1]
    if history_limit:
        history.append(new)
    return AddedMessage(message_id=new.id, history=history, hits=hits)


async def add_answer(conn: Connection, *, question_id: int, content: str) -> int | None:
    """Store the assistant's answer to a user message; None if it was answered before."""
    cur = conn.cursor(row_factory=scalar_row)
    await cur.execute(INSERT_ANSWER, {"question_id": question_id, "content": content}, prepare=True)
    answer_id: int | None = await cur.fetchone()
    return answer_id


async def fetch_history(
    conn: Connection, *, telegram_user_id: int, telegram_chat_id: int, limit: int
) -> list[StoredMessage]:
    """The last ``limit`` live messages of (user, chat), oldest first."""
    cur = conn.cursor(row_factory=args_row(StoredMessage))
    params = {"telegram_user_id": telegram_user_id, "telegram_chat_id": telegram_chat_id, "limit": limit}
    await cur.execute(SELECT_HISTORY, params, prepare=True)
    return (await cur.fetchall())[::-1]


async def soft_delete_message(conn: Connection, *, message_id: int) -> None:
    """Mark one message deleted."""
    await conn.execute(SOFT_DELETE_MESSAGE, {"message_id": message_id})


async def soft_delete_messages(conn: Connection, *, telegram_user_id: int, telegram_chat_id: int) -> int:
    """Mark every live message of (user, chat) deleted; how many were."""
    cur = await conn.execute(
        SOFT_DELETE_MESSAGES,
        {"telegram_user_id": telegram_user_id, "telegram_chat_id": telegram_chat_id},
        prepare=True,
    )
    return cur.rowcount


async def count_messages(conn: Connection, *, telegram_user_id: int, telegram_chat_id: int) -> MessageCounts:
    """How many messages (user, chat) has, live and soft-deleted."""
    cur = conn.cursor(row_factory=class_row(MessageCounts))
    await cur.execute(COUNT_MESSAGES, {"telegram_user_id": telegram_user_id, "telegram_chat_id": telegram_chat_id})
    counts = await cur.fetchone()
    assert counts is not None  # an aggregate always returns a row
    return counts


async def fetch_pending_questions(conn: Connection, *, max_age_s: int) -> list[PendingQuestion]:
    """User messages younger than ``max_age_s`` that still await an answer, oldest first."""
    cur = conn.cursor(row_factory=class_row(PendingQuestion))
    await cur.execute(SELECT_PENDING_QUESTIONS, {"max_age_s": max_age_s})
    return await cur.fetchall()


async def purge_deleted_messages(conn: Connection, *, days: int) -> int:
    """Hard-delete messages soft-deleted more than ``days`` days ago; how many were."""
    cur = await conn.execute(PURGE_DELETED, {"days": days})
    return cur.rowcount


async def fetch_schema_version(conn: Connection) -> str | None:
    """The Alembic revision the database is at, or None if it was never migrated."""
    try:
        cur = conn.cursor(row_factory=scalar_row)
        await cur.execute("SELECT version_num FROM alembic_version")
        version: str | None = await cur.fetchone()
        return version
    except psycopg.errors.UndefinedTable:
        return None

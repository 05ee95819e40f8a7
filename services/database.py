"""Data access: a catalogue of parameterised SQL over a psycopg async connection pool.

Every function takes the connection first and binds its values server-side; none ever formats
a value into SQL. Connections are in autocommit mode: each statement is its own transaction,
so a write costs one round trip and one commit, and nothing holds a transaction open. Users
and chats are addressed by their Telegram ids; internal ids stay inside the database.

History is read in *turn order*: each question at its own id, its answer right after it
(``coalesce(reply_to_id, id)``), so a question stored while an earlier one was still being
answered never comes between that question and its answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Concatenate, Final, Literal, NamedTuple, ParamSpec, TypeAlias, TypeVar
from weakref import WeakKeyDictionary

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import args_row, class_row, scalar_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from services import metrics

logger = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stopped", "failed"]  # an answer cut short; None: complete
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
    finish_reason: FinishReason | None = None


@dataclass(frozen=True, slots=True)
class MessageCounts:
    """Messages of one (user, chat): still visible and soft-deleted."""

    live: int
    deleted: int


@dataclass(frozen=True, slots=True)
class AddedQuestion:
    """A user message as stored: its id; ``new`` is False when this Telegram message was stored
    before (a redelivered update, or a retry of a statement whose reply was lost); ``set_aside``
    when it was stored already soft-deleted (over the rate limit, or cleared since)."""

    id: int
    new: bool
    set_aside: bool
    leased: bool | None = None  # this process holds the chat's lease (None: no lease asked for)
    lease_version: int | None = None


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """An answer stored for a question, and how many of its parts Telegram has accepted."""

    id: int
    content: str
    sent_parts: int


@dataclass(frozen=True, slots=True)
class ChatSettings:
    """What a chat chose (/model, /prompt, /temperature); None: the configuration's default."""

    model: str | None = None
    system_prompt: str | None = None
    temperature: float | None = None


DEFAULT_SETTINGS: Final = ChatSettings()
SettingName = Literal["model", "system_prompt", "temperature"]


@dataclass(frozen=True, slots=True)
class TurnStart:
    """What a turn finds when it starts: the live history ending with its question (oldest
    first), the answer when one was stored but not yet fully delivered, and the chat's settings."""

    history: list[StoredMessage]
    answer: StoredAnswer | None
    settings: ChatSettings = DEFAULT_SETTINGS


@dataclass(frozen=True, slots=True)
class UnfinishedTurn:
    """A recent question that has no answer, or whose answer Telegram has not accepted yet."""

    question_id: int
    telegram_user_id: int
    telegram_chat_id: int
    telegram_message_id: int | None
    telegram_thread_id: int | None


@dataclass(frozen=True, slots=True)
class RetriedQuestion:
    """The question /retry asks again."""

    id: int
    telegram_message_id: int | None
    telegram_thread_id: int | None


@dataclass(frozen=True, slots=True)
class Undone:
    """What /undo did: ``restored`` messages of the last clear brought back, or ``undone``
    messages of the last turn set aside (``question``: its text)."""

    restored: int
    undone: int
    question: str | None


@dataclass(frozen=True, slots=True)
class EditedQuestion:
    """A stored question whose text the user edited; ``last``: it is the dialog's newest live
    turn, whose answer (shown in ``replaced_message_ids``) was set aside for a new one."""

    id: int
    telegram_thread_id: int | None
    last: bool
    replaced_message_ids: list[int]


@dataclass(frozen=True, slots=True)
class SearchHit:
    """A message found by /search: ``snippet`` has its matches between the marker characters."""

    role: Role
    created_at: datetime
    cleared: bool
    snippet: str


@dataclass(frozen=True, slots=True)
class DialogStats:
    """A user's messages in one chat and in all chats; token sums are None when never reported."""

    first_contact: datetime | None
    chat_messages: int
    chat_cleared: int
    chat_chars: int
    chat_prompt_tokens: int | None
    chat_completion_tokens: int | None
    all_messages: int
    all_cleared: int
    all_chars: int
    all_prompt_tokens: int | None
    all_completion_tokens: int | None
    chats: int


@dataclass(frozen=True, slots=True)
class ExportedMessage:
    """One message of a dialog as /export writes it."""

    role: Role
    content: str
    created_at: datetime
    cleared: bool


@dataclass(frozen=True, slots=True)
class _TurnRow:
    id: int
    role: Role
    content: str
    length: int
    created_at: datetime
    finish_reason: FinishReason | None
    is_answer: bool
    settled: bool
    sent_parts: int
    model: str | None
    system_prompt: str | None
    temperature: float | None


# -- the pool -------------------------------------------------------------------------------


async def init_db(url: str, *, size: int = 10, timeout_s: float = 5.0) -> Pool:
    """Open a pool of ``size`` autocommit connections; raise ``PoolTimeout`` if none connects.

    Each connection is checked as it is handed out, so after a server restart the dead ones are
    replaced before a caller sees them. ``timeout_s`` bounds the wait for a connection before
    ``run`` asks whether the server answers at all.
    """
    pool: Pool = AsyncConnectionPool(
        url,
        min_size=size,
        max_size=size,
        open=False,
        timeout=timeout_s,
        check=AsyncConnectionPool.check_connection,
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


def _conninfo(pool: Pool) -> str:
    assert isinstance(pool.conninfo, str)  # init_db passes a URL
    return pool.conninfo


async def server_answers(pool: Pool) -> bool:
    """Whether the database accepts a new connection now, bypassing the pool."""
    try:
        conn = await psycopg.AsyncConnection.connect(_conninfo(pool), connect_timeout=max(1, int(pool.timeout)))
    except psycopg.OperationalError:
        return False
    await conn.close()
    return True


# One probe per pool at a time, its answer shared for a second: when a saturated pool times out
# many waiters at once, they must not each open a connection to ask (that feeds the saturation).
_probes: WeakKeyDictionary[Pool, tuple[float, asyncio.Task[bool]]] = WeakKeyDictionary()
PROBE_SHARED_S = 1.0


async def _server_answers_shared(pool: Pool) -> bool:
    now = asyncio.get_running_loop().time()
    started, probe = _probes.get(pool, (0.0, None))
    if probe is None or (probe.done() and now - started > PROBE_SHARED_S):
        probe = asyncio.ensure_future(server_answers(pool))
        _probes[pool] = (now, probe)
    return await asyncio.shield(probe)


async def run(
    pool: Pool, work: Callable[Concatenate[Connection, P], Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    """``work(conn, ...)`` on a pooled connection.

    A full pool means *wait*: when no connection frees up within the pool's timeout, the
    server is asked directly; only when it does not answer does ``PoolTimeout`` reach the
    caller, as an outage.
    """
    while True:
        try:
            async with metrics.stage("database"), pool.connection() as conn:  # the wait for a connection counts
                return await work(conn, *args, **kwargs)
        except PoolTimeout:
            if not await _server_answers_shared(pool):
                raise
            logger.warning("every database connection is busy; still waiting (%s)", pool.get_stats())


@asynccontextmanager
async def advisory_lock(pool: Pool, name: str) -> AsyncIterator[bool]:
    """Try to take the session-level advisory lock ``name`` on a connection of its own, held
    until the block ends (or the process dies); yields whether it was taken."""
    async with await psycopg.AsyncConnection.connect(_conninfo(pool), autocommit=True) as conn:
        cur = conn.cursor(row_factory=scalar_row)
        await cur.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (name,))
        yield bool(await cur.fetchone())


# -- SQL --------------------------------------------------------------------------------------
# Parameters are cast to their column types: whatever width psycopg picks for a Python int,
# the comparison is bigint = bigint and the unique indexes apply.

# Registration of the user and the chat, as CTEs shared by the statements below. The common
# case (known user, same first name, known chat) only reads: no row lock, no WAL, no identity
# value burnt. A first contact racing another resolves through ON CONFLICT, whose DO UPDATE
# (not DO NOTHING) returns the id the other transaction committed.
_REGISTER_USER_CTES: Final = """
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
    user_row AS (SELECT id FROM new_user UNION ALL SELECT id FROM known_user LIMIT 1),"""
_REGISTER_CHAT_CTES: Final = """
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

_REGISTER_CTES: Final = _REGISTER_USER_CTES + _REGISTER_CHAT_CTES

REGISTER: Final = (
    "WITH" + _REGISTER_CTES + "SELECT (SELECT id FROM user_row) AS user_id, (SELECT id FROM chat_row) AS chat_id"
)

# A question, stored in one statement: register, count a rate-limit hit (a fixed one-minute
# window per user, when a limit is set) and store the message, set aside (soft-deleted) at
# once when it is over the limit, so no crash can leave a refused question awaiting an answer.
# A Telegram message stored before is not stored again; its row is returned with new = false
# (xmax is 0 only on a freshly inserted row), so the caller can still see it answered.
# ``created_at`` is given only when a question spooled during an outage is written back.
ADD_QUESTION: Final = (
    "WITH"
    + _REGISTER_CTES
    + """,
    rate AS (
        INSERT INTO rate_limits AS r (telegram_user_id, window_start, hits)
        SELECT %(telegram_user_id)s::bigint, date_trunc('minute', now()), 1
        WHERE %(rate_limit)s::integer > 0
        ON CONFLICT (telegram_user_id) DO UPDATE
        SET hits = CASE WHEN r.window_start = EXCLUDED.window_start THEN r.hits + 1 ELSE 1 END,
            window_start = EXCLUDED.window_start
        RETURNING hits
    ),
    lease AS (
        INSERT INTO chat_leases AS l (chat_id, holder, expires_at, done_through)
        SELECT (SELECT id FROM chat_row), %(holder)s::text, now() + make_interval(secs => %(lease_ttl_s)s::integer),
               coalesce((SELECT coalesce(reply_to_id, id) FROM messages
                         WHERE chat_id = (SELECT id FROM chat_row) AND deleted_at IS NULL
                         ORDER BY coalesce(reply_to_id, id) DESC, id DESC LIMIT 1), 0)
        WHERE %(holder)s::text IS NOT NULL AND coalesce((SELECT hits FROM rate), 0) <= %(rate_limit)s::integer
        ON CONFLICT (chat_id) DO UPDATE
        SET holder = CASE WHEN l.holder IS NULL OR l.holder = EXCLUDED.holder THEN EXCLUDED.holder ELSE l.holder END,
            expires_at = CASE WHEN l.holder IS NULL OR l.holder = EXCLUDED.holder
                              THEN EXCLUDED.expires_at ELSE l.expires_at END,
            version = l.version + 1
        RETURNING l.holder = %(holder)s::text AS leased, l.version
    )
    INSERT INTO messages AS m
        (user_id, chat_id, role, content, telegram_message_id, telegram_thread_id, created_at, deleted_at,
         deleted_reason)
    SELECT (SELECT id FROM user_row), (SELECT id FROM chat_row), 'user', %(content)s::text,
           %(telegram_message_id)s::bigint, %(telegram_thread_id)s::bigint,
           coalesce(%(created_at)s::timestamptz, now()),
           CASE WHEN (SELECT hits FROM rate) > %(rate_limit)s::integer THEN now() END,
           CASE WHEN (SELECT hits FROM rate) > %(rate_limit)s::integer THEN 'rate_limit' END
    ON CONFLICT ON CONSTRAINT messages_telegram_message_key
        DO UPDATE SET telegram_message_id = m.telegram_message_id
    RETURNING id, xmax = 0 AS new, deleted_at IS NOT NULL AS set_aside,
              (SELECT leased FROM lease) AS leased, (SELECT version FROM lease) AS lease_version
"""
)

# What a turn needs when it starts, in one index scan: the live history of the question's
# (user, chat) up to the question, in turn order, newest first; its answer comes first when
# there is one. Nothing comes back for a question that is cleared or failed. The chat's settings
# ride on the question's own row: the lateral join's condition on m.id is a one-time filter, so
# chat_settings is read once per turn, by its primary key, and no other row carries the prompt
# (LIMIT 1 keeps the planner from flattening the subquery into a join that sorts the history).
# real → numeric → float8: 0.3 stored as real reads back as 0.3, not 0.30000001192092896.
SELECT_TURN_START: Final = """
    WITH q AS (
        SELECT id, user_id, chat_id FROM messages
        WHERE id = %(question_id)s::bigint AND role = 'user' AND deleted_at IS NULL AND failed_at IS NULL
    )
    SELECT m.id, m.role, m.content, m.length, m.created_at, m.finish_reason,
           m.reply_to_id IS NOT NULL AND m.reply_to_id = q.id AS is_answer,
           m.delivered_at IS NOT NULL OR m.failed_at IS NOT NULL AS settled,
           coalesce(cardinality(m.sent_message_ids), 0) AS sent_parts,
           s.model, s.system_prompt, s.temperature::numeric::float8 AS temperature
    FROM q CROSS JOIN LATERAL (
        SELECT id, role, content, length, created_at, finish_reason, reply_to_id, delivered_at, failed_at,
               sent_message_ids
        FROM messages
        WHERE user_id = q.user_id AND chat_id = q.chat_id AND deleted_at IS NULL
          AND coalesce(reply_to_id, id) <= q.id
        ORDER BY coalesce(reply_to_id, id) DESC, id DESC
        LIMIT %(limit)s::integer + 1
    ) m
    LEFT JOIN LATERAL (
        SELECT model, system_prompt, temperature FROM chat_settings
        WHERE chat_id = q.chat_id AND m.id = q.id
        LIMIT 1
    ) s ON true
"""

# Only a live question gets an answer, and only one live answer (messages_live_answer_key): a
# /clear that came first wins, and nothing is stored.
INSERT_ANSWER: Final = """
    INSERT INTO messages
        (user_id, chat_id, role, content, reply_to_id, telegram_thread_id, finish_reason, prompt_tokens,
         completion_tokens)
    SELECT user_id, chat_id, 'assistant', %(content)s::text, id, telegram_thread_id, %(finish_reason)s::text,
           %(prompt_tokens)s::integer, %(completion_tokens)s::integer
    FROM messages
    WHERE id = %(question_id)s::bigint AND deleted_at IS NULL
    ON CONFLICT (reply_to_id) WHERE deleted_at IS NULL DO NOTHING
    RETURNING id
"""

RECORD_SENT_PART: Final = """
    UPDATE messages
    SET sent_message_ids = coalesce(sent_message_ids, '{}') || %(telegram_message_id)s::bigint,
        delivered_at = CASE WHEN %(last)s::boolean THEN now() END
    WHERE id = %(answer_id)s::bigint
"""

SET_FAILED: Final = """
    UPDATE messages SET failed_at = now() WHERE id = %(message_id)s::bigint AND failed_at IS NULL
"""

# Newest first so the partial index is read backwards with LIMIT and no sort; callers reverse.
SELECT_HISTORY: Final = """
    SELECT id, role, content, length, created_at, finish_reason
    FROM messages
    WHERE user_id = (SELECT id FROM users WHERE telegram_user_id = %(telegram_user_id)s::bigint)
      AND chat_id = (SELECT id FROM chats WHERE telegram_chat_id = %(telegram_chat_id)s::bigint)
      AND deleted_at IS NULL
    ORDER BY coalesce(reply_to_id, id) DESC, id DESC
    LIMIT %(limit)s::integer
"""

# ``before`` is given only for a /clear spooled during an outage: it clears what was said
# before it, and nothing written back after it, however often the write-back is repeated.
SOFT_DELETE_MESSAGES: Final = """
    UPDATE messages SET deleted_at = coalesce(%(before)s::timestamptz, now()), deleted_reason = 'clear'
    WHERE user_id = (SELECT id FROM users WHERE telegram_user_id = %(telegram_user_id)s::bigint)
      AND chat_id = (SELECT id FROM chats WHERE telegram_chat_id = %(telegram_chat_id)s::bigint)
      AND deleted_at IS NULL
      AND created_at <= coalesce(%(before)s::timestamptz, now())
"""

COUNT_MESSAGES: Final = """
    SELECT count(*) FILTER (WHERE deleted_at IS NULL) AS live,
           count(*) FILTER (WHERE deleted_at IS NOT NULL) AS deleted
    FROM messages
    WHERE user_id = (SELECT id FROM users WHERE telegram_user_id = %(telegram_user_id)s::bigint)
      AND chat_id = (SELECT id FROM chats WHERE telegram_chat_id = %(telegram_chat_id)s::bigint)
"""

# A turn is unfinished when its live question is neither failed nor answered by an answer that
# Telegram accepted (or refused for good). The BRIN index on created_at limits the scan to
# recent rows.
SELECT_UNFINISHED_TURNS: Final = """
    SELECT q.id AS question_id, u.telegram_user_id, c.telegram_chat_id, q.telegram_message_id, q.telegram_thread_id
    FROM messages q
    JOIN users u ON u.id = q.user_id
    JOIN chats c ON c.id = q.chat_id
    WHERE q.role = 'user'
      AND q.deleted_at IS NULL
      AND q.failed_at IS NULL
      AND q.created_at > now() - make_interval(secs => %(max_age_s)s::integer)
      AND NOT EXISTS (
          SELECT FROM messages a
          WHERE a.reply_to_id = q.id AND a.deleted_at IS NULL
            AND (a.delivered_at IS NOT NULL OR a.failed_at IS NOT NULL)
      )
    ORDER BY q.id
"""

# Writing back what an outage spooled: each statement finds the question by its Telegram key
# (the unique (chat_id, telegram_message_id) index) and is idempotent, so a write-back repeated
# after a crash stores nothing twice (an answer is known by its question and its time, even when
# a clear written back after it has set it aside).
_QUESTION_BY_KEY: Final = """
    SELECT m.id, m.user_id, m.chat_id, m.telegram_thread_id FROM messages m
    WHERE m.chat_id = (SELECT id FROM chats WHERE telegram_chat_id = %(telegram_chat_id)s::bigint)
      AND m.telegram_message_id = %(telegram_message_id)s::bigint
"""

WRITE_BACK_ANSWER: Final = (
    "WITH q AS ("
    + _QUESTION_BY_KEY
    + """)
    INSERT INTO messages
        (user_id, chat_id, role, content, reply_to_id, telegram_thread_id, created_at, finish_reason, prompt_tokens,
         completion_tokens)
    SELECT user_id, chat_id, 'assistant', %(content)s::text, id, telegram_thread_id, %(created_at)s::timestamptz,
           %(finish_reason)s::text, %(prompt_tokens)s::integer, %(completion_tokens)s::integer
    FROM q
    WHERE NOT EXISTS (
        SELECT FROM messages a WHERE a.reply_to_id = q.id AND a.created_at = %(created_at)s::timestamptz
    )
    ON CONFLICT (reply_to_id) WHERE deleted_at IS NULL DO NOTHING
"""
)

WRITE_BACK_SENT_PART: Final = (
    "WITH q AS ("
    + _QUESTION_BY_KEY
    + """)
    UPDATE messages a
    SET sent_message_ids = coalesce(a.sent_message_ids, '{}') || %(sent_message_id)s::bigint,
        delivered_at = CASE WHEN %(last)s::boolean THEN %(at)s::timestamptz ELSE a.delivered_at END
    FROM q
    WHERE a.reply_to_id = q.id AND a.deleted_at IS NULL
      AND NOT coalesce(a.sent_message_ids @> ARRAY[%(sent_message_id)s::bigint], false)
"""
)

WRITE_BACK_FAILURE: Final = (
    "WITH q AS ("
    + _QUESTION_BY_KEY
    + """)
    UPDATE messages m SET failed_at = %(at)s::timestamptz
    FROM q
    WHERE m.failed_at IS NULL
      AND ((%(answer)s::boolean AND m.reply_to_id = q.id AND m.deleted_at IS NULL)
           OR (NOT %(answer)s::boolean AND m.id = q.id))
"""
)

# -- history the user controls (/retry, /undo, edits, /search, /stats, /export) ---------------
# A dialog is one user's messages in one chat, found by Telegram's ids.
_DIALOG: Final = """
    dialog AS (
        SELECT (SELECT id FROM users WHERE telegram_user_id = %(telegram_user_id)s::bigint) AS user_id,
               (SELECT id FROM chats WHERE telegram_chat_id = %(telegram_chat_id)s::bigint) AS chat_id
    )
"""

# The dialog's newest live turn: the top of messages_turn_idx, read backwards.
_LAST_TURN: Final = """
    last_turn AS (
        SELECT coalesce(m.reply_to_id, m.id) AS question_id, m.created_at
        FROM messages m
        WHERE m.user_id = (SELECT user_id FROM dialog) AND m.chat_id = (SELECT chat_id FROM dialog)
          AND m.deleted_at IS NULL
        ORDER BY coalesce(m.reply_to_id, m.id) DESC, m.id DESC
        LIMIT 1
    )
"""

# /retry: the last question is asked again. Its live answer is set aside ('retry'), so the new
# answer takes its place in every later context; a question that had failed may run again.
RETRY_LAST_TURN: Final = (
    "WITH"
    + _DIALOG
    + ","
    + _LAST_TURN
    + """,
    question AS (
        UPDATE messages q SET failed_at = NULL
        FROM last_turn t
        WHERE q.id = t.question_id AND q.role = 'user' AND q.deleted_at IS NULL
        RETURNING q.id, q.telegram_message_id, q.telegram_thread_id
    ),
    replaced AS (
        UPDATE messages a SET deleted_at = now(), deleted_reason = 'retry'
        FROM question q
        WHERE a.reply_to_id = q.id AND a.deleted_at IS NULL
        RETURNING a.id
    )
    SELECT id, telegram_message_id, telegram_thread_id FROM question
"""
)

# /undo: when the dialog's latest deletion is a /clear and nothing was said since, that clear's
# rows come back; otherwise the newest live turn (question and answer) is set aside ('undo').
# A clear is restored only while it is the latest deletion, so only the last one can be.
# last_deletion is MATERIALIZED: inlined, it would be looked up again for every cleared row.
UNDO_LAST_TURN: Final = (
    "WITH"
    + _DIALOG
    + ","
    + _LAST_TURN
    + """,
    last_deletion AS MATERIALIZED (
        SELECT m.deleted_at, m.deleted_reason
        FROM messages m
        WHERE m.user_id = (SELECT user_id FROM dialog) AND m.chat_id = (SELECT chat_id FROM dialog)
          AND m.deleted_at IS NOT NULL AND m.deleted_reason IS DISTINCT FROM 'rate_limit'
        ORDER BY m.deleted_at DESC
        LIMIT 1
    ),
    restored AS (
        UPDATE messages m SET deleted_at = NULL, deleted_reason = NULL
        FROM last_deletion l
        WHERE l.deleted_reason = 'clear'
          AND NOT EXISTS (SELECT FROM last_turn t WHERE t.created_at > l.deleted_at)
          AND m.user_id = (SELECT user_id FROM dialog) AND m.chat_id = (SELECT chat_id FROM dialog)
          AND m.deleted_at = l.deleted_at AND m.deleted_reason = 'clear'
        RETURNING m.id
    ),
    undone AS (
        UPDATE messages m SET deleted_at = now(), deleted_reason = 'undo'
        FROM last_turn t
        WHERE NOT EXISTS (SELECT FROM restored)
          AND m.user_id = (SELECT user_id FROM dialog) AND m.chat_id = (SELECT chat_id FROM dialog)
          AND m.deleted_at IS NULL AND coalesce(m.reply_to_id, m.id) = t.question_id
        RETURNING m.role, m.content
    )
    SELECT (SELECT count(*) FROM restored) AS restored,
           (SELECT count(*) FROM undone) AS undone,
           (SELECT content FROM undone WHERE role = 'user') AS question
"""
)

# An edited question takes the new text (found by its Telegram key). When it is the dialog's
# newest live turn, its live answer is set aside ('edit') for a new one, and the ids of the
# messages that showed the old answer come back, to be edited in place.
EDIT_QUESTION: Final = (
    "WITH"
    + _DIALOG
    + ","
    + _LAST_TURN
    + """,
    question AS (
        UPDATE messages q
        SET content = %(content)s::text, edited_at = now(),
            failed_at = CASE WHEN q.deleted_at IS NULL AND q.id = (SELECT question_id FROM last_turn)
                             THEN NULL ELSE q.failed_at END
        WHERE q.chat_id = (SELECT chat_id FROM dialog) AND q.telegram_message_id = %(telegram_message_id)s::bigint
          AND q.user_id = (SELECT user_id FROM dialog) AND q.role = 'user'
          AND q.content IS DISTINCT FROM %(content)s::text
        RETURNING q.id, q.telegram_thread_id,
                  q.deleted_at IS NULL AND q.id = (SELECT question_id FROM last_turn) AS last
    ),
    replaced AS (
        UPDATE messages a SET deleted_at = now(), deleted_reason = 'edit'
        FROM question q
        WHERE q.last AND a.reply_to_id = q.id AND a.deleted_at IS NULL
        RETURNING a.sent_message_ids
    )
    SELECT q.id, q.telegram_thread_id, q.last,
           coalesce((SELECT sent_message_ids FROM replaced), '{}') AS replaced_message_ids
    FROM question q
"""
)

# /search: the dialog's messages matching a web-search-style query (words, "phrases", -not, or),
# best first. messages_search_idx (btree_gin) intersects the dialog's posting lists with the
# query's, so the cost follows the dialog's matches, not the table. ts_headline runs on the
# hits only, marking matches with the characters in %(options)s.
SEARCH_MESSAGES: Final = (
    "WITH"
    + _DIALOG
    + """,
    hits AS (
        SELECT m.id, m.role, m.content, m.created_at, m.deleted_at IS NOT NULL AS cleared,
               ts_rank(m.search_vector, websearch_to_tsquery('pg_catalog.russian', %(query)s::text)) AS rank
        FROM messages m
        WHERE m.user_id = (SELECT user_id FROM dialog) AND m.chat_id = (SELECT chat_id FROM dialog)
          AND m.search_vector @@ websearch_to_tsquery('pg_catalog.russian', %(query)s::text)
          AND (%(everything)s::boolean OR m.deleted_at IS NULL)
        ORDER BY rank DESC, m.id DESC
        LIMIT %(limit)s::integer
    )
    SELECT role, created_at, cleared,
           ts_headline('pg_catalog.russian', content, websearch_to_tsquery('pg_catalog.russian', %(query)s::text),
                       %(options)s::text) AS snippet
    FROM hits
    ORDER BY rank DESC, id DESC
"""
)

# /stats: one pass over the user's messages (all chats), through messages_search_idx's user_id.
SELECT_STATS: Final = (
    "WITH"
    + _DIALOG
    + """
    SELECT (SELECT created_at FROM users WHERE id = (SELECT user_id FROM dialog)) AS first_contact,
           count(*) FILTER (WHERE in_chat) AS chat_messages,
           count(*) FILTER (WHERE in_chat AND deleted_at IS NOT NULL) AS chat_cleared,
           coalesce(sum(length) FILTER (WHERE in_chat), 0) AS chat_chars,
           sum(prompt_tokens) FILTER (WHERE in_chat) AS chat_prompt_tokens,
           sum(completion_tokens) FILTER (WHERE in_chat) AS chat_completion_tokens,
           count(*) AS all_messages,
           count(*) FILTER (WHERE deleted_at IS NOT NULL) AS all_cleared,
           coalesce(sum(length), 0) AS all_chars,
           sum(prompt_tokens) AS all_prompt_tokens,
           sum(completion_tokens) AS all_completion_tokens,
           count(DISTINCT chat_id) AS chats
    FROM (
        SELECT m.chat_id, m.length, m.deleted_at, m.prompt_tokens, m.completion_tokens,
               m.chat_id = (SELECT chat_id FROM dialog) AS in_chat
        FROM messages m
        WHERE m.user_id = (SELECT user_id FROM dialog)
    ) mine
"""
)

# /export: every message of the dialog, cleared ones too, in turn order, read through a
# server-side cursor.
SELECT_DIALOG: Final = (
    "WITH"
    + _DIALOG
    + """
    SELECT m.role, m.content, m.created_at, m.deleted_at IS NOT NULL AS cleared
    FROM messages m
    WHERE m.user_id = (SELECT user_id FROM dialog) AND m.chat_id = (SELECT chat_id FROM dialog)
    ORDER BY coalesce(m.reply_to_id, m.id), m.id
"""
)

# Retention, one batch per statement: at most %(limit)s of the oldest rows soft-deleted before
# the cutoff, found by an ordered range scan of the partial index messages_deleted_idx (it holds
# soft-deleted rows only, revision 005), then deleted by primary key. ``= ANY (ARRAY(...))``
# rather than ``IN (...)``: the ids are collected once and looked up in the key's index, where
# IN may be planned as a join that scans the whole table. A batch is a short transaction: no
# long lock, no burst of WAL, and the bot's statements run in between. SKIP LOCKED: two
# processes purging at once take different rows instead of waiting for each other.
PURGE_DELETED: Final = """
    DELETE FROM messages
    WHERE id = ANY (ARRAY(
        SELECT id FROM messages
        WHERE deleted_at < now() - make_interval(days => %(days)s::integer)
        ORDER BY deleted_at
        LIMIT %(limit)s::integer
        FOR UPDATE SKIP LOCKED
    ))
"""

# A chat's settings by its Telegram id: /model, /prompt and /temperature show them (a turn reads
# them within SELECT_TURN_START). No row: every setting is the default.
SELECT_CHAT_SETTINGS: Final = """
    SELECT s.model, s.system_prompt, s.temperature::numeric::float8 AS temperature
    FROM chats c JOIN chat_settings s ON s.chat_id = c.id
    WHERE c.telegram_chat_id = %(telegram_chat_id)s::bigint
"""

# One setting of a chat, the others kept (NULL: back to the default), registering the chat if
# no one has written in it yet. ``name`` picks the setting; the three values are bound typed,
# so no name or value is ever spliced into the SQL. Returns the settings as they now stand.
SET_CHAT_SETTING: Final = (
    "WITH"
    + _REGISTER_CHAT_CTES
    + """
    INSERT INTO chat_settings AS s (chat_id, model, system_prompt, temperature, updated_by)
    SELECT (SELECT id FROM chat_row),
           %(model)s::text, %(system_prompt)s::text, %(temperature)s::real, %(updated_by)s::bigint
    ON CONFLICT (chat_id) DO UPDATE SET
        model = CASE WHEN %(name)s::text = 'model' THEN EXCLUDED.model ELSE s.model END,
        system_prompt = CASE WHEN %(name)s::text = 'system_prompt' THEN EXCLUDED.system_prompt ELSE s.system_prompt END,
        temperature = CASE WHEN %(name)s::text = 'temperature' THEN EXCLUDED.temperature ELSE s.temperature END,
        updated_at = now(),
        updated_by = EXCLUDED.updated_by
    RETURNING s.model, s.system_prompt, s.temperature::numeric::float8 AS temperature
"""
)

# Rate-limit counters of windows that are over: the user's next message starts a new window
# anyway (ADD_QUESTION), so they hold nothing but space.
PURGE_RATE_LIMITS: Final = """
    DELETE FROM rate_limits WHERE window_start < now() - interval '1 minute'
"""


# -- functions ------------------------------------------------------------------------------


async def upsert_user_and_chat(
    conn: Connection, *, telegram_user_id: int, first_name: str | None, telegram_chat_id: int
) -> None:
    """Register a user (keeping ``first_name`` current) and a chat; writes nothing if both are known."""
    params = {"telegram_user_id": telegram_user_id, "first_name": first_name, "telegram_chat_id": telegram_chat_id}
    await conn.execute(REGISTER, params, prepare=True)


async def add_question(
    conn: Connection,
    *,
    telegram_user_id: int,
    first_name: str | None,
    telegram_chat_id: int,
    content: str,
    telegram_message_id: int | None = None,
    telegram_thread_id: int | None = None,
    rate_limit: int = 0,
    created_at: datetime | None = None,
    holder: str | None = None,
    lease_ttl_s: int = 0,
) -> AddedQuestion:
    """Store a user's message, registering user and chat, in one round trip and one transaction.

    With ``rate_limit`` > 0 it counts a hit for the user and sets the message aside when this
    minute's hits exceed the limit. ``created_at`` defaults to now. With ``holder``, the chat's
    lease is taken for it when free or held by it already, and bumped in any case
    (``services/leases.py``); a question set aside neither takes nor bumps it.
    """
    cur = conn.cursor(row_factory=class_row(AddedQuestion))
    await cur.execute(
        ADD_QUESTION,
        {
            "telegram_user_id": telegram_user_id,
            "first_name": first_name,
            "telegram_chat_id": telegram_chat_id,
            "content": content,
            "telegram_message_id": telegram_message_id,
            "telegram_thread_id": telegram_thread_id,
            "rate_limit": rate_limit,
            "created_at": created_at,
            "holder": holder,
            "lease_ttl_s": lease_ttl_s,
        },
        prepare=True,
    )
    added = await cur.fetchone()
    assert added is not None  # INSERT ... ON CONFLICT DO UPDATE returns the row either way
    return added


async def fetch_turn_start(conn: Connection, *, question_id: int, history_limit: int) -> TurnStart | None:
    """The history ending with the question and its stored answer, if any; None when the turn
    has nothing left to do (the question is cleared or failed, its answer delivered or refused)."""
    cur = conn.cursor(row_factory=class_row(_TurnRow))
    await cur.execute(SELECT_TURN_START, {"question_id": question_id, "limit": history_limit}, prepare=True)
    rows = await cur.fetchall()
    if not rows:
        return None
    answer: StoredAnswer | None = None
    if rows[0].is_answer:
        head = rows.pop(0)
        if head.settled:
            return None
        answer = StoredAnswer(id=head.id, content=head.content, sent_parts=head.sent_parts)
    question = next(r for r in rows if r.id == question_id)  # the newest live message in turn order
    settings = ChatSettings(question.model, question.system_prompt, question.temperature)
    history = [
        StoredMessage(r.id, r.role, r.content, r.length, r.created_at, r.finish_reason) for r in rows[:history_limit]
    ]
    return TurnStart(history=history[::-1], answer=answer, settings=settings)


async def add_answer(
    conn: Connection,
    *,
    question_id: int,
    content: str,
    finish_reason: FinishReason | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
) -> int | None:
    """Store the assistant's answer to a live question (``finish_reason``: cut short, and why;
    the tokens the endpoint reported); None if it has a live answer already or was cleared."""
    cur = conn.cursor(row_factory=scalar_row)
    params = {
        "question_id": question_id,
        "content": content,
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }
    await cur.execute(INSERT_ANSWER, params, prepare=True)
    answer_id: int | None = await cur.fetchone()
    return answer_id


async def record_sent_part(conn: Connection, *, answer_id: int, telegram_message_id: int, last: bool) -> None:
    """Record that Telegram accepted one more part of an answer; ``last`` marks it delivered."""
    params = {"answer_id": answer_id, "telegram_message_id": telegram_message_id, "last": last}
    await conn.execute(RECORD_SENT_PART, params, prepare=True)


async def set_failed(conn: Connection, *, message_id: int) -> None:
    """Mark a turn ended for good: a question with no answer, or an answer Telegram refused."""
    await conn.execute(SET_FAILED, {"message_id": message_id})


async def fetch_history(
    conn: Connection, *, telegram_user_id: int, telegram_chat_id: int, limit: int
) -> list[StoredMessage]:
    """The last ``limit`` live messages of (user, chat) in turn order, oldest first."""
    cur = conn.cursor(row_factory=args_row(StoredMessage))
    params = {"telegram_user_id": telegram_user_id, "telegram_chat_id": telegram_chat_id, "limit": limit}
    await cur.execute(SELECT_HISTORY, params, prepare=True)
    return (await cur.fetchall())[::-1]


async def soft_delete_messages(
    conn: Connection, *, telegram_user_id: int, telegram_chat_id: int, before: datetime | None = None
) -> int:
    """Mark every live message of (user, chat) created up to ``before`` (default: now) deleted;
    how many were."""
    cur = await conn.execute(
        SOFT_DELETE_MESSAGES,
        {"telegram_user_id": telegram_user_id, "telegram_chat_id": telegram_chat_id, "before": before},
        prepare=True,
    )
    return cur.rowcount


async def write_back_answer(
    conn: Connection,
    *,
    telegram_chat_id: int,
    telegram_message_id: int,
    content: str,
    created_at: datetime,
    finish_reason: FinishReason | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
) -> None:
    """Store a spooled answer to the question Telegram knows as (chat, message id), unless stored."""
    params = {
        "telegram_chat_id": telegram_chat_id,
        "telegram_message_id": telegram_message_id,
        "content": content,
        "created_at": created_at,
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }
    await conn.execute(WRITE_BACK_ANSWER, params)


async def write_back_sent_part(
    conn: Connection, *, telegram_chat_id: int, telegram_message_id: int, sent_message_id: int, last: bool, at: datetime
) -> None:
    """Record a spooled delivery of one part of the answer to (chat, message id), unless recorded."""
    params = {
        "telegram_chat_id": telegram_chat_id,
        "telegram_message_id": telegram_message_id,
        "sent_message_id": sent_message_id,
        "last": last,
        "at": at,
    }
    await conn.execute(WRITE_BACK_SENT_PART, params)


async def write_back_failure(
    conn: Connection, *, telegram_chat_id: int, telegram_message_id: int, answer: bool, at: datetime
) -> None:
    """Mark the question (chat, message id), or its answer, failed, unless marked."""
    params = {
        "telegram_chat_id": telegram_chat_id,
        "telegram_message_id": telegram_message_id,
        "answer": answer,
        "at": at,
    }
    await conn.execute(WRITE_BACK_FAILURE, params)


async def count_messages(conn: Connection, *, telegram_user_id: int, telegram_chat_id: int) -> MessageCounts:
    """How many messages (user, chat) has, live and soft-deleted."""
    cur = conn.cursor(row_factory=class_row(MessageCounts))
    await cur.execute(COUNT_MESSAGES, {"telegram_user_id": telegram_user_id, "telegram_chat_id": telegram_chat_id})
    counts = await cur.fetchone()
    assert counts is not None  # an aggregate always returns a row
    return counts


def _dialog(telegram_user_id: int, telegram_chat_id: int, **params: object) -> dict[str, object]:
    return {"telegram_user_id": telegram_user_id, "telegram_chat_id": telegram_chat_id, **params}


async def retry_last_turn(conn: Connection, *, telegram_user_id: int, telegram_chat_id: int) -> RetriedQuestion | None:
    """Set aside the answer to the dialog's last question so it is asked again; that question,
    or None when the dialog has no live question."""
    cur = conn.cursor(row_factory=class_row(RetriedQuestion))
    await cur.execute(RETRY_LAST_TURN, _dialog(telegram_user_id, telegram_chat_id))
    return await cur.fetchone()


async def undo_last_turn(conn: Connection, *, telegram_user_id: int, telegram_chat_id: int) -> Undone:
    """Bring back the last /clear if nothing was said since, else set aside the last turn."""
    cur = conn.cursor(row_factory=class_row(Undone))
    await cur.execute(UNDO_LAST_TURN, _dialog(telegram_user_id, telegram_chat_id))
    undone = await cur.fetchone()
    assert undone is not None  # a SELECT without FROM returns one row
    return undone


async def edit_question(
    conn: Connection, *, telegram_user_id: int, telegram_chat_id: int, telegram_message_id: int, content: str
) -> EditedQuestion | None:
    """Give a stored question its edited text; None when the message is not a stored question
    of this user or its text did not change."""
    cur = conn.cursor(row_factory=class_row(EditedQuestion))
    params = _dialog(telegram_user_id, telegram_chat_id, telegram_message_id=telegram_message_id, content=content)
    await cur.execute(EDIT_QUESTION, params)
    return await cur.fetchone()


async def search_messages(
    conn: Connection,
    *,
    telegram_user_id: int,
    telegram_chat_id: int,
    query: str,
    everything: bool,
    limit: int,
    options: str,
) -> list[SearchHit]:
    """The dialog's messages (``everything``: cleared ones too) that match ``query``, best first,
    with a snippet built by ts_headline with ``options``."""
    cur = conn.cursor(row_factory=class_row(SearchHit))
    params = _dialog(
        telegram_user_id, telegram_chat_id, query=query, everything=everything, limit=limit, options=options
    )
    await cur.execute(SEARCH_MESSAGES, params, prepare=True)
    return await cur.fetchall()


async def fetch_stats(conn: Connection, *, telegram_user_id: int, telegram_chat_id: int) -> DialogStats:
    """How much the user has said and read, in this chat and in all."""
    cur = conn.cursor(row_factory=class_row(DialogStats))
    await cur.execute(SELECT_STATS, _dialog(telegram_user_id, telegram_chat_id))
    stats = await cur.fetchone()
    assert stats is not None  # an aggregate always returns a row
    return stats


async def dialog_messages(
    conn: Connection, *, telegram_user_id: int, telegram_chat_id: int, batch: int = 1000
) -> AsyncIterator[ExportedMessage]:
    """Every message of the dialog in turn order, ``batch`` rows at a time from a server-side
    cursor, so a long history is never held whole (the caller consumes it on ``conn``)."""
    async with conn.transaction():
        cur = conn.cursor("dialog_export", row_factory=class_row(ExportedMessage))
        cur.itersize = batch
        async with cur:
            await cur.execute(SELECT_DIALOG, _dialog(telegram_user_id, telegram_chat_id))
            async for message in cur:
                yield message


async def fetch_unfinished_turns(conn: Connection, *, max_age_s: int) -> list[UnfinishedTurn]:
    """Turns younger than ``max_age_s`` still to answer or deliver, oldest first."""
    cur = conn.cursor(row_factory=class_row(UnfinishedTurn))
    await cur.execute(SELECT_UNFINISHED_TURNS, {"max_age_s": max_age_s})
    return await cur.fetchall()


async def purge_deleted_messages(conn: Connection, *, days: int, limit: int) -> int:
    """Hard-delete at most ``limit`` of the messages soft-deleted more than ``days`` days ago,
    oldest first; how many were."""
    cur = await conn.execute(PURGE_DELETED, {"days": days, "limit": limit})
    return cur.rowcount


async def purge_rate_limits(conn: Connection) -> int:
    """Delete the rate-limit counters of past windows; how many."""
    cur = await conn.execute(PURGE_RATE_LIMITS)
    return cur.rowcount


async def get_chat_settings(conn: Connection, *, telegram_chat_id: int) -> ChatSettings:
    """The chat's settings; every one None (the default) when it has chosen none."""
    cur = conn.cursor(row_factory=class_row(ChatSettings))
    await cur.execute(SELECT_CHAT_SETTINGS, {"telegram_chat_id": telegram_chat_id})
    return await cur.fetchone() or DEFAULT_SETTINGS


async def set_chat_setting(
    conn: Connection,
    *,
    telegram_chat_id: int,
    name: SettingName,
    value: str | float | None,
    telegram_user_id: int,
) -> ChatSettings:
    """Set one setting of the chat (None: back to the default), keeping the others; the
    settings as they now stand."""
    params: dict[str, object] = {
        "telegram_chat_id": telegram_chat_id,
        "name": name,
        "model": None,
        "system_prompt": None,
        "temperature": None,
        "updated_by": telegram_user_id,
    }
    params[name] = value
    cur = conn.cursor(row_factory=class_row(ChatSettings))
    await cur.execute(SET_CHAT_SETTING, params)
    settings = await cur.fetchone()
    assert settings is not None  # INSERT ... ON CONFLICT DO UPDATE returns the row either way
    return settings


async def fetch_schema_version(conn: Connection) -> str | None:
    """The Alembic revision the database is at, or None if it was never migrated."""
    try:
        cur = conn.cursor(row_factory=scalar_row)
        await cur.execute("SELECT version_num FROM alembic_version")
        version: str | None = await cur.fetchone()
        return version
    except psycopg.errors.UndefinedTable:
        return None

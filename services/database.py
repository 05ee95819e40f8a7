"""Data access: a catalogue of parameterised SQL over a psycopg async connection pool.

Every function takes the connection first and binds its values server-side; none ever formats
a value into SQL. Connections are in autocommit mode: each statement is its own transaction,
so a write costs one round trip and one commit, and nothing holds a transaction open. Users
and chats are addressed by their Telegram ids; internal ids stay inside the database.
Parameters are cast to their column types: whatever width psycopg picks for a Python int, the
comparison is bigint = bigint and the unique indexes apply.

History is read in *turn order*: each question at its own id, its answer right after it
(``coalesce(reply_to_id, id)``), so a question stored while an earlier one was still being
answered never comes between that question and its answer.

The catalogue runs by topic, each statement directly above the function that runs it (and
named after it), the fragments statements share above the first that uses them: the pool and
running a statement; users and chats; a question and its admission; a turn's context;
summaries; answers and their delivery; the spool's write-back; history the user controls;
memories; chat settings; recovery; retention; the schema version.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Concatenate, Final, Literal, NamedTuple, ParamSpec, TypeAlias, TypeVar
from weakref import WeakKeyDictionary

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import class_row, dict_row, scalar_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from services import failures
from services.failures import Failure
from services.llm.tokens import estimate_tokens, image_tokens
from services.ops import metrics
from services.records import (
    DEFAULT_SETTINGS,
    EMPTY_CONTEXT,
    Answer,
    Attachment,
    ChatSettings,
    ContextMessage,
    DialogContext,
    FinishReason,
    Role,
    SettingName,
    Summary,
    TurnStart,
)

logger = logging.getLogger(__name__)

Connection: TypeAlias = AsyncConnection[Any]
T = TypeVar("T")
R = TypeVar("R")  # a typed row
P = ParamSpec("P")


# -- the pool and running a statement ---------------------------------------------------------


class Pool(AsyncConnectionPool[Connection]):
    """The pool of ``DATABASE_URL``, and where a connection that needs a whole session opens:
    ``session_url`` (``DATABASE_DIRECT_URL``), the server itself when the pool's URL is a
    transaction pooler such as PgBouncer in transaction mode, which hands each transaction to
    any of its server connections (see ``connect_session``)."""

    def __init__(self, url: str, *, session_url: str, connect_options: dict[str, Any], **options: Any) -> None:
        super().__init__(url, kwargs=connect_options, **options)
        self.session_url = session_url
        self.connect_options = connect_options  # psycopg's ``connect`` arguments of every connection


async def init_db(
    url: str,
    *,
    size: int = 10,
    timeout_s: float = 5.0,
    session_url: str | None = None,
    prepared_statements: bool = True,
) -> Pool:
    """Open a pool of ``size`` autocommit connections; raise ``PoolTimeout`` if none connects.

    Connections are not checked as they are handed out (that would cost every statement a round
    trip, and psycopg-pool's back-off between failed checks stalls a turn for seconds after a
    server restart): ``run`` finds a broken one by its error, drops the pool's stale ones at once
    and runs the statement again. ``timeout_s`` bounds the wait for a connection.

    ``prepared_statements=False`` (``DB_PREPARED_STATEMENTS=false``) opens the connections with
    ``prepare_threshold=None``: psycopg then prepares nothing, not even the statements run with
    ``prepare=True``, since a transaction pooler would send a statement prepared on one server
    connection to another. ``session_url`` (default ``url``): see ``Pool``.
    """
    connect_options: dict[str, Any] = {"autocommit": True}
    if not prepared_statements:
        connect_options["prepare_threshold"] = None
    pool = Pool(
        url,
        session_url=session_url or url,
        connect_options=connect_options,
        min_size=size,
        max_size=size,
        open=False,
        timeout=timeout_s,
        # Give up background reconnection quickly: its backoff doubles up to this bound, which
        # would delay recovery long after the server is back. A waiting caller regrows the pool
        # at once instead.
        reconnect_timeout=timeout_s,
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


async def connect(url: str, **options: Any) -> Connection:
    """A connection of its own on ``url``, outside any pool, in autocommit mode: where there is
    no pool yet (a command-line tool's first attempt), and under ``connect_session``. ``options``:
    more of psycopg's ``connect`` arguments (``connect_timeout``)."""
    return await psycopg.AsyncConnection.connect(url, **{"autocommit": True, **options})


async def connect_session(pool: Pool, *, pooled_url: bool = False, **options: Any) -> Connection:
    """A connection of its own, outside the pool, opened as the pool's are (autocommit, preparing
    statements as they do): on ``pool.session_url`` for what needs a whole session to itself (a
    session-level advisory lock, LISTEN, a session setting); with ``pooled_url``, on the pool's
    own URL, to ask whether a new connection opens where the pool's do (``server_answers``, the
    health check). ``options``: more of psycopg's ``connect`` arguments (``connect_timeout``)."""
    url = _conninfo(pool) if pooled_url else pool.session_url
    return await connect(url, **{**pool.connect_options, **options})


def _conninfo(pool: Pool) -> str:
    assert isinstance(pool.conninfo, str)  # init_db passes a URL
    return pool.conninfo


async def server_answers(pool: Pool) -> bool:
    """Whether the database accepts a new connection now, bypassing the pool."""
    return await _new_connection_error(pool) is None


async def _new_connection_error(pool: Pool) -> str | None:
    """Why a new connection, bypassing the pool, does not open now (None: it opens)."""
    try:
        # As long as the pool's own wait: a loaded server slow to accept is not an outage; one that
        # refuses (it is down) answers at once.
        conn = await connect_session(pool, pooled_url=True, connect_timeout=max(1, int(pool.timeout)))
    except psycopg.OperationalError as error:
        return type(error).__name__
    await conn.close()
    return None


async def _waiting_pool_probe(pool: Pool) -> bool:
    """``server_answers`` for a pool that keeps a caller waiting, logged once per probe (not per
    waiter)."""
    error = await _new_connection_error(pool)
    if error is None:
        logger.info("every database connection is busy; still waiting (%s)", pool.get_stats())
        return True
    logger.warning("no pooled connection and a new one fails (%s): database unavailable", error)
    return False


# Shared per pool: when a saturated pool keeps many callers waiting, they must not each open a
# connection to ask (that feeds the saturation), and a broken connection found by many at once
# drops the stale ones once. A probe's answer is shared for a second.
_probes: WeakKeyDictionary[Pool, tuple[float, asyncio.Task[bool]]] = WeakKeyDictionary()
_checks: WeakKeyDictionary[Pool, asyncio.Task[None]] = WeakKeyDictionary()
PROBE_SHARED_S = 1.0
PROBE_AFTER_S = 1.0  # a caller kept waiting this long for a connection asks the server directly


async def _server_answers_shared(pool: Pool) -> bool:
    now = asyncio.get_running_loop().time()
    started, probe = _probes.get(pool, (0.0, None))
    if probe is None or (probe.done() and now - started > PROBE_SHARED_S):
        probe = asyncio.ensure_future(_waiting_pool_probe(pool))
        _probes[pool] = (now, probe)
    return await asyncio.shield(probe)


async def _drop_stale(pool: Pool) -> None:
    """Check the pool's idle connections now and replace the broken ones (after a server restart
    they all are), once for every caller that found one."""
    check = _checks.get(pool)
    if check is None or check.done():
        check = _checks[pool] = asyncio.ensure_future(pool.check())
    await asyncio.shield(check)


async def _connection(pool: Pool) -> Connection:
    """A pooled connection, waiting as long as the server answers (a busy pool is not an outage);
    ``PoolTimeout`` as soon as a caller has waited ``PROBE_AFTER_S`` and a new connection fails."""
    if pool.get_stats()["pool_available"]:
        # One is idle, so getconn hands it over without waiting: no task and no timer to watch
        # the wait (they cost the loop a few iterations, on every statement of every turn).
        return await pool.getconn()
    while True:
        getting = asyncio.ensure_future(pool.getconn())  # its place in the pool's queue is kept
        try:
            done, _ = await asyncio.wait({getting}, timeout=PROBE_AFTER_S)
            if not done and not await _server_answers_shared(pool):
                raise PoolTimeout("no pooled connection, and the server refuses a new one")
            try:
                return await getting
            except PoolTimeout:  # the pool's whole timeout: busy, or out?
                if not await _server_answers_shared(pool):
                    raise
        except BaseException:
            if not getting.done():
                getting.cancel()  # the pool takes back a connection it hands to a cancelled wait
            elif not getting.cancelled() and getting.exception() is None:
                await pool.putconn(getting.result())  # handed over while the probe was asked
            raise


async def run(
    pool: Pool, work: Callable[Concatenate[Connection, P], Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    """``work(conn, ...)`` on a pooled connection.

    A full pool means *wait*: ``PoolTimeout`` reaches the caller only when a new connection fails
    too (an outage). A connection that breaks under ``work`` (``failures.Failure.BROKEN``: the
    server restarted, or ended the backend) is replaced and ``work`` runs again on a fresh one,
    for as long as the pool's timeout. A statement whose reply was lost with its connection may
    have committed: the writes are keyed (a question by its Telegram id, an answer by its
    question, a part by its message id), so running one again finds it done.
    """
    deadline = asyncio.get_running_loop().time() + pool.timeout
    while True:
        async with metrics.stage("database"):  # the wait for a connection counts
            conn = await _connection(pool)
            try:
                return await work(conn, *args, **kwargs)
            except psycopg.Error as error:
                failure = failures.classify(error)
                metrics.DATABASE_FAILURES.labels(failure.value).inc()
                if failure is not Failure.BROKEN or asyncio.get_running_loop().time() > deadline:
                    raise
                logger.info(
                    "database connection broke under %s (%s): running it again", _name(work), failures.reason(error)
                )
            finally:
                await pool.putconn(conn)  # a broken one is discarded, and replaced
        await _drop_stale(pool)


def _name(work: Callable[..., object]) -> str:
    return getattr(work, "__name__", type(work).__name__)


async def _one_row(
    conn: Connection, row: type[R], statement: str, params: Mapping[str, object], *, prepare: bool | None = None
) -> R:
    """The one row ``statement`` always returns (an aggregate, a SELECT without FROM, the
    RETURNING of an upsert), as a ``row`` (``class_row``); ``prepare`` as psycopg's."""
    cur = conn.cursor(row_factory=class_row(row))
    await cur.execute(statement, params, prepare=prepare)
    found = await cur.fetchone()
    assert found is not None, "a statement that always returns a row returned none"
    return found


@asynccontextmanager
async def advisory_lock(pool: Pool, name: str) -> AsyncIterator[bool]:
    """Try to take the session-level advisory lock ``name`` on a session of its own
    (``connect_session``), held until the block ends (or the process dies); yields whether it
    was taken."""
    async with await connect_session(pool) as conn:
        cur = conn.cursor(row_factory=scalar_row)
        await cur.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (name,))
        yield bool(await cur.fetchone())


# -- users and chats --------------------------------------------------------------------------

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

UPSERT_USER_AND_CHAT: Final = (
    "WITH" + _REGISTER_CTES + "SELECT (SELECT id FROM user_row) AS user_id, (SELECT id FROM chat_row) AS chat_id"
)


async def upsert_user_and_chat(
    conn: Connection, *, telegram_user_id: int, first_name: str | None, telegram_chat_id: int
) -> None:
    """Register a user (keeping ``first_name`` current) and a chat; writes nothing if both are known."""
    params = {"telegram_user_id": telegram_user_id, "first_name": first_name, "telegram_chat_id": telegram_chat_id}
    await conn.execute(UPSERT_USER_AND_CHAT, params, prepare=True)


def _dialog(telegram_user_id: int, telegram_chat_id: int, **params: object) -> dict[str, object]:
    """The parameters of a statement about a dialog (one user's messages in one chat), named by
    Telegram's ids, with ``params``."""
    return {"telegram_user_id": telegram_user_id, "telegram_chat_id": telegram_chat_id, **params}


# -- a question and its admission -------------------------------------------------------------
# One admission for every way a turn can call the LLM: the statement that stores a question
# (ADD_QUESTION) or re-opens one (/retry, an edit of the last question) decides it itself, in
# the same transaction as the change it allows, so there is no check to skip and no window
# between a check and the change. /clear and /undo count against the rate limit the same way.
# A turn recovered after a restart or handed over by a chat's lease runs a question admitted
# when it was stored (or re-opened), and is not charged again; a summary is part of the turn
# that made it (its tokens are counted, ADD_SUMMARY).
#
# ``rate``: a hit for the user in a fixed one-minute window, when %(rate_limit)s > 0 and the
# statement's ``counted`` condition holds (an edit counts only when it edits a stored question).
# ``over_budget``: the user's tokens today (a UTC date, whatever the server's TimeZone), found
# by token_usage's primary key, have reached %(token_budget)s (0: no budget). ``admission``:
# both verdicts in one row (``refused``: either); ``verdicts`` is MATERIALIZED, so each is
# decided once (inlined, ``refused`` would probe them again).
def _admission(counted: str = "true") -> str:
    return f"""
    rate AS (
        INSERT INTO rate_limits AS r (telegram_user_id, window_start, hits)
        SELECT %(telegram_user_id)s::bigint, date_trunc('minute', now()), 1
        WHERE %(rate_limit)s::integer > 0 AND {counted}
        ON CONFLICT (telegram_user_id) DO UPDATE
        SET hits = CASE WHEN r.window_start = EXCLUDED.window_start THEN r.hits + 1 ELSE 1 END,
            window_start = EXCLUDED.window_start
        RETURNING hits
    ),
    over_budget AS (
        SELECT FROM token_usage
        WHERE %(token_budget)s::bigint > 0
          AND user_id = (SELECT id FROM users WHERE telegram_user_id = %(telegram_user_id)s::bigint)
          AND day = (now() AT TIME ZONE 'UTC')::date
          AND tokens >= %(token_budget)s::bigint
    ),
    verdicts AS MATERIALIZED (
        SELECT coalesce((SELECT hits FROM rate), 0) > %(rate_limit)s::integer AS rate_limited,
               EXISTS (SELECT FROM over_budget) AS over_budget
    ),
    admission AS (
        SELECT rate_limited, over_budget, rate_limited OR over_budget AS refused FROM verdicts
    )"""


@dataclass(frozen=True, slots=True)
class AddedQuestion:
    """A user message as stored: its id; ``new`` is False when this Telegram message was stored
    before (a redelivered update, or a retry of a statement whose reply was lost); ``set_aside``
    when it was stored already soft-deleted (over the rate limit, or cleared since);
    ``over_budget`` when it was stored just now, set aside because its user had spent the daily
    token budget."""

    id: int
    new: bool
    set_aside: bool
    over_budget: bool = False
    leased: bool | None = None  # this process holds the chat's lease (None: no lease asked for)
    lease_version: int | None = None
    start: TurnStart | None = None  # its turn's start, when read with it (``read``)

    @property
    def rate_limited(self) -> bool:
        """Refused now for the rate limit (stored set aside; a message stored before was told once)."""
        return self.new and self.set_aside


# A question, stored in one statement: register, decide its admission and store the message,
# set aside (soft-deleted) at once when it is refused, so no crash can leave a refused question
# awaiting an answer. A Telegram message stored before is not stored again; its row is returned
# with new = false (xmax is 0 only on a freshly inserted row), so the caller can still see it
# answered. ``created_at`` is given only when a question spooled during an outage is written
# back (with no limits: it was answered meanwhile).
ADD_QUESTION: Final = (
    "WITH"
    + _REGISTER_CTES
    + ","
    + _admission()
    + """,
    lease AS (
        INSERT INTO chat_leases AS l (chat_id, holder, expires_at, done_through)
        SELECT (SELECT id FROM chat_row), %(holder)s::text, now() + make_interval(secs => %(lease_ttl_s)s::integer),
               coalesce((SELECT coalesce(reply_to_id, id) FROM messages
                         WHERE chat_id = (SELECT id FROM chat_row) AND deleted_at IS NULL
                         ORDER BY coalesce(reply_to_id, id) DESC, id DESC LIMIT 1), 0)
        WHERE %(holder)s::text IS NOT NULL AND NOT (SELECT refused FROM admission)
        ON CONFLICT (chat_id) DO UPDATE
        SET holder = CASE WHEN l.holder IS NULL OR l.holder = EXCLUDED.holder THEN EXCLUDED.holder ELSE l.holder END,
            expires_at = CASE WHEN l.holder IS NULL OR l.holder = EXCLUDED.holder
                              THEN EXCLUDED.expires_at ELSE l.expires_at END,
            version = l.version + 1
        RETURNING l.holder = %(holder)s::text AS leased, l.version
    )
    INSERT INTO messages AS m
        (user_id, chat_id, role, content, tokens, quoted, attachments, telegram_message_id, telegram_thread_id,
         created_at, deleted_at, deleted_reason)
    SELECT (SELECT id FROM user_row), (SELECT id FROM chat_row), 'user', %(content)s::text, %(tokens)s::integer,
           %(quoted)s::text, %(attachments)s::jsonb, %(telegram_message_id)s::bigint, %(telegram_thread_id)s::bigint,
           coalesce(%(created_at)s::timestamptz, now()),
           CASE WHEN (SELECT refused FROM admission) THEN now() END,
           CASE WHEN (SELECT refused FROM admission) THEN 'rate_limit' END
    ON CONFLICT ON CONSTRAINT messages_telegram_message_key
        DO UPDATE SET telegram_message_id = m.telegram_message_id
    RETURNING id, xmax = 0 AS new, deleted_at IS NOT NULL AS set_aside,
              xmax = 0 AND (SELECT over_budget FROM admission) AS over_budget,
              (SELECT leased FROM lease) AS leased, (SELECT version FROM lease) AS lease_version
"""
)


async def add_question(
    conn: Connection,
    *,
    telegram_user_id: int,
    first_name: str | None,
    telegram_chat_id: int,
    content: str,
    telegram_message_id: int | None = None,
    telegram_thread_id: int | None = None,
    quoted: str | None = None,
    attachments: Sequence[Attachment] = (),
    rate_limit: int = 0,
    token_budget: int = 0,
    created_at: datetime | None = None,
    holder: str | None = None,
    lease_ttl_s: int = 0,
    read: StartRead | None = None,
) -> AddedQuestion:
    """Store a user's message, registering user and chat, in one round trip and one transaction;
    with ``read``, its turn's start comes back in that round trip too (``FETCH_FRESH_TURN_START``).

    With ``rate_limit`` > 0 it counts a hit for the user and sets the message aside when this
    minute's hits exceed the limit; with ``token_budget`` > 0, also when the user's tokens
    today (UTC) have reached it. ``quoted``: the text it replies to. ``created_at`` defaults to
    now. With ``holder``, the chat's lease is taken for it when free or held by it already, and
    bumped in any case (``services/cluster/leases.py``); a question set aside neither takes nor bumps it.
    ``attachments``: what it came with (its images count in its estimated tokens).
    """
    params: dict[str, object] = {
        "telegram_user_id": telegram_user_id,
        "first_name": first_name,
        "telegram_chat_id": telegram_chat_id,
        "content": content,
        "tokens": estimate_tokens(content) + sum(image_tokens(a.width, a.height) for a in attachments if a.is_image),
        "quoted": quoted,
        "attachments": Jsonb([a.stored() for a in attachments]) if attachments else None,
        "telegram_message_id": telegram_message_id,
        "telegram_thread_id": telegram_thread_id,
        "rate_limit": rate_limit,
        "token_budget": token_budget,
        "created_at": created_at,
        "holder": holder,
        "lease_ttl_s": lease_ttl_s,
    }
    if read is not None and telegram_message_id is not None:
        with_start = await _add_question_and_read_start(conn, params, read)
        if with_start is not None:
            return with_start
    # INSERT ... ON CONFLICT DO UPDATE returns the row either way
    return await _one_row(conn, AddedQuestion, ADD_QUESTION, params, prepare=True)


# The admission alone, for a question that costs an API call before it can be stored (a voice
# message is transcribed first): the hit is counted here, so its ADD_QUESTION counts none
# (rate_limit 0) and checks the budget only.
ADMIT: Final = (
    "WITH"
    + _admission()
    + """
    SELECT rate_limited, over_budget FROM admission
"""
)


@dataclass(frozen=True, slots=True)
class Admission:
    """The admission's verdicts: over the rate limit, over the daily token budget."""

    rate_limited: bool
    over_budget: bool


async def admit(conn: Connection, *, telegram_user_id: int, rate_limit: int, token_budget: int) -> Admission:
    """Count a hit for the user against ``rate_limit`` and check ``token_budget`` (0: none)."""
    params = {"telegram_user_id": telegram_user_id, "rate_limit": rate_limit, "token_budget": token_budget}
    return await _one_row(conn, Admission, ADMIT, params, prepare=True)


# -- a turn's context -------------------------------------------------------------------------


# A turn's context, read in one statement: the dialog's newest live summary (revision 009),
# then the live history after it, newest first in turn order, up to the question, with a
# running sum of the messages' estimated tokens. Rows past %(budget)s are not sent back (the
# newest is always kept), so a long dialog costs the wire only what the LLM can take;
# ``read`` counts what the index scan found (HISTORY_LIMIT + 2 at most: more than that means
# older history lies beyond the limit). A row from before revision 009 has no estimate and
# counts one token per character. The summary, the chat's settings, the text the question
# replies to and the user's memories ride on one row only (LIMIT 1 keeps the planner from
# flattening the lateral subqueries into sorting joins).
#
# Two shapes, spliced from constant fragments: a dialog is one user's turns in the chat
# (messages_turn_idx), or, for a group with GROUP_CONTEXT=shared, every user's turns in it
# (messages_chat_turn_idx), each user message with its author's first name.
_DIALOG_ROWS: Final = {
    False: "user_id = (SELECT user_id FROM q) AND chat_id = (SELECT chat_id FROM q)",
    True: "chat_id = (SELECT chat_id FROM q)",
}
_SUMMARY_OWNER: Final = {False: "user_id = (SELECT user_id FROM q)", True: "user_id IS NULL"}
_AUTHOR: Final = {False: "NULL::text", True: "coalesce((SELECT first_name FROM users WHERE id = r.user_id), '')"}

# The dialog's newest live summary before turn q.id: one probe of summaries_dialog_idx.
_SUMMARY: Final = {
    shared: f"""
    summary AS MATERIALIZED (
        SELECT through_id, covered, content, tokens FROM summaries
        WHERE chat_id = (SELECT chat_id FROM q) AND {_SUMMARY_OWNER[shared]} AND deleted_at IS NULL
          AND through_id < (SELECT id FROM q)
        ORDER BY through_id DESC
        LIMIT 1
    )"""
    for shared in (False, True)
}

MAX_MEMORIES: Final = 50  # a user's live memories: /remember refuses more, a turn reads no more
MAX_MEMORY_CHARS: Final = 500  # of one memory: the CHECK of memories.content (revision 014)

# The asking user's live memories (revision 014), oldest first: one range of memories_user_idx,
# at most MAX_MEMORIES (a constant of the statement, not a value), read only where the chat may
# see them: a private chat (a positive Telegram id, by the chat's primary key) always, a group
# when the user allowed it (their row, by its primary key); otherwise the index is not touched.
# In both shapes the asking user is the question's: a shared group's context carries only
# theirs. An uncorrelated subquery, so it runs once per read; the planner may take the few rows
# by a bitmap scan of the index and sort them (50 at most), the history's plan unchanged.
_MEMORIES: Final = f"""ARRAY(
               SELECT content FROM memories
               WHERE user_id = (SELECT user_id FROM q) AND deleted_at IS NULL
                 AND ((SELECT telegram_chat_id FROM chats WHERE id = (SELECT chat_id FROM q)) > 0
                      OR (SELECT memories_in_groups FROM users WHERE id = (SELECT user_id FROM q)))
               ORDER BY id
               LIMIT {MAX_MEMORIES:d})"""


# q is read only through scalar subqueries: joined, it would hide the index order of the
# history from the window and the final ORDER BY, and both would sort.
def _context_read(question: str, *, shared: bool) -> str:
    return f"""
    WITH q AS ({question}),{_SUMMARY[shared]},
    r AS (
        SELECT h.*, sum(h.tokens) OVER w AS running, row_number() OVER w AS n, count(*) OVER () AS read
        FROM (
            SELECT id, user_id, role, content, coalesce(tokens, length) AS tokens, finish_reason, attachments,
                   coalesce(reply_to_id, id) AS turn, reply_to_id, delivered_at, failed_at, sent_message_ids
            FROM messages
            WHERE {_DIALOG_ROWS[shared]} AND deleted_at IS NULL
              AND coalesce(reply_to_id, id) <= (SELECT id FROM q)
              AND coalesce(reply_to_id, id) > coalesce((SELECT through_id FROM summary), 0)
            ORDER BY coalesce(reply_to_id, id) DESC, id DESC
            LIMIT %(limit)s::integer + 2
        ) h
        WINDOW w AS (ORDER BY h.turn DESC, h.id DESC)
    )
    SELECT r.id, r.role, r.content, r.tokens, r.running, r.turn, r.finish_reason, {_AUTHOR[shared]} AS author,
           r.attachments, r.read,
           r.reply_to_id IS NOT NULL AND r.reply_to_id = (SELECT id FROM q) AS is_answer,
           r.delivered_at IS NOT NULL OR r.failed_at IS NOT NULL AS settled,
           coalesce(cardinality(r.sent_message_ids), 0) AS sent_parts,
           cs.model, cs.system_prompt, cs.temperature::numeric::float8 AS temperature,
           sm.through_id AS summary_through, sm.covered AS summary_covered, sm.content AS summary,
           sm.tokens AS summary_tokens, CASE WHEN r.n = 1 THEN (SELECT quoted FROM q) END AS quoted,
           CASE WHEN r.n = 1 THEN {_MEMORIES} END AS memories
    FROM r
    LEFT JOIN LATERAL (
        SELECT model, system_prompt, temperature FROM chat_settings
        WHERE chat_id = (SELECT chat_id FROM q) AND r.n = 1
        LIMIT 1
    ) cs ON true
    LEFT JOIN LATERAL (SELECT * FROM summary WHERE r.n = 1 LIMIT 1) sm ON true
    WHERE r.running <= %(budget)s::integer OR r.n = 1 OR r.id = (SELECT id FROM q)
    ORDER BY r.turn DESC, r.id DESC
"""


class _ReadHead(NamedTuple):
    """What the first row of a context read carries after its message's columns."""

    read: int
    is_answer: bool
    settled: bool
    sent_parts: int
    model: str | None
    system_prompt: str | None
    temperature: float | None
    summary_through: int | None
    summary_covered: int | None
    summary: str | None
    summary_tokens: int | None
    quoted: str | None  # the text the question replies to (a turn's read)
    memories: list[str]  # the asking user's, where the chat may see them (_MEMORIES)

    def summary_read(self) -> Summary | None:
        if self.summary is None or self.summary_through is None or self.summary_covered is None:
            return None
        return Summary(self.summary_through, self.summary_covered, self.summary, self.summary_tokens or 0)


# A context read's rows are plain tuples (the cheapest row psycopg builds): the message's columns
# first, in ContextMessage's order, then _ReadHead's, read from the first row only.
_MESSAGE_COLUMNS: Final = len(ContextMessage._fields)


def _dialog_context(rows: list[tuple[Any, ...]], history_limit: int, *, answered: bool = False) -> DialogContext:
    """A context read's rows as a DialogContext; ``answered``: the first row is the question's
    answer, not history (it still carries the summary and the read's count)."""
    if not rows:
        return EMPTY_CONTEXT
    head = _ReadHead._make(rows[0][_MESSAGE_COLUMNS:])
    history = [ContextMessage._make(row[:_MESSAGE_COLUMNS]) for row in rows[answered : answered + history_limit]]
    return DialogContext(history, head.summary_read(), head.read - answered, tuple(head.memories))


# What a turn needs when it starts: its context, and its answer when one was stored but not yet
# fully delivered (then it comes first). Nothing comes back for a question that is cleared or
# failed.
_TURN_QUESTION: Final = """
        SELECT id, user_id, chat_id, quoted FROM messages
        WHERE id = %(question_id)s::bigint AND role = 'user' AND deleted_at IS NULL AND failed_at IS NULL"""
FETCH_TURN_START: Final = _context_read(_TURN_QUESTION, shared=False)
FETCH_TURN_START_SHARED: Final = _context_read(_TURN_QUESTION, shared=True)


async def fetch_turn_start(
    conn: Connection, *, question_id: int, history_limit: int, budget: int, shared: bool = False
) -> TurnStart | None:
    """The context up to the question (at most ``history_limit`` messages, and no more past
    ``budget`` estimated tokens than the newest) and its stored answer, if any; None when the
    turn has nothing left to do (the question is cleared or failed, its answer delivered or
    refused). ``shared``: the group's history across its users."""
    statement = FETCH_TURN_START_SHARED if shared else FETCH_TURN_START
    cur = await conn.execute(
        statement, {"question_id": question_id, "limit": history_limit, "budget": budget}, prepare=True
    )
    return _turn_start(await cur.fetchall(), history_limit)


def _turn_start(rows: list[tuple[Any, ...]], history_limit: int) -> TurnStart | None:
    """A turn start read's rows as a ``TurnStart``; None when they hold nothing left to do."""
    if not rows:
        return None
    head = _ReadHead._make(rows[0][_MESSAGE_COLUMNS:])
    settings = ChatSettings(head.model, head.system_prompt, head.temperature)
    answer: Answer | None = None
    if head.is_answer:
        if head.settled:
            return None
        stored = ContextMessage._make(rows[0][:_MESSAGE_COLUMNS])
        answer = Answer(id=stored.id, content=stored.content, sent_parts=head.sent_parts)
    dialog = _dialog_context(rows, history_limit, answered=answer is not None)
    return TurnStart(dialog=dialog, answer=answer, settings=settings, quoted=head.quoted, memories=dialog.memories)


@dataclass(frozen=True, slots=True)
class StartRead:
    """What a turn's start reads: at most ``history_limit`` messages and about ``budget``
    estimated tokens of history; ``shared``: the group's history across its users."""

    history_limit: int
    budget: int
    shared: bool = False


# A fresh question's turn start, read in the same round trip as ADD_QUESTION (a pipeline) where
# the chat is idle, so its turn reads nothing more (ADR-04). The question is found by Telegram's
# key, its id being unknown when the read is sent; the read sees it, committed by the statement
# before. In a pipeline the two share one implicit transaction: a read the server refuses would
# take the question with it, so then the question is stored alone and its turn reads its start
# as any other turn does.
_FRESH_QUESTION: Final = """
        SELECT id, user_id, chat_id, quoted FROM messages
        WHERE chat_id = (SELECT id FROM chats WHERE telegram_chat_id = %(telegram_chat_id)s::bigint)
          AND telegram_message_id = %(telegram_message_id)s::bigint
          AND role = 'user' AND deleted_at IS NULL AND failed_at IS NULL"""
FETCH_FRESH_TURN_START: Final = _context_read(_FRESH_QUESTION, shared=False)
FETCH_FRESH_TURN_START_SHARED: Final = _context_read(_FRESH_QUESTION, shared=True)


async def _add_question_and_read_start(
    conn: Connection, params: dict[str, object], read: StartRead
) -> AddedQuestion | None:
    """``ADD_QUESTION`` and ``FETCH_FRESH_TURN_START`` in one round trip; None when the server
    refused the pair for a reason a fresh connection would not mend (the caller stores the
    question alone). A broken connection or an outage is raised, for ``run`` to handle."""
    added = conn.cursor(row_factory=class_row(AddedQuestion))
    statement = FETCH_FRESH_TURN_START_SHARED if read.shared else FETCH_FRESH_TURN_START
    try:
        async with conn.pipeline():
            await added.execute(ADD_QUESTION, params, prepare=True)
            start = await conn.execute(
                statement, {**params, "limit": read.history_limit, "budget": read.budget}, prepare=True
            )
    except psycopg.Error as error:
        if failures.classify(error) in (Failure.OUTAGE, Failure.BROKEN):
            raise
        logger.warning(
            "question and its turn's start not stored together (%s): the question alone", failures.reason(error)
        )
        return None
    stored = await added.fetchone()
    assert stored is not None  # INSERT ... ON CONFLICT DO UPDATE returns the row either way
    if not stored.new or stored.set_aside:  # told before, or refused: no turn of its own to start
        return stored
    return replace(stored, start=_turn_start(await start.fetchall(), read.history_limit))


# /context: what the dialog's next turn would read (its question not yet asked).
_NEXT_QUESTION: Final = """
        SELECT 9223372036854775807::bigint AS id,
               (SELECT id FROM users WHERE telegram_user_id = %(telegram_user_id)s::bigint) AS user_id,
               (SELECT id FROM chats WHERE telegram_chat_id = %(telegram_chat_id)s::bigint) AS chat_id,
               NULL::text AS quoted"""
FETCH_NEXT_CONTEXT: Final = _context_read(_NEXT_QUESTION, shared=False)
FETCH_NEXT_CONTEXT_SHARED: Final = _context_read(_NEXT_QUESTION, shared=True)


async def fetch_next_context(
    conn: Connection, *, telegram_user_id: int, telegram_chat_id: int, history_limit: int, budget: int, shared: bool
) -> DialogContext:
    """What the dialog's next turn would read (as ``fetch_turn_start``, before its question)."""
    statement = FETCH_NEXT_CONTEXT_SHARED if shared else FETCH_NEXT_CONTEXT
    params = _dialog(telegram_user_id, telegram_chat_id, limit=history_limit, budget=budget)
    cur = await conn.execute(statement, params, prepare=True)
    return _dialog_context(await cur.fetchall(), history_limit)


# -- summaries --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SummarySource:
    """What a new summary is written from: the dialog's previous summary, if any, and the live
    messages after it, oldest first (``turn`` and ``author`` as in ContextMessage)."""

    summary: str | None
    covered: int
    messages: list[ContextMessage]


# A rolling summary's source: the live turns after the dialog's summary (if any) and before
# turn %(before)s, oldest first, with a running sum of their estimated tokens; rows past
# %(budget)s are not sent back (the first always is). The previous summary rides on the first
# row, to be folded into the new one.
def _summary_source(*, shared: bool) -> str:
    return f"""
    WITH q AS (SELECT user_id, chat_id, %(before)s::bigint AS id FROM messages WHERE id = %(question_id)s::bigint),
    {_SUMMARY[shared]},
    r AS (
        SELECT h.*, sum(h.tokens) OVER w AS running, row_number() OVER w AS n
        FROM (
            SELECT id, user_id, role, content, coalesce(tokens, length) AS tokens, finish_reason,
                   coalesce(reply_to_id, id) AS turn
            FROM messages
            WHERE {_DIALOG_ROWS[shared]} AND deleted_at IS NULL
              AND coalesce(reply_to_id, id) < (SELECT id FROM q)
              AND coalesce(reply_to_id, id) > coalesce((SELECT through_id FROM summary), 0)
            ORDER BY coalesce(reply_to_id, id), id
            LIMIT %(limit)s::integer
        ) h
        WINDOW w AS (ORDER BY h.turn, h.id)
    )
    SELECT r.role, r.content, r.finish_reason, r.turn, {_AUTHOR[shared]} AS author,
           sm.content AS summary, sm.covered AS summary_covered
    FROM r LEFT JOIN LATERAL (SELECT * FROM summary WHERE r.n = 1 LIMIT 1) sm ON true
    WHERE r.running <= %(budget)s::integer OR r.n = 1
    ORDER BY r.turn, r.id
"""


FETCH_SUMMARY_SOURCE: Final = _summary_source(shared=False)
FETCH_SUMMARY_SOURCE_SHARED: Final = _summary_source(shared=True)


async def fetch_summary_source(
    conn: Connection, *, question_id: int, before: int, budget: int, limit: int, shared: bool
) -> SummarySource:
    """The live messages of the question's dialog after its summary and before turn ``before``,
    oldest first, up to ``limit`` and (past the first) ``budget`` estimated tokens."""
    cur = conn.cursor(row_factory=dict_row)
    statement = FETCH_SUMMARY_SOURCE_SHARED if shared else FETCH_SUMMARY_SOURCE
    params = {"question_id": question_id, "before": before, "budget": budget, "limit": limit}
    await cur.execute(statement, params, prepare=True)
    rows = await cur.fetchall()
    head = rows[0] if rows else {}
    messages = [
        ContextMessage(0, r["role"], r["content"], 0, 0, r["turn"], r["finish_reason"], r["author"]) for r in rows
    ]
    return SummarySource(head.get("summary"), head.get("summary_covered") or 0, messages)


# Every LLM call's reported tokens go to (a user, a UTC day) in token_usage, budget or not
# (cheap, and right when a budget is turned on mid-day), from the RETURNING of the statement
# that stores what the call made: each statement names its ``spent`` rows (user_id,
# created_at, prompt_tokens, completion_tokens). An answer counts for its question's user on the
# day it was made, once (a write-back repeated after a crash, or an answer to a question
# answered already, counts nothing); so does one dropped because its question was cleared or
# undone meanwhile; a summary counts for the user whose turn made it.
_COUNT_TOKENS_CTE: Final = """
    counted AS (
        INSERT INTO token_usage AS t (user_id, day, tokens)
        SELECT user_id, (created_at AT TIME ZONE 'UTC')::date,
               coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)
        FROM spent
        WHERE prompt_tokens IS NOT NULL OR completion_tokens IS NOT NULL
        ON CONFLICT (user_id, day) DO UPDATE SET tokens = t.tokens + EXCLUDED.tokens
    )"""


# A new summary replaces the dialog's live one, in one statement. It is written only while the
# turn that made it is still live: a /clear or /undo that came first wins, and nothing is stored.
# Nor is an empty one (the LLM wrote nothing). Its tokens count either way, for the user whose
# turn made it (in a shared group too: the summary is part of that turn, which was admitted when
# its question was stored).
def _add_summary(*, shared: bool) -> str:
    owner = "NULL::bigint" if shared else "q.user_id"
    return f"""
    WITH q AS (
        SELECT user_id, chat_id FROM messages
        WHERE id = %(question_id)s::bigint AND deleted_at IS NULL AND %(content)s::text <> ''
    ),
    replaced AS (
        UPDATE summaries SET deleted_at = now(), deleted_reason = 'replaced'
        WHERE chat_id = (SELECT chat_id FROM q) AND {_SUMMARY_OWNER[shared]} AND deleted_at IS NULL
    ),
    stored AS (
        INSERT INTO summaries (user_id, chat_id, through_id, covered, content, tokens)
        SELECT {owner}, q.chat_id, %(through_id)s::bigint, %(covered)s::integer, %(content)s::text,
               %(tokens)s::integer
        FROM q
        RETURNING id
    ),
    spent AS (
        SELECT user_id, now() AS created_at, %(prompt_tokens)s::integer AS prompt_tokens,
               %(completion_tokens)s::integer AS completion_tokens
        FROM messages WHERE id = %(question_id)s::bigint
    ),{_COUNT_TOKENS_CTE}
    SELECT id FROM stored
"""


ADD_SUMMARY: Final = _add_summary(shared=False)
ADD_SUMMARY_SHARED: Final = _add_summary(shared=True)


async def add_summary(
    conn: Connection,
    *,
    question_id: int,
    through_id: int,
    covered: int,
    content: str,
    shared: bool,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
) -> bool:
    """Store a summary of the question's dialog up to turn ``through_id`` in place of its live
    one; False when the question was cleared or undone meanwhile, or ``content`` is empty (nothing
    stored). The tokens the endpoint reported for it count for the question's user either way."""
    params = {
        "question_id": question_id,
        "through_id": through_id,
        "covered": covered,
        "content": content,
        "tokens": estimate_tokens(content),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }
    cur = await conn.execute(ADD_SUMMARY_SHARED if shared else ADD_SUMMARY, params)
    return await cur.fetchone() is not None


# -- answers and their delivery ---------------------------------------------------------------
# Only a live question gets an answer, and only one live answer (messages_live_answer_key): a
# /clear that came first wins, and nothing is stored; the call's tokens count all the same. An
# answer to a question answered already (the statement run again) counts nothing.
ADD_ANSWER: Final = (
    """
    WITH question AS (
        SELECT id, user_id, chat_id, telegram_thread_id, deleted_at IS NULL AS live
        FROM messages WHERE id = %(question_id)s::bigint
    ),
    answer AS (
    INSERT INTO messages
        (user_id, chat_id, role, content, tokens, reply_to_id, telegram_thread_id, finish_reason, prompt_tokens,
         completion_tokens)
    SELECT user_id, chat_id, 'assistant', %(content)s::text, %(tokens)s::integer, id, telegram_thread_id,
           %(finish_reason)s::text, %(prompt_tokens)s::integer, %(completion_tokens)s::integer
    FROM question
    WHERE live
    ON CONFLICT (reply_to_id) WHERE deleted_at IS NULL DO NOTHING
    RETURNING id, user_id, created_at, prompt_tokens, completion_tokens
    ),
    spent AS (
        SELECT user_id, created_at, prompt_tokens, completion_tokens FROM answer
        UNION ALL
        SELECT user_id, now(), %(prompt_tokens)s::integer, %(completion_tokens)s::integer FROM question WHERE NOT live
    ),"""
    + _COUNT_TOKENS_CTE
    + """
    SELECT id FROM answer
"""
)


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
        "tokens": estimate_tokens(content),
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }
    await cur.execute(ADD_ANSWER, params, prepare=True)
    answer_id: int | None = await cur.fetchone()
    return answer_id


# A part already recorded is not recorded again: the statement may run twice (database.run).
RECORD_SENT_PART: Final = """
    UPDATE messages
    SET sent_message_ids = coalesce(sent_message_ids, '{}') || %(telegram_message_id)s::bigint,
        delivered_at = CASE WHEN %(last)s::boolean THEN now() END
    WHERE id = %(answer_id)s::bigint
      AND NOT coalesce(sent_message_ids @> ARRAY[%(telegram_message_id)s::bigint], false)
"""


async def record_sent_part(conn: Connection, *, answer_id: int, telegram_message_id: int, last: bool) -> None:
    """Record that Telegram accepted one more part of an answer; ``last`` marks it delivered."""
    params = {"answer_id": answer_id, "telegram_message_id": telegram_message_id, "last": last}
    await conn.execute(RECORD_SENT_PART, params, prepare=True)


SET_FAILED: Final = """
    UPDATE messages SET failed_at = now() WHERE id = %(message_id)s::bigint AND failed_at IS NULL
"""


async def set_failed(conn: Connection, *, message_id: int) -> None:
    """Mark a turn ended for good: a question with no answer, or an answer Telegram refused."""
    await conn.execute(SET_FAILED, {"message_id": message_id})


# -- the spool's write-back -------------------------------------------------------------------
# Writing back what an outage spooled: each statement finds the question by its Telegram key
# (the unique (chat_id, telegram_message_id) index) and is idempotent, so a write-back repeated
# after a crash stores nothing twice (an answer is known by its question and its time, even when
# a clear written back after it has set it aside).
_QUESTION_BY_KEY: Final = """
    SELECT m.id, m.user_id, m.chat_id, m.telegram_thread_id FROM messages m
    WHERE m.chat_id = (SELECT id FROM chats WHERE telegram_chat_id = %(telegram_chat_id)s::bigint)
      AND m.telegram_message_id = %(telegram_message_id)s::bigint
"""


def _by_key(telegram_chat_id: int, telegram_message_id: int, **params: object) -> dict[str, object]:
    """The parameters of a statement about the question Telegram knows as (chat, message id)
    (``_QUESTION_BY_KEY``), with ``params``."""
    return {"telegram_chat_id": telegram_chat_id, "telegram_message_id": telegram_message_id, **params}


WRITE_BACK_ANSWER: Final = (
    "WITH q AS ("
    + _QUESTION_BY_KEY
    + """),
    answer AS (
    INSERT INTO messages
        (user_id, chat_id, role, content, tokens, reply_to_id, telegram_thread_id, created_at, finish_reason,
         prompt_tokens, completion_tokens)
    SELECT user_id, chat_id, 'assistant', %(content)s::text, %(tokens)s::integer, id, telegram_thread_id,
           %(created_at)s::timestamptz, %(finish_reason)s::text, %(prompt_tokens)s::integer,
           %(completion_tokens)s::integer
    FROM q
    WHERE NOT EXISTS (
        SELECT FROM messages a WHERE a.reply_to_id = q.id AND a.created_at = %(created_at)s::timestamptz
    )
    ON CONFLICT (reply_to_id) WHERE deleted_at IS NULL DO NOTHING
    RETURNING user_id, created_at, prompt_tokens, completion_tokens
    ),
    spent AS (SELECT user_id, created_at, prompt_tokens, completion_tokens FROM answer),"""
    + _COUNT_TOKENS_CTE
    + """
    SELECT FROM answer
"""
)


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
    params = _by_key(
        telegram_chat_id,
        telegram_message_id,
        content=content,
        tokens=estimate_tokens(content),
        created_at=created_at,
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )
    await conn.execute(WRITE_BACK_ANSWER, params)


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


async def write_back_sent_part(
    conn: Connection, *, telegram_chat_id: int, telegram_message_id: int, sent_message_id: int, last: bool, at: datetime
) -> None:
    """Record a spooled delivery of one part of the answer to (chat, message id), unless recorded."""
    params = _by_key(telegram_chat_id, telegram_message_id, sent_message_id=sent_message_id, last=last, at=at)
    await conn.execute(WRITE_BACK_SENT_PART, params)


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


async def write_back_failure(
    conn: Connection, *, telegram_chat_id: int, telegram_message_id: int, answer: bool, at: datetime
) -> None:
    """Mark the question (chat, message id), or its answer, failed, unless marked."""
    params = _by_key(telegram_chat_id, telegram_message_id, answer=answer, at=at)
    await conn.execute(WRITE_BACK_FAILURE, params)


# -- history the user controls (/clear, /retry, /undo, edits, /search, /stats, /export) -------
# A dialog is one user's messages in one chat, found by Telegram's ids.
_DIALOG: Final = """
    dialog AS (
        SELECT (SELECT id FROM users WHERE telegram_user_id = %(telegram_user_id)s::bigint) AS user_id,
               (SELECT id FROM chats WHERE telegram_chat_id = %(telegram_chat_id)s::bigint) AS chat_id
    )
"""


# A group's shared summary that one user's /clear set aside holds the other members' words too.
# When one of them takes back words it holds (their /clear, or their /undo of a turn it covers:
# ``taken_back`` names the statement's rows, by ``turn``), it is withheld (revision 012): no
# /undo brings it back, whatever the order of the clears. Found by summaries_cleared_idx.
def _withhold(taken_back: str) -> str:
    return f"""
    withheld AS (
        UPDATE summaries s SET deleted_reason = 'withheld'
        WHERE s.chat_id = (SELECT chat_id FROM dialog) AND s.user_id IS NULL AND s.deleted_reason = 'clear'
          AND s.through_id >= (SELECT min(turn) FROM {taken_back})
    )"""


class _RateLimitOnly:
    """The verdict of a statement that counts against the rate limit only (/clear, /undo)."""

    __slots__ = ()

    @property
    def over_budget(self) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class Cleared(_RateLimitOnly):
    """What /clear did: how many messages it ``cleared``; ``rate_limited``: none, refused."""

    cleared: int
    rate_limited: bool = False


# /clear: one hit against the rate limit; over it, nothing is cleared. ``before`` is given only
# for a /clear spooled during an outage (then no limit is checked): it clears what was said
# before it, and nothing written back after it, however often the write-back is repeated.
# The dialog's summaries go with it, and so does the group's shared one: it may quote the user.
SOFT_DELETE_MESSAGES: Final = (
    "WITH"
    + _DIALOG
    + ","
    + _admission()
    + """,
    summaries_cleared AS (
        UPDATE summaries SET deleted_at = coalesce(%(before)s::timestamptz, now()), deleted_reason = 'clear'
        WHERE chat_id = (SELECT chat_id FROM dialog)
          AND (user_id = (SELECT user_id FROM dialog) OR user_id IS NULL)
          AND deleted_at IS NULL
          AND created_at <= coalesce(%(before)s::timestamptz, now())
          AND NOT (SELECT refused FROM admission)
    ),
    cleared AS (
        UPDATE messages SET deleted_at = coalesce(%(before)s::timestamptz, now()), deleted_reason = 'clear'
        WHERE user_id = (SELECT user_id FROM dialog) AND chat_id = (SELECT chat_id FROM dialog)
          AND deleted_at IS NULL
          AND created_at <= coalesce(%(before)s::timestamptz, now())
          AND NOT (SELECT refused FROM admission)
        RETURNING coalesce(reply_to_id, id) AS turn
    ),"""
    + _withhold("cleared")
    + """
    SELECT (SELECT count(*) FROM cleared) AS cleared, (SELECT rate_limited FROM admission) AS rate_limited
"""
)


async def soft_delete_messages(
    conn: Connection,
    *,
    telegram_user_id: int,
    telegram_chat_id: int,
    before: datetime | None = None,
    rate_limit: int = 0,
) -> Cleared:
    """Mark every live message of (user, chat) created up to ``before`` (default: now) deleted,
    counting a hit against ``rate_limit`` (0: no limit): nothing, when that is over it."""
    params = _dialog(telegram_user_id, telegram_chat_id, before=before, rate_limit=rate_limit, token_budget=0)
    return await _one_row(conn, Cleared, SOFT_DELETE_MESSAGES, params, prepare=True)  # a SELECT without FROM


@dataclass(frozen=True, slots=True)
class MessageCounts:
    """Messages of one (user, chat): still visible and soft-deleted."""

    live: int
    deleted: int


COUNT_MESSAGES: Final = """
    SELECT count(*) FILTER (WHERE deleted_at IS NULL) AS live,
           count(*) FILTER (WHERE deleted_at IS NOT NULL) AS deleted
    FROM messages
    WHERE user_id = (SELECT id FROM users WHERE telegram_user_id = %(telegram_user_id)s::bigint)
      AND chat_id = (SELECT id FROM chats WHERE telegram_chat_id = %(telegram_chat_id)s::bigint)
"""


async def count_messages(conn: Connection, *, telegram_user_id: int, telegram_chat_id: int) -> MessageCounts:
    """How many messages (user, chat) has, live and soft-deleted."""
    params = _dialog(telegram_user_id, telegram_chat_id)
    return await _one_row(conn, MessageCounts, COUNT_MESSAGES, params)  # an aggregate


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


@dataclass(frozen=True, slots=True)
class RetriedQuestion:
    """The question /retry asks again (``id`` None: there is none), unless it was refused: the
    user is over the rate limit or the daily token budget (then nothing changed)."""

    id: int | None
    telegram_message_id: int | None
    telegram_thread_id: int | None
    rate_limited: bool = False
    over_budget: bool = False


# /retry: the last question is asked again, when admitted (a hit, and the budget, as for a new
# question; refused, nothing changes). Its live answer is set aside ('retry'), so the new answer
# takes its place in every later context; a question that had failed may run again. One row
# always: the question re-opened (id NULL: none) and the admission's verdicts.
RETRY_LAST_TURN: Final = (
    "WITH"
    + _DIALOG
    + ","
    + _LAST_TURN
    + ","
    + _admission()
    + """,
    question AS (
        UPDATE messages q SET failed_at = NULL
        FROM last_turn t
        WHERE q.id = t.question_id AND q.role = 'user' AND q.deleted_at IS NULL
          AND NOT (SELECT refused FROM admission)
        RETURNING q.id, q.telegram_message_id, q.telegram_thread_id
    ),
    replaced AS (
        UPDATE messages a SET deleted_at = now(), deleted_reason = 'retry'
        FROM question q
        WHERE a.reply_to_id = q.id AND a.deleted_at IS NULL
        RETURNING a.id
    )
    SELECT q.id, q.telegram_message_id, q.telegram_thread_id, a.rate_limited, a.over_budget
    FROM admission a LEFT JOIN question q ON true
"""
)


async def retry_last_turn(
    conn: Connection, *, telegram_user_id: int, telegram_chat_id: int, rate_limit: int = 0, token_budget: int = 0
) -> RetriedQuestion:
    """Set aside the answer to the dialog's last question so it is asked again, when the user
    is within ``rate_limit`` (a hit counted) and ``token_budget`` (0: none); that question (its
    ``id`` None when the dialog has no live question, or the retry was refused)."""
    params = _dialog(telegram_user_id, telegram_chat_id, rate_limit=rate_limit, token_budget=token_budget)
    return await _one_row(conn, RetriedQuestion, RETRY_LAST_TURN, params)  # the admission's, joined to the question


@dataclass(frozen=True, slots=True)
class Undone(_RateLimitOnly):
    """What /undo did: ``restored`` messages of the last clear brought back, or ``undone``
    messages of the last turn set aside (``question``: its text)."""

    restored: int
    undone: int
    question: str | None
    rate_limited: bool = False  # over the rate limit: nothing changed


# /undo: one hit against the rate limit; over it, nothing changes. When the dialog's latest
# deletion is a /clear and nothing was said since, that clear's rows come back, with the
# summaries it set aside (not those withheld since); otherwise the newest live turn (question
# and answer) is set aside ('undo'), with the summaries that cover it. A clear is restored only
# while it is the latest deletion, so only the last one can be. last_deletion is MATERIALIZED:
# inlined, it would be looked up again for every cleared row.
UNDO_LAST_TURN: Final = (
    "WITH"
    + _DIALOG
    + ","
    + _LAST_TURN
    + ","
    + _admission()
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
        WHERE l.deleted_reason = 'clear' AND NOT (SELECT refused FROM admission)
          AND NOT EXISTS (SELECT FROM last_turn t WHERE t.created_at > l.deleted_at)
          AND m.user_id = (SELECT user_id FROM dialog) AND m.chat_id = (SELECT chat_id FROM dialog)
          AND m.deleted_at = l.deleted_at AND m.deleted_reason = 'clear'
        RETURNING m.id
    ),
    undone AS (
        UPDATE messages m SET deleted_at = now(), deleted_reason = 'undo'
        FROM last_turn t
        WHERE NOT EXISTS (SELECT FROM restored) AND NOT (SELECT refused FROM admission)
          AND m.user_id = (SELECT user_id FROM dialog) AND m.chat_id = (SELECT chat_id FROM dialog)
          AND m.deleted_at IS NULL AND coalesce(m.reply_to_id, m.id) = t.question_id
        RETURNING m.role, m.content, coalesce(m.reply_to_id, m.id) AS turn
    ),
    summaries_restored AS (
        UPDATE summaries s SET deleted_at = NULL, deleted_reason = NULL
        FROM last_deletion l
        WHERE EXISTS (SELECT FROM restored)
          AND s.chat_id = (SELECT chat_id FROM dialog)
          AND (s.user_id = (SELECT user_id FROM dialog) OR s.user_id IS NULL)
          AND s.deleted_at = l.deleted_at AND s.deleted_reason = 'clear'
    ),
    summaries_undone AS (
        UPDATE summaries s SET deleted_at = now(), deleted_reason = 'undo'
        FROM last_turn t
        WHERE EXISTS (SELECT FROM undone)
          AND s.chat_id = (SELECT chat_id FROM dialog)
          AND (s.user_id = (SELECT user_id FROM dialog) OR s.user_id IS NULL)
          AND s.deleted_at IS NULL AND s.through_id >= t.question_id
    ),"""
    + _withhold("undone")
    + """
    SELECT (SELECT count(*) FROM restored) AS restored,
           (SELECT count(*) FROM undone) AS undone,
           (SELECT content FROM undone WHERE role = 'user') AS question,
           (SELECT rate_limited FROM admission) AS rate_limited
"""
)


async def undo_last_turn(
    conn: Connection, *, telegram_user_id: int, telegram_chat_id: int, rate_limit: int = 0
) -> Undone:
    """Bring back the last /clear if nothing was said since, else set aside the last turn;
    nothing when the hit it counts is over ``rate_limit`` (0: no limit)."""
    params = _dialog(telegram_user_id, telegram_chat_id, rate_limit=rate_limit, token_budget=0)
    return await _one_row(conn, Undone, UNDO_LAST_TURN, params)  # a SELECT without FROM


@dataclass(frozen=True, slots=True)
class EditedQuestion:
    """A stored question whose text the user edited; ``last``: it is the dialog's newest live
    turn, whose answer (shown in ``replaced_message_ids``) was set aside for a new one."""

    id: int
    telegram_thread_id: int | None
    last: bool
    replaced_message_ids: list[int]
    rate_limited: bool = False  # refused (nothing changed): over the rate limit,
    over_budget: bool = False  # or over the daily token budget (the last turn only)


# An edited question takes the new text (found by its Telegram key). When it is the dialog's
# newest live turn, its live answer is set aside ('edit') for a new one, and the ids of the
# messages that showed the old answer come back, to be edited in place. Only an edit that
# changes a stored question of the user counts a hit; over the rate limit (or, for the newest
# turn, which is answered again, over the budget) nothing changes.
EDIT_QUESTION: Final = (
    "WITH"
    + _DIALOG
    + ","
    + _LAST_TURN
    + """,
    target AS (
        SELECT q.id, q.telegram_thread_id, q.deleted_at IS NULL AND q.id = (SELECT question_id FROM last_turn) AS last
        FROM messages q
        WHERE q.chat_id = (SELECT chat_id FROM dialog) AND q.telegram_message_id = %(telegram_message_id)s::bigint
          AND q.user_id = (SELECT user_id FROM dialog) AND q.role = 'user'
          AND q.content IS DISTINCT FROM %(content)s::text
    ),"""
    + _admission("EXISTS (SELECT FROM target)")
    + """,
    verdict AS (
        SELECT t.id, t.telegram_thread_id, t.last, a.rate_limited, t.last AND a.over_budget AS over_budget
        FROM target t, admission a
    ),
    question AS (
        UPDATE messages q
        SET content = %(content)s::text, tokens = %(tokens)s::integer, edited_at = now(),
            failed_at = CASE WHEN v.last THEN NULL ELSE q.failed_at END
        FROM verdict v
        WHERE q.id = v.id AND NOT v.rate_limited AND NOT v.over_budget
        RETURNING q.id, v.last
    ),
    replaced AS (
        UPDATE messages a SET deleted_at = now(), deleted_reason = 'edit'
        FROM question q
        WHERE q.last AND a.reply_to_id = q.id AND a.deleted_at IS NULL
        RETURNING a.sent_message_ids
    )
    SELECT v.id, v.telegram_thread_id, v.last,
           coalesce((SELECT sent_message_ids FROM replaced), '{}') AS replaced_message_ids,
           v.rate_limited, v.over_budget
    FROM verdict v
"""
)


async def edit_question(
    conn: Connection,
    *,
    telegram_user_id: int,
    telegram_chat_id: int,
    telegram_message_id: int,
    content: str,
    rate_limit: int = 0,
    token_budget: int = 0,
) -> EditedQuestion | None:
    """Give a stored question its edited text, when the user is within ``rate_limit`` (a hit
    counted) and, for the last question, ``token_budget``; None when the message is not a
    stored question of this user or its text did not change."""
    cur = conn.cursor(row_factory=class_row(EditedQuestion))
    params = _dialog(
        telegram_user_id,
        telegram_chat_id,
        telegram_message_id=telegram_message_id,
        content=content,
        tokens=estimate_tokens(content),
        rate_limit=rate_limit,
        token_budget=token_budget,
    )
    await cur.execute(EDIT_QUESTION, params)
    return await cur.fetchone()


@dataclass(frozen=True, slots=True)
class SearchHit:
    """A message found by /search: ``snippet`` has its matches between the marker characters."""

    role: Role
    created_at: datetime
    cleared: bool
    snippet: str


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


# websearch_to_tsquery nests each "-" of a run in the one before, and its parser's stack ends at
# 32 ("tsquery stack too small", XX000): a run of them is read as one.
_NEGATIONS: Final = re.compile(r"-(?:\s*-)+")


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
    query = _NEGATIONS.sub("-", query)
    params = _dialog(
        telegram_user_id, telegram_chat_id, query=query, everything=everything, limit=limit, options=options
    )
    await cur.execute(SEARCH_MESSAGES, params, prepare=True)
    return await cur.fetchall()


@dataclass(frozen=True, slots=True)
class Recalled:
    """An older message found for a turn's recall: who wrote it, when, its text (cut)."""

    role: Role
    created_at: datetime
    content: str


# Recall: the live messages of a turn's dialog from before its window (turns before
# %(before_turn)s) that match any of the question's words (%(query)s: "w1 or w2 ..."), best
# first, each cut to %(chars)s characters. The same messages_search_idx as /search; a shared
# group's history is the chat's, every user's. Cleared messages never come back. Only the newest
# RECALL_CANDIDATES matches are ranked: "any word" matches much of a long dialog, and ranking
# reads each match's search_vector (at 100,000 messages in one dialog, 356 ms p50 for all of them).
RECALL_CANDIDATES: Final = 1000
_RECALL_ROWS: Final = {
    False: "m.user_id = (SELECT user_id FROM dialog) AND m.chat_id = (SELECT chat_id FROM dialog)",
    True: "m.chat_id = (SELECT chat_id FROM dialog)",
}
_RECALL: Final = {
    shared: (
        "WITH"
        + _DIALOG
        + f""",
    recent AS MATERIALIZED (
        SELECT m.id, m.search_vector FROM messages m
        WHERE {_RECALL_ROWS[shared]}
          AND m.search_vector @@ websearch_to_tsquery('pg_catalog.russian', %(query)s::text)
          AND m.deleted_at IS NULL AND coalesce(m.reply_to_id, m.id) < %(before_turn)s::bigint
        ORDER BY m.id DESC
        LIMIT {RECALL_CANDIDATES:d}
    ),
    best AS (
        SELECT id, ts_rank(search_vector, websearch_to_tsquery('pg_catalog.russian', %(query)s::text)) AS rank
        FROM recent
        ORDER BY rank DESC, id DESC
        LIMIT %(limit)s::integer
    )
    SELECT m.role, m.created_at, left(m.content, %(chars)s::integer) AS content
    FROM best JOIN messages m ON m.id = best.id
    ORDER BY best.rank DESC, m.id DESC
"""
    )
    for shared in (False, True)
}
RECALL_EARLIER: Final = _RECALL[False]
RECALL_EARLIER_SHARED: Final = _RECALL[True]


async def recall_earlier(
    conn: Connection,
    *,
    telegram_user_id: int,
    telegram_chat_id: int,
    query: str,
    before_turn: int,
    limit: int,
    chars: int,
    shared: bool = False,
) -> list[Recalled]:
    """The dialog's live messages before turn ``before_turn`` that best match ``query`` (a
    web-search query), at most ``limit``, each cut to ``chars`` characters."""
    cur = conn.cursor(row_factory=class_row(Recalled))
    query = _NEGATIONS.sub("-", query)  # a model's query too: a run of "-" is refused otherwise
    params = _dialog(telegram_user_id, telegram_chat_id, query=query, before_turn=before_turn, limit=limit, chars=chars)
    await cur.execute(RECALL_EARLIER_SHARED if shared else RECALL_EARLIER, params, prepare=True)
    return await cur.fetchall()


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
    tokens_today: int | None = None  # counted for the daily budget; None: none today


# /stats: one pass over the user's messages (all chats), through messages_search_idx's user_id;
# today's tokens (UTC) by token_usage's primary key.
FETCH_STATS: Final = (
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
           count(DISTINCT chat_id) AS chats,
           (SELECT tokens FROM token_usage
            WHERE user_id = (SELECT user_id FROM dialog) AND day = (now() AT TIME ZONE 'UTC')::date) AS tokens_today
    FROM (
        SELECT m.chat_id, m.length, m.deleted_at, m.prompt_tokens, m.completion_tokens,
               m.chat_id = (SELECT chat_id FROM dialog) AS in_chat
        FROM messages m
        WHERE m.user_id = (SELECT user_id FROM dialog)
    ) mine
"""
)


async def fetch_stats(conn: Connection, *, telegram_user_id: int, telegram_chat_id: int) -> DialogStats:
    """How much the user has said and read, in this chat and in all."""
    params = _dialog(telegram_user_id, telegram_chat_id)
    return await _one_row(conn, DialogStats, FETCH_STATS, params)  # an aggregate


@dataclass(frozen=True, slots=True)
class ExportedMessage:
    """One message of a dialog as /export writes it."""

    role: Role
    content: str
    created_at: datetime
    cleared: bool
    attachments: list[dict[str, Any]] | None = None  # as stored (``Attachment.from_stored``)

    @property
    def attached(self) -> list[Attachment]:
        return [Attachment.from_stored(a) for a in self.attachments or ()]


# /export: every message of the dialog, cleared ones too, in turn order, read through a
# server-side cursor.
DIALOG_MESSAGES: Final = (
    "WITH"
    + _DIALOG
    + """
    SELECT m.role, m.content, m.created_at, m.deleted_at IS NOT NULL AS cleared, m.attachments
    FROM messages m
    WHERE m.user_id = (SELECT user_id FROM dialog) AND m.chat_id = (SELECT chat_id FROM dialog)
    ORDER BY coalesce(m.reply_to_id, m.id), m.id
"""
)


async def dialog_messages(
    conn: Connection, *, telegram_user_id: int, telegram_chat_id: int, batch: int = 1000
) -> AsyncIterator[ExportedMessage]:
    """Every message of the dialog in turn order, ``batch`` rows at a time from a server-side
    cursor, so a long history is never held whole (the caller consumes it on ``conn``)."""
    async with conn.transaction():
        cur = conn.cursor("dialog_export", row_factory=class_row(ExportedMessage))
        cur.itersize = batch
        async with cur:
            await cur.execute(DIALOG_MESSAGES, _dialog(telegram_user_id, telegram_chat_id))
            async for message in cur:
                yield message


# -- memories ---------------------------------------------------------------------------------
# What a user asked the bot to remember about them (/remember, revision 014): the user's own,
# across every chat, read by every turn's context (_MEMORIES) where the chat may see them. Each
# statement finds the user by their Telegram id and touches only their rows, live ones through
# memories_user_idx; forgetting sets deleted_at, the row stays.
_USER_ID: Final = "(SELECT id FROM users WHERE telegram_user_id = %(telegram_user_id)s::bigint)"


@dataclass(frozen=True, slots=True)
class Memory:
    """One of a user's live memories: its id (for the "Forget" button), its text, when it was kept."""

    id: int
    content: str
    created_at: datetime


# A memory, registering the user if new; refused (no row) when the user has MAX_MEMORIES live
# ones already, decided by the statement that would store it. ``live`` counts at most that many
# through the index, so a full list costs a bounded read. Two /remember of one user committed
# at the same instant (two chats, two processes) can each see the other's slot as free and go
# one past the limit; every read stops at MAX_MEMORIES all the same.
ADD_MEMORY: Final = (
    "WITH"
    + _REGISTER_USER_CTES
    + f"""
    live AS (
        SELECT count(*) AS memories FROM (
            SELECT FROM memories WHERE user_id = (SELECT id FROM user_row) AND deleted_at IS NULL
            LIMIT {MAX_MEMORIES:d}
        ) m
    )
    INSERT INTO memories (user_id, content)
    SELECT (SELECT id FROM user_row), %(content)s::text
    WHERE (SELECT memories FROM live) < {MAX_MEMORIES:d}
    RETURNING id
"""
)


async def add_memory(conn: Connection, *, telegram_user_id: int, first_name: str | None, content: str) -> int | None:
    """Keep ``content`` (1 to 500 characters) for the user, registering them; its id, or None
    when they have ``MAX_MEMORIES`` live memories already."""
    cur = conn.cursor(row_factory=scalar_row)
    params = {"telegram_user_id": telegram_user_id, "first_name": first_name, "content": content}
    await cur.execute(ADD_MEMORY, params)
    memory_id: int | None = await cur.fetchone()
    return memory_id


# What /memory lists: what a turn reads (at most MAX_MEMORIES, oldest first), with ids.
LIST_MEMORIES: Final = f"""
    SELECT id, content, created_at FROM memories
    WHERE user_id = {_USER_ID} AND deleted_at IS NULL
    ORDER BY id
    LIMIT {MAX_MEMORIES:d}
"""


async def list_memories(conn: Connection, *, telegram_user_id: int) -> list[Memory]:
    """The user's live memories, oldest first (none for a user never seen)."""
    cur = conn.cursor(row_factory=class_row(Memory))
    await cur.execute(LIST_MEMORIES, {"telegram_user_id": telegram_user_id})
    return await cur.fetchall()


# One memory, by its id and only the user's own: a button pressed by someone else, or pressed
# twice, changes nothing.
FORGET_MEMORY: Final = f"""
    UPDATE memories SET deleted_at = now()
    WHERE id = %(memory_id)s::bigint AND user_id = {_USER_ID} AND deleted_at IS NULL
    RETURNING id
"""


async def forget_memory(conn: Connection, *, telegram_user_id: int, memory_id: int) -> bool:
    """Forget the user's memory ``memory_id`` (soft delete); False when it is not theirs or is
    forgotten already."""
    cur = await conn.execute(FORGET_MEMORY, {"telegram_user_id": telegram_user_id, "memory_id": memory_id})
    return await cur.fetchone() is not None


FORGET_MEMORIES: Final = f"""
    WITH forgotten AS (
        UPDATE memories SET deleted_at = now()
        WHERE user_id = {_USER_ID} AND deleted_at IS NULL
        RETURNING id
    )
    SELECT count(*) FROM forgotten
"""


async def forget_memories(conn: Connection, *, telegram_user_id: int) -> int:
    """Forget every live memory of the user (soft delete); how many."""
    cur = conn.cursor(row_factory=scalar_row)
    await cur.execute(FORGET_MEMORIES, {"telegram_user_id": telegram_user_id})
    forgotten: int | None = await cur.fetchone()
    assert forgotten is not None  # an aggregate
    return forgotten


# Whether the user lets their memories into group chats, registering them if new (a user may
# set it before they ever talk; the first question fills in their name).
SET_MEMORIES_IN_GROUPS: Final = """
    INSERT INTO users (telegram_user_id, memories_in_groups)
    VALUES (%(telegram_user_id)s::bigint, %(allowed)s::boolean)
    ON CONFLICT (telegram_user_id) DO UPDATE SET memories_in_groups = EXCLUDED.memories_in_groups
"""


async def set_memories_in_groups(conn: Connection, *, telegram_user_id: int, allowed: bool) -> None:
    """Let the user's memories into the context of group chats (``allowed``), or keep them to
    private chats."""
    await conn.execute(SET_MEMORIES_IN_GROUPS, {"telegram_user_id": telegram_user_id, "allowed": allowed})


GET_MEMORIES_IN_GROUPS: Final = (
    "SELECT memories_in_groups FROM users WHERE telegram_user_id = %(telegram_user_id)s::bigint"
)


async def get_memories_in_groups(conn: Connection, *, telegram_user_id: int) -> bool:
    """Whether the user lets their memories into group chats (False for a user never seen)."""
    cur = conn.cursor(row_factory=scalar_row)
    await cur.execute(GET_MEMORIES_IN_GROUPS, {"telegram_user_id": telegram_user_id})
    return bool(await cur.fetchone())


# -- chat settings ----------------------------------------------------------------------------
# A chat's settings by its Telegram id: /model, /prompt and /temperature show them (a turn reads
# them within FETCH_TURN_START). No row: every setting is the default.
GET_CHAT_SETTINGS: Final = """
    SELECT s.model, s.system_prompt, s.temperature::numeric::float8 AS temperature
    FROM chats c JOIN chat_settings s ON s.chat_id = c.id
    WHERE c.telegram_chat_id = %(telegram_chat_id)s::bigint
"""


async def get_chat_settings(conn: Connection, *, telegram_chat_id: int) -> ChatSettings:
    """The chat's settings; every one None (the default) when it has chosen none."""
    cur = conn.cursor(row_factory=class_row(ChatSettings))
    await cur.execute(GET_CHAT_SETTINGS, {"telegram_chat_id": telegram_chat_id})
    return await cur.fetchone() or DEFAULT_SETTINGS


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
    # INSERT ... ON CONFLICT DO UPDATE returns the row either way
    return await _one_row(conn, ChatSettings, SET_CHAT_SETTING, params)


# -- recovery ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnfinishedTurn:
    """A recent question that has no answer, or whose answer Telegram has not accepted yet."""

    question_id: int
    telegram_user_id: int
    telegram_chat_id: int
    telegram_message_id: int | None
    telegram_thread_id: int | None


# A turn is unfinished when its live question is neither failed nor answered by an answer that
# Telegram accepted (or refused for good). The BRIN index on created_at limits the scan to
# recent rows.
FETCH_UNFINISHED_TURNS: Final = """
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


async def fetch_unfinished_turns(conn: Connection, *, max_age_s: int) -> list[UnfinishedTurn]:
    """Turns younger than ``max_age_s`` still to answer or deliver, oldest first."""
    cur = conn.cursor(row_factory=class_row(UnfinishedTurn))
    await cur.execute(FETCH_UNFINISHED_TURNS, {"max_age_s": max_age_s})
    return await cur.fetchall()


# -- retention --------------------------------------------------------------------------------


# Retention, one batch per statement: at most %(limit)s of the oldest rows soft-deleted before
# the cutoff, found by an ordered range scan of the partial index messages_deleted_idx (it holds
# soft-deleted rows only, revision 005), then deleted by primary key. ``= ANY (ARRAY(...))``
# rather than ``IN (...)``: the ids are collected once and looked up in the key's index, where
# IN may be planned as a join that scans the whole table. A batch is a short transaction: no
# long lock, no burst of WAL, and the bot's statements run in between. SKIP LOCKED: two
# processes purging at once take different rows instead of waiting for each other. Summaries
# set aside (a /clear, an /undo, a newer summary) go the same way, through summaries_deleted_idx.
def _purge_deleted(table: Literal["messages", "summaries"]) -> str:
    return f"""
    DELETE FROM {table}
    WHERE id = ANY (ARRAY(
        SELECT id FROM {table}
        WHERE deleted_at < now() - make_interval(days => %(days)s::integer)
        ORDER BY deleted_at
        LIMIT %(limit)s::integer
        FOR UPDATE SKIP LOCKED
    ))
"""


PURGE_DELETED_MESSAGES: Final = _purge_deleted("messages")


async def purge_deleted_messages(conn: Connection, *, days: int, limit: int) -> int:
    """Hard-delete at most ``limit`` of the messages soft-deleted more than ``days`` days ago,
    oldest first; how many were."""
    cur = await conn.execute(PURGE_DELETED_MESSAGES, {"days": days, "limit": limit})
    return cur.rowcount


PURGE_DELETED_SUMMARIES: Final = _purge_deleted("summaries")


async def purge_deleted_summaries(conn: Connection, *, days: int, limit: int) -> int:
    """Hard-delete at most ``limit`` of the summaries set aside more than ``days`` days ago,
    oldest first; how many were."""
    cur = await conn.execute(PURGE_DELETED_SUMMARIES, {"days": days, "limit": limit})
    return cur.rowcount


# Rate-limit counters of windows that are over: the user's next message starts a new window
# anyway (ADD_QUESTION), so they hold nothing but space.
PURGE_RATE_LIMITS: Final = """
    DELETE FROM rate_limits WHERE window_start < now() - interval '1 minute'
"""


async def purge_rate_limits(conn: Connection) -> int:
    """Delete the rate-limit counters of past windows; how many."""
    cur = await conn.execute(PURGE_RATE_LIMITS)
    return cur.rowcount


# Token counts of days that are over. Yesterday's and the day before's stay: an answer written
# back after an outage counts on the day it was made. The table holds a row per user active in
# those days, so a scan of it is cheap (no index on day alone is needed).
PURGE_TOKEN_USAGE: Final = """
    DELETE FROM token_usage WHERE day < (now() AT TIME ZONE 'UTC')::date - 2
"""  # noqa: S105 - SQL, not a password


async def purge_token_usage(conn: Connection) -> int:
    """Delete the token counts of days before the day before yesterday (UTC); how many."""
    cur = await conn.execute(PURGE_TOKEN_USAGE)
    return cur.rowcount


# -- the schema version -----------------------------------------------------------------------

FETCH_SCHEMA_VERSION: Final = "SELECT version_num FROM alembic_version"


async def fetch_schema_version(conn: Connection) -> str | None:
    """The Alembic revision the database is at, or None if it was never migrated."""
    try:
        cur = conn.cursor(row_factory=scalar_row)
        await cur.execute(FETCH_SCHEMA_VERSION)
        version: str | None = await cur.fetchone()
        return version
    except psycopg.errors.UndefinedTable:
        return None

"""Several bot processes on one database: which one answers a chat, and which one runs an update.

**Update claims.** A command, a button or an edit that Telegram (or a load balancer) delivers
twice, maybe to two processes, runs once: the first process to insert its ``update_id`` into
``update_claims`` runs it (``claim_update``). A text message needs no claim: the message's own
key stores it once, and the chat's lease answers it once.

**Chat leases.** One process at a time answers a chat's questions: the *holder* of its row in
``chat_leases``, until ``expires_at`` unless renewed. No connection is held meanwhile:

- *taken* by the statement that stores a question (``ADD_QUESTION``'s lease CTE), when the chat
  has no holder or this process holds it already. Whoever stores a question bumps ``version``,
  holder or not: that is how the holder learns of a question another process stored.
- *handed on* after each turn by one statement (``NEXT_QUESTION``): it reads, in one snapshot,
  the lease's version and the chat's oldest open question past ``done_through``, and then,
  only if the version is still the one it read, either keeps the lease and returns that
  question, or releases the lease when there is none. A question stored meanwhile bumped the
  version, so the conditional write (re-checked on the newest row version under READ COMMITTED)
  fails, and the holder looks again: no question is left without a holder.
- *renewed* for all the chats a process is working on by one statement every third of the TTL
  (``RENEW``), so a long LLM stream keeps its lease without a write per turn.
- *swept*: a process that died (SIGKILL, lost host) renews nothing; once its leases expire, any
  process's sweeper takes them (``TAKE_EXPIRED``, an index range scan over expired held rows,
  SKIP LOCKED so sweepers never wait for each other) and answers their open questions, oldest
  first. Each turn reads its own state first, so an answer stored by the dead process is sent
  without asking the LLM again, and parts already delivered are not sent again.

Timestamps are the database's ``now()``: one clock for every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg.rows import class_row, scalar_row

from services import database
from services.context import call
from services.database import Connection, Pool
from services.failures import StorageUnavailable

logger = logging.getLogger(__name__)

CLAIM_KEEP_S: Final = 86_400  # Telegram stops redelivering an update within a day
CLAIM_PURGE_EVERY_S: Final = 3600.0
SWEEP_BATCH: Final = 100  # expired leases taken per sweep statement

# -- SQL ------------------------------------------------------------------------------------

CLAIM_UPDATE: Final = """
    INSERT INTO update_claims (update_id) VALUES (%(update_id)s::bigint)
    ON CONFLICT (update_id) DO NOTHING
    RETURNING true
"""

PURGE_CLAIMS: Final = """
    DELETE FROM update_claims WHERE claimed_at < now() - make_interval(secs => %(keep_s)s::integer)
"""

# The chat's oldest open question past the lease's ``done_through``, and the lease as this
# process holds it, both read in one snapshot; then one conditional write: the lease kept (and
# ``done_through`` moved up to just before that question), or released when there is none. The
# write happens only if the row still has the version read: a question stored after the
# snapshot bumped it, and the caller asks again (``moved`` false while ``held`` is true).
# ``finished``: the question the holder has just finished with (answered, failed, or left to the
# next start's recovery), never returned. Open: live, not failed, and no live answer delivered
# or refused. The scan is ``messages_chat_turn_idx`` from ``done_through``, so its length is the
# chat's turns since the last hand-over, not the chat's history.
NEXT_QUESTION: Final = """
    WITH lease AS (
        SELECT l.chat_id, l.version, l.done_through
        FROM chats c JOIN chat_leases l ON l.chat_id = c.id
        WHERE c.telegram_chat_id = %(telegram_chat_id)s::bigint AND l.holder = %(holder)s::text
    ),
    next AS (
        SELECT q.id, q.user_id, q.telegram_message_id, q.telegram_thread_id
        FROM lease CROSS JOIN LATERAL (
            SELECT id, user_id, telegram_message_id, telegram_thread_id FROM messages m
            WHERE m.chat_id = lease.chat_id AND m.deleted_at IS NULL
              AND coalesce(m.reply_to_id, m.id) > lease.done_through
              AND m.role = 'user' AND m.failed_at IS NULL
              AND m.id IS DISTINCT FROM %(finished)s::bigint
              AND NOT EXISTS (
                  SELECT FROM messages a
                  WHERE a.reply_to_id = m.id AND a.deleted_at IS NULL
                    AND (a.delivered_at IS NOT NULL OR a.failed_at IS NOT NULL)
              )
            ORDER BY coalesce(m.reply_to_id, m.id), m.id
            LIMIT 1
        ) q
    ),
    moved AS (
        UPDATE chat_leases l
        SET holder = CASE WHEN EXISTS (SELECT FROM next) THEN l.holder END,
            version = l.version + 1,
            expires_at = now() + make_interval(secs => %(ttl_s)s::integer),
            done_through = CASE
                WHEN EXISTS (SELECT FROM next) THEN (SELECT id FROM next) - 1
                ELSE greatest(l.done_through, coalesce(%(finished)s::bigint, 0))
            END
        FROM lease
        WHERE l.chat_id = lease.chat_id AND l.holder = %(holder)s::text AND l.version = lease.version
        RETURNING l.version
    )
    SELECT EXISTS (SELECT FROM lease) AS held,
           (SELECT version FROM moved) AS version,
           n.id AS question_id, u.telegram_user_id, n.telegram_message_id, n.telegram_thread_id
    FROM (SELECT 1) one
    LEFT JOIN next n ON true
    LEFT JOIN users u ON u.id = n.user_id
"""

# The chat's lease for this process, for a turn that does not start with a new question (a
# /retry, an edited question, a recovered turn): taken when the chat has no holder, this process
# holds it, or it expired; bumped in any case, with ``done_through`` lowered to just before
# ``question_id``, so whichever process holds it finds that question next.
TAKE: Final = """
    INSERT INTO chat_leases AS l (chat_id, holder, expires_at, done_through)
    SELECT c.id, %(holder)s::text, now() + make_interval(secs => %(ttl_s)s::integer), %(question_id)s::bigint - 1
    FROM chats c WHERE c.telegram_chat_id = %(telegram_chat_id)s::bigint
    ON CONFLICT (chat_id) DO UPDATE
    SET holder = CASE WHEN l.holder IS NULL OR l.holder = EXCLUDED.holder OR l.expires_at < now()
                      THEN EXCLUDED.holder ELSE l.holder END,
        expires_at = CASE WHEN l.holder IS NULL OR l.holder = EXCLUDED.holder OR l.expires_at < now()
                          THEN EXCLUDED.expires_at ELSE l.expires_at END,
        version = l.version + 1,
        done_through = least(l.done_through, EXCLUDED.done_through)
    RETURNING l.holder = %(holder)s::text AS held, l.version
"""

# Expired leases of chats some process held, oldest expiry first: taken by this process.
TAKE_EXPIRED: Final = """
    UPDATE chat_leases l
    SET holder = %(holder)s::text, version = l.version + 1,
        expires_at = now() + make_interval(secs => %(ttl_s)s::integer)
    FROM chats c
    WHERE l.chat_id IN (
            SELECT chat_id FROM chat_leases
            WHERE holder IS NOT NULL AND expires_at < now()
            ORDER BY expires_at
            LIMIT %(limit)s::integer
            FOR UPDATE SKIP LOCKED
        )
      AND l.holder IS NOT NULL AND l.expires_at < now() AND c.id = l.chat_id
    RETURNING c.telegram_chat_id, l.version
"""

RENEW: Final = """
    UPDATE chat_leases l SET expires_at = now() + make_interval(secs => %(ttl_s)s::integer)
    FROM chats c
    WHERE c.telegram_chat_id = ANY(%(telegram_chat_ids)s::bigint[]) AND l.chat_id = c.id
      AND l.holder = %(holder)s::text
    RETURNING c.telegram_chat_id, l.version
"""

# Every lease of this process expires now, so any process's sweeper takes it at once: at
# shutdown (what the drain did not finish) and at start-up (what a previous run left).
EXPIRE_MINE: Final = """
    UPDATE chat_leases SET expires_at = now() WHERE holder = %(holder)s::text AND expires_at > now()
"""

# The tending connection's bound on each statement, for the session (``SET``, with a bound value).
SET_STATEMENT_TIMEOUT: Final = "SELECT set_config('statement_timeout', %(ms)s::text, false)"

# -- functions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NextQuestion:
    """What ``NEXT_QUESTION`` found: whether this process ``held`` the lease, the version its
    write left (None: nothing written), and the question to answer next, if any."""

    held: bool
    version: int | None
    question_id: int | None
    telegram_user_id: int | None
    telegram_message_id: int | None
    telegram_thread_id: int | None


@dataclass(frozen=True, slots=True)
class Taken:
    held: bool
    version: int


@dataclass(frozen=True, slots=True)
class ChatLease:
    """A chat lease this process holds (``TAKE_EXPIRED``, ``RENEW``), at ``version``."""

    telegram_chat_id: int
    version: int


class LeaseLost(Exception):
    """Another process holds the chat now (this one stalled past its lease): the turn stops
    before storing or sending anything more, and the holder answers the question."""


async def claim_update(conn: Connection, *, update_id: int) -> bool:
    """Whether this process is the first to claim ``update_id``."""
    cur = conn.cursor(row_factory=scalar_row)
    await cur.execute(CLAIM_UPDATE, {"update_id": update_id}, prepare=True)
    return bool(await cur.fetchone())


async def purge_claims(conn: Connection, *, keep_s: int = CLAIM_KEEP_S) -> int:
    """Delete claims older than ``keep_s``; how many."""
    cur = await conn.execute(PURGE_CLAIMS, {"keep_s": keep_s})
    return cur.rowcount


async def next_question(
    conn: Connection, *, telegram_chat_id: int, holder: str, finished: int | None, ttl_s: int
) -> NextQuestion:
    """One try at handing the chat on: see ``NEXT_QUESTION``."""
    cur = conn.cursor(row_factory=class_row(NextQuestion))
    params = {"telegram_chat_id": telegram_chat_id, "holder": holder, "finished": finished, "ttl_s": ttl_s}
    await cur.execute(NEXT_QUESTION, params, prepare=True)
    found = await cur.fetchone()
    assert found is not None  # a SELECT from a one-row subquery
    return found


async def record_last_part(
    conn: Connection, *, answer_id: int, telegram_message_id: int, telegram_chat_id: int, holder: str, ttl_s: int
) -> NextQuestion:
    """``RECORD_SENT_PART`` of an answer's last part, then ``NEXT_QUESTION`` (its question is
    settled by then, so none is named), sent together: one round trip."""
    cur = conn.cursor(row_factory=class_row(NextQuestion))
    record = {"answer_id": answer_id, "telegram_message_id": telegram_message_id, "last": True}
    hand_over = {"telegram_chat_id": telegram_chat_id, "holder": holder, "finished": None, "ttl_s": ttl_s}
    async with conn.pipeline():
        await conn.execute(database.RECORD_SENT_PART, record, prepare=True)
        await cur.execute(NEXT_QUESTION, hand_over, prepare=True)
    found = await cur.fetchone()
    assert found is not None  # a SELECT from a one-row subquery
    return found


async def take(conn: Connection, *, telegram_chat_id: int, holder: str, question_id: int, ttl_s: int) -> Taken | None:
    """Take (or bump) the chat's lease for ``question_id``; None for a chat never registered."""
    cur = conn.cursor(row_factory=class_row(Taken))
    params = {"telegram_chat_id": telegram_chat_id, "holder": holder, "question_id": question_id, "ttl_s": ttl_s}
    await cur.execute(TAKE, params)
    return await cur.fetchone()


async def take_expired(conn: Connection, *, holder: str, ttl_s: int, limit: int = SWEEP_BATCH) -> list[ChatLease]:
    """Take up to ``limit`` expired leases; the chats taken."""
    cur = conn.cursor(row_factory=class_row(ChatLease))
    await cur.execute(TAKE_EXPIRED, {"holder": holder, "ttl_s": ttl_s, "limit": limit}, prepare=True)
    return await cur.fetchall()


async def renew(conn: Connection, *, telegram_chat_ids: list[int], holder: str, ttl_s: int) -> list[ChatLease]:
    """Push the expiry of this process's leases on ``telegram_chat_ids``; those it still holds."""
    cur = conn.cursor(row_factory=class_row(ChatLease))
    params = {"telegram_chat_ids": telegram_chat_ids, "holder": holder, "ttl_s": ttl_s}
    await cur.execute(RENEW, params, prepare=True)
    return await cur.fetchall()


async def expire_mine(conn: Connection, *, holder: str) -> int:
    """Let every lease of ``holder`` expire now; how many."""
    cur = await conn.execute(EXPIRE_MINE, {"holder": holder})
    return cur.rowcount


# -- the process's side ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Handover:
    """What the holder does after a turn: answer ``question`` next (None: the lease is released,
    or lost to another process, and this process leaves the chat)."""

    question: NextQuestion | None


@dataclass(slots=True)
class _Held:
    version: int  # the newest version seen
    # When (``time.monotonic``) the lease surely lasts until: when the statement that set it
    # was sent, plus the TTL.
    until: float


class Leases:
    """This process's chat leases: which chats it works on now, the hand-over after a turn,
    and the background renewal and sweep.

    A process that stalls past its lease (overloaded, paused) may find the chat taken by a
    sweeper when it wakes. So before it stores or sends an answer, a turn asks ``secure``: the
    lease must have at least half its TTL to go (by this process's own clock, counted from when
    the statement that set it was sent, so never later than the database's expiry), or be
    renewed first; otherwise the turn stops (``LeaseLost``) and the new holder answers.
    """

    def __init__(self, pool: Pool, *, holder: str, ttl_s: int) -> None:
        self.pool = pool
        self.holder = holder
        self.ttl_s = ttl_s
        self._held: dict[int, _Held] = {}  # by telegram chat id
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._conn: Connection | None = None
        self._taking: set[asyncio.Task[None]] = set()

    def holds(self, chat_id: int) -> bool:
        """Whether this process works on the chat now (took its lease and has not let go)."""
        return chat_id in self._held

    @property
    def held(self) -> int:
        return len(self._held)

    def note(self, chat_id: int, *, held: bool, version: int, sent: float) -> None:
        """Record what a statement (sent at ``sent``, ``time.monotonic``) found about the chat's
        lease. Answers on different connections may be read out of order: an older version never
        overrides a newer one."""
        current = self._held.get(chat_id)
        if current is not None and current.version > version:
            return
        if held:
            self._held[chat_id] = _Held(version, sent + self.ttl_s)
        else:
            self._held.pop(chat_id, None)

    async def secure(self, chat_id: int) -> None:
        """Make sure this process holds the chat's lease for at least half its TTL more,
        renewing it when less is left. Raises ``LeaseLost`` when another process holds it, and
        ``StorageUnavailable`` when the database does not answer."""
        held = self._held.get(chat_id)
        if held is not None and held.until - time.monotonic() < self.ttl_s / 2:
            sent = time.monotonic()
            renewed = await call(self.pool, renew, telegram_chat_ids=[chat_id], holder=self.holder, ttl_s=self.ttl_s)
            self._renewed({chat_id: held.version}, renewed, sent)
        if chat_id not in self._held:
            raise LeaseLost(chat_id)

    def _renewed(self, asked: dict[int, int], renewed: list[ChatLease], sent: float) -> None:
        """Record a renewal of the chats ``asked`` (at the versions then seen). A chat let go
        meanwhile stays let go; one not renewed is another process's now, unless a newer
        statement said otherwise meanwhile."""
        for lease in renewed:
            current = self._held.get(lease.telegram_chat_id)
            if current is not None:
                current.version = max(current.version, lease.version)
                current.until = max(current.until, sent + self.ttl_s)
        kept = {lease.telegram_chat_id for lease in renewed}
        for chat_id, version in asked.items():
            current = self._held.get(chat_id)
            if chat_id not in kept and current is not None and current.version == version:
                logger.warning("lease of chat %s expired and was taken by another process", chat_id)
                del self._held[chat_id]

    def forget(self, chat_id: int) -> None:
        """Stop renewing the chat's lease (the database could not be asked): it expires and a
        sweeper, maybe this process's, takes it."""
        self._held.pop(chat_id, None)

    async def handover(self, chat_id: int, *, finished: int | None) -> Handover:
        """The chat's next question for this process, or None after releasing (or losing) it.
        Raises ``StorageUnavailable`` when the database does not answer (the lease is then forgotten)."""
        try:
            while True:
                sent = time.monotonic()
                found = await call(
                    self.pool,
                    next_question,
                    telegram_chat_id=chat_id,
                    holder=self.holder,
                    finished=finished,
                    ttl_s=self.ttl_s,
                )
                handover = self._settle(chat_id, found, sent)
                if handover is not None:
                    return handover
        except StorageUnavailable:
            self.forget(chat_id)
            raise

    def _settle(self, chat_id: int, found: NextQuestion, sent: float) -> Handover | None:
        """What a hand-over's answer means; None: a question was stored after its snapshot (the
        version moved, nothing was written), so the hand-over must look again."""
        if not found.held:
            logger.info("lease of chat %s is no longer this process's", chat_id)
            self._held.pop(chat_id, None)
            return Handover(None)
        if found.version is None:
            return None
        self.note(chat_id, held=found.question_id is not None, version=found.version, sent=sent)
        return Handover(found if found.question_id is not None else None)

    async def record_last_part(self, chat_id: int, *, answer_id: int, telegram_message_id: int) -> Handover | None:
        """Record the last part of an answer as delivered and hand the chat over, the two
        statements in one round trip (a pipeline): the hand-over of a turn that ended well costs
        no wait of its own. None when the hand-over must be asked again (``handover``)."""
        sent = time.monotonic()
        found = await call(
            self.pool,
            record_last_part,
            answer_id=answer_id,
            telegram_message_id=telegram_message_id,
            telegram_chat_id=chat_id,
            holder=self.holder,
            ttl_s=self.ttl_s,
        )
        return self._settle(chat_id, found, sent)

    async def take(self, chat_id: int, question_id: int) -> bool:
        """Take the chat's lease for a turn that is not a new question (see ``TAKE``); whether
        this process holds it now. When not, the holder answers ``question_id`` in its turn."""
        sent = time.monotonic()
        taken = await call(
            self.pool, take, telegram_chat_id=chat_id, holder=self.holder, question_id=question_id, ttl_s=self.ttl_s
        )
        if taken is None:
            return False
        self.note(chat_id, held=taken.held, version=taken.version, sent=sent)
        return taken.held

    async def claim(self, update_id: int) -> bool:
        """Whether this process is the first to claim the update (see ``CLAIM_UPDATE``)."""
        return await call(self.pool, claim_update, update_id=update_id)

    async def expire_mine(self) -> None:
        """Let every lease of this process expire now, for any sweeper to take."""
        expired = await call(self.pool, expire_mine, holder=self.holder)
        self._held.clear()
        if expired:
            logger.info("%d chat lease(s) of this process expired for others to take", expired)

    def start(self, on_taken: Callable[[int], Coroutine[Any, Any, None]]) -> None:
        """Renew this process's leases and sweep expired ones every third of the TTL; each chat
        swept is passed to ``on_taken`` (in a task of its own)."""
        self._task = asyncio.create_task(self._tend(on_taken), name="chat-leases")

    async def stop(self) -> None:
        """Stop renewing and sweeping once the round under way has ended (its statements are
        not cancelled mid-flight: that would leave the connection to a cancel request), and drop
        what a sweep took but has not handed over yet (``expire_mine`` lets it go)."""
        self._stopping.set()
        if self._task is not None:
            await self._task
        for task in list(self._taking):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _tend(self, on_taken: Callable[[int], Coroutine[Any, Any, None]]) -> None:
        every_s = max(0.2, self.ttl_s / 3)
        loop = asyncio.get_running_loop()
        purged_at = loop.time()
        while not self._stopping.is_set():
            try:
                await self.tend(on_taken)
                if loop.time() - purged_at > CLAIM_PURGE_EVERY_S:
                    purged_at = loop.time()
                    await purge_claims(await self._connection())
            except psycopg.Error as error:
                logger.warning("chat leases not renewed or swept this round: %s", type(error).__name__)
                if self._conn is not None:
                    await self._conn.close()
                    self._conn = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), every_s)

    async def _connection(self) -> Connection:
        """The tending's own connection: renewal must not wait behind the turns for the pool.
        A session of its own (``database.connect_session``): its statement timeout is a session
        setting, set once connected (a startup ``options`` parameter is refused by PgBouncer)."""
        if self._conn is None or self._conn.closed:
            # A round longer than a third of the TTL is failing anyway: it ends, and the next tries again.
            round_s = max(1, self.ttl_s // 3)
            conn = await database.connect_session(self.pool, connect_timeout=round_s)
            try:
                await conn.execute(SET_STATEMENT_TIMEOUT, {"ms": round_s * 1000})
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        return self._conn

    async def tend(self, on_taken: Callable[[int], Coroutine[Any, Any, None]]) -> int:
        """One round: renew what this process holds, take what expired; how many chats were
        taken. Raises ``psycopg.Error`` when the database does not answer."""
        conn = await self._connection()
        if self._held:
            asked = {chat_id: held.version for chat_id, held in self._held.items()}
            sent = time.monotonic()
            renewed = await renew(conn, telegram_chat_ids=list(asked), holder=self.holder, ttl_s=self.ttl_s)
            self._renewed(asked, renewed, sent)
        sent = time.monotonic()
        expired = await take_expired(conn, holder=self.holder, ttl_s=self.ttl_s)
        for lease in expired:
            self.note(lease.telegram_chat_id, held=True, version=lease.version, sent=sent)
        if expired:
            logger.warning("took %d expired chat lease(s)", len(expired))
        for lease in expired:
            task = asyncio.create_task(on_taken(lease.telegram_chat_id))
            self._taking.add(task)
            task.add_done_callback(self._taking.discard)
        return len(expired)

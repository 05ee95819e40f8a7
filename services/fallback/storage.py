"""Where the turn pipeline keeps what it must not lose, whether or not PostgreSQL answers.

While PostgreSQL answers, every read and write goes to it (through ``services.context``), and the
recent history of each active dialog is remembered in process memory as turns pass. When a call
finds the database unavailable, the bot degrades instead of apologising: turns are answered
from that memory, and every write (question, answer, delivery, failure, /clear) waits in the
spool, in order. A background task asks the server every second; once it answers, the spool is
written back in order and the bot returns to the database. With no database at all
(``DATABASE_ENABLED=false``) the same memory path is the only one, and nothing is spooled.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import psycopg

from services import context, database
from services.database import (
    Connection,
    Pool,
    Recalled,
    StartRead,
    UnfinishedTurn,
)
from services.failures import RETRY_LATER, StorageUnavailable, classify, reason
from services.fallback import spool
from services.fallback.memory import RecentHistory, Remembered
from services.fallback.spool import Spool, Spooled, SpooledKind, SpoolFull
from services.llm.budget import dialog_of
from services.ops import metrics
from services.records import (
    NO_USAGE,
    Answer,
    Attachment,
    Dialog,
    DialogContext,
    FinishReason,
    Question,
    TurnStart,
    Usage,
    as_sent,
    described,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")
RECOVERY_LOCK = "llmbot.recovery"
WRITE_BACK_BATCH = 100  # spooled writes per transaction
STATUS_EVERY_S = 30.0


class HistoryDisabled(StorageUnavailable):
    """The bot runs without a database (DATABASE_ENABLED=false): there is no stored history to
    search, export, undo or retry."""


class Unavailable(enum.Enum):
    """What ``Storage._in_database`` returns when the database could not do the work."""

    UNAVAILABLE = enum.auto()


UNAVAILABLE = Unavailable.UNAVAILABLE


@dataclass
class _SpooledTurn:
    answer: str | None = None
    sent_parts: int = 0
    settled: bool = False  # delivered, failed or cleared: nothing left to do


class Storage:
    """The turn pipeline's persistence, degrading to memory and a spool during an outage."""

    def __init__(
        self, pool: Pool | None, *, history: RecentHistory, spool: Spool | None, probe_every_s: float = 1.0
    ) -> None:
        self._pool = pool
        self._history = history
        self._spool = spool
        self._probe_every_s = probe_every_s
        self._healthy = pool is not None
        self._history_missing: set[Dialog] = set()
        self._writer: asyncio.Task[None] | None = None

    @property
    def degraded(self) -> bool:
        """Answering from memory: the database is unavailable, disabled, or being written back to."""
        return not self._healthy

    @property
    def spooled(self) -> int:
        """Writes waiting for the database."""
        return len(self._spool) if self._spool is not None else 0

    # -- start and stop -------------------------------------------------------------------------

    def resume_spool(self) -> list[Question]:
        """Load what a previous process spooled (it restarted during an outage): rebuild the memory
        from it, start writing it back, and return its questions still to answer or deliver."""
        if self._spool is None or not self._spool.load():
            return []
        logger.warning("%d spooled write(s) left by the previous run: writing them back", self.spooled)
        self._healthy = False  # new writes queue behind the spooled ones
        questions: dict[tuple[int, int], Question] = {}
        for item in self._spool.items:
            dialog = (item.user_id, item.chat_id)
            if item.kind == "question":
                questions[item.chat_id, item.message_id] = Question(
                    item.chat_id, item.user_id, item.message_id, thread_id=item.thread_id
                )
                content = described(item.text, [Attachment.from_stored(a) for a in item.attachments or ()])
                self._history.append(dialog, Remembered("user", content, item.message_id))
            elif item.kind == "answer":
                content = as_sent(item.text, item.finish_reason)
                self._history.append(dialog, Remembered("assistant", content, item.message_id))
            elif item.kind == "clear":
                self._history.forget(dialog)
        self._start_writer()
        return [q for q in questions.values() if not self._spooled_turn(q).settled]

    async def close(self) -> None:
        """Stop writing back; what is left stays in the spool's file for the next start."""
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer

    @asynccontextmanager
    async def recovery(self, max_age_s: int) -> AsyncIterator[list[UnfinishedTurn]]:
        """The database's unfinished turns, read under an advisory lock held for the block (one
        process recovers at a time); none when this process is not the one, or is degraded."""
        if not self._healthy:
            yield []
            return
        assert self._pool is not None
        async with contextlib.AsyncExitStack() as lock:
            unfinished: list[UnfinishedTurn] = []
            try:
                if await lock.enter_async_context(context.exclusive(self._pool, RECOVERY_LOCK)):
                    unfinished = await context.fetch_unfinished_turns(self._pool, max_age_s=max_age_s)
                else:
                    logger.info("another process is recovering unfinished turns")
            except StorageUnavailable:
                logger.warning("recovery of unfinished turns skipped: database unavailable")
            yield unfinished

    # -- what a turn does ---------------------------------------------------------------------

    async def register(self, *, user_id: int, first_name: str | None, chat_id: int) -> None:
        """Register user and chat (degraded: their first question's write-back registers them)."""
        await self._in_database(
            lambda pool: context.upsert_user_and_chat(
                pool, telegram_user_id=user_id, first_name=first_name, telegram_chat_id=chat_id
            )
        )

    async def admit(self, *, user_id: int, rate_limit: int, token_budget: int) -> None:
        """Count a hit for the user and check the budget, before a question that costs an API
        call to store; raises ``RateLimited`` or ``OverBudget``. Degraded, neither is checked."""
        await self._in_database(
            lambda pool: context.admit(pool, telegram_user_id=user_id, rate_limit=rate_limit, token_budget=token_budget)
        )

    async def add_question(
        self,
        *,
        user_id: int,
        first_name: str | None,
        chat_id: int,
        message_id: int,
        thread_id: int | None,
        content: str,
        rate_limit: int,
        quoted: str | None = None,
        attachments: Sequence[Attachment] = (),
        token_budget: int = 0,
        holder: str | None = None,
        lease_ttl_s: int = 0,
        read: StartRead | None = None,
    ) -> Question:
        """Store a question (with ``holder``: taking or bumping the chat's lease; with ``read``,
        reading its turn's start in the same round trip); raises ``RateLimited`` (``OverBudget``),
        or ``StorageUnavailable`` when it cannot be kept. Degraded, neither limit is checked: the
        question is spooled."""
        dialog = (user_id, chat_id)
        added = await self._in_database(
            lambda pool: context.add_question(
                pool,
                telegram_user_id=user_id,
                first_name=first_name,
                telegram_chat_id=chat_id,
                telegram_message_id=message_id,
                telegram_thread_id=thread_id,
                content=content,
                quoted=quoted,
                attachments=attachments,
                rate_limit=rate_limit,
                token_budget=token_budget,
                holder=holder,
                lease_ttl_s=lease_ttl_s,
                read=read,
            )
        )
        remembered = Remembered("user", described(content, attachments), message_id)
        if added is not UNAVAILABLE:
            question = Question(
                chat_id, user_id, message_id, added.id, thread_id, added.leased, added.lease_version, added.start
            )
            if added.new:
                self._history.append(dialog, remembered)
            if added.start is not None:
                self._remember(question, added.start.dialog)
            return question
        question = Question(chat_id, user_id, message_id, thread_id=thread_id)
        if self._spool is not None and any(
            i.kind == "question" and i.chat_id == chat_id and i.message_id == message_id for i in self._spool.items
        ):
            return question  # a redelivered update: its turn finds what is left to do
        if dialog not in self._history and self._pool is not None:
            self._history_missing.add(dialog)
        stored = [a.stored() for a in attachments] or None
        self._keep(
            Spooled(
                "question", chat_id, user_id, spool.now(), message_id, first_name, thread_id, content, quoted,
                attachments=stored,
            )
        )  # fmt: skip
        self._history.append(dialog, remembered)
        return question

    async def recall_earlier(
        self, question: Question, *, query: str, before_turn: int, limit: int, chars: int, shared: bool
    ) -> list[Recalled]:
        """The dialog's live messages from before turn ``before_turn`` that match ``query``; none
        while degraded (the memory holds only the recent history)."""
        found = await self._in_database(
            lambda pool: context.recall_earlier(
                pool,
                telegram_user_id=question.user_id,
                telegram_chat_id=question.chat_id,
                query=query,
                before_turn=before_turn,
                limit=limit,
                chars=chars,
                shared=shared,
            )
        )
        return [] if found is UNAVAILABLE else found

    async def start_turn(
        self, question: Question, *, history_limit: int, budget: int, shared: bool = False
    ) -> TurnStart | None:
        """The turn's context (at most ``history_limit`` messages, about ``budget`` estimated
        tokens) and stored answer; None when nothing is left to do."""
        question_id = question.id
        if question_id is not None:
            start = await self._in_database(
                lambda pool: context.fetch_turn_start(
                    pool, question_id=question_id, history_limit=history_limit, budget=budget, shared=shared
                )
            )
            if start is None:
                return None
            if start is not UNAVAILABLE:
                self._remember(question, start.dialog)
                return start
        state = self._spooled_turn(question)
        if state.settled or question.message_id is None:
            return None
        answer = Answer(None, state.answer, state.sent_parts) if state.answer is not None else None
        missing = question.dialog in self._history_missing
        self._history_missing.discard(question.dialog)  # the user is told once
        history = self._history.context(question.dialog, question.message_id)
        return TurnStart(dialog_of(history[-history_limit:]), answer, missing, from_database=False)

    async def add_answer(
        self, question: Question, content: str, finish_reason: FinishReason | None = None, usage: Usage = NO_USAGE
    ) -> Answer | None:
        """Store an answer (``finish_reason``: cut short, and why; ``usage``: its tokens); None
        when its question was cleared (or answered) meanwhile."""
        remembered = Remembered("assistant", as_sent(content, finish_reason), question.message_id)
        question_id = question.id
        if question_id is not None:
            answer_id = await self._in_database(
                lambda pool: context.add_answer(
                    pool, question_id=question_id, content=content, finish_reason=finish_reason, usage=usage
                )
            )
            if answer_id is None:
                return None
            if answer_id is not UNAVAILABLE:
                self._history.append(question.dialog, remembered)
                return Answer(answer_id, content)
        if question.message_id is None or self._spooled_turn(question).settled:
            return None
        self._keep_for(
            question,
            "answer",
            text=content,
            finish_reason=finish_reason,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
        )
        self._history.append(question.dialog, remembered)
        return Answer(None, content)

    async def record_sent_part(self, question: Question, answer: Answer, *, sent_message_id: int, last: bool) -> None:
        """Record one part of an answer accepted by Telegram; the last one makes it delivered."""
        answer_id = answer.id
        if answer_id is not None:
            done = await self._in_database(
                lambda pool: context.record_sent_part(
                    pool, answer_id=answer_id, telegram_message_id=sent_message_id, last=last
                )
            )
            if done is not UNAVAILABLE:
                return
        self._keep_for(question, "sent", sent_message_id=sent_message_id, last=last)

    async def set_failed(self, question: Question, answer: Answer | None = None) -> None:
        """End a turn for good: no answer could be made, or Telegram refused ``answer``."""
        target = answer.id if answer is not None else question.id
        if target is not None:
            done = await self._in_database(lambda pool: context.set_failed(pool, message_id=target))
            if done is not UNAVAILABLE:
                return
        self._keep_for(question, "failed", answer=answer is not None)

    async def clear(self, *, user_id: int, chat_id: int, rate_limit: int = 0) -> int:
        """Forget the dialog; how many messages were cleared (degraded: as many as were
        remembered). Raises ``RateLimited`` when the hit it counts is over ``rate_limit``: then
        nothing is forgotten. Degraded, no limit is checked: the clear is spooled."""
        cleared = await self._in_database(
            lambda pool: context.soft_delete_messages(
                pool, telegram_user_id=user_id, telegram_chat_id=chat_id, rate_limit=rate_limit
            )
        )
        remembered = self._history.forget((user_id, chat_id))
        self._history.remember((user_id, chat_id), [])  # known to be empty: nothing is missing
        if cleared is not UNAVAILABLE:
            return cleared.cleared
        self._keep(Spooled("clear", chat_id, user_id, spool.now()))
        return remembered

    # -- the stored history itself: only while the database is in use --------------------------

    @asynccontextmanager
    async def database(self) -> AsyncIterator[Pool]:
        """The pool, for work on the stored history itself (/search, /stats, /export, settings,
        /retry, /undo, edits, summaries), which has no fallback: ``HistoryDisabled`` without a
        database, ``StorageUnavailable`` while degraded. An outage met inside degrades the bot."""
        if self._pool is None:
            raise HistoryDisabled
        if not self._healthy:
            raise StorageUnavailable("degraded")
        try:
            yield self._pool
        except StorageUnavailable:
            self._degrade()
            raise

    def forget(self, user_id: int, chat_id: int) -> None:
        """Drop what memory holds of the dialog, changed in the database (/retry, /undo, an edit):
        the next turn reads it afresh."""
        self._history.forget((user_id, chat_id))

    async def _in_database(self, work: Callable[[Pool], Awaitable[T]]) -> T | Literal[Unavailable.UNAVAILABLE]:
        """``work(pool)`` while the database is in use; ``UNAVAILABLE`` when degraded, or when
        ``work`` finds it unavailable (which degrades the bot)."""
        if not self._healthy:
            return UNAVAILABLE
        assert self._pool is not None
        try:
            return await work(self._pool)
        except StorageUnavailable:
            self._degrade()
            return UNAVAILABLE

    # -- degraded mode ------------------------------------------------------------------------

    def _remember(self, question: Question, dialog: DialogContext) -> None:
        remembered = [Remembered(m.role, as_sent(m.content, m.finish_reason), None) for m in reversed(dialog.history)]
        if remembered and question.message_id is not None:
            remembered[-1] = Remembered("user", remembered[-1].content, question.message_id)
        self._history.remember(question.dialog, remembered)

    def _spooled_turn(self, question: Question) -> _SpooledTurn:
        state = _SpooledTurn()
        if self._spool is None:
            return state
        asked = False
        for item in self._spool.items:
            if item.chat_id != question.chat_id:
                continue
            if item.kind == "clear" and item.user_id == question.user_id:
                state.settled = state.settled or asked or question.id is not None
            elif item.message_id != question.message_id:
                continue
            elif item.kind == "question":
                asked = True
            elif item.kind == "answer":
                state.answer = item.text
            elif item.kind == "sent":
                state.sent_parts += 1
                state.settled = state.settled or item.last
            elif item.kind == "failed":
                state.settled = True
        return state

    def _keep_for(self, question: Question, kind: SpooledKind, **fields: Any) -> None:
        if question.message_id is not None:  # a question with no Telegram id cannot be written back
            self._keep(Spooled(kind, question.chat_id, question.user_id, spool.now(), question.message_id, **fields))

    def _keep(self, item: Spooled) -> None:
        """Spool a write for the database (none without a database); the spool's order is the
        write-back's, so from here on writes go through it until it is written back."""
        if self._spool is None:
            return
        try:
            self._spool.add(item)
        except SpoolFull:
            logger.error("spool full (%d writes): a %s cannot be kept", self._spool.max_items, item.kind)
            raise StorageUnavailable("spool full") from None
        self._healthy = False
        self._start_writer()

    def _degrade(self) -> None:
        if self._healthy:
            logger.error("database unavailable: answering from memory, spooling writes until it returns")
        self._healthy = False
        self._start_writer()

    def _start_writer(self) -> None:
        if self._pool is not None and self._spool is not None and (self._writer is None or self._writer.done()):
            self._writer = asyncio.create_task(self._write_back_when_back(), name="write-back")

    async def _write_back_when_back(self) -> None:
        assert self._pool is not None and self._spool is not None
        last_status = time.monotonic()
        while True:
            await asyncio.sleep(self._probe_every_s)
            if time.monotonic() - last_status > STATUS_EVERY_S:
                logger.warning("degraded: %d spooled write(s) wait for the database", self.spooled)
                last_status = time.monotonic()
            if not await database.server_answers(self._pool):
                continue
            started, written = time.monotonic(), 0
            try:
                while self._spool.items:
                    batch = self._spool.items[:WRITE_BACK_BATCH]
                    try:
                        await database.run(self._pool, _write_batch, batch)
                    except psycopg.Error as error:
                        if classify(error) in RETRY_LATER:
                            raise
                        await self._write_one_by_one(len(batch))  # to find the write it refuses
                    else:
                        self._spool.drop_first(len(batch))
                    written += len(batch)
            except psycopg.Error as error:
                logger.warning("write-back interrupted after %d write(s): %s", written, reason(error))
                continue
            # Nothing awaited since the spool was found empty: no write can slip in between.
            self._healthy = True
            self._history_missing.clear()
            logger.warning(
                "write-back finished: %d write(s) in %.1fs; the database is back", written, time.monotonic() - started
            )
            return

    async def _write_one_by_one(self, count: int) -> None:
        """Write back the first ``count`` spooled writes one at a time: one the database refuses
        (its input, or a bug) is set aside, logged and counted, never tried again."""
        assert self._pool is not None and self._spool is not None
        for _ in range(count):
            item = self._spool.items[0]
            try:
                await database.run(self._pool, _write_batch, [item])
            except psycopg.Error as error:
                if classify(error) in RETRY_LATER:
                    raise
                metrics.SPOOL_SET_ASIDE.inc()
                logger.error(
                    "spooled %s of chat %s, message %s set aside: the database refuses it (%s)",
                    item.kind, item.chat_id, item.message_id, reason(error),
                )  # fmt: skip
            self._spool.drop_first(1)


async def _write_batch(conn: Connection, batch: list[Spooled]) -> None:
    async with conn.transaction():
        for item in batch:
            await spool.write_back(conn, item)

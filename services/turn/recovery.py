"""Recovery at start-up: the turns a crash or an outage left unfinished, queued again.

First those a previous run spooled during an outage, then the database's: one process at a
time (a PostgreSQL advisory lock, held until they have run). Each turn reads its own state when
it runs, so a turn finished meanwhile is not answered twice. None passes the admission again:
each question was admitted when it was stored or re-opened (a refused one was stored set aside,
and is not unfinished), and a spooled one while degraded, when no limit is checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack

from config import Config
from services.cluster.ownership import Ownership
from services.failures import StorageUnavailable
from services.fallback.storage import Storage
from services.records import Question

logger = logging.getLogger(__name__)


class Recovery:
    """Queues the unfinished turns (``queue``: a question's turn, queued; its future resolves
    once it has run), and holds the recovery lock until they have run."""

    def __init__(
        self, storage: Storage, owner: Ownership, config: Config, *, queue: Callable[[Question], asyncio.Future[None]]
    ) -> None:
        self._storage = storage
        self._owner = owner
        self._max_age_s = config.pending_reply_max_age_s
        self._queue = queue
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Queue the unfinished turns ahead of new messages; how many."""
        done = [self._queue(question) for question in self._storage.resume_spool()]
        await self._owner.release()  # what a previous run of this process held is taken below, or swept, at once
        if self._max_age_s:
            lock = AsyncExitStack()
            unfinished = await lock.enter_async_context(self._storage.recovery(self._max_age_s))
            refused: set[int] = set()  # chats another process holds: it answers them
            for turn in unfinished:
                chat_id = turn.telegram_chat_id
                if chat_id in refused:
                    continue
                question = Question(
                    chat_id, turn.telegram_user_id, turn.telegram_message_id, turn.question_id, turn.telegram_thread_id
                )
                try:
                    ours = self._owner.answers(chat_id, question.id) or await self._owner.take(chat_id, question.id)
                except StorageUnavailable:
                    ours = True  # as with one process: the turn reads its state when it runs
                if not ours:
                    refused.add(chat_id)
                    continue
                done.append(self._queue(question))
            self._task = asyncio.create_task(self._release_after(lock, done))
        logger.info("recovering %d unfinished turn(s)", len(done))
        return len(done)

    async def _release_after(self, lock: AsyncExitStack, done: list[asyncio.Future[None]]) -> None:
        try:
            if done:
                await asyncio.wait(done)
            logger.info("recovered %d unfinished turn(s)", len(done))
        finally:
            await lock.aclose()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

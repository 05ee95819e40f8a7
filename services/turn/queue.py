"""Per-chat order with a bound on the work in flight.

Each chat's jobs run one at a time, in the order they were submitted; different chats run in
parallel, at most ``limit`` jobs at once across all chats. A chat's *intake* is a FIFO lock,
taken in the order updates arrive, so what enters a chat (a question stored, a /clear) enters
in arrival order as well. A chat with nothing queued, running or waiting is forgotten, so memory
follows the active chats, not every chat ever seen. Nothing here knows what a job does.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

StopReason = Literal["stop", "cancel"]  # the user stopped it (its text is kept); a /clear, /undo or edit


class Stopped(Exception):
    """The work awaited through ``ChatQueues.stoppable`` was stopped: ``reason`` is ``"stop"``
    (``ChatQueues.stop``: keep what was done) or ``"cancel"`` (``ChatQueues.cancel``: drop it)."""

    def __init__(self, reason: StopReason) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)
class _Job(Generic[T]):
    ident: int
    item: T
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


@dataclass(eq=False)
class _Chat(Generic[T]):
    intake: asyncio.Lock = field(default_factory=asyncio.Lock)
    queue: deque[_Job[T]] = field(default_factory=deque)
    entering: int = 0  # holders of the intake and waiters for it
    worker: asyncio.Task[None] | None = None
    running: _Job[T] | None = None
    stoppable: asyncio.Future[Any] | None = None
    stop_reason: StopReason = "stop"

    def idle(self) -> bool:
        return not (self.entering or self.queue or self.worker)


class ChatQueues(Generic[T]):
    """Runs ``handle(item)`` for the items submitted to each chat, one chat's at a time."""

    def __init__(
        self,
        handle: Callable[[T], Awaitable[None]],
        *,
        limit: int,
        after: Callable[[T], Awaitable[None]] | None = None,
    ) -> None:
        """``after(item)``: run by the chat's worker once ``handle(item)`` has ended, inside the
        chat's intake, so it sees what the updates before it did and none after it."""
        self._handle = handle
        self._after = after
        self._slots = asyncio.Semaphore(limit)
        self._chats: dict[int, _Chat[T]] = {}

    def _chat(self, chat_id: int) -> _Chat[T]:
        chat = self._chats.get(chat_id)
        if chat is None:
            chat = self._chats[chat_id] = _Chat()
        return chat

    def _forget_if_idle(self, chat_id: int, chat: _Chat[T]) -> None:
        if chat.idle() and self._chats.get(chat_id) is chat:
            del self._chats[chat_id]

    @asynccontextmanager
    async def intake(self, chat_id: int) -> AsyncIterator[None]:
        """Hold the chat's intake; callers get it in the order they asked for it.

        The order is fixed when this is entered, so enter it before the first real wait of
        the update's task (aiogram starts one task per update, in the order they arrive).
        """
        chat = self._chat(chat_id)
        chat.entering += 1
        try:
            async with chat.intake:
                yield
        finally:
            chat.entering -= 1
            self._forget_if_idle(chat_id, chat)

    def submit(self, chat_id: int, ident: int, item: T, *, first: bool = False) -> asyncio.Future[None]:
        """Queue ``item`` behind the chat's earlier items (``first``: ahead of them); a future
        resolved once it has run or was dropped. An item whose ``ident`` is queued or running
        already is not queued twice (with ``first``, a queued one moves to the front)."""
        chat = self._chat(chat_id)
        for job in (chat.running, *chat.queue):
            if job is not None and job.ident == ident:
                if first and job is not chat.running:
                    chat.queue.remove(job)
                    chat.queue.appendleft(job)
                return job.done
        job = _Job(ident, item)
        if first:
            chat.queue.appendleft(job)
        else:
            chat.queue.append(job)
        if chat.worker is None:
            chat.worker = asyncio.create_task(self._work(chat_id, chat), name=f"chat-{chat_id}")
        return job.done

    def pending(self, chat_id: int, matches: Callable[[T], bool]) -> list[T]:
        """The chat's running and queued items that ``matches``, in the order they run."""
        chat = self._chats.get(chat_id)
        if chat is None:
            return []
        return [job.item for job in (chat.running, *chat.queue) if job is not None and matches(job.item)]

    async def stoppable(self, chat_id: int, work: Awaitable[R]) -> R:
        """Await ``work`` (from inside a job of ``chat_id``) so that ``cancel`` can stop it;
        raises ``Stopped`` when it did."""
        chat = self._chats[chat_id]
        task = asyncio.ensure_future(work)
        chat.stoppable = task
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                raise Stopped(chat.stop_reason) from None
            raise
        finally:
            chat.stoppable = None

    async def cancel(self, chat_id: int, matches: Callable[[T], bool]) -> None:
        """Drop the chat's queued items that ``matches``; stop the running one if it matches
        (only what it awaits through ``stoppable``, which raises ``Stopped("cancel")``) and wait
        until it has ended."""
        chat = self._chats.get(chat_id)
        if chat is None:
            return
        for job in [job for job in chat.queue if matches(job.item)]:
            chat.queue.remove(job)
            job.finish()
        running = chat.running
        if running is not None and matches(running.item):
            self._stop(chat, "cancel")
            await asyncio.wait({running.done})

    def stop(self, chat_id: int, matches: Callable[[T], bool], *, reason: StopReason = "stop") -> bool:
        """Stop what the chat's running item awaits through ``stoppable``, if it ``matches``;
        whether there was something to stop. The item goes on with what it has, told ``reason``
        (``Stopped``); queued items are left alone."""
        chat = self._chats.get(chat_id)
        if chat is None or chat.running is None or not matches(chat.running.item) or chat.stoppable is None:
            return False
        self._stop(chat, reason)
        return True

    @staticmethod
    def _stop(chat: _Chat[T], reason: StopReason) -> None:
        if chat.stoppable is not None:
            chat.stop_reason = reason
            chat.stoppable.cancel()

    async def _work(self, chat_id: int, chat: _Chat[T]) -> None:
        try:
            while chat.queue:
                async with self._slots:
                    if not chat.queue:  # dropped by cancel while waiting for a slot
                        break
                    job = chat.running = chat.queue.popleft()
                    try:
                        await self._handle(job.item)
                    except Exception:
                        # One broken job must not stop the chat, nor any other chat.
                        logger.exception("job %s in chat %s failed", job.ident, chat_id)
                    finally:
                        chat.running = None
                        job.finish()
                if self._after is not None:
                    async with self.intake(chat_id):
                        try:
                            await self._after(job.item)
                        except Exception:
                            logger.exception("after job %s in chat %s failed", job.ident, chat_id)
        finally:
            chat.worker = None
            self._forget_if_idle(chat_id, chat)

    async def drain(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for every queued and running job; how many chats still had work."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while workers := {chat.worker for chat in self._chats.values() if chat.worker is not None}:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return len(workers)
            await asyncio.wait(workers, timeout=remaining)
        return 0

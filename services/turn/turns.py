"""The chat's front desk: questions are stored and queued here, and the commands that change a
turn (/clear, /retry, /undo, an edit, a stop) act on the queue; each turn itself runs in
``services.turn.turn``, one chat's at a time, in arrival order (``services.turn.queue``).

A question is stored at once, in arrival order, by one statement that also decides its
admission (rate limit, daily budget) and, with several processes, the chat's lease; then its
turn waits behind the chat's earlier ones. Commands that re-open a question (/retry, an edit)
are admitted the same way, by the statement that re-opens it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager

from config import Config
from services import context
from services.cluster.leases import NextQuestion
from services.cluster.ownership import Ownership
from services.cluster.signals import ChatSignal
from services.database import StartRead, Undone
from services.fallback.storage import Storage
from services.llm.budget import ContextBudget, Window
from services.llm.client import LLM
from services.llm.summaries import Summariser
from services.media.files import ImageCache
from services.media.intake import ShownImage
from services.records import Attachment, Question
from services.turn.delivery import Address, Delivery
from services.turn.queue import ChatQueues
from services.turn.recovery import Recovery
from services.turn.turn import Crew, Turn

logger = logging.getLogger(__name__)


class Turns:
    """Stores questions, queues their turns, and carries out the commands that change them."""

    def __init__(
        self,
        storage: Storage,
        llm: LLM,
        delivery: Delivery,
        config: Config,
        owner: Ownership,
        images: ImageCache | None = None,
    ) -> None:
        self._storage = storage
        self._config = config
        self._owner = owner
        self._queues: ChatQueues[Turn] = ChatQueues(
            self._run, limit=config.max_turns_in_flight, after=self._after if owner.hands_over else None
        )
        self.budget = ContextBudget(
            context_tokens=config.context_tokens,
            max_tokens=config.llm_max_tokens,
            models=config.allowed_models or (config.llm_model,),
            model_list=llm.context_lengths,
        )
        self._crew = Crew(
            storage,
            llm,
            delivery,
            config,
            owner,
            self._queues,
            self.budget,
            Summariser(storage, llm, config.llm_max_tokens),
            images,
        )
        self._recovery = Recovery(storage, owner, config, queue=self._recover)

    def intake(self, chat_id: int) -> AbstractAsyncContextManager[None]:
        """The chat's intake, a FIFO lock: ``ask`` and the commands run inside it, entered in the
        order the chat's updates arrived, so they take effect in that order."""
        return self._queues.intake(chat_id)

    async def ask(
        self,
        *,
        user_id: int,
        first_name: str | None,
        address: Address,
        telegram_message_id: int,
        text: str,
        quoted: str | None = None,
        attachments: Sequence[Attachment] = (),
        images: Sequence[ShownImage] = (),
        admitted: bool = False,
    ) -> None:
        """Store a question and queue its turn behind the chat's earlier ones (inside the intake);
        ``quoted``: the text it replies to, which its turn's context shows before it;
        ``attachments``: what it came with, ``images`` those shown as received; ``admitted``: its
        hit was counted already (``admit``).

        Raises ``RateLimited`` or ``OverBudget`` (the question is set aside) or ``StorageUnavailable``.
        A message stored before (a redelivered update, a retried statement) is queued again: its
        turn finds out from the database what, if anything, is still to do.
        """
        chat_id = address.chat_id
        # Where nothing of the chat is queued or running here, its turn starts at once: its start
        # is read in the round trip that stores the question (ADR-04).
        read = None
        if not self._queues.pending(chat_id, lambda _: True):
            read = StartRead(self._config.history_limit, await self.budget.read_bound(), self._crew.shared(chat_id))
        sent = time.monotonic()
        question = await self._storage.add_question(
            user_id=user_id,
            first_name=first_name,
            chat_id=chat_id,
            message_id=telegram_message_id,
            thread_id=address.thread_id,
            content=text,
            quoted=quoted,
            attachments=attachments,
            rate_limit=0 if admitted else self._config.rate_limit_per_minute,
            token_budget=self._config.daily_token_budget_per_user,
            holder=self._owner.holder,
            lease_ttl_s=self._owner.ttl_s,
            read=read,
        )
        logger.debug("user %s in chat %s: question %s, %d chars", user_id, chat_id, question.id, len(text))
        if not self._owner.asked(
            chat_id, leased=question.leased, version=question.lease_version, sent=sent
        ):  # another process answers the chat now, this question in its turn
            logger.info("question %s left to the process holding chat %s", question.id, chat_id)
            return
        self._submit(Turn(self._crew, question, address, quoted=quoted, images=images))

    async def admit(self, *, user_id: int) -> None:
        """Admit a question before it costs an API call to store (a voice message, transcribed
        first): raises ``RateLimited`` or ``OverBudget``; then ``ask`` it with ``admitted``."""
        config = self._config
        await self._storage.admit(
            user_id=user_id, rate_limit=config.rate_limit_per_minute, token_budget=config.daily_token_budget_per_user
        )

    async def register(self, *, user_id: int, first_name: str | None, chat_id: int) -> None:
        """Register the user and the chat on first contact, keeping ``first_name`` current."""
        await self._storage.register(user_id=user_id, first_name=first_name, chat_id=chat_id)

    def _recover(self, question: Question) -> asyncio.Future[None]:
        return self._submit(Turn.late(self._crew, question))

    def _submit(self, turn: Turn, *, first: bool = False) -> asyncio.Future[None]:
        return self._queues.submit(turn.chat_id, turn.ident, turn, first=first)

    async def _run(self, turn: Turn) -> None:
        if not self._owner.answers(turn.chat_id, turn.question.id):
            logger.info("question %s left to the process holding chat %s", turn.question.id, turn.chat_id)
            return
        await turn.run()

    async def _after(self, turn: Turn) -> None:
        """After a turn (inside the chat's intake, so a /clear that stopped it has taken effect):
        the chat's next question for this process goes first in its queue."""
        found = await self._owner.after(
            turn.chat_id, turn.question.id, settled=not turn.unsettled, handover=turn.handover
        )
        if found is not None:
            self._handed_over(turn.chat_id, found)

    def _handed_over(self, chat_id: int, found: NextQuestion) -> None:
        self._submit(Turn.handed_over(self._crew, chat_id, found), first=True)

    # -- the commands ---------------------------------------------------------------------------

    async def clear(self, *, user_id: int, chat_id: int) -> int:
        """Forget the user's history in the chat (inside the intake); how many messages were cleared.

        It counts against the rate limit: over it, ``RateLimited`` and nothing changes (the
        statement decides, before any turn is touched). Then the user's queued turns are dropped
        and a running one is stopped (or, when it is already delivering, waited for), so no
        answer from before arrives after the clear: a turn that starts or stores meanwhile finds
        its question cleared. When another process holds the chat, it is told to stop the
        user's running turn as well.
        """
        cleared = await self._storage.clear(
            user_id=user_id, chat_id=chat_id, rate_limit=self._config.rate_limit_per_minute
        )
        await self._queues.cancel(chat_id, lambda turn: turn.question.user_id == user_id)
        await self._owner.tell_holder(ChatSignal("cancel", chat_id, user_id))  # its answer to what was cleared stops
        return cleared

    async def retry(self, *, user_id: int, chat_id: int) -> bool:
        """Ask the user's last question in the chat again (inside the intake): its answer is set
        aside (one still being written is dropped) and a new one is written. Whether there was
        a question to ask again.

        Admitted as a new question is (``RateLimited``, ``OverBudget``: nothing changes), by the
        statement that re-opens the question, before the turn being written is touched: a
        refused /retry costs no LLM call, not even one started again."""
        async with self._storage.database() as pool:
            retried = await context.retry_last_turn(
                pool,
                telegram_user_id=user_id,
                telegram_chat_id=chat_id,
                rate_limit=self._config.rate_limit_per_minute,
                token_budget=self._config.daily_token_budget_per_user,
            )
        if retried.id is None:
            return False
        self._storage.forget(user_id, chat_id)  # the next turn reads the history afresh
        question = Question(chat_id, user_id, retried.telegram_message_id, retried.id, retried.telegram_thread_id)
        await self._drop_newest_turn(user_id, chat_id)
        if await self._owner.take(chat_id, question.id):
            self._submit(Turn.late(self._crew, question))
        logger.info("user %s in chat %s: question %s asked again", user_id, chat_id, question.id)
        return True

    async def undo(self, *, user_id: int, chat_id: int) -> Undone:
        """Take back the user's last turn in the chat, or the /clear right before (inside the
        intake); a turn of it still queued or being written is dropped. It counts against the
        rate limit: over it, ``RateLimited`` and nothing changes."""
        async with self._storage.database() as pool:
            undone = await context.undo_last_turn(
                pool, telegram_user_id=user_id, telegram_chat_id=chat_id, rate_limit=self._config.rate_limit_per_minute
            )
        self._storage.forget(user_id, chat_id)
        if undone.undone:
            await self._drop_newest_turn(user_id, chat_id)
        return undone

    async def _drop_newest_turn(self, user_id: int, chat_id: int) -> None:
        """Drop the user's newest turn in the chat if it is queued or running (a running one
        stops writing, or finishes delivering first): it is the last question, just changed.
        Dropped after the change, which decides the admission: a turn that stores its answer in
        that moment finds its question undone (nothing stored), or, re-opened by a /retry or an
        edit, delivers that answer, which the new turn then finds."""
        mine = self._queues.pending(chat_id, lambda turn: turn.question.user_id == user_id)
        if mine:
            newest = mine[-1]
            await self._queues.cancel(chat_id, lambda turn: turn is newest)

    async def edit(self, *, user_id: int, address: Address, telegram_message_id: int, text: str) -> bool:
        """The user edited a message (inside the intake): a stored question takes the new text,
        and when it is the user's last one, it is answered again. Whether it was a stored question."""
        chat_id = address.chat_id
        # The user's turns here, seen before the edit reads which messages show the answer: one
        # delivering now records its message after that read.
        mine = self._queues.pending(chat_id, lambda turn: turn.question.user_id == user_id)
        async with self._storage.database() as pool:
            edited = await context.edit_question(
                pool,
                telegram_user_id=user_id,
                telegram_chat_id=chat_id,
                telegram_message_id=telegram_message_id,
                content=text,
                rate_limit=self._config.rate_limit_per_minute,
                token_budget=self._config.daily_token_budget_per_user,
            )  # admitted as a new question is (refused: nothing changed, its running turn goes on)
        if edited is None:
            return False
        self._storage.forget(user_id, chat_id)
        if not edited.last:
            return True
        replaces = edited.replaced_message_ids[0] if edited.replaced_message_ids else None
        if mine and mine[-1].ident == telegram_message_id:  # its answer, written to the old text, is dropped
            newest = mine[-1]
            await self._queues.cancel(chat_id, lambda turn: turn is newest)  # (nothing, if it has ended)
            # Delivering when the edit read, it sent the message to replace (recorded since, or not).
            replaces = replaces if replaces is not None else newest.first_message_id
        question = Question(chat_id, user_id, telegram_message_id, edited.id, edited.telegram_thread_id)
        if await self._owner.take(chat_id, question.id):
            self._submit(Turn(self._crew, question, address, replaces=replaces))
        logger.info("user %s in chat %s: question %s edited, answered again", user_id, chat_id, edited.id)
        return True

    async def stop(self, *, chat_id: int, user_id: int | None = None, ident: int | None = None) -> bool:
        """Stop the answer being written in the chat (by ``user_id``, or for question ``ident``):
        what was written so far becomes the answer. Whether there was one to stop: here, or at
        the process holding the chat (several processes), which is asked to."""
        signal = ChatSignal("stop", chat_id, user_id, ident)
        return self._stop_here(signal) or await self._owner.tell_holder(signal)

    def _stop_here(self, signal: ChatSignal) -> bool:
        return self._queues.stop(
            signal.chat_id,
            lambda turn: (
                (signal.user_id is None or turn.question.user_id == signal.user_id)
                and (signal.ident is None or turn.ident == signal.ident)
            ),
        )

    def _signalled(self, signal: ChatSignal) -> None:
        """Act on a signal another process passed on: a stop, or a /clear's cancel of the user's
        running turn. Not of the user's queued turns: they may be questions sent after the clear
        (the notification can come after them), and those before it find nothing left to do. A
        question asked after the clear whose turn was cancelled all the same is still open, and
        the chat's hand-over gives it back to this process."""
        if signal.kind == "stop":
            self._stop_here(signal)
        else:
            self._queues.stop(signal.chat_id, lambda turn: turn.question.user_id == signal.user_id, reason="cancel")

    async def next_window(self, *, user_id: int, chat_id: int) -> tuple[str, Window]:
        """The model and the context the user's next turn in the chat would take (/context)."""
        crew = self._crew
        async with self._storage.database() as pool:
            settings = crew.chosen(await context.get_chat_settings(pool, telegram_chat_id=chat_id))
            dialog = await context.fetch_next_context(
                pool,
                telegram_user_id=user_id,
                telegram_chat_id=chat_id,
                history_limit=self._config.history_limit,
                budget=await self.budget.read_bound(),
                shared=crew.shared(chat_id),
            )
        return crew.model_of(settings), await crew.window(dialog, settings)

    # -- start and stop -------------------------------------------------------------------------

    async def recover(self) -> int:
        """Queue the turns a crash or an outage left unfinished, ahead of new messages, and start
        tending the chats this process holds; how many turns were queued."""
        queued = await self._recovery.start()
        self._owner.start(self._handed_over, self._signalled)
        return queued

    async def drain(self, timeout_s: float) -> None:
        """Let queued and running turns finish, up to ``timeout_s``; what is left is recovered
        at the next start."""
        left = await self._queues.drain(timeout_s)
        if left:
            logger.warning("%d chat(s) still had turns after %.0fs; they resume at the next start", left, timeout_s)
        await self._owner.stop()
        await self._recovery.stop()

"""The turn pipeline: one chat turn, start to end, and the order turns run in.

A turn: the question is stored at once, in arrival order → it waits behind the chat's earlier
turns → its context is read → the LLM answers → the answer is stored → each part goes to
Telegram and is recorded as accepted. Every step leaves a fact in the database, so a turn cut
short anywhere (crash, outage, Telegram down) resumes where it stopped, and never asks the LLM
again for an answer it has stored. Telegram itself stays behind the ``Delivery`` seam.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass, replace

from config import Config
from services.cluster.leases import Handover, LeaseLost, Leases, NextQuestion
from services.cluster.signals import ChatSignal, ChatSignals
from services.database import Undone
from services.failures import BadRequest, StorageUnavailable
from services.fallback.storage import Storage
from services.llm.budget import ContextBudget, Window
from services.llm.client import LLM, LLMError, system_prompt_of
from services.llm.summaries import Summariser
from services.ops import metrics
from services.records import Answer, ChatMessage, ChatSettings, DialogContext, FinishReason, Question, Usage
from services.text.clean import storable
from services.text.formatting import Part, render, split
from services.turn.delivery import Address, Delivery, DeliveryFailed, DeliveryRefused
from services.turn.queue import ChatQueues, Stopped
from services.turn.streaming import LiveReply, Shown

logger = logging.getLogger(__name__)

DB_APOLOGY = "Sorry, my memory is unavailable right now. Please try again in a minute."
LLM_APOLOGY = "Sorry, I couldn't come up with an answer just now. Please try again in a moment."
BAD_INPUT = "Sorry, my memory refuses that as it is. Please rephrase it and try again."
APOLOGY = "Sorry, something went wrong on my side. Please try again."
HISTORY_MISSING = "(I can't reach my memory of our earlier messages right now, so I'm answering this one on its own.)"
SUMMARY_NOTICE = "(Our conversation has grown long, so I summarised its older part to keep it in mind.)"


@dataclass(frozen=True, slots=True)
class TurnRequest:
    """A stored question waiting for its turn; ``replaces``: the message showing the answer that
    the new one replaces (an edited question), edited in place where Telegram allows."""

    question: Question
    address: Address
    replaces: int | None = None
    quoted: str | None = None  # the text the question replies to, from its update (stored with it too)

    @classmethod
    def late(cls, question: Question) -> TurnRequest:
        """The turn of a question recovered after a restart (or re-opened by /retry): its answer
        quotes the question. No admission here: the question was admitted by the statement that
        stored (or re-opened) it, and is not charged again."""
        return cls(question, Address(question.chat_id, question.thread_id, question.message_id))

    @classmethod
    def handed_over(cls, chat_id: int, found: NextQuestion) -> TurnRequest:
        """The turn of a question the chat's lease hands this process (stored by any process):
        answered as a new question is (quoting it in groups only). Admitted when it was stored
        (or re-opened), by whichever process did: not charged again."""
        assert found.question_id is not None and found.telegram_user_id is not None
        message_id = found.telegram_message_id
        question = Question(chat_id, found.telegram_user_id, message_id, found.question_id, found.telegram_thread_id)
        return cls(question, Address(chat_id, found.telegram_thread_id, message_id if chat_id < 0 else None))

    @property
    def ident(self) -> int:
        """Unique among the chat's turns: Telegram's message id (or, lacking it, the row's)."""
        question = self.question
        return question.message_id if question.message_id is not None else -(question.id or 0)


def with_quote(context: list[ChatMessage], quoted: str | None) -> list[ChatMessage]:
    """The context with the text the question replies to shown before the question."""
    if not quoted or not context:
        return context
    question = context[-1]
    return [*context[:-1], {"role": question["role"], "content": f"[Replying to: {quoted}]\n\n{question['content']}"}]


class Turns:
    """Stores questions, runs their turns one chat at a time, and clears and recovers them."""

    def __init__(
        self, storage: Storage, llm: LLM, delivery: Delivery, config: Config, leases: Leases | None = None
    ) -> None:
        self._storage = storage
        self._llm = llm
        self._delivery = delivery
        self._config = config
        self._leases = leases  # None: no database, so no other process to agree with
        self._left: set[int] = set()  # questions whose turn ended unsettled, until handed over
        self._handed: dict[int, Handover] = {}  # question -> the hand-over recorded with its delivery
        self._queues: ChatQueues[TurnRequest] = ChatQueues(
            self._run, limit=config.max_turns_in_flight, after=self._after if leases is not None else None
        )
        self._recovery: asyncio.Task[None] | None = None
        self._signals = (
            ChatSignals(leases.pool, holder=leases.holder, on_signal=self._signalled) if leases is not None else None
        )
        self.budget = ContextBudget(
            context_tokens=config.context_tokens,
            max_tokens=config.llm_max_tokens,
            models=config.allowed_models or (config.llm_model,),
            model_list=llm.context_lengths,
        )
        self._summariser = Summariser(storage, llm, config.llm_max_tokens)

    def intake(self, chat_id: int) -> AbstractAsyncContextManager[None]:
        """The chat's intake, a FIFO lock: ``ask`` and ``clear`` run inside it, entered in the
        order the chat's updates arrived, so a chat's questions and clears take effect in that order."""
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
    ) -> None:
        """Store a question and queue its turn behind the chat's earlier ones (inside the intake);
        ``quoted``: the text it replies to, which its turn's context shows before it.

        Raises ``RateLimited`` or ``OverBudget`` (the question is set aside) or ``StorageUnavailable``.
        A message stored before (a redelivered update, a retried statement) is queued again: its
        turn finds out from the database what, if anything, is still to do.
        """
        sent = time.monotonic()
        question = await self._storage.add_question(
            user_id=user_id,
            first_name=first_name,
            chat_id=address.chat_id,
            message_id=telegram_message_id,
            thread_id=address.thread_id,
            text=text,
            quoted=quoted,
            rate_limit=self._config.rate_limit_per_minute,
            token_budget=self._config.daily_token_budget_per_user,
            holder=self._leases.holder if self._leases is not None else None,
            lease_ttl_s=self._leases.ttl_s if self._leases is not None else 0,
        )
        logger.info("user %s in chat %s: question %s, %d chars", user_id, address.chat_id, question.id, len(text))
        if question.leased is not None and self._leases is not None:
            self._leases.note(address.chat_id, held=question.leased, version=question.lease_version or 0, sent=sent)
            if not question.leased:  # another process answers the chat now, this question in its turn
                logger.info("question %s left to the process holding chat %s", question.id, address.chat_id)
                return
        self._submit(TurnRequest(question, address, quoted=quoted))

    async def register(self, *, user_id: int, first_name: str | None, chat_id: int) -> None:
        """Register the user and the chat on first contact, keeping ``first_name`` current."""
        await self._storage.register(user_id=user_id, first_name=first_name, chat_id=chat_id)

    def _submit(self, turn: TurnRequest, *, first: bool = False) -> asyncio.Future[None]:
        return self._queues.submit(turn.address.chat_id, turn.ident, turn, first=first)

    async def _leased(self, chat_id: int, question: Question) -> bool:
        """Whether this process may run the turn of ``question``, which is not a new question (a
        /retry, an edit, a recovered turn): it takes the chat's lease when it can; otherwise the
        process holding it answers the question in its turn."""
        if self._leases is None or question.id is None:
            return True
        if await self._leases.take(chat_id, question.id):
            return True
        logger.info("question %s left to the process holding chat %s", question.id, chat_id)
        return False

    async def _hand_over(self, chat_id: int, finished: int | None) -> None:
        """The lease's next question for this chat goes first in its queue (stored by this process
        or another); with none left the lease is released."""
        assert self._leases is not None
        try:
            handover = await self._leases.handover(chat_id, finished=finished)
        except StorageUnavailable:
            logger.warning("chat %s: lease not handed over (database unavailable); it expires", chat_id)
            return
        if handover.question is not None:
            self._submit(TurnRequest.handed_over(chat_id, handover.question), first=True)

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
        await self._to_holder(ChatSignal("cancel", chat_id, user_id))  # its answer to what was cleared stops
        return cleared

    async def retry(self, *, user_id: int, chat_id: int) -> bool:
        """Ask the user's last question in the chat again (inside the intake): its answer is set
        aside (one still being written is dropped) and a new one is written. Whether there was
        a question to ask again.

        Admitted as a new question is (``RateLimited``, ``OverBudget``: nothing changes), by the
        statement that re-opens the question, before the turn being written is touched: a
        refused /retry costs no LLM call, not even one started again."""
        question = await self._storage.retry(
            user_id=user_id,
            chat_id=chat_id,
            rate_limit=self._config.rate_limit_per_minute,
            token_budget=self._config.daily_token_budget_per_user,
        )
        if question is None:
            return False
        await self._drop_newest_turn(user_id, chat_id)
        if await self._leased(chat_id, question):
            self._submit(TurnRequest.late(question))
        logger.info("user %s in chat %s: question %s asked again", user_id, chat_id, question.id)
        return True

    async def undo(self, *, user_id: int, chat_id: int) -> Undone:
        """Take back the user's last turn in the chat, or the /clear right before (inside the
        intake); a turn of it still queued or being written is dropped. It counts against the
        rate limit: over it, ``RateLimited`` and nothing changes."""
        undone = await self._storage.undo(
            user_id=user_id, chat_id=chat_id, rate_limit=self._config.rate_limit_per_minute
        )
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
        edited = await self._storage.edit(
            user_id=user_id,
            chat_id=chat_id,
            message_id=telegram_message_id,
            text=text,
            rate_limit=self._config.rate_limit_per_minute,
            token_budget=self._config.daily_token_budget_per_user,
        )  # admitted as a new question is (refused: nothing changed, its running turn goes on)
        if edited is None or not edited.last:
            return edited is not None
        mine = self._queues.pending(chat_id, lambda turn: turn.question.user_id == user_id)
        if mine and mine[-1].ident == telegram_message_id:  # its answer, written to the old text, is dropped
            newest = mine[-1]
            await self._queues.cancel(chat_id, lambda turn: turn is newest)
        question = Question(chat_id, user_id, telegram_message_id, edited.id, edited.telegram_thread_id)
        replaces = edited.replaced_message_ids[0] if edited.replaced_message_ids else None
        if await self._leased(chat_id, question):
            self._submit(TurnRequest(question, address, replaces))
        logger.info("user %s in chat %s: question %s edited, answered again", user_id, chat_id, edited.id)
        return True

    async def recover(self) -> int:
        """Queue the turns a crash or an outage left unfinished, ahead of new messages; how many.

        First those a previous run spooled during an outage, then the database's: one process at
        a time (a PostgreSQL advisory lock, held until they have run). Each turn reads its own
        state when it runs, so a turn finished meanwhile is not answered twice. None passes the
        admission again: each question was admitted when it was stored or re-opened (a refused
        one was stored set aside, and is not unfinished), and a spooled one while degraded,
        when no limit is checked.
        """
        done = [self._submit(TurnRequest.late(question)) for question in self._storage.resume_spool()]
        if self._leases is not None and not self._storage.degraded:
            # What a previous run of this process held is taken below, or swept, at once.
            with contextlib.suppress(StorageUnavailable):
                await self._leases.expire_mine()
        if self._config.pending_reply_max_age_s:
            lock = AsyncExitStack()
            unfinished = await lock.enter_async_context(self._storage.recovery(self._config.pending_reply_max_age_s))
            refused: set[int] = set()  # chats another process holds: it answers them
            for turn in unfinished:
                question = Question(
                    turn.telegram_chat_id,
                    turn.telegram_user_id,
                    turn.telegram_message_id,
                    turn.question_id,
                    turn.telegram_thread_id,
                )
                if turn.telegram_chat_id in refused:
                    continue
                try:
                    leased = (self._leases is not None and self._leases.holds(turn.telegram_chat_id)) or (
                        await self._leased(turn.telegram_chat_id, question)
                    )
                except StorageUnavailable:
                    leased = True  # as without leases: the turn reads its state when it runs
                if not leased:
                    refused.add(turn.telegram_chat_id)
                    continue
                done.append(self._submit(TurnRequest.late(question)))
            self._recovery = asyncio.create_task(self._release_after(lock, done))
        if self._leases is not None:
            self._leases.start(lambda chat_id: self._hand_over(chat_id, None))
        if self._signals is not None:
            self._signals.start()
        logger.info("recovering %d unfinished turn(s)", len(done))
        return len(done)

    async def _release_after(self, lock: AsyncExitStack, done: list[asyncio.Future[None]]) -> None:
        try:
            if done:
                await asyncio.wait(done)
            logger.info("recovered %d unfinished turn(s)", len(done))
        finally:
            await lock.aclose()

    async def drain(self, timeout_s: float) -> None:
        """Let queued and running turns finish, up to ``timeout_s``; what is left is recovered
        at the next start."""
        left = await self._queues.drain(timeout_s)
        if left:
            logger.warning("%d chat(s) still had turns after %.0fs; they resume at the next start", left, timeout_s)
        if self._signals is not None:
            await self._signals.stop()
        if self._leases is not None:
            await self._leases.stop()
            with contextlib.suppress(StorageUnavailable):
                await self._leases.expire_mine()  # what is left, another process takes at once
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery

    # -- one turn ---------------------------------------------------------------------------

    async def _run(self, turn: TurnRequest) -> None:
        chat_id, question_id = turn.address.chat_id, turn.question.id
        if self._leases is None or question_id is None:
            await self._run_turn(turn)
            return
        if not self._leases.holds(chat_id):
            logger.info("question %s left to the process holding chat %s", question_id, chat_id)
            return
        finished = False
        try:
            finished = await self._run_turn(turn)
        finally:
            if not finished:  # left for the next start's recovery: the hand-over passes it
                self._left.add(question_id)

    async def _after(self, turn: TurnRequest) -> None:
        """After a turn (inside the chat's intake, so a /clear that stopped it has taken effect):
        the chat's lease hands this process the next question, or is released."""
        assert self._leases is not None
        chat_id, question_id = turn.address.chat_id, turn.question.id
        left = question_id in self._left
        self._left.discard(question_id)
        handed = self._handed.pop(question_id, None) if question_id is not None else None
        if handed is not None:  # taken with the delivery's record; submitted now, in the intake
            if handed.question is not None and self._leases.holds(chat_id):
                self._submit(TurnRequest.handed_over(chat_id, handed.question), first=True)
        elif question_id is not None and self._leases.holds(chat_id):
            # A settled question is not named: should it be asked again meanwhile (a /retry at
            # another process), the hand-over finds it open and answers it.
            await self._hand_over(chat_id, question_id if left else None)

    @metrics.turn
    async def _run_turn(self, turn: TurnRequest) -> bool:
        """Run the turn; whether it ended settled (False: it waits for the next start's recovery)."""
        try:
            await self._answer(turn)
        except StorageUnavailable:
            metrics.turn_outcome("db_unavailable")
            logger.warning("turn of question %s stopped: nowhere to keep it", turn.ident)
            await self._say(turn.address, DB_APOLOGY)
            return False
        except DeliveryFailed as error:
            metrics.turn_outcome("delivery_failed")
            logger.warning("answer to question %s waits for recovery: %s", turn.ident, error)
            return False
        except LeaseLost:
            metrics.turn_outcome("lease_lost")
            logger.warning(
                "turn of question %s stopped: chat %s is another process's now", turn.ident, turn.address.chat_id
            )
        except BadRequest as error:  # this turn's input; the chat's next turns go on
            metrics.turn_outcome("bad_request")
            logger.warning("turn of question %s: the database refused its input (%s)", turn.ident, error)
            await self._say(turn.address, BAD_INPUT)
        except Exception:  # a bug: the traceback, the apology; the chat's next turns go on
            metrics.turn_outcome("error")
            logger.exception("turn of question %s failed", turn.ident)
            await self._say(turn.address, APOLOGY)
        return True

    async def _secure(self, turn: TurnRequest) -> None:
        """Before the turn stores or sends anything: raises ``LeaseLost`` when the chat's lease
        has gone to another process (see ``Leases.secure``). Without leases, for a question kept
        only in the spool, or during an outage, there is no one to agree with, or no way to."""
        if self._leases is None or turn.question.id is None or self._storage.degraded:
            return
        with contextlib.suppress(StorageUnavailable):  # the store or the send meets the outage its own way
            await self._leases.secure(turn.address.chat_id)

    def _shared(self, chat_id: int) -> bool:
        """Whether the chat's turns read its whole history (a group, with GROUP_CONTEXT=shared)."""
        return chat_id < 0 and self._config.group_context == "shared"

    async def next_window(self, *, user_id: int, chat_id: int) -> tuple[str, Window]:
        """The model and the context the user's next turn in the chat would take (/context)."""
        settings = self._chosen(await self._storage.chat_settings(chat_id=chat_id))
        dialog = await self._storage.next_context(
            user_id=user_id,
            chat_id=chat_id,
            history_limit=self._config.history_limit,
            budget=await self.budget.read_bound(),
            shared=self._shared(chat_id),
        )
        model = settings.model or self._config.llm_model
        window = await self._window(dialog, settings)
        return model, window

    async def _answer(self, turn: TurnRequest) -> None:
        question = turn.question
        shared = self._shared(question.chat_id)
        start = await self._storage.start_turn(
            question,
            history_limit=self._config.history_limit,
            budget=await self.budget.read_bound(),
            shared=shared,
        )
        if start is None:
            logger.info("question %s needs nothing more (cleared, failed or delivered)", turn.ident)
            return
        if start.answer is not None:  # stored before a crash or an outage: send it, no new LLM call
            await self._deliver(turn, start.answer, Shown())
            return
        if start.history_missing:
            await self._say(turn.address, HISTORY_MISSING)
        drafts = turn.address.chat_id > 0 and turn.replaces is None  # drafts: private chats only
        live = LiveReply(
            self._delivery,
            turn.address,
            draft_id=turn.ident if drafts else None,
            draft_interval_s=self._config.stream_draft_interval_s,
            edit_interval_s=self._config.stream_edit_interval_s,
            replacing=turn.replaces,
        )
        settings = self._chosen(start.settings)
        model = settings.model or self._config.llm_model
        # Stored with the question: a turn that did not start from its update (handed over from
        # another process, recovered, retried, edited) quotes what the update did.
        quoted = turn.quoted or start.quoted
        window = await self._window(start.dialog, settings, quoted)
        context = with_quote(window.messages, quoted)
        text, cut_short, usage = await self._write(turn, context, live, settings)
        self.budget.calibrate(model, estimated=window.used, reported=usage.prompt_tokens)
        shown = await live.finish()
        await self._secure(turn)
        if cut_short == "cancel":  # cleared meanwhile: nothing from before may stay live
            logger.info("turn of question %s cancelled before its answer", turn.ident)
            return
        if not text.strip():
            await self._storage.set_failed(question)
            if cut_short != "stop":
                metrics.turn_outcome("llm_failed")
                await self._say(turn.address, LLM_APOLOGY)
            return
        finish_reason: FinishReason | None = "stopped" if cut_short == "stop" else "failed" if cut_short else None
        answer = await self._storage.add_answer(question, storable(text), finish_reason, usage)
        if answer is None:
            logger.info("question %s was cleared or answered meanwhile; answer dropped", turn.ident)
            return
        delivered = await self._deliver(turn, answer, shown)
        if finish_reason == "failed":
            metrics.turn_outcome("llm_failed")
            await self._say(turn.address, LLM_APOLOGY)
        if delivered and window.crowded and start.from_database and self._config.summaries:
            await self._summarise(turn, window, model, shared)

    async def _summarise(self, turn: TurnRequest, window: Window, model: str, shared: bool) -> None:
        """Fold the older part of the turn's crowded history into its summary, and say so once
        it is stored; a failure leaves the history as it was (the next crowded turn tries again)."""
        try:
            stored = await self._summariser.refresh(
                turn.question, window, model=model, history_limit=self._config.history_limit, shared=shared
            )
        except (LLMError, StorageUnavailable) as error:
            logger.warning("summary after question %s not written: %s", turn.ident, type(error).__name__)
            return
        if stored:
            await self._say(turn.address, SUMMARY_NOTICE)

    async def _window(self, dialog: DialogContext, settings: ChatSettings, quoted: str | None = None) -> Window:
        """The part of ``dialog`` a call with the chat's (chosen) settings takes."""
        return await self.budget.choose(
            dialog,
            model=settings.model or self._config.llm_model,
            system_prompt=system_prompt_of(self._config.system_prompt, settings.system_prompt),
            history_limit=self._config.history_limit,
            quoted=quoted,
        )

    def _chosen(self, settings: ChatSettings) -> ChatSettings:
        """The chat's settings as the LLM call takes them: a model no longer in ALLOWED_MODELS
        (the configuration changed since it was chosen) falls back to the default."""
        if settings.model is not None and settings.model not in self._config.allowed_models:
            logger.info("chat's model is no longer allowed: using the default")
            return replace(settings, model=None)
        return settings

    async def _write(
        self, turn: TurnRequest, context: list[ChatMessage], live: LiveReply, settings: ChatSettings
    ) -> tuple[str, str | None, Usage]:
        """The LLM's answer as it streams to ``live``; why it was cut short: ``"stop"`` (the user
        stopped it), ``"cancel"`` (a /clear, /undo or edit), ``"failed"`` (the LLM broke off), or
        None; and the tokens the endpoint reported."""
        written: list[str] = []
        usage = Usage()

        async def stream() -> None:
            nonlocal usage
            pieces = self._llm.stream(
                context,
                model=settings.model,
                system_prompt=system_prompt_of(self._config.system_prompt, settings.system_prompt),
                temperature=settings.temperature,
            )
            async for piece in pieces:
                if isinstance(piece, Usage):
                    usage = piece
                    continue
                written.append(piece)
                live.write("".join(written))

        typing = asyncio.create_task(self._typing_until(turn.address, live.visible))
        try:
            await self._queues.stoppable(turn.address.chat_id, stream())
            return "".join(written), None, usage
        except Stopped as stopped:
            logger.info("turn of question %s stopped (%s)", turn.ident, stopped.reason)
            return "".join(written), stopped.reason, usage
        except LLMError:
            return "".join(written), "failed", usage
        finally:
            typing.cancel()

    async def _typing_until(self, address: Address, visible: asyncio.Event) -> None:
        """ "typing…" until the first text of the answer is on the screen."""
        async with self._delivery.typing(address):
            await visible.wait()

    async def stop(self, *, chat_id: int, user_id: int | None = None, ident: int | None = None) -> bool:
        """Stop the answer being written in the chat (by ``user_id``, or for question ``ident``):
        what was written so far becomes the answer. Whether there was one to stop: here, or at
        the process holding the chat (several processes), which is asked to."""
        signal = ChatSignal("stop", chat_id, user_id, ident)
        return self._stop_here(signal) or await self._to_holder(signal)

    def _stop_here(self, signal: ChatSignal) -> bool:
        return self._queues.stop(
            signal.chat_id,
            lambda turn: (
                (signal.user_id is None or turn.question.user_id == signal.user_id)
                and (signal.ident is None or turn.ident == signal.ident)
            ),
        )

    async def _to_holder(self, signal: ChatSignal) -> bool:
        """Pass ``signal`` to the process holding its chat, when that is another one (several
        processes); whether one was told."""
        if (
            self._signals is None
            or self._leases is None
            or self._leases.holds(signal.chat_id)
            or self._storage.degraded
        ):
            return False
        try:
            return await self._signals.send(signal)
        except StorageUnavailable:
            return False

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

    async def _deliver(self, turn: TurnRequest, answer: Answer, shown: Shown) -> bool:
        """Make every part of the stored answer final on Telegram, part by part, recording each:
        parts the stream completed are only recorded, the message it was editing gets its final
        text, the rest is sent. Whether Telegram took it (False: it refused for good)."""
        parts = split(render(answer.content))
        for index in range(answer.sent_parts, len(parts)):
            part, last = parts[index], index == len(parts) - 1
            await self._secure(turn)
            try:
                if index < len(shown.complete):
                    message_id = shown.complete[index]
                elif shown.editing is not None:
                    message_id, shown.editing = shown.editing, None
                    if part != shown.editing_shows:
                        message_id = await self._edit_or_send(turn.address, message_id, part, quote=index == 0)
                else:
                    message_id = await self._delivery.send(turn.address, part, quote=index == 0)
            except DeliveryRefused as error:
                metrics.turn_outcome("refused")
                logger.warning("Telegram refused the answer in chat %s: %s", turn.address.chat_id, error)
                await self._storage.set_failed(turn.question, answer)
                return False
            try:
                await self._record_sent_part(turn, answer, message_id, last=last)
            except StorageUnavailable:
                # The user has this part; only the record is missing. Recovery may send it again.
                logger.warning("part %d of the answer to %s sent but not recorded", index + 1, turn.ident)
        metrics.turn_outcome("answered")
        logger.info(
            "delivered the answer to %s in chat %s: %d chars", turn.ident, turn.address.chat_id, len(answer.content)
        )
        return True

    async def _record_sent_part(self, turn: TurnRequest, answer: Answer, message_id: int, *, last: bool) -> None:
        """Record a part Telegram accepted; the last one of a leased chat's turn with the chat's
        hand-over in the same round trip (its result is used after the turn, in the intake)."""
        chat_id, question_id = turn.address.chat_id, turn.question.id
        leases = self._leases
        ready = leases is not None and leases.holds(chat_id) and not self._storage.degraded
        if last and ready and leases is not None and answer.id is not None and question_id is not None:
            try:
                handed = await leases.record_last_part(chat_id, answer_id=answer.id, telegram_message_id=message_id)
            except StorageUnavailable:
                pass  # not known to be recorded: the storage records it, or spools it
            else:
                if handed is not None:
                    self._handed[question_id] = handed
                return
        await self._storage.record_sent_part(turn.question, answer, sent_message_id=message_id, last=last)

    async def _edit_or_send(self, address: Address, message_id: int, part: Part, *, quote: bool) -> int:
        """Show ``part`` in the message ``message_id``; when Telegram refuses the edit (the message
        was deleted, or is too old to edit), in a new message. The id of the message showing it."""
        try:
            await self._delivery.edit(address, message_id, part)
        except DeliveryRefused as error:
            logger.info("could not edit message %s in chat %s (%s): sending anew", message_id, address.chat_id, error)
            return await self._delivery.send(address, part, quote=quote)
        return message_id

    async def _say(self, address: Address, text: str) -> None:
        """A short notice (an apology) that is worth one try and no more."""
        with contextlib.suppress(DeliveryRefused, DeliveryFailed):
            await self._delivery.send(address, Part(text, ()), quote=True)

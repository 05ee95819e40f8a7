"""One chat turn, top to bottom: ``Turn.run``.

A stored question's turn: its context is read → the window that fits the model is chosen → the
LLM writes the answer, streamed to Telegram as it grows → the answer is stored → each part goes
to Telegram and is recorded as accepted → a crowded history is summarised. Every step leaves a
fact in the database, so a turn cut short anywhere (crash, outage, Telegram down) resumes where
it stopped and never asks the LLM again for an answer it has stored. A failure ends the turn by
its class (``services.failures``), decided once, in ``run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from config import Config
from services.cluster.leases import Handover, LeaseLost, NextQuestion
from services.cluster.ownership import Ownership
from services.failures import BadRequest, StorageUnavailable
from services.fallback.storage import Storage
from services.llm.budget import ContextBudget, Window
from services.llm.client import LLM, ImagesRefused, LLMError, ToolCalls, ToolsRefused, system_prompt_of
from services.llm.recall import RECALLED, RECALLED_CHARS, looked_back, recall_block, recall_query
from services.llm.summaries import Summariser
from services.media.errors import Unreadable
from services.media.files import FileGone, FileTooBig, ImageCache
from services.media.images import data_url, sniff
from services.media.intake import ShownImage
from services.ops import metrics
from services.records import (
    Answer,
    Attachment,
    ChatMessage,
    ChatSettings,
    DialogContext,
    FinishReason,
    Question,
    Usage,
)
from services.text.clean import storable
from services.text.formatting import Part, render, split
from services.turn.delivery import Address, Delivery, DeliveryFailed, DeliveryRefused
from services.turn.queue import ChatQueues, Stopped
from services.turn.streaming import LiveReply, Shown
from services.turn.tools import MAX_ROUNDS, Toolbox

logger = logging.getLogger(__name__)

DB_APOLOGY = "Sorry, my memory is unavailable right now. Please try again in a minute."
LLM_APOLOGY = "Sorry, I couldn't come up with an answer just now. Please try again in a moment."
BAD_INPUT = "Sorry, my memory refuses that as it is. Please rephrase it and try again."
APOLOGY = "Sorry, something went wrong on my side. Please try again."
HISTORY_MISSING = "(I can't reach my memory of our earlier messages right now, so I'm answering this one on its own.)"
SUMMARY_NOTICE = "(Our conversation has grown long, so I summarised its older part to keep it in mind.)"
NO_VISION = "(This model can't see images, so I read only the text of your message.)"

CutShort = Literal["stop", "cancel", "failed"]  # the user stopped it; a /clear, /undo or edit; the LLM broke off


@dataclass(frozen=True, slots=True)
class Crew:
    """What every turn works with, made once per process."""

    storage: Storage
    llm: LLM
    delivery: Delivery
    config: Config
    owner: Ownership
    queues: ChatQueues[Turn]
    budget: ContextBudget
    summariser: Summariser
    images: ImageCache | None  # None: images are not shown again after their own turn

    def shared(self, chat_id: int) -> bool:
        """Whether the chat's turns read its whole history (a group, with GROUP_CONTEXT=shared)."""
        return chat_id < 0 and self.config.group_context == "shared"

    def chosen(self, settings: ChatSettings) -> ChatSettings:
        """The chat's settings as the LLM call takes them: a model no longer in ALLOWED_MODELS
        (the configuration changed since it was chosen) falls back to the default."""
        if settings.model is not None and settings.model not in self.config.allowed_models:
            logger.info("chat's model is no longer allowed: using the default")
            return replace(settings, model=None)
        return settings

    def model_of(self, settings: ChatSettings) -> str:
        return settings.model or self.config.llm_model

    def prompt(self, settings: ChatSettings, dialog: DialogContext) -> str:
        """The system prompt of a call with the chat's settings: the operator's, the chat's, and
        the memories of the dialog's user this chat may see."""
        return system_prompt_of(self.config.system_prompt, settings.system_prompt, dialog.memories)

    async def window(self, dialog: DialogContext, settings: ChatSettings, quoted: str | None = None) -> Window:
        """The part of ``dialog`` a call with the chat's (chosen) settings takes."""
        return await self.budget.choose(
            dialog,
            model=self.model_of(settings),
            system_prompt=self.prompt(settings, dialog),
            history_limit=self.config.history_limit,
            quoted=quoted,
        )


@dataclass(frozen=True, slots=True)
class Written:
    """What the LLM wrote for a turn: the text, why it was cut short (None: it was not), and the
    tokens the endpoint reported."""

    text: str
    cut_short: CutShort | None
    usage: Usage

    @property
    def finish_reason(self) -> FinishReason | None:
        return "stopped" if self.cut_short == "stop" else "failed" if self.cut_short else None


def _added(before: Usage, more: Usage) -> Usage:
    """The tokens of a turn's LLM calls together (a turn that called tools made several)."""
    if before.prompt_tokens is None and before.completion_tokens is None:
        return more
    return Usage(
        (before.prompt_tokens or 0) + (more.prompt_tokens or 0),
        (before.completion_tokens or 0) + (more.completion_tokens or 0),
    )


def _left_out(window: Window, dialog: DialogContext) -> bool:
    """Whether the dialog has history the window does not show (a summary stands in for it, or
    it did not fit)."""
    return window.summary is not None or window.in_full < dialog.read


def with_quote(context: list[ChatMessage], quoted: str | None) -> list[ChatMessage]:
    """The context with the text the question replies to shown before the question."""
    if not quoted or not context:
        return context
    question = context[-1]
    return [*context[:-1], {"role": question["role"], "content": f"[Replying to: {quoted}]\n\n{question['content']}"}]


class Turn:
    """A stored question's turn: ``run`` answers it and delivers the answer.

    ``replaces``: the message showing the answer the new one replaces (an edited question),
    edited in place where Telegram allows; ``quoted``: the text the question replies to, from
    its update (a turn that did not start from its update reads it from the question's row);
    ``images``: the images the question came with, as received.
    """

    def __init__(
        self,
        crew: Crew,
        question: Question,
        address: Address,
        *,
        replaces: int | None = None,
        quoted: str | None = None,
        images: Sequence[ShownImage] = (),
    ) -> None:
        self.crew = crew
        self.question = question
        self.address = address
        self.replaces = replaces
        self.quoted = quoted
        self.images = images
        self.unsettled = False  # it ended with work left for the next start's recovery
        self.handover: Handover | None = None  # the chat's hand-over, taken with the last part's record
        self.first_message_id: int | None = None  # the answer's first message, once Telegram took it

    @classmethod
    def late(cls, crew: Crew, question: Question) -> Turn:
        """The turn of a question recovered after a restart (or re-opened by /retry or an edit):
        its answer quotes the question. Not admitted again: it was when it was stored or re-opened."""
        return cls(crew, question, Address(question.chat_id, question.thread_id, question.message_id))

    @classmethod
    def handed_over(cls, crew: Crew, chat_id: int, found: NextQuestion) -> Turn:
        """The turn of a question the chat's lease hands this process (stored by any process),
        answered as a new question is (quoting it in groups only); admitted when it was stored."""
        assert found.question_id is not None and found.telegram_user_id is not None
        message_id = found.telegram_message_id
        question = Question(chat_id, found.telegram_user_id, message_id, found.question_id, found.telegram_thread_id)
        return cls(crew, question, Address(chat_id, found.telegram_thread_id, message_id if chat_id < 0 else None))

    @property
    def ident(self) -> int:
        """Unique among the chat's turns: Telegram's message id (or, lacking it, the row's)."""
        question = self.question
        return question.message_id if question.message_id is not None else -(question.id or 0)

    @metrics.turn
    async def run(self) -> None:
        """Answer the question and deliver the answer; a failure ends the turn by its class."""
        self.unsettled = True  # until it ends one way or another (a cancelled turn stays so)
        try:
            await self._answer()
        except StorageUnavailable:
            metrics.turn_outcome("db_unavailable")
            logger.warning("turn of question %s stopped: nowhere to keep it", self.ident)
            await self._say(DB_APOLOGY)
            return
        except DeliveryFailed as error:
            metrics.turn_outcome("delivery_failed")
            logger.warning("answer to question %s waits for recovery: %s", self.ident, error)
            return
        except LeaseLost:
            metrics.turn_outcome("lease_lost")
            logger.warning("turn of question %s stopped: chat %s is another process's now", self.ident, self.chat_id)
        except BadRequest as error:  # this turn's input; the chat's next turns go on
            metrics.turn_outcome("bad_request")
            logger.warning("turn of question %s: the database refused its input (%s)", self.ident, error)
            await self._say(BAD_INPUT)
        except Exception:  # a bug: the traceback, the apology; the chat's next turns go on
            metrics.turn_outcome("error")
            logger.exception("turn of question %s failed", self.ident)
            await self._say(APOLOGY)
        self.unsettled = False

    @property
    def chat_id(self) -> int:
        return self.address.chat_id

    async def _answer(self) -> None:
        crew = self.crew
        start = self.question.start or await crew.storage.start_turn(
            self.question,
            history_limit=crew.config.history_limit,
            budget=await crew.budget.read_bound(),
            shared=crew.shared(self.chat_id),
        )
        if start is None:
            logger.info("question %s needs nothing more (cleared, failed or delivered)", self.ident)
            return
        if start.answer is not None:  # stored before a crash or an outage: send it, no new LLM call
            await self._deliver(start.answer, Shown())
            return
        if start.history_missing:
            await self._say(HISTORY_MISSING)
        settings = crew.chosen(start.settings)
        quoted = self.quoted or start.quoted
        window = await crew.window(start.dialog, settings, quoted)
        live = self._live_reply()
        model = crew.model_of(settings)
        written = await self._call(with_quote(window.messages, quoted), window, start.dialog, live, settings, model)
        crew.budget.calibrate(model, estimated=window.used, reported=written.usage.prompt_tokens)
        shown = await live.finish()
        await self._secure()
        if written.cut_short == "cancel":  # cleared meanwhile: nothing from before may stay live
            logger.info("turn of question %s cancelled before its answer", self.ident)
            return
        answer = await self._store(written)
        if answer is None:
            return
        delivered = await self._deliver(answer, shown)
        if written.cut_short == "failed":
            metrics.turn_outcome("llm_failed")
            await self._say(LLM_APOLOGY)
        if delivered and window.crowded and start.from_database and crew.config.summaries:
            await self._summarise(window, model)

    async def _call(
        self,
        context: list[ChatMessage],
        window: Window,
        dialog: DialogContext,
        live: LiveReply,
        settings: ChatSettings,
        model: str,
    ) -> Written:
        """The LLM's answer to ``context``, with what the call may add: the window's images, the
        tools (else, where the window left history out, what recall found). An endpoint that
        refuses images or tools is asked again without them, before anything was written."""
        crew = self.crew
        toolbox = self._toolbox(window, dialog)
        recalled = await self._recalled(window, dialog) if toolbox is None else None
        images = await self._shown(window) if crew.llm.sees_images(model) else None
        if images is None and self.images:
            await self._say(NO_VISION)
        while True:
            messages: list[ChatMessage] = list(context)
            shown = images
            if recalled is not None:  # before the history, after the summary: its messages move one on
                messages.insert(len(messages) - len(window.recent), {"role": "system", "content": recalled})
                shown = {index + 1: urls for index, urls in (images or {}).items()}
            try:
                return await self._write(messages, live, settings, shown, toolbox, crew.prompt(settings, dialog))
            except ToolsRefused:
                toolbox = None
                recalled = await self._recalled(window, dialog)
            except ImagesRefused:
                await self._say(NO_VISION)
                images = None

    def _toolbox(self, window: Window, dialog: DialogContext) -> Toolbox | None:
        """The tools this turn offers (LLM_TOOLS, and an endpoint that has not refused them):
        ``search_history`` when history was left out (RECALL), ``remember``; None while the
        history is read from memory (degraded)."""
        crew = self.crew
        if not (crew.config.llm_tools and crew.llm.tools) or self.question.id is None or crew.storage.degraded:
            return None
        before = window.recent[-1].turn if crew.config.recall and _left_out(window, dialog) else None
        return Toolbox(crew.storage, self.question, before_turn=before, shared=crew.shared(self.chat_id))

    async def _recalled(self, window: Window, dialog: DialogContext) -> str | None:
        """What a turn whose dialog has outgrown its window recalls from before it (RECALL): the
        older messages its question's words find, as a system message, told to the user in one
        line; None when nothing is left out or nothing is found."""
        crew = self.crew
        query = recall_query(window.recent[0].content) if window.recent else None
        if not crew.config.recall or crew.storage.degraded or not _left_out(window, dialog) or query is None:
            return None
        try:
            found = await crew.storage.recall_earlier(
                self.question,
                query=query,
                before_turn=window.recent[-1].turn,
                limit=RECALLED,
                chars=RECALLED_CHARS,
                shared=crew.shared(self.chat_id),
            )
        except BadRequest as error:  # the search refused these words: the turn goes on without it
            logger.warning("recall for question %s refused: %s", self.ident, error)
            return None
        block = recall_block(found, window.room - window.used)
        if block is None:
            return None
        text, shown = block
        logger.info("question %s recalled %d older message(s)", self.ident, len(shown))
        await self._say(looked_back(shown))
        return text

    async def _shown(self, window: Window) -> dict[int, list[str]]:
        """The images the call shows, as data URLs by the index of their message in the window:
        the newest CONTEXT_IMAGES of its messages, the question's own as received, older ones
        from memory or downloaded again; one Telegram no longer gives is left out (its message
        still says "[photo]")."""
        left = self.crew.config.context_images
        shown: dict[int, list[str]] = {}
        last = len(window.messages) - 1
        for newest, message in enumerate(window.recent):
            if left <= 0:
                break
            if newest == 0 and self.images:
                urls = [data_url(image.data, image.mime_type) for image in self.images[:left]]
            else:
                urls = [url for image in message.images[:left] if (url := await self._again(image)) is not None]
            if urls:
                shown[last - newest] = urls
                left -= len(urls)
        return shown

    async def _again(self, image: Attachment) -> str | None:
        """An image of an earlier message as a data URL; None when it cannot be had."""
        if self.crew.images is None:
            return None
        try:
            data = await self.crew.images.image(image.file_id, image.file_unique_id)
            return data_url(data, image.mime_type or sniff(data))
        except (FileGone, FileTooBig, Unreadable) as error:
            logger.info("an image of chat %s not shown again: %s", self.chat_id, type(error).__name__)
            return None

    def _live_reply(self) -> LiveReply:
        config = self.crew.config
        drafts = self.chat_id > 0 and self.replaces is None  # drafts: private chats only
        return LiveReply(
            self.crew.delivery,
            self.address,
            draft_id=self.ident if drafts else None,
            draft_interval_s=config.stream_draft_interval_s,
            edit_interval_s=config.stream_edit_interval_s,
            replacing=self.replaces,
        )

    async def _write(
        self,
        context: list[ChatMessage],
        live: LiveReply,
        settings: ChatSettings,
        images: dict[int, list[str]] | None = None,
        toolbox: Toolbox | None = None,
        prompt: str | None = None,
    ) -> Written:
        """The LLM's answer as it streams to ``live``, stoppable through the chat's queue;
        ``images`` shown with the messages at their indices (``ImagesRefused``: not taken);
        ``toolbox``: the tools it may call, at most ``MAX_ROUNDS`` answers in a row, each
        call's result sent back (``ToolsRefused``: none taken)."""
        written: list[str] = []
        usage = Usage()
        if prompt is None:
            prompt = system_prompt_of(self.crew.config.system_prompt, settings.system_prompt)

        async def stream() -> None:
            nonlocal usage
            messages: list[ChatMessage | dict[str, object]] = list(context)
            for round_ in range(MAX_ROUNDS + 1):
                calls: ToolCalls | None = None
                pieces = self.crew.llm.stream(
                    messages,
                    model=settings.model,
                    system_prompt=prompt,
                    temperature=settings.temperature,
                    images=images,
                    tools=toolbox.offered() if toolbox is not None and round_ < MAX_ROUNDS else (),
                )
                said = len(written)
                async for piece in pieces:
                    if isinstance(piece, Usage):
                        usage = _added(usage, piece)
                    elif isinstance(piece, ToolCalls):
                        calls = piece
                    else:
                        written.append(piece)
                        live.write("".join(written))
                if calls is None or toolbox is None:
                    return
                messages.append(calls.message("".join(written[said:])))
                for call in calls.calls:
                    result = await toolbox.run(call)
                    if result.line is not None:
                        await self._say(result.line)
                    messages.append({"role": "tool", "tool_call_id": call.id, "content": result.content})

        typing = asyncio.create_task(self._typing_until(live.visible))
        try:
            await self.crew.queues.stoppable(self.chat_id, stream())
            return Written("".join(written), None, usage)
        except Stopped as stopped:
            logger.info("turn of question %s stopped (%s)", self.ident, stopped.reason)
            return Written("".join(written), stopped.reason, usage)
        except LLMError:
            return Written("".join(written), "failed", usage)
        finally:
            typing.cancel()

    async def _typing_until(self, visible: asyncio.Event) -> None:
        """ "typing…" until the first text of the answer is on the screen."""
        async with self.crew.delivery.typing(self.address):
            await visible.wait()

    async def _store(self, written: Written) -> Answer | None:
        """Store what was written; None when there is nothing to deliver (nothing written, or the
        question cleared or answered meanwhile)."""
        storage = self.crew.storage
        if not written.text.strip():
            await storage.set_failed(self.question)
            if written.cut_short != "stop":
                metrics.turn_outcome("llm_failed")
                await self._say(LLM_APOLOGY)
            return None
        answer = await storage.add_answer(self.question, storable(written.text), written.finish_reason, written.usage)
        if answer is None:
            logger.info("question %s was cleared or answered meanwhile; answer dropped", self.ident)
        return answer

    async def _deliver(self, answer: Answer, shown: Shown) -> bool:
        """Make every part of the stored answer final on Telegram, part by part, recording each:
        parts the stream completed are only recorded, the message it was editing gets its final
        text, the rest is sent. Whether Telegram took it (False: it refused for good)."""
        parts = split(render(answer.content))
        for index in range(answer.sent_parts, len(parts)):
            part, last = parts[index], index == len(parts) - 1
            await self._secure()
            try:
                if index < len(shown.complete):
                    message_id = shown.complete[index]
                elif shown.editing is not None:
                    message_id, shown.editing = shown.editing, None
                    if part != shown.editing_shows:
                        message_id = await self._edit_or_send(message_id, part, quote=index == 0)
                else:
                    message_id = await self.crew.delivery.send(self.address, part, quote=index == 0)
            except DeliveryRefused as error:
                metrics.turn_outcome("refused")
                logger.warning("Telegram refused the answer in chat %s: %s", self.chat_id, error)
                await self.crew.storage.set_failed(self.question, answer)
                return False
            if index == 0:
                self.first_message_id = message_id
            try:
                await self._record_sent_part(answer, message_id, last=last)
            except StorageUnavailable:
                # The user has this part; only the record is missing. Recovery may send it again.
                logger.warning("part %d of the answer to %s sent but not recorded", index + 1, self.ident)
        metrics.turn_outcome("answered")
        # The turn's one line at INFO (the question's and the LLM call's are DEBUG): each line
        # took about 1% of a turn's CPU (bench/profile.py).
        logger.info(
            "delivered the answer to %s in chat %s: %d chars in %d part(s)",
            self.ident,
            self.chat_id,
            len(answer.content),
            len(parts),
        )
        return True

    async def _record_sent_part(self, answer: Answer, message_id: int, *, last: bool) -> None:
        """Record a part Telegram accepted; the last one, where the chat is handed over after
        the turn, with the hand-over in the same round trip."""
        if last and answer.id is not None and self.question.id is not None:
            recorded = await self.crew.owner.record_last_part(
                self.chat_id, answer_id=answer.id, telegram_message_id=message_id
            )
            if recorded.recorded:
                self.handover = recorded.handover
                return
        await self.crew.storage.record_sent_part(self.question, answer, sent_message_id=message_id, last=last)

    async def _edit_or_send(self, message_id: int, part: Part, *, quote: bool) -> int:
        """Show ``part`` in the message ``message_id``; when Telegram refuses the edit (the message
        was deleted, or is too old to edit), in a new message. The id of the message showing it."""
        delivery = self.crew.delivery
        try:
            await delivery.edit(self.address, message_id, part)
        except DeliveryRefused as error:
            logger.info("could not edit message %s in chat %s (%s): sending anew", message_id, self.chat_id, error)
            return await delivery.send(self.address, part, quote=quote)
        return message_id

    async def _summarise(self, window: Window, model: str) -> None:
        """Fold the older part of the turn's crowded history into its summary, and say so once
        it is stored; a failure leaves the history as it was (the next crowded turn tries again)."""
        crew = self.crew
        try:
            stored = await crew.summariser.refresh(
                self.question,
                window,
                model=model,
                history_limit=crew.config.history_limit,
                shared=crew.shared(self.chat_id),
            )
        except (LLMError, StorageUnavailable) as error:
            logger.warning("summary after question %s not written: %s", self.ident, type(error).__name__)
            return
        if stored:
            await self._say(SUMMARY_NOTICE)

    async def _secure(self) -> None:
        """Before the turn stores or sends anything: ``LeaseLost`` when the chat has gone to another process."""
        await self.crew.owner.secure(self.chat_id, self.question.id)

    async def _say(self, text: str) -> None:
        """A short notice (an apology) that is worth one try and no more."""
        with contextlib.suppress(DeliveryRefused, DeliveryFailed):
            await self.crew.delivery.send(self.address, Part(text, ()), quote=True)

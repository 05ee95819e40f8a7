"""The context budget: how much of a dialog the next LLM call can take, and which part.

A prompt may take the model's context length less ``LLM_MAX_TOKENS`` (kept for the answer).
The context length is ``CONTEXT_TOKENS`` when set, else what the endpoint's model list
publishes (OpenRouter's ``context_length``), else 8192. Stored messages carry estimated tokens
(``services.llm.tokens``); the ratio of the tokens an endpoint reports to the estimate of what was
sent calibrates the estimate per model, so a model whose tokenizer counts more gets less history.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from services.llm.tokens import estimate_tokens
from services.records import Attachment, ChatMessage, ContextMessage, DialogContext, Summary, as_sent, described

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_TOKENS = 8192
MIN_PROMPT_TOKENS = 512  # a prompt's room when LLM_MAX_TOKENS leaves less (the question must fit)
MODEL_LIST_TTL_S = 3600.0  # the endpoint's model list is asked again after this
RATIO_BOUNDS = (0.25, 4.0)  # reported / estimated tokens: past these, a report is taken as an outlier
RATIO_WEIGHT = 0.3  # how much one report moves the ratio
CROWDED = 0.75  # a history past this share of its room is summarised after the turn
SUMMARY_LABEL = "Summary of the earlier conversation (its messages are not shown):\n"
SOMEONE = "Someone"


@dataclass(frozen=True, slots=True)
class Window:
    """The part of a dialog one LLM call takes: ``messages`` to send (after the system prompt,
    oldest first, the summary first when there is one), ``in_full`` of them history; ``used``
    and ``room``: estimated tokens the prompt takes and may take (system prompt included);
    ``crowded``: older history was left out, or the prompt is past ``CROWDED`` of its room."""

    messages: list[ChatMessage]
    in_full: int
    used: int
    room: int
    summary: Summary | None
    crowded: bool
    recent: list[ContextMessage] = field(default_factory=list)  # the history kept, newest first


ModelList = Callable[[], Awaitable[dict[str, int]]]


class ContextBudget:
    """Each model's room for a prompt, calibrated by the tokens the endpoint reports."""

    def __init__(
        self,
        *,
        context_tokens: int,
        max_tokens: int,
        models: Sequence[str],
        model_list: ModelList,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._context_tokens = context_tokens
        self._max_tokens = max_tokens
        self._models = tuple(models)
        self._model_list = model_list
        self._clock = clock
        self._listing: asyncio.Future[dict[str, int]] | None = None
        self._asked_at = 0.0
        self._ratios: dict[str, float] = {}

    async def context_length(self, model: str) -> int:
        """The model's context length in tokens."""
        if self._context_tokens:
            return self._context_tokens
        now = self._clock()
        if self._listing is None or now - self._asked_at > MODEL_LIST_TTL_S:
            # One request at a time: the turns that start meanwhile wait for its answer rather
            # than guess (a guess may be longer than the model's context).
            self._asked_at, self._listing = now, asyncio.ensure_future(self._published())
        published = await asyncio.shield(self._listing)
        return published.get(model, DEFAULT_CONTEXT_TOKENS)

    async def _published(self) -> dict[str, int]:
        try:
            return await self._model_list()
        except Exception as error:  # any failure: the default, asked again after the TTL
            logger.warning("could not read the endpoint's model list: %s", type(error).__name__)
            return {}

    def ratio(self, model: str) -> float:
        """Reported tokens per estimated token for the model (1 until it reports)."""
        return self._ratios.get(model, 1.0)

    def calibrate(self, model: str, *, estimated: int, reported: int | None) -> None:
        """Learn from one call: ``estimated`` tokens were sent, the endpoint counted ``reported``."""
        if not reported or estimated <= 0:
            return
        low, high = RATIO_BOUNDS
        seen = min(max(reported / estimated, low), high)
        old = self._ratios.get(model)
        self._ratios[model] = seen if old is None else old + RATIO_WEIGHT * (seen - old)

    async def room(self, model: str) -> int:
        """Estimated tokens a prompt to ``model`` may take."""
        tokens = max(await self.context_length(model) - self._max_tokens, MIN_PROMPT_TOKENS)
        return int(tokens / self.ratio(model))

    async def read_bound(self) -> int:
        """The most any allowed model may take: the bound of a context read, before the chat's
        own model and system prompt are known."""
        return max([await self.room(model) for model in self._models])

    async def choose(
        self,
        dialog: DialogContext,
        *,
        model: str,
        system_prompt: str,
        history_limit: int,
        quoted: str | None = None,
    ) -> Window:
        """The newest history that fits the model's room with the system prompt, the summary and
        the quoted text, at most ``history_limit`` messages, starting at a user message. The
        newest message (the question) is always kept."""
        room = await self.room(model)
        fixed = estimate_tokens(system_prompt) + (estimate_tokens(quoted) if quoted else 0)
        summary = dialog.summary
        if summary is not None:
            fixed += summary.tokens
        kept: list[ContextMessage] = []
        used = fixed
        for message in dialog.history[:history_limit]:
            if kept and used + message.tokens > room:
                break
            kept.append(message)
            used += message.tokens
        while len(kept) > 1 and kept[-1].role == "assistant":  # an answer without its question
            used -= kept.pop().tokens
        crowded = len(kept) < dialog.read or used > CROWDED * room
        messages = [_as_message(m) for m in reversed(kept)]
        if summary is not None:
            messages.insert(0, {"role": "system", "content": SUMMARY_LABEL + summary.content})
        return Window(messages, len(kept), used, room, summary, crowded, kept)


def _as_message(message: ContextMessage) -> ChatMessage:
    content = as_sent(message.content, message.finish_reason)
    if message.attachments:
        content = described(content, [Attachment.from_stored(a) for a in message.attachments])
    if message.role == "user" and message.author is not None:  # a group's shared history
        content = f"{message.author or SOMEONE}: {content}"
    return {"role": message.role, "content": content}


def dialog_of(messages: Sequence[ChatMessage]) -> DialogContext:
    """A dialog remembered in memory (oldest first) as a context read gives it."""
    history: list[ContextMessage] = []
    running = 0
    for index, message in enumerate(reversed(messages)):
        tokens = estimate_tokens(message["content"])
        running += tokens
        history.append(ContextMessage(-index, message["role"], message["content"], tokens, running, -index))
    return DialogContext(history, None, len(history))

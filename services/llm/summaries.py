"""Rolling summaries: the older part of a long dialog, folded by the LLM into a few notes.

After a turn whose history was crowded (``Window.crowded``), the history outside its newest
part (half the room, half the history limit) is written into one summary with the previous
one, stored in PostgreSQL in its place. The next turns read the summary and only the history
after it. It runs after the answer is delivered, in the chat's turn, so the user waits for
nothing and the chat's next turn reads it.

A summary is part of the turn that made it: it needs no admission of its own (that turn's
question was admitted when it was stored, and a turn makes one summary at most), and the
tokens its LLM call is reported to take count in ``token_usage`` for the user whose question
that turn answered, in a group's shared history too: the member whose turn crowded it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services import context
from services.fallback.storage import Storage
from services.llm.budget import Window
from services.llm.client import LLM
from services.records import ChatMessage, ContextMessage, Question, Usage, as_sent
from services.text.clean import storable

logger = logging.getLogger(__name__)

SOURCE_LIMIT = 1000  # messages one summary takes in at most; the rest wait for the next one
MIN_WORDS = 50
INSTRUCTIONS = (
    "You keep the memory of a long conversation between a user and an assistant. Write one summary that "
    "replaces the earlier summary (if given) and the messages below: the facts, names, numbers, decisions and "
    "preferences stated, what was asked and answered, and what was being discussed last. Write plain notes in "
    "the conversation's language, at most {words} words."
)
TEMPERATURE = 0.2  # notes, not prose


@dataclass(frozen=True, slots=True)
class Summariser:
    """Writes a dialog's rolling summary with the LLM and stores it."""

    storage: Storage
    llm: LLM
    max_tokens: int

    async def refresh(
        self, question: Question, window: Window, *, model: str, history_limit: int, shared: bool
    ) -> bool:
        """Fold the history older than the newest part of ``window`` into the dialog's summary;
        whether a new summary was stored. Raises ``LLMError`` or ``StorageUnavailable``."""
        if not window.recent:
            return False
        question_id = question.id
        assert question_id is not None  # summaries are made only from a context read in the database
        before = recent_start(window, history_limit)
        async with self.storage.database() as pool:
            source = await context.fetch_summary_source(
                pool, question_id=question_id, before=before, budget=window.room // 2, limit=SOURCE_LIMIT, shared=shared
            )
        messages = source.messages
        if len(messages) > 1 and messages[-1].role == "user":
            messages = messages[:-1]  # its answer may lie past the budget: it waits for the next summary
        if not messages:
            return False
        words = max(MIN_WORDS, min(self.max_tokens, window.room // 8) * 3 // 4)
        request: list[ChatMessage] = [{"role": "user", "content": transcript(source.summary, messages)}]
        pieces = self.llm.stream(
            request, model=model, system_prompt=INSTRUCTIONS.format(words=words), temperature=TEMPERATURE
        )
        written: list[str] = []
        usage = Usage()
        async for piece in pieces:
            if isinstance(piece, Usage):
                usage = piece
            elif isinstance(piece, str):  # no tools are offered: no ToolCalls
                written.append(piece)
        text = storable("".join(written)).strip()
        async with self.storage.database() as pool:
            stored = await context.add_summary(
                pool,
                question_id=question_id,
                through_id=messages[-1].turn,
                covered=source.covered + len(messages),
                content=text,
                shared=shared,
                usage=usage,
            )
        logger.info("summary of %d message(s) through turn %s: %d chars", len(messages), messages[-1].turn, len(text))
        return stored


def recent_start(window: Window, history_limit: int) -> int:
    """The turn where the part of the history kept in full after a summary starts: the newest
    messages within half the room and half the history limit (the newest always)."""
    room, most = window.room // 2, max(1, history_limit // 2)
    used = 0
    start = window.recent[0].turn
    for count, message in enumerate(window.recent, 1):
        used += message.tokens
        if count > most or (count > 1 and used > room):
            break
        start = message.turn
    return start


def transcript(summary: str | None, messages: list[ContextMessage]) -> str:
    """The text the LLM summarises: the earlier summary, then the messages, each with its speaker."""
    lines = [f"Earlier summary:\n{summary}\n"] if summary else []
    lines.append("Messages:")
    for message in messages:
        speaker = "Assistant" if message.role == "assistant" else (message.author or "User")
        lines.append(f"{speaker}: {as_sent(message.content, message.finish_reason)}")
    return "\n".join(lines)

"""The tools a turn offers the model (OpenAI ``tools``): ``search_history``, a look beyond the
window through the full-text search ``/search`` uses, and ``remember``, a fact the user wants
kept (ADR-10). Arguments are checked before anything runs; a result is data, sent back as a
``tool`` message, never as instructions; each call the user should know of is told in one line."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Final

from services import context
from services.database import MAX_MEMORY_CHARS
from services.failures import BadRequest, StorageUnavailable
from services.fallback.storage import Storage
from services.llm.client import ToolCall
from services.llm.recall import RECALLED_CHARS, looked_back
from services.records import Question

logger = logging.getLogger(__name__)

MAX_ROUNDS = 3  # answers that call tools in one turn; the next is asked without tools
FOUND = 5  # messages one search_history returns at most
MAX_QUERY_CHARS = 200
NOTED = "📝 Noted: {fact}"

SEARCH_HISTORY: Final = {
    "type": "function",
    "function": {
        "name": "search_history",
        "description": (
            "Search the older part of this conversation, which is not shown to you, for messages "
            "about something the user refers to. Returns the best matches with their dates."
        ),
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": 'words to look for; "a phrase", or, -not'}},
            "required": ["query"],
            "additionalProperties": False,
        },
    },
}
REMEMBER: Final = {
    "type": "function",
    "function": {
        "name": "remember",
        "description": (
            "Save a short fact about the user that they want you to keep for later conversations "
            "(only when they ask you to remember it)."
        ),
        "parameters": {
            "type": "object",
            "properties": {"fact": {"type": "string", "description": "the fact, in one short sentence"}},
            "required": ["fact"],
            "additionalProperties": False,
        },
    },
}


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What a call gives back to the model, and the line it tells the user (None: nothing)."""

    content: str
    line: str | None = None


class Toolbox:
    """The tools of one turn: ``search_history`` when its dialog has outgrown the window (turns
    before ``before_turn`` are not shown), ``remember`` where memories can be stored."""

    def __init__(self, storage: Storage, question: Question, *, before_turn: int | None, shared: bool) -> None:
        self._storage = storage
        self._question = question
        self._before_turn = before_turn
        self._shared = shared

    def offered(self) -> list[dict[str, Any]]:
        tools: list[dict[str, Any]] = [REMEMBER]
        if self._before_turn is not None:
            tools.insert(0, SEARCH_HISTORY)
        return tools

    async def run(self, call: ToolCall) -> ToolResult:
        """Run one call; a bad one (unknown tool, arguments that are not what it takes) is told
        to the model as an error, and nothing runs."""
        try:
            arguments = json.loads(call.arguments or "{}")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            return _refused(call, "arguments must be a JSON object")
        if call.name == "search_history" and self._before_turn is not None:
            query = arguments.get("query")
            if not isinstance(query, str) or not query.strip() or len(query) > MAX_QUERY_CHARS:
                return _refused(call, f"query must be text of 1 to {MAX_QUERY_CHARS} characters")
            return await self._search(query, self._before_turn)
        if call.name == "remember":
            fact = arguments.get("fact")
            if not isinstance(fact, str) or not fact.strip() or len(fact) > MAX_MEMORY_CHARS:
                return _refused(call, f"fact must be text of 1 to {MAX_MEMORY_CHARS} characters")
            return await self._remember(" ".join(fact.split()))
        return _refused(call, f"there is no tool {call.name!r} here")

    async def _search(self, query: str, before_turn: int) -> ToolResult:
        try:
            found = await self._storage.recall_earlier(
                self._question, query=query, before_turn=before_turn, limit=FOUND, chars=RECALLED_CHARS,
                shared=self._shared,
            )  # fmt: skip
        except BadRequest:
            return ToolResult(json.dumps({"error": "that query could not be searched; try other words"}))
        logger.info("search_history for question %s: %d found", self._question.id, len(found))
        if not found:
            return ToolResult(json.dumps({"found": []}))
        messages = [
            {
                "date": m.created_at.strftime("%Y-%m-%d"),
                "from": "user" if m.role == "user" else "you",
                "text": m.content,
            }
            for m in found
        ]
        return ToolResult(json.dumps({"found": messages}, ensure_ascii=False), looked_back(found))

    async def _remember(self, fact: str) -> ToolResult:
        question = self._question
        try:
            async with self._storage.database() as pool:
                stored = await context.add_memory(
                    pool, telegram_user_id=question.user_id, first_name=None, content=fact
                )
        except StorageUnavailable:
            return ToolResult(json.dumps({"error": "memories cannot be saved right now"}))
        if stored is None:
            return ToolResult(
                json.dumps({"error": "the user has as many memories as can be kept; ask them to /memory"})
            )
        logger.info("remember for question %s: memory %s, %d chars", question.id, stored, len(fact))
        return ToolResult(json.dumps({"saved": True}), NOTED.format(fact=fact))


def _refused(call: ToolCall, why: str) -> ToolResult:
    logger.info("a call of %s refused: %s", call.name[:40], why)
    return ToolResult(json.dumps({"error": why}))

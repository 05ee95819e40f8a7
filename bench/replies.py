"""What the bot sends into a chat besides answers, for the benchmarks' accounting.

A turn ends in an answer or in an apology (a refusal); after some turns the bot also sends a
notice that is no answer (a summary was written, the history could not be read). The benches
count each kind apart: a notice counted as an answer would make a chat's next question start
early and shift every later answer by one.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final, Literal

from handlers.errors import NO_HISTORY
from handlers.messages import SLOW_DOWN, over_budget_reply
from services.turn.turn import APOLOGY, BAD_INPUT, DB_APOLOGY, HISTORY_MISSING, LLM_APOLOGY, NO_VISION, SUMMARY_NOTICE

REFUSALS: Final = frozenset({DB_APOLOGY, LLM_APOLOGY, BAD_INPUT, APOLOGY, SLOW_DOWN, NO_HISTORY})
NOTICES: Final = frozenset({SUMMARY_NOTICE, HISTORY_MISSING, NO_VISION})
# Over the daily token budget: the reply names the time left, so it is known by what comes before.
OVER_BUDGET: Final = over_budget_reply(datetime(2000, 1, 1, tzinfo=UTC)).split(" in about ")[0]

Kind = Literal["answer", "refusal", "notice"]


def kind(text: str) -> Kind:
    """What a message the bot sent is: an apology instead of an answer, a notice beside one, or an answer."""
    if text in REFUSALS or text.startswith(OVER_BUDGET):
        return "refusal"
    if text in NOTICES:
        return "notice"
    return "answer"

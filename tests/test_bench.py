"""The benchmarks' accounting keeps up with what the bot sends: every text the turn pipeline and
the error handlers send instead of, or beside, an answer is known to ``bench.replies``, so a new
notice or apology cannot be taken for an answer (which once made ``make bench`` report lost
turns that were not lost). That the benchmarks run at all is ``make bench-smoke``, in CI."""

from __future__ import annotations

import ast
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench import replies
from handlers import errors, messages
from services.turn import turn

ROOT = Path(__file__).resolve().parent.parent


def said_by_name(path: Path, call: str) -> set[str]:
    """The module-level names passed as the text (the last argument) of each ``call(...)`` in ``path``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[-1], ast.Name):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
            if name == call:
                names.add(node.args[-1].id)
    return names


def test_every_text_the_turn_pipeline_says_is_no_answer() -> None:
    said = said_by_name(ROOT / "services" / "turn" / "turn.py", "_say")
    assert said, "the turn pipeline says nothing through _say any more: look again at how it answers"
    for name in sorted(said):
        assert replies.kind(getattr(turn, name)) != "answer", name


def test_every_text_the_error_handlers_answer_is_no_answer() -> None:
    answered = said_by_name(ROOT / "handlers" / "errors.py", "_answer") - {"text"}
    assert answered
    for name in sorted(answered):
        assert replies.kind(getattr(errors, name)) == "refusal", name


@pytest.mark.parametrize("hour", [0, 12, 23])
def test_the_over_budget_reply_is_a_refusal_at_any_hour(hour: int) -> None:
    assert replies.kind(messages.over_budget_reply(datetime(2026, 1, 1, hour, 30, tzinfo=UTC))) == "refusal"


def test_an_answer_is_an_answer() -> None:
    assert replies.kind("echo: chat 1 turn 1") == "answer"
    assert replies.kind(turn.SUMMARY_NOTICE) == "notice"

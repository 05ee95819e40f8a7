"""The benchmarks' accounting keeps up with what the bot sends: every text the turn pipeline and
the error handlers send instead of, or beside, an answer is known to ``bench.replies``, so a new
notice or apology cannot be taken for an answer (which once made ``make bench`` report lost
turns that were not lost); the whole-bot report prints each goal beside its figure and judges
only what the run measured. That the benchmarks run at all is ``make bench-smoke``, in CI."""

from __future__ import annotations

import ast
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import bench.__main__ as bench
from bench import history, replies, whole_bot
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


def whole_bot_row(chats: int, **figures: Any) -> dict[str, Any]:
    """A whole-bot level as ``bench.whole_bot`` returns it, with made-up figures."""
    row: dict[str, Any] = {
        "chats": chats, "turns": 3 * chats, "llm_delay_s": 1.0, "turns_per_s": 260.0,
        "overhead": {"p50_ms": 8.0, "p99_ms": 40.0}, "overhead_by_turn": [{"p50_ms": 8.0, "p99_ms": 40.0}] * 3,
        "cpu_ms_per_turn": 3.5, "telegram_calls_per_turn": {"sendChatAction": 1.0, "sendMessage": 1.0},
        "standins_cpu_ms_per_turn": 1.0, "startup_s": 3.0, "startup_cpu_s": 2.9, "rss_at_start_mib": 200.0,
        "peak_rss_mib": 260.0, "summary_notices": 0, "apologies": 0, "lost_turns": 0, "warnings_logged": 0,
        "exit_status": 0,
    }  # fmt: skip
    return {**row, **figures}


def whole_bot_results(*rows: dict[str, Any]) -> dict[str, Any]:
    machine = {"cpus": 2, "platform": "Linux", "postgresql": "15", "durability": "defaults"}
    baseline = {"import_s": 2.5, "import_cpu_s": 2.2, "peak_rss_mib": 165.0}
    return {"machine": machine, "whole_bot": list(rows), "aiogram_baseline": baseline}


def test_each_whole_bot_goal_is_printed_with_its_figure_and_verdict() -> None:
    results = whole_bot_results(
        whole_bot_row(1), whole_bot_row(100, overhead={"p50_ms": 9.0, "p99_ms": 70.0}), whole_bot_row(1000)
    )
    said = bench.goals(results)
    assert said == [
        "- bot CPU per streamed turn at 1000 chats: 3.50 ms (goal <= 4 ms): met",
        "- streamed turns/s, one process at 1000 chats: 260.00 (goal >= 250): met",
        "- bot overhead p99 at 100 chats: 70.00 ms (goal <= 50 ms): NOT met",
        "- start to polling, beyond aiogram's import: 0.50 s (goal <= 1 s): met",
        "- resident memory at polling start, beyond aiogram's: 36.70 MB (goal <= 40 MB): met",  # 35 MiB
    ]
    assert "\ngoals:\n" + "\n".join(said) in bench.report(results)  # a report of the whole-bot section alone


def test_a_goal_at_a_level_the_run_did_not_have_is_not_judged() -> None:
    said = bench.goals(whole_bot_results(whole_bot_row(1), whole_bot_row(20)))  # a smoke run's levels
    assert [line.rsplit(": ", 1)[1] for line in said] == ["n/a", "n/a", "n/a", "met", "met"]


def test_search_is_judged_by_its_goal_and_the_recall_beside_it_by_none() -> None:
    def cell(p50_ms: float) -> dict[str, float]:
        return {"p50_ms": p50_ms, "p99_ms": p50_ms, "mean_hits": 1.0}

    small = {"common word": cell(1.0), "rare word": cell(1.0), history.RECALL: cell(1.0)}
    large = {"common word": cell(2.5), "rare word": cell(3.5), history.RECALL: cell(5.0)}
    said = history.goals({"search": {"10000": small, "1000000": large}})
    assert [said[kind]["met"] for kind in small] == [True, False, None]  # within 3x; past 3x; no goal of its own


def test_the_bench_reads_a_process_cpu_and_memory_from_proc() -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc here")
    cpu, memory = whole_bot.cpu_seconds(os.getpid()), whole_bot.memory_bytes(os.getpid())
    assert cpu is not None and cpu > 0
    assert memory is not None and 0 < memory["rss"] <= memory["peak"]

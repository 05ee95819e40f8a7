"""Where the bot's CPU goes under load: ``python -m bench.profile``.

Runs the whole-bot benchmark (``bench.whole_bot``: ``python bot.py`` against the stand-ins and a
throwaway PostgreSQL, default configuration) at ``--chats`` concurrent chats with the bot process
under cProfile, and prints its top functions by own time and by cumulative time. The whole
process is profiled, start-up included (imports and the first connections: a few hundred
milliseconds of a run of tens of seconds). cProfile slows a Python-bound program down (about
twice), so the run's own figures are not the benchmark's; the shares are what to read. The
stats are kept in ``--output`` for a closer look (``python -m pstats FILE``, snakeviz).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import pstats
import sys
import tempfile
from pathlib import Path

from alembic import command

from bench.__main__ import TOKEN, alembic_config
from bench.whole_bot import whole_bot
from services.ops.local_postgres import throwaway


async def profile(chats: int, turns: int, llm_delay_s: float, output: Path) -> dict[str, object]:
    cluster = throwaway(settings={"max_connections": "1100"})
    try:
        url = cluster.create_database("bench_profile")
        command.upgrade(alembic_config(url), "head")
        spool = Path(tempfile.mkdtemp(prefix="llmbot-profile-")) / "writes.jsonl"
        return await whole_bot(
            url,
            TOKEN,
            list(range(1_000_000, 1_000_000 + chats)),
            turns,
            llm_delay_s,
            spool_path=spool,
            command=(sys.executable, "-m", "cProfile", "-o", str(output), "bot.py"),
        )
    finally:
        cluster.destroy()


def top(output: Path, sort: str, limit: int) -> str:
    text = io.StringIO()
    stats = pstats.Stats(str(output), stream=text)
    stats.strip_dirs().sort_stats(sort).print_stats(limit)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description="Profile the bot process under the whole-bot load.")
    parser.add_argument("--chats", type=int, default=1000, help="concurrent chats")
    parser.add_argument("--turns", type=int, default=3, help="turns per chat")
    parser.add_argument("--llm-delay", type=float, default=1.0, help="the LLM stand-in's seconds per answer")
    parser.add_argument("--top", type=int, default=30, help="functions to print per list")
    parser.add_argument("--output", type=Path, default=Path(tempfile.gettempdir()) / "llmbot-bot.prof")
    args = parser.parse_args()
    row = asyncio.run(profile(args.chats, args.turns, args.llm_delay, args.output))
    print(
        f"{row['chats']} chats x {row['turns_per_chat']} turns under cProfile: {row['turns_per_s']:.1f} turns/s, "
        f"{row['cpu_ms_per_turn']} ms CPU a turn, {row['lost_turns']} lost, {row['apologies']} apologies "
        "(profiled: slower than the benchmark)"
    )
    print("\nby own time (tottime):")
    print(top(args.output, "tottime", args.top))
    print("by cumulative time:")
    print(top(args.output, "cumulative", args.top))
    print(f"stats kept in {args.output}")


if __name__ == "__main__":
    main()

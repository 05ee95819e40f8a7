"""Benchmark of streamed replies (part of ``make bench``; alone: ``python -m bench.streaming``).

The whole bot over real HTTP against the stand-ins and a throwaway PostgreSQL, with an LLM that
streams like a real one (a first token after ``--first-token-ms``, then ``--chars-per-s``):
- time from the LLM's first token to the first text Telegram accepts (a draft in a private chat,
  the first message in a group), p50 and p99; goal: ≤ first token + 300 ms at p50;
- Telegram calls per 2000-character answer at the default throttle.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from alembic import command

from bench import replies
from bench.__main__ import alembic_config, parse, percentile, write_results
from bench.standins import LLMStandIn, TelegramStandIn
from bot import create_bot, create_dispatcher, poll
from config import load_config
from services import database
from services.llm.client import create_llm
from services.llm.summaries import INSTRUCTIONS
from services.ops.local_postgres import throwaway
from services.text.formatting import render, split

TOKEN = "123456:BENCH-token-abcdefghijklmnopqrstuvwxyz"
ANSWER = ("Streaming keeps the user reading while the model writes. " * 40)[:2000]
FINAL = [part.text for part in split(render(ANSWER))]
CALLS = ("sendMessageDraft", "sendMessage", "editMessageText")
SUMMARY_INSTRUCTIONS = INSTRUCTIONS.split("{")[0]  # how a summary's request begins


def answered(telegram: TelegramStandIn, chat: int, *, turns: int) -> bool:
    """Whether ``chat`` shows the final parts of ``turns`` answers: the last turn has ended (a
    notice beside them, a summary written once the history is crowded, is no answer)."""
    shown = [text for text in telegram.shown(chat) if replies.kind(text) != "notice"]
    return len(shown) == turns * len(FINAL) and shown[-len(FINAL) :] == FINAL


async def measure(
    url: str, *, chats: list[int], turns: int, first_token_s: float, chars_per_s: float
) -> dict[str, Any]:
    """Run ``turns`` turns in each chat of ``chats`` (one after another); the figures."""
    telegram, llm = TelegramStandIn(), LLMStandIn()
    await telegram.start()
    await llm.start()
    llm.reply = lambda messages: ANSWER
    llm.delay, llm.chunk = first_token_s, 20
    llm.pace = llm.chunk / chars_per_s
    env = {
        "TELEGRAM_BOT_TOKEN": TOKEN,
        "OPENAI_API_KEY": "x",
        "OPENAI_BASE_URL": llm.url,
        "TELEGRAM_API_URL": telegram.url,
        "DATABASE_URL": url,
        "LOG_LEVEL": "WARNING",
        "GROUP_TRIGGER": "all",  # the group's turns need no mention here
        "SPOOL_PATH": str(Path(tempfile.mkdtemp(prefix="llmbot-bench-")) / "spool.jsonl"),
    }
    config = load_config(env)
    pool = await database.init_db(config.database_url, size=config.db_pool_size, timeout_s=config.db_pool_timeout_s)
    bot = create_bot(config)
    dp = create_dispatcher(config, pool, create_llm(config), bot)
    polling = asyncio.create_task(poll(dp, bot, config, handle_signals=False, polling_timeout=1))
    delays: list[float] = []
    calls_per_answer: list[int] = []
    try:
        for turn in range(turns):
            for chat in chats:
                before = len(telegram.sent)
                requests_before = len(llm.requests)
                telegram.send(f"question {turn}", user_id=abs(chat), chat_id=chat)
                await telegram.wait_for(partial(answered, telegram, chat, turns=turn + 1), timeout=60)
                new = [
                    s
                    for s in telegram.sent[before:]
                    if s.method in CALLS and s.chat_id == chat and s.status == 200 and replies.kind(s.text) != "notice"
                ]
                # The turn's own request: a summary (the turn before crowded the history) may come first.
                asked = next(
                    i
                    for i in range(requests_before, len(llm.requests))
                    if not str(llm.requests[i]["messages"][0]["content"]).startswith(SUMMARY_INSTRUCTIONS)
                )
                delays.append((new[0].answered_at - llm.first_chunk_of[asked]) * 1000)
                calls_per_answer.append(len(new))
    finally:
        await dp.stop_polling()
        await polling
        await database.close_db(pool)
        await telegram.stop()
        await llm.stop()
    return {
        "first_text_after_first_token_ms": {"p50": statistics.median(delays), "p99": percentile(delays, 0.99)},
        "telegram_calls_per_2000_chars": statistics.median(calls_per_answer),
        "turns": len(delays),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cluster = throwaway()
    try:
        url = cluster.create_database("streaming_bench")
        command.upgrade(alembic_config(url), "head")
        figures = {}
        for name, chats in (("private chat (drafts)", [1]), ("group (edits)", [-1001])):
            figures[name] = await measure(
                url,
                chats=chats,
                turns=args.turns,
                first_token_s=args.first_token_ms / 1000,
                chars_per_s=args.chars_per_s,
            )
        return {
            "taken_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "llm": {
                "first_token_ms": args.first_token_ms,
                "chars_per_s": args.chars_per_s,
                "answer_chars": len(ANSWER),
            },
            "figures": figures,
        }
    finally:
        cluster.destroy()


def report(results: dict[str, Any]) -> str:
    llm = results["llm"]
    lines = [
        f"streamed replies: LLM first token after {llm['first_token_ms']} ms, then {llm['chars_per_s']} chars/s, "
        f"{llm['answer_chars']}-character answers; default throttle (drafts 0.3 s, edits 1.5 s)",
        "",
        "| chat | first text after the first token, p50 ms | p99 ms | Telegram calls per answer | turns |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, figures in results["figures"].items():
        first = figures["first_text_after_first_token_ms"]
        lines.append(
            f"| {name} | {first['p50']:.0f} | {first['p99']:.0f} | {figures['telegram_calls_per_2000_chars']:.0f} "
            f"| {figures['turns']} |"
        )
    lines.append("")
    lines.append("goal: first visible text ≤ the LLM's first token + 300 ms at p50")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark of streamed replies.")
    parser.add_argument("--turns", type=int, default=10, help="turns per kind of chat")
    parser.add_argument("--first-token-ms", type=float, default=500)
    parser.add_argument("--chars-per-s", type=float, default=400)
    # 12 turns: past HISTORY_LIMIT (20 messages), so a summary and its notice come too.
    args = parse(parser, {"turns": 12, "first_token_ms": 50, "chars_per_s": 10_000})
    results = asyncio.run(run(args))
    print(report(results))
    write_results(results, "streaming", args.smoke)


if __name__ == "__main__":
    main()

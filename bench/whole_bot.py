"""The whole bot at N concurrent chats: the real dispatcher long-polling the Telegram stand-in,
the real OpenAI client calling the LLM stand-in (which starts answering after ``llm_delay_s``;
with the default LLM_STREAM the answer streams, in one burst), the real database, the default
configuration.

Each of N private chats sends ``turns`` messages one after another, the next one as soon as
the previous answer is accepted by the Telegram stand-in. A turn's *overhead* is what the bot
adds to the LLM's time: (Telegram accepted the answer − getUpdates handed out the question)
− (the LLM stand-in's time on that chat's requests meanwhile: the turn's own and, when the
turn before crowded the history, the summary the chat's queue waits for). A notice (the
summary written) is counted apart, not taken for an answer; an answer to a chat of an earlier
run on the same database (a turn it left unsettled, recovered at this start) is counted as
recovered. The stand-ins run in this process and this event loop, so their own work is inside
the figures (overhead, CPU and memory alike).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import replies
from bench.standins import LLMStandIn, Sent, TelegramStandIn
from bot import create_bot, create_dispatcher, poll, setup_logging
from config import load_config
from services import database
from services.llm.client import create_llm

CHAT_OF_REQUEST = re.compile(r"\bchat (\d+) turn \d+")  # a question's text, in the turn's request or a summary's
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


def rss_bytes() -> int | None:
    """The resident set size of this process now (Linux), or None elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * PAGE
    except OSError:
        return None


def peak_rss_bytes() -> int:
    """ru_maxrss: the highest RSS this process has had so far (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Warnings(logging.Handler):
    """Counts the log records at WARNING and above, keeping the first few."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.first: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.first) < 5:
            self.first.append(f"{record.levelname} {record.name}: {record.getMessage()}")


@contextlib.contextmanager
def production_logging(level: str, warnings: Warnings) -> Iterator[None]:
    """The bot's log lines at ``level``, formatted as in production, written to /dev/null (their
    cost is part of the bot's; their text would drown the report); warnings are counted."""
    root = logging.getLogger()
    names = ["bot", "config", "handlers", "services", "aiogram"]
    saved_levels = {name: logging.getLogger(name).level for name in names}
    saved_handlers, saved_root_level = root.handlers[:], root.level
    with open(os.devnull, "w") as sink:
        handler = logging.StreamHandler(sink)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.handlers = [handler, warnings]  # so setup_logging's basicConfig adds no stderr handler
        try:
            setup_logging(level)
            root.setLevel(logging.WARNING)
            yield
        finally:
            root.handlers = saved_handlers
            root.setLevel(saved_root_level)
            for name, value in saved_levels.items():
                logging.getLogger(name).setLevel(value)


@dataclass
class Users:
    """N people, each sending their next message when the answer to the previous one arrives."""

    telegram: TelegramStandIn
    chats: list[int]
    turns: int
    questions: dict[int, list[tuple[int, str]]] = field(default_factory=dict)  # chat -> (update id, text)
    answers: dict[int, list[Sent]] = field(default_factory=dict)  # chat -> accepted answers and apologies, in order
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    received: int = 0
    last_answer_at: float = 0.0
    notices: int = 0  # accepted notices (a summary written): no answer, so no next question
    recovered: int = 0  # accepted messages to chats not of this run: earlier runs' turns, recovered

    def start(self) -> None:
        self.telegram.on_accepted = self.on_accepted
        for chat in self.chats:
            self.questions[chat], self.answers[chat] = [], []
            self.ask(chat)

    def ask(self, chat: int) -> None:
        text = f"chat {chat} turn {len(self.questions[chat]) + 1}"
        update_id = self.telegram.push("message", self.telegram.message(text, user_id=chat))
        self.questions[chat].append((update_id, text))

    def on_accepted(self, sent: Sent) -> None:
        answers = self.answers.get(sent.chat_id)
        if answers is None:
            self.recovered += 1
            return
        if replies.kind(sent.text) == "notice":
            self.notices += 1
            return
        answers.append(sent)
        self.received += 1
        self.last_answer_at = sent.answered_at
        if len(self.questions[sent.chat_id]) < self.turns:
            self.ask(sent.chat_id)
        elif self.received >= len(self.chats) * self.turns:
            self.finished.set()


def summary(samples: list[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50_ms": None, "p99_ms": None}
    ordered = sorted(samples)
    return {"p50_ms": statistics.median(ordered), "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


STALL_S = 30.0  # no answer for this long (past the LLM's delay): the turns still open are lost


async def until_done_or_stalled(done: asyncio.Event, progress: Callable[[], int], stall_s: float) -> None:
    """Wait for ``done``, however long a loaded machine takes, while ``progress()`` keeps
    moving; once it has stood still for ``stall_s``, give up: what is missing is then counted
    as lost, not waited for forever (a fixed deadline cut slow runs short)."""
    last, since = progress(), time.monotonic()
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 1.0)
        if progress() != last:
            last, since = progress(), time.monotonic()
        elif time.monotonic() - since > stall_s:
            return


async def sample_rss(peak: list[int], every_s: float = 0.05) -> None:
    while True:
        now = rss_bytes()
        if now is not None and now > peak[0]:
            peak[0] = now
        await asyncio.sleep(every_s)


async def whole_bot(
    url: str, token: str, chats: list[int], turns: int, llm_delay_s: float, *, spool_path: Path
) -> dict[str, Any]:
    """One run of the bot with ``len(chats)`` chats sending ``turns`` messages each; the
    configuration is the default but for the addresses, and ``spool_path`` (written only if the
    database fails)."""
    telegram, llm = TelegramStandIn(), LLMStandIn(delay=llm_delay_s)
    await telegram.start()
    await llm.start()
    config = load_config(
        {
            "TELEGRAM_BOT_TOKEN": token,
            "OPENAI_API_KEY": "sk-bench",
            "OPENAI_BASE_URL": llm.url,
            "TELEGRAM_API_URL": telegram.url,
            "DATABASE_URL": url,
            "SPOOL_PATH": str(spool_path),
        }
    )
    pool = await database.init_db(config.database_url, size=config.db_pool_size, timeout_s=config.db_pool_timeout_s)
    bot = create_bot(config)
    llm_client = create_llm(config)
    dp = create_dispatcher(config, pool, llm_client, bot)
    users = Users(telegram, chats, turns)
    expected = len(chats) * turns
    rss_before = rss_bytes() or 0
    rss_peak = [rss_before]
    sampler = asyncio.create_task(sample_rss(rss_peak))
    warnings = Warnings()
    try:
        with production_logging(config.log_level, warnings):
            polling = asyncio.create_task(poll(dp, bot, config, handle_signals=False))
            try:
                await telegram.wait_for(lambda: bool(telegram.calls("setMyCommands")) or polling.done(), 30)
                cpu_before = cpu_seconds()
                started, calls_before = time.monotonic(), len(telegram.sent)
                users.start()
                await until_done_or_stalled(users.finished, lambda: users.received, llm_delay_s + STALL_S)
                cpu = cpu_seconds() - cpu_before
            finally:
                if not polling.done():
                    await dp.stop_polling()
                await polling
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await database.close_db(pool)
        await llm_client.client.close()
        await llm.stop()
        await telegram.stop()

    questions = {text for asked in users.questions.values() for _, text in asked}
    spans: dict[int, list[tuple[float, float]]] = {}  # chat -> the LLM stand-in's (arrived, answered), in order
    summaries = 0
    for request, span in zip(llm.requests, llm.spans, strict=True):
        content = str(request["messages"][-1]["content"])
        summaries += content not in questions
        match = CHAT_OF_REQUEST.search(content)
        if match:
            spans.setdefault(int(match.group(1)), []).append(span)
    overhead: list[float] = []
    by_turn: list[list[float]] = [[] for _ in range(turns)]
    apologies = answered_ok = 0
    for chat in chats:
        asked, answers = users.questions[chat], users.answers[chat]
        for index, ((update_id, text), sent) in enumerate(zip(asked, answers, strict=False)):
            if replies.kind(sent.text) == "refusal":
                apologies += 1
            elif sent.text == f"echo: {text}":
                answered_ok += 1
                begun = telegram.handed_out[update_id]
                llm_s = sum(
                    max(0.0, min(answered, sent.answered_at) - max(arrived, begun))
                    for arrived, answered in spans.get(chat, [])
                )
                ms = (sent.answered_at - begun - llm_s) * 1000
                overhead.append(ms)
                by_turn[index].append(ms)
    elapsed = users.last_answer_at - started
    calls: dict[str, int] = {}
    for sent in telegram.sent[calls_before:]:
        calls[sent.method] = calls.get(sent.method, 0) + 1
    return {
        "chats": len(chats),
        "turns_per_chat": turns,
        "turns": expected,
        "llm_delay_s": llm_delay_s,
        "turns_per_s": answered_ok / elapsed if elapsed > 0 else 0.0,
        "overhead": summary(overhead),
        "overhead_by_turn": [summary(samples) for samples in by_turn],
        "llm_requests": len(llm.requests),
        "summary_requests": summaries,
        "summary_notices": users.notices,
        "recovered": users.recovered,
        "telegram_calls_per_turn": {method: count / expected for method, count in sorted(calls.items())},
        "apologies": apologies,
        "lost_turns": expected - answered_ok - apologies,
        "extra_answers": sum(max(0, len(users.answers[chat]) - turns) for chat in chats),
        "warnings_logged": warnings.count,
        "first_warnings": warnings.first,
        "cpu_ms_per_turn": cpu * 1000 / max(1, answered_ok),
        "rss_before_mib": rss_before / MIB,
        "rss_growth_mib": (rss_peak[0] - rss_before) / MIB,
        "peak_rss_mib": peak_rss_bytes() / MIB,
    }

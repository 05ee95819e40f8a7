"""The whole bot at N concurrent chats: ``python bot.py`` as a child process, as in production,
long-polling the Telegram stand-in and calling the LLM stand-in (which starts answering after
``llm_delay_s``; with the default LLM_STREAM the answer streams, in one burst) with the real
database and the default configuration. The stand-ins and the simulated users run in this
process, so what is measured of the child (its CPU, its memory, its start-up) is the bot's own.

Each of N private chats sends ``turns`` messages one after another, the next one as soon as
the previous answer is accepted by the Telegram stand-in; the chats' first messages are spread
over one LLM delay, so that they do not all meet the LLM's fixed delay in lock-step. A turn's *overhead* is what the bot
adds to the LLM's time: (Telegram accepted the answer − getUpdates handed out the question)
− (the LLM stand-in's time on that chat's requests meanwhile: the turn's own and, when the
turn before crowded the history, the summary the chat's queue waits for). A notice (the
summary written) is counted apart, not taken for an answer; an answer to a chat of an earlier
run on the same database (a turn it left unsettled, recovered at this start) is counted as
recovered. The stand-ins still share the machine's CPUs with the bot and PostgreSQL, so on a
small machine their work slows the bot's overhead and turns/s, but not its CPU per turn.

Start-up is the time from starting the process to its first getUpdates; it and the resident
memory are also given beyond what ``python -c "import aiogram"`` alone takes (``aiogram_baseline``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import replies
from bench.standins import LLMStandIn, Sent, TelegramStandIn

ROOT = Path(__file__).resolve().parent.parent
CHAT_OF_REQUEST = re.compile(r"\bchat (\d+) turn \d+")  # a question's text, in the turn's request or a summary's
MIB = 1024 * 1024
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0


# -- what /proc tells of a process (Linux; None elsewhere) ---------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of process ``pid`` so far, all its threads (``/proc/<pid>/stat``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 (state) onwards
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S  # fields 14 and 15: utime, stime


def memory_bytes(pid: int) -> dict[str, int] | None:
    """Resident memory of process ``pid``: now (VmRSS) and its peak so far (VmHWM)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, flags=re.MULTILINE))
    if len(values) != 2:
        return None
    return {"rss": int(values["VmRSS"]) * 1024, "peak": int(values["VmHWM"]) * 1024}


# Run in a child: its CPU seconds and peak RSS (kB, of this program: ru_maxrss would count the
# forked parent too) once aiogram is imported.
IMPORT_AIOGRAM = """
import resource, re, pathlib
import aiogram
usage = resource.getrusage(resource.RUSAGE_SELF)
peak = re.search(r"VmHWM:\\s+(\\d+) kB", pathlib.Path("/proc/self/status").read_text())
print(usage.ru_utime + usage.ru_stime, peak.group(1) if peak else "nan")
"""


def aiogram_baseline(runs: int = 3) -> dict[str, float]:
    """What ``python -c "import aiogram"`` takes: seconds from start to exit and CPU seconds
    (the medians of ``runs``), and peak resident memory in MiB (the largest). The bot's start-up
    and memory are given beyond these: aiogram builds every Bot API type as it is imported,
    which is not ours to cut."""
    seconds, cpu, peak = [], [], 0.0
    for _ in range(runs):
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", IMPORT_AIOGRAM], cwd=ROOT, capture_output=True, text=True, check=True
        )
        seconds.append(time.monotonic() - started)
        used, kib = done.stdout.split()
        cpu.append(float(used))
        peak = max(peak, float(kib) / 1024)
    return {"import_s": statistics.median(seconds), "import_cpu_s": statistics.median(cpu), "peak_rss_mib": peak}


# -- the users -----------------------------------------------------------------------------------


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

    def start(self, spread_s: float) -> None:
        """Each chat's first message, spread evenly over ``spread_s``: chats that met the LLM's
        fixed delay in lock-step would all be answered in the same instant, a burst of
        CPU work that measures the burst, not what a turn costs."""
        self.telegram.on_accepted = self.on_accepted
        loop = asyncio.get_running_loop()
        for index, chat in enumerate(self.chats):
            self.questions[chat], self.answers[chat] = [], []
            loop.call_later(spread_s * index / len(self.chats), self.ask, chat)

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


# -- the bot process -----------------------------------------------------------------------------


def bot_env(url: str, token: str, telegram: TelegramStandIn, llm: LLMStandIn, spool_path: Path) -> dict[str, str]:
    """The default configuration but for the addresses and ``spool_path`` (written only if the
    database fails); no ``.env`` read, so a developer's own settings stay out of the figures."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "PYTHON_DOTENV_DISABLED": "1",
        "TELEGRAM_BOT_TOKEN": token,
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": llm.url,
        "TELEGRAM_API_URL": telegram.url,
        "DATABASE_URL": url,
        "SPOOL_PATH": str(spool_path),
    }


def spawn(command: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """The bot started in the project's root, its output (stdout and stderr) to ``log``."""
    with log.open("wb") as output:
        return subprocess.Popen(list(command), cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def started_polling(telegram: TelegramStandIn, process: subprocess.Popen[bytes], log: Path) -> float:
    """Wait for the bot's first getUpdates; when it came (monotonic). RuntimeError with the
    bot's output when it exits or takes longer than STARTUP_TIMEOUT_S."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while telegram.first_poll_at is None:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the bot did not start polling:\n{tail(log)}")
        await asyncio.sleep(0.005)
    return telegram.first_poll_at


async def stopped(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, as a service manager stops the bot, and its exit status (killed past STOP_TIMEOUT_S)."""
    process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            return process.wait()
        await asyncio.sleep(0.05)
    return process.returncode


def logged_problems(log: Path) -> tuple[int, list[str]]:
    """How many lines of the bot's log are warnings or errors, and the first few."""
    problems = [
        line
        for line in log.read_text(errors="replace").splitlines()
        if re.search(r" (WARNING|ERROR|CRITICAL) ", line) and "Received SIGTERM signal" not in line  # ours: the stop
    ]
    return len(problems), problems[:5]


async def whole_bot(
    url: str,
    token: str,
    chats: list[int],
    turns: int,
    llm_delay_s: float,
    *,
    spool_path: Path,
    command: Sequence[str] = (sys.executable, "bot.py"),
) -> dict[str, Any]:
    """One run of the bot with ``len(chats)`` chats sending ``turns`` messages each; ``command``
    starts the bot (in the project's root), e.g. under a profiler."""
    telegram, llm = TelegramStandIn(), LLMStandIn(delay=llm_delay_s)
    await telegram.start()
    await llm.start()
    users = Users(telegram, chats, turns)
    expected = len(chats) * turns
    fd, name = tempfile.mkstemp(prefix="llmbot-bench-", suffix=".log")
    os.close(fd)
    log = Path(name)
    try:
        spawned = time.monotonic()
        process = spawn(command, bot_env(url, token, telegram, llm, spool_path), log)
        try:
            polling = await started_polling(telegram, process, log)
            at_start = memory_bytes(process.pid)
            cpu_before = cpu_seconds(process.pid)  # the start-up's
            ours_before = cpu_seconds(os.getpid())
            started, calls_before = time.monotonic(), len(telegram.sent)
            users.start(spread_s=llm_delay_s)
            await until_done_or_stalled(users.finished, lambda: users.received, llm_delay_s + STALL_S)
            cpu_after = cpu_seconds(process.pid)
            ours_after = cpu_seconds(os.getpid())
            at_end = memory_bytes(process.pid)
        finally:
            exit_status = await stopped(process)
        warnings, first_warnings = logged_problems(log)
    finally:
        os.unlink(log)
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
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    ours = None if ours_before is None or ours_after is None else ours_after - ours_before
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
        "warnings_logged": warnings,
        "first_warnings": first_warnings,
        "exit_status": exit_status,
        # the bot process alone (the stand-ins are in this one)
        "cpu_ms_per_turn": None if cpu is None else cpu * 1000 / max(1, answered_ok),
        "standins_cpu_ms_per_turn": None if ours is None else ours * 1000 / max(1, answered_ok),
        "startup_s": polling - spawned,
        "startup_cpu_s": cpu_before,
        "rss_at_start_mib": None if at_start is None else at_start["rss"] / MIB,
        "peak_rss_mib": None if at_end is None else at_end["peak"] / MIB,
    }

"""Our bot beside a peer (issue 24): n3d1117/chatgpt-telegram-bot, python-telegram-bot 21.x, on
the same stand-ins and the same load, so that the comparison is re-taken after every change.

``python -m bench.peer`` runs each bot as a child process of its own (ours: ``python bot.py``
on a throwaway PostgreSQL; the peer: ``bench/peer_launch.py`` in the peer's own venv), one bot
at a time, against fresh stand-ins of the Telegram Bot API and of the LLM (``bench.standins``,
in this process). N users at once each send M messages one after another, the next as soon as
the chat shows the whole answer to the previous one (whatever method put it there: a message,
or an edit of a streamed one). Per bot and run it reads, from the bot's own process only (not
the stand-ins', not PostgreSQL's):

- CPU ms per turn: utime + stime from /proc/<pid>/stat over the load, / the turns answered;
- Telegram calls per turn, per method, as the stand-in recorded them (getUpdates aside);
- time from the first question posted to the last answer shown;
- peak RSS (VmHWM from /proc/<pid>/status) and the time from spawn to the first getUpdates.

It prints both bots' min/median/max over the runs, the ratio of the medians, and the issue's goal
next to the measured ratio; the figures are printed, not judged (a peer's bad day is no failure
of ours). The peer's checkout is given as ``--peer-dir`` (no GitHub at run time); its venv is
made once from its requirements.txt with pip.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from aiohttp import web
from alembic import command
from psycopg import sql

from bench.__main__ import alembic_config, parse, write_results
from bench.standins import LLMStandIn, TelegramStandIn
from bench.whole_bot import STALL_S, until_done_or_stalled
from services.ops.local_postgres import LocalPostgres, throwaway
from services.text.formatting import render, split

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = Path(__file__).resolve().parent / "peer_launch.py"
PEER_REPO = "https://github.com/n3d1117/chatgpt-telegram-bot"
PEER_COMMIT = "df4dcaa"  # the commit the comparison is pinned at
DEFAULT_PEER_DIR = Path(tempfile.gettempdir()) / "llmbot-peer" / "chatgpt-telegram-bot"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
DEFAULT_PEER_VENV = CACHE / "llmbot-bench" / "peer-venv"
TOKEN = "123456:BENCH-token-abcdefghijklmnopqrstuvwxyz"
SHOWN = frozenset({"sendMessage", "editMessageText"})  # the methods that put an answer's text in a chat
FILLER = "Streaming keeps the user reading while the model writes. "
READY_TIMEOUT_S = 120.0  # spawn to the first getUpdates: imports on a small, busy machine
SETTLE_S = 1.0  # after the last answer, before CPU is read: the turn's last writes and calls
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024
GOAL = 0.2  # issue 24: CPU per streamed turn ≤ 1/5 of the peer's
BOTS = ("ours", "peer")
TEMPLATE = "peer_bench_template"  # migrated once; each of our runs gets a copy


# -- the peer's checkout and venv ------------------------------------------------------------


def how_to_get(peer_dir: Path) -> str:
    """The one line that makes ``peer_dir`` (the bench needs no GitHub at run time, git does once)."""
    return f"git clone {PEER_REPO} {peer_dir} && git -C {peer_dir} checkout {PEER_COMMIT}"


def commit_of(peer_dir: Path) -> str:
    """The checkout's commit, or "unknown" when it is no git work tree (a copied folder)."""
    git = shutil.which("git")
    if git is None:
        return "unknown"
    found = subprocess.run([git, "-C", str(peer_dir), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return found.stdout.strip() if found.returncode == 0 else "unknown"


def peer_python(peer_dir: Path, venv: Path) -> Path:
    """The peer venv's interpreter, the venv made (or remade) when the peer's requirements.txt is
    not the one it was made from: the peer runs on its own pins, not on ours."""
    requirements = peer_dir / "requirements.txt"
    wanted = hashlib.sha256(requirements.read_bytes()).hexdigest()
    stamp, python = venv / ".peer-requirements.sha256", venv / "bin" / "python"
    if python.exists() and stamp.exists() and stamp.read_text().strip() == wanted:
        return python
    print(f"making the peer's venv in {venv} from {requirements} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(requirements)], check=True)
    stamp.write_text(wanted + "\n")
    return python


# -- a bot's process, as the kernel sees it ------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads, not its children), from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5)


def peak_rss_mib(pid: int) -> float:
    """VmHWM of ``pid``: the highest resident set it has had."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MIB
    return 0.0


def own_cpu_seconds() -> float:
    """This process's CPU: the stand-ins and the users, which share the machine with the bot."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Spawn:
    """How to start one bot: its command line, environment and working folder."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path


def ours(telegram_url: str, llm_url: str, database_url: str, streamed: bool, workdir: Path) -> Spawn:
    """``python bot.py`` with the default configuration but for the addresses (as bench.whole_bot
    and bench.instances run it), streaming or not."""
    env = {
        "TELEGRAM_BOT_TOKEN": TOKEN,
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": llm_url,
        "TELEGRAM_API_URL": telegram_url,
        "DATABASE_URL": database_url,
        "SPOOL_PATH": str(workdir / "spool.jsonl"),
        "LLM_STREAM": "true" if streamed else "false",
    }
    return Spawn([sys.executable, "bot.py"], env, ROOT)


def peer(python: Path, peer_dir: Path, telegram_url: str, llm_url: str, streamed: bool, workdir: Path) -> Spawn:
    """The peer through the launcher, with its defaults but for the addresses and STREAM; it
    writes its usage_logs/ into ``workdir``."""
    env = {
        "TELEGRAM_BOT_TOKEN": TOKEN,
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": llm_url,
        "PEER_TELEGRAM_API_URL": telegram_url,
        "STREAM": "true" if streamed else "false",
    }
    return Spawn([str(python), str(LAUNCHER), str(peer_dir)], env, workdir)


async def start(spawn: Spawn, log: Path) -> asyncio.subprocess.Process:
    """The bot's process, its output (both streams) in ``log``."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(spawn.cwd), **spawn.env}
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            *spawn.argv, cwd=spawn.cwd, env=env, stdout=out, stderr=subprocess.STDOUT
        )


async def stop(process: asyncio.subprocess.Process, timeout_s: float = 30.0) -> int:
    """SIGTERM, as a supervisor stops a bot; SIGKILL if it has not exited within ``timeout_s``."""
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout_s)
        except TimeoutError:
            process.kill()
            await process.wait()
    return process.returncode if process.returncode is not None else -1


# -- the load ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """What the users send and how the LLM answers."""

    users: int
    turns: int
    streamed: bool
    first_token_s: float
    answer_chars: int
    chars_per_s: float

    @property
    def answer_s(self) -> float:
        """The LLM's time on one answer: its first token, then the rest at ``chars_per_s``."""
        return self.first_token_s + self.answer_chars / self.chars_per_s

    @property
    def floor_s(self) -> float:
        """The time to the last answer if a bot added nothing: each chat's turns one after another."""
        return self.turns * self.answer_s


def answer_to(question: str, chars: int) -> str:
    """A plain-text answer of about ``chars`` characters naming its question: the text both bots
    show as it is (no Markdown to render, no trailing blank for the peer to strip)."""
    return (f"echo: {question}. " + FILLER * (chars // len(FILLER) + 1))[:chars].rstrip()


def shown_as(answer: str) -> str:
    """The text the chat shows at the end of the turn; our renderer must leave it as it is, or
    the two bots would end their turns on different texts."""
    parts = [part.text for part in split(render(answer))]
    if parts != [answer]:
        raise ValueError(f"answers must be plain text under 4096 characters, shown unchanged: {answer[:60]!r}")
    return answer


def llm_for(load: Load) -> LLMStandIn:
    """The LLM stand-in of the load: streamed, a first token after ``first_token_s`` and then
    ``chars_per_s``; not streamed, the whole answer after as long as the stream takes."""
    llm = LLMStandIn(reply=lambda messages: answer_to(str(messages[-1]["content"]), load.answer_chars))
    if load.streamed:
        llm.delay, llm.chunk = load.first_token_s, 8
        llm.pace = llm.chunk / load.chars_per_s
    else:
        llm.delay = load.answer_s
    return llm


@dataclass
class WatchedTelegram(TelegramStandIn):
    """The Telegram stand-in, telling ``on_shown`` of every text a chat shows (an accepted message
    or edit) and noting when the bot first polled: ready."""

    on_shown: Callable[[int, str, float], None] | None = None
    first_poll_at: float | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if method == "getUpdates" and self.first_poll_at is None:
            self.first_poll_at = time.monotonic()
        response = await super()._handle(request)
        # The stand-in records a call and answers it without awaiting in between, so the last
        # record is this request's.
        if method in SHOWN and response.status == 200 and self.on_shown is not None and self.sent:
            sent = self.sent[-1]
            if sent.method == method:
                self.on_shown(sent.chat_id, sent.text, time.monotonic())
        return response


@dataclass
class Users:
    """N people, each sending their next message once the chat shows the whole answer."""

    telegram: WatchedTelegram
    load: Load
    chats: list[int]
    asked: dict[int, int] = field(default_factory=dict)  # chat -> questions sent
    waiting_for: dict[int, str] = field(default_factory=dict)  # chat -> the text that ends its turn
    answered: int = 0
    last_answer_at: float = 0.0
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self) -> None:
        self.telegram.on_shown = self.shown
        for chat in self.chats:
            self.asked[chat] = 0
            self.ask(chat)

    def ask(self, chat: int) -> None:
        self.asked[chat] += 1
        question = f"chat {chat} turn {self.asked[chat]}"
        self.waiting_for[chat] = shown_as(answer_to(question, self.load.answer_chars))
        self.telegram.send(question, user_id=chat)

    def shown(self, chat: int, text: str, at: float) -> None:
        if self.waiting_for.get(chat) != text:
            return  # a part of a streamed answer, or a text that is no answer
        del self.waiting_for[chat]
        self.answered += 1
        self.last_answer_at = at
        if self.asked[chat] < self.load.turns:
            self.ask(chat)
        elif self.answered >= len(self.chats) * self.load.turns:
            self.finished.set()


def tail_of(log: Path, chars: int = 3000) -> str:
    """The end of a bot's output: why it did not start."""
    return log.read_text(errors="replace")[-chars:]


async def until_polling(telegram: WatchedTelegram, process: asyncio.subprocess.Process, log: Path) -> None:
    """Until the bot asks for updates; RuntimeError, with its log's end, if it exits or never does."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while telegram.first_poll_at is None:
        if process.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the bot did not start polling (exit status {process.returncode}):\n{tail_of(log)}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 0.05)


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most LLM requests open at one time: what a bot's HTTP client lets through at once."""
    edges = sorted([(arrived, 1) for arrived, _ in spans] + [(answered, -1) for _, answered in spans])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


async def measure(load: Load, launch: Callable[[str, str, Path], Spawn], workdir: Path) -> dict[str, Any]:
    """One bot under ``load``: spawn it, wait until it polls, send the questions, read its figures."""
    telegram, llm = WatchedTelegram(), llm_for(load)
    await telegram.start()
    await llm.start()
    log = workdir / "bot.log"
    spawned_at = time.monotonic()
    process = await start(launch(telegram.url, llm.url, workdir), log)
    try:
        await until_polling(telegram, process, log)
        ready_s = (telegram.first_poll_at or spawned_at) - spawned_at
        await asyncio.sleep(SETTLE_S)  # start-up's last work (our recovery, the peer's post_init) done
        chats = list(range(1_000_001, 1_000_001 + load.users))
        users = Users(telegram, load, chats)
        load_average = os.getloadavg()[0]
        cpu_before, calls_before = cpu_seconds(process.pid), len(telegram.sent)
        stand_ins_before, started = own_cpu_seconds(), time.monotonic()
        users.start()
        await until_done_or_stalled(users.finished, lambda: users.answered, load.answer_s + STALL_S)
        await asyncio.sleep(SETTLE_S)
        cpu = cpu_seconds(process.pid) - cpu_before
        stand_ins, window = own_cpu_seconds() - stand_ins_before, time.monotonic() - started
        peak = peak_rss_mib(process.pid)
    finally:
        status = await stop(process)
        await llm.stop()
        await telegram.stop()
    calls: dict[str, int] = {}
    for sent in telegram.sent[calls_before:]:
        calls[sent.method] = calls.get(sent.method, 0) + 1
    turns = max(1, users.answered)
    return {
        "answered": users.answered,
        "lost": load.users * load.turns - users.answered,
        "cpu_ms_per_turn": cpu * 1000 / turns,
        "telegram_calls_per_turn": sum(calls.values()) / turns,
        "calls_per_turn_by_method": {method: count / turns for method, count in sorted(calls.items())},
        "last_answer_s": users.last_answer_at - started if users.answered else None,
        "peak_rss_mib": peak,
        "start_to_polling_s": ready_s,
        "bot_cpu_busy_pct": cpu * 100 / window,
        "stand_ins_cpu_busy_pct": stand_ins * 100 / window,
        "load_average_at_start": load_average,
        "llm_requests": len(llm.requests),
        "llm_requests_at_once": most_at_once(llm.spans),
        "exit_status": status,
    }


# -- the runs ------------------------------------------------------------------------------------


@dataclass
class Bench:
    """Everything a run needs: the peer's interpreter and checkout, our throwaway PostgreSQL, and
    a folder for the runs' working folders and logs."""

    python: Path
    peer_dir: Path
    cluster: LocalPostgres
    folder: Path
    databases: int = 0
    migrated: bool = False

    def fresh_database(self) -> str:
        """A new database at the newest schema: each of our runs starts from nothing, as the peer
        does. Copied from one migrated once (a template), so Alembic runs and logs once."""
        if not self.migrated:
            command.upgrade(alembic_config(self.cluster.create_database(TEMPLATE)), "head")
            self.migrated = True
        self.databases += 1
        name = f"peer_bench_{self.databases}"
        with psycopg.connect(self.cluster.url_for("postgres"), autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(TEMPLATE))
            )
        return self.cluster.url_for(name)

    async def run_bot(self, bot: str, load: Load, label: str) -> dict[str, Any]:
        workdir = self.folder / label
        workdir.mkdir(parents=True)
        if bot == "ours":
            url = self.fresh_database()

            def launch(telegram_url: str, llm_url: str, where: Path) -> Spawn:
                return ours(telegram_url, llm_url, url, load.streamed, where)
        else:

            def launch(telegram_url: str, llm_url: str, where: Path) -> Spawn:
                return peer(self.python, self.peer_dir, telegram_url, llm_url, load.streamed, where)

        figures = await measure(load, launch, workdir)
        figures["log"] = str(workdir / "bot.log")
        return figures

    async def section(self, load: Load, runs: int) -> dict[str, list[dict[str, Any]]]:
        """``runs`` runs of each bot, in turns (ours first in even runs, the peer first in odd ones),
        so that a machine growing busier weighs on both."""
        results: dict[str, list[dict[str, Any]]] = {bot: [] for bot in BOTS}
        for run in range(runs):
            for bot in BOTS if run % 2 == 0 else BOTS[::-1]:
                print(f"  run {run + 1}/{runs}: {bot}", flush=True)
                label = f"{'streamed' if load.streamed else 'not-streamed'}-{bot}-{run + 1}"
                results[bot].append(await self.run_bot(bot, load, label))
        return results


def loads(args: argparse.Namespace) -> dict[str, Load]:
    """The sections: streamed and not, each at its own number of users."""
    common = {"turns": args.turns, "first_token_s": args.first_token_ms / 1000, "answer_chars": args.answer_chars}
    sections = {
        "streamed": Load(users=args.users, streamed=True, chars_per_s=args.chars_per_s, **common),
        "not streamed": Load(users=args.plain_users, streamed=False, chars_per_s=args.chars_per_s, **common),
    }
    return {name: load for name, load in sections.items() if name.replace(" ", "-") in args.sections}


async def run(args: argparse.Namespace, python: Path, peer_dir: Path) -> dict[str, Any]:
    cluster = throwaway()
    try:
        folder = Path(tempfile.mkdtemp(prefix="llmbot-peer-bench-"))
        print(f"the bots' logs and working folders: {folder}", flush=True)
        bench = Bench(python, peer_dir, cluster, folder)
        results: dict[str, Any] = {
            "taken_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "load_average_at_start": os.getloadavg(),
            },
            "peer": {"repo": PEER_REPO, "commit": commit_of(peer_dir), "pinned": PEER_COMMIT},
            "runs": args.runs,
            "sections": {},
        }
        for name, load in loads(args).items():
            print(f"{name}: {load.users} users × {load.turns} messages", flush=True)
            section = await bench.section(load, args.runs)
            results["sections"][name] = {"load": load.__dict__ | {"floor_s": load.floor_s}, **section}
        return results
    finally:
        cluster.destroy()


# -- the report ------------------------------------------------------------------------------


MEASURES = (  # key, label, format
    ("cpu_ms_per_turn", "CPU ms per turn", "{:.1f}"),
    ("telegram_calls_per_turn", "Telegram calls per turn", "{:.1f}"),
    ("last_answer_s", "first question to last answer, s", "{:.1f}"),
    ("peak_rss_mib", "peak RSS, MiB", "{:.0f}"),
    ("start_to_polling_s", "spawn to first getUpdates, s", "{:.1f}"),
)
CONTEXT = (  # the same, without a ratio: how busy the machine was, to read the times by
    ("bot_cpu_busy_pct", "the bot's CPU over the load, % of one CPU", "{:.0f}"),
    ("stand_ins_cpu_busy_pct", "the stand-ins' CPU (this process), % of one CPU", "{:.0f}"),
    ("llm_requests_at_once", "LLM requests open at once, most", "{:.0f}"),
)


def spread(runs: list[dict[str, Any]], key: str, shape: str) -> tuple[str, float | None]:
    """The "min / median / max" of ``key`` over ``runs`` (one figure for one run), and the median."""
    values = sorted(run[key] for run in runs if run[key] is not None)
    if not values:
        return "—", None
    median = statistics.median(values)
    if len(values) == 1:
        return shape.format(median), median
    return " / ".join(shape.format(value) for value in (values[0], median, values[-1])), median


def ratio(mine: float | None, theirs: float | None) -> float | None:
    return mine / theirs if mine is not None and theirs else None


def section_table(name: str, section: dict[str, Any]) -> list[str]:
    load = section["load"]
    how = (
        f"first token after {load['first_token_s']:g} s, then {load['chars_per_s']:g} chars/s"
        if load["streamed"]
        else f"the whole answer after {load['first_token_s'] + load['answer_chars'] / load['chars_per_s']:g} s"
    )
    lines = [
        f"{name}: {load['users']} users at once × {load['turns']} messages each; {load['answer_chars']}-character "
        f"answers, {how}; the LLM alone: {load['floor_s']:.1f} s to the last answer",
        "",
        "| measure | ours | peer | ours / peer |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, label, shape in MEASURES:
        (mine, my_median), (theirs, their_median) = (spread(section[bot], key, shape) for bot in BOTS)
        share = ratio(my_median, their_median)
        lines.append(f"| {label} | {mine} | {theirs} | {'—' if share is None else f'{share:.2f}'} |")
    for key, label, shape in CONTEXT:
        mine, theirs = (spread(section[bot], key, shape)[0] for bot in BOTS)
        lines.append(f"| {label} | {mine} | {theirs} | |")
    answered = [f"{sum(r['answered'] for r in section[bot])}/{sum(r['answered'] + r['lost'] for r in section[bot])}"
                for bot in BOTS]  # fmt: skip
    lines.append(f"| turns answered | {answered[0]} | {answered[1]} | |")
    lines.append("")
    for bot in BOTS:
        methods = section[bot][-1]["calls_per_turn_by_method"]
        lines.append(f"{bot}, calls per turn (last run): " + ", ".join(f"{m} {n:.2f}" for m, n in methods.items()))
    return lines


def report(results: dict[str, Any], smoke: bool) -> str:
    peer_commit = results["peer"]["commit"]
    machine = results["machine"]
    lines = [
        f"peer: {PEER_REPO} at {peer_commit[:12]}"
        + ("" if peer_commit.startswith(PEER_COMMIT) else f" (NOT the pinned {PEER_COMMIT})"),
        f"{machine['cpus']} CPUs, load average at start {machine['load_average_at_start'][0]:.1f}; "
        f"{results['runs']} run(s) of each bot, min / median / max",
        "",
    ]
    for name, section in results["sections"].items():
        lines += [*section_table(name, section), ""]
    streamed = results["sections"].get("streamed")
    if streamed:
        mine, theirs = (spread(streamed[bot], "cpu_ms_per_turn", "{:.1f}")[1] for bot in BOTS)
        share = ratio(mine, theirs)
        measured = "—" if share is None else f"{share:.2f} (1/{1 / share:.1f})" if share else "0"
        verdict = "not judged (smoke run)" if smoke else ("met" if share is not None and share <= GOAL else "not met")
        goal = f"goal: CPU per streamed turn ≤ 1/5 of the peer's (ratio ≤ {GOAL:.2f})"
        lines.append(f"{goal}; measured {measured}: {verdict}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Our bot beside n3d1117/chatgpt-telegram-bot, on the same load.")
    parser.add_argument("--peer-dir", type=Path, default=DEFAULT_PEER_DIR, help="the peer's checkout")
    parser.add_argument("--peer-venv", type=Path, default=DEFAULT_PEER_VENV, help="the peer's venv (made if needed)")
    parser.add_argument("--users", type=int, default=200, help="users at once, streamed")
    parser.add_argument("--plain-users", type=int, default=50, help="users at once, not streamed")
    parser.add_argument("--turns", type=int, default=3, help="messages each user sends, one after another")
    parser.add_argument("--runs", type=int, default=3, help="runs of each bot (min / median / max)")
    parser.add_argument("--first-token-ms", type=float, default=1000)
    parser.add_argument("--answer-chars", type=int, default=200)
    parser.add_argument("--chars-per-s", type=float, default=400)
    parser.add_argument(
        "--sections", nargs="+", choices=["streamed", "not-streamed"], default=["streamed", "not-streamed"]
    )
    args = parse(parser, {"users": 5, "plain_users": 3, "turns": 2, "runs": 1, "first_token_ms": 200})
    peer_dir = args.peer_dir.resolve()
    if not (peer_dir / "bot" / "main.py").exists():
        print(f"no peer checkout in {peer_dir}; get it with:\n  {how_to_get(peer_dir)}", file=sys.stderr)
        raise SystemExit(2)
    python = peer_python(peer_dir, args.peer_venv.resolve())
    results = asyncio.run(run(args, python, peer_dir))
    print(report(results, args.smoke))
    write_results(results, "peer", args.smoke)


if __name__ == "__main__":
    main()

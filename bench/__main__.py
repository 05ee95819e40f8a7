"""Benchmark of the data path of one chat turn (``make bench``).

Starts its own throwaway PostgreSQL with default (durable) settings, migrates it, and measures
in one run: the floors (SELECT 1, one committed INSERT, one committed message row), the
database cost of one turn and its round trips, throughput through the real aiogram pipeline next
to pgbench running the same SQL, history-read latency as the table grows, and the whole bot over
HTTP (the real dispatcher, LLM client and database against the stand-ins of ``bench.standins``)
at 1 and 1000 concurrent chats. Prints tables and writes JSON to bench/results/; exits non-zero
when a turn went unanswered (an apology, a lost or a duplicated answer).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from aiogram import Bot, Dispatcher
from aiogram.client.session.base import BaseSession
from aiogram.methods import GetMe, SendMessage, TelegramMethod
from aiogram.methods.base import TelegramType
from aiogram.types import Chat, Message, Update, User
from alembic import command
from alembic.config import Config as AlembicConfig
from psycopg import pq

from bench import replies
from bench.instances import instances
from bench.whole_bot import aiogram_baseline, whole_bot
from bot import create_dispatcher
from config import load_config
from services import context, database, records
from services.cluster import leases
from services.database import Connection, Pool
from services.llm.client import LLM
from services.llm.tokens import estimate_tokens
from services.ops.local_postgres import LocalPostgres, throwaway

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent
TOKEN = "123456:BENCH-token-abcdefghijklmnopqrstuvwxyz"
CONTEXT_BUDGET = 7_168  # the read bound of an 8192-token model with LLM_MAX_TOKENS=1024
HISTORY_LIMIT = 20
COMMITS_PER_TURN = 3
MESSAGE_ROWS_PER_TURN = 2  # of the commits, those that insert a message row: the question, the answer
FLOOR_DIALOG = 999_999_999  # the user and chat of the message-row floor, apart from every bench dialog
DB_COST_GOAL = 1.3  # per-turn database cost / the floor of its commits, at most (issue 24)
# ADD_QUESTION and FETCH_FRESH_TURN_START (one pipeline: one round trip), ADD_ANSWER, RECORD_SENT_PART
STATEMENTS_PER_TURN = 4
# A spool of its own, never written unless the bench database fails: the default path, relative
# to the working directory, could hold another run's writes.
SPOOL_PATH = Path(tempfile.gettempdir()) / f"llmbot-bench-{os.getpid()}" / "writes.jsonl"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed(n: int, operation: Callable[[int], Awaitable[object]]) -> list[float]:
    """Latencies in milliseconds of ``n`` sequential calls."""
    samples = []
    for i in range(n):
        started = time.perf_counter()
        await operation(i)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def parse(parser: argparse.ArgumentParser, smoke: dict[str, Any]) -> argparse.Namespace:
    """The command line; with ``--smoke`` the defaults are ``smoke`` (options given still win): a
    few seconds of each section, so that CI sees a section break, with its figures printed but
    neither judged nor written to bench/results/."""
    parser.add_argument(
        "--smoke", action="store_true", help="a few seconds of every section: figures printed, not judged or written"
    )
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args()
    return args


def write_results(results: dict[str, Any], name: str, smoke: bool) -> None:
    """The run's JSON in bench/results/ (a smoke run's is not kept)."""
    if smoke:
        print("\nsmoke run: figures not judged, nothing written")
        return
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{results['taken_at'].replace(':', '')}.json"
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(f"\nwrote {path.relative_to(ROOT)}")


def summary(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": statistics.median(samples), "p99_ms": percentile(samples, 0.99)}


# -- floors and the per-turn cost -------------------------------------------------------------


async def floors(pool: Pool, n: int) -> dict[str, dict[str, float]]:
    """SELECT 1; one committed one-row INSERT into a bare table (the floor's unit); one committed
    INSERT of a message row and nothing else: into ``messages`` with its indexes, foreign keys
    and search trigger, as a question or an answer is stored."""
    async with pool.connection() as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS bench_floor (id bigint GENERATED ALWAYS AS IDENTITY, v text)")
        await database.upsert_user_and_chat(
            conn, telegram_user_id=FLOOR_DIALOG, first_name="Bench", telegram_chat_id=FLOOR_DIALOG
        )
        cur = await conn.execute(
            "SELECT (SELECT id FROM users WHERE telegram_user_id = %(id)s), "
            "(SELECT id FROM chats WHERE telegram_chat_id = %(id)s)",
            {"id": FLOOR_DIALOG},
        )
        dialog = await cur.fetchone()
        assert dialog is not None

    async def select_one(_: int) -> None:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1", prepare=True)

    async def insert_one(i: int) -> None:
        async with pool.connection() as conn:
            await conn.execute("INSERT INTO bench_floor (v) VALUES (%s)", (f"row {i}",), prepare=True)

    async def insert_message(i: int) -> None:
        async with pool.connection() as conn:
            await conn.execute(
                "INSERT INTO messages (user_id, chat_id, role, content) VALUES (%s, %s, 'user', %s)",
                (*dialog, f"question {i} from {FLOOR_DIALOG}"),
                prepare=True,
            )

    await timed(200, select_one)  # warm-up: connections, prepared statements
    await timed(200, insert_message)
    return {
        "select_1": summary(await timed(n, select_one)),
        "insert_commit": summary(await timed(n, insert_one)),
        "message_row_commit": summary(await timed(n, insert_message)),
    }


# The round trips of a turn, as one_turn times them (``steps``) and report_turn names them.
STEPS = ("question and its turn's start", "answer", "delivery record")


async def one_turn(
    pool: Pool, user: int, chat: int, message_id: int, holder: str | None = None, steps: list[float] | None = None
) -> None:
    """The database work of one text message, exactly as the turn pipeline does it: store the
    question and read the turn's start (one round trip), store the answer, record its delivery; with ``holder``, as
    one of several processes: the chat's lease taken with the question and handed on (here:
    released) after the turn. ``steps``: each round trip's milliseconds, in STEPS' order, are
    appended to it."""
    started = time.perf_counter()

    def step() -> None:
        nonlocal started
        if steps is not None:
            now = time.perf_counter()
            steps.append((now - started) * 1000)
            started = now

    question = await context.add_question(
        pool,
        telegram_user_id=user,
        first_name="Bench",
        telegram_chat_id=chat,
        telegram_message_id=message_id,
        telegram_thread_id=None,
        content=f"question {message_id} from {user}",
        rate_limit=1_000_000,  # counted, as with the default config, never hit
        holder=holder,
        lease_ttl_s=30,
        read=database.StartRead(HISTORY_LIMIT, CONTEXT_BUDGET),
    )
    assert question.start is not None
    step()
    answer = await context.add_answer(pool, question_id=question.id, content=f"answer to {message_id}")
    assert answer is not None
    step()
    if holder is None:
        await context.record_sent_part(pool, answer_id=answer, telegram_message_id=message_id, last=True)
        step()
        return
    assert question.leased
    await database.run(
        pool,
        leases.record_last_part,
        answer_id=answer,
        telegram_message_id=message_id,
        telegram_chat_id=chat,
        holder=holder,
        ttl_s=30,
    )
    step()


async def per_step(url: str, n: int, *, flushed: bool) -> dict[str, float]:
    """The p50 milliseconds of each of a turn's round trips (STEPS), of one committed INSERT and of
    one committed message row; with ``flushed`` False, on connections whose commits do not wait
    for the WAL flush (``synchronous_commit=off``), which leaves what a statement costs beyond
    its commit's flush."""
    setting = "on" if flushed else "off"
    pool = await database.init_db(f"{url}?options=-c%20synchronous_commit%3D{setting}", size=2)
    try:
        samples: list[float] = []
        await per_turn(pool, n, base=30_000 if flushed else 40_000, steps=samples)
        figures = {name: statistics.median(samples[k :: len(STEPS)]) for k, name in enumerate(STEPS)}
        floor = await floors(pool, n)
        figures["one committed INSERT"] = floor["insert_commit"]["p50_ms"]
        figures["one committed INSERT of a message row"] = floor["message_row_commit"]["p50_ms"]
        return figures
    finally:
        await database.close_db(pool)


async def per_turn(
    pool: Pool, n: int, holder: str | None = None, *, base: int | None = None, steps: list[float] | None = None
) -> dict[str, float]:
    """p50 and p99 of ``n`` turns (after 200 to warm up) over 100 dialogs numbered from ``base``
    (by default one range without the lease, another with it); ``steps`` as one_turn's."""
    users = 100
    if base is None:
        base = 10_000 if holder is None else 20_000
    await timed(200, lambda i: one_turn(pool, base + i % users, base + i % users, 1_000_000 + i, holder))
    return summary(await timed(n, lambda i: one_turn(pool, base + i % users, base + i % users, i, holder, steps)))


async def round_trips_per_turn(url: str, holder: str | None = None) -> dict[str, Any]:
    """The synchronous round trips of one turn, from libpq's trace of the pool's one connection:
    each time the client sends and then waits for the server (a statement, or statements sent
    together in a pipeline, count one; so would a check of a connection as the pool hands it
    out, an empty simple Query); ``statements_per_round_trip``: what each one carried."""
    pool = await database.init_db(url, size=1)
    dialog = 1 if holder is None else 2
    try:
        await one_turn(pool, dialog, dialog, 1, holder)  # register first: the measured turn is a returning user's
        with tempfile.TemporaryFile("w+") as trace:
            async with pool.connection() as conn:
                conn.pgconn.trace(trace.fileno())
                conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
            await one_turn(pool, dialog, dialog, 2, holder)
            conn.pgconn.untrace()  # directly: taking it from the pool again would be traced too
            trace.seek(0)
            sent = trace.read()
    finally:
        await database.close_db(pool)
    # A round trip: what the client sends before it next reads from the server (F lines, then B).
    batches: list[list[str]] = []
    previous = "B"
    for line in sent.splitlines():
        fields = line.split()  # direction, length, message, its contents
        if not fields or fields[0] not in ("F", "B"):
            continue
        if fields[0] == "F" and previous == "B":
            batches.append([])
        if fields[0] == "F" and fields[2:3] in (["Execute"], ["Query"]):
            batches[-1].append(fields[2])
        previous = fields[0]
    statements = sum(batch.count("Execute") for batch in batches)
    checks = sum(batch.count("Query") for batch in batches)
    expected = STATEMENTS_PER_TURN + (holder is not None)
    if statements != expected:
        raise RuntimeError(f"the trace shows {statements} statements in a turn, not {expected}")
    return {
        "total": len(batches),
        "statements": statements,
        "pool_checks": checks,
        "statements_per_round_trip": [len(batch) for batch in batches],
    }


# -- throughput through aiogram -------------------------------------------------------------


class InstantSession(BaseSession):
    """A Bot API session that answers every call at once, in process, counting what the bot
    sent each chat: answers, refusals (apologies) and notices (a summary written)."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: collections.Counter[int] = collections.Counter()
        self.kinds: collections.Counter[str] = collections.Counter()

    async def make_request(
        self,
        bot: Bot,
        method: TelegramMethod[TelegramType],
        timeout: int | None = None,  # noqa: ASYNC109
    ) -> TelegramType:
        if isinstance(method, SendMessage):
            kind = replies.kind(method.text)
            self.kinds[kind] += 1
            if kind == "answer":
                self.answers[int(method.chat_id)] += 1
            # model_construct: the stand-in's own cost (validation) stays out of the figures
            chat = Chat.model_construct(id=int(method.chat_id), type="private")
            message = Message.model_construct(message_id=1, date=datetime.now(UTC), chat=chat, text=method.text)
            return cast(TelegramType, message)
        if isinstance(method, GetMe):
            return cast(TelegramType, User(id=4242, is_bot=True, first_name="Bench", username="bench_bot"))
        return cast(TelegramType, True)

    async def stream_content(
        self,
        url: str,
        headers: dict[str, Any] | None = None,
        timeout: int = 30,  # noqa: ASYNC109
        chunk_size: int = 65536,
        raise_for_status: bool = True,
    ) -> AsyncGenerator[bytes, None]:
        raise NotImplementedError
        yield b""

    async def close(self) -> None:
        return None


class InstantLLM:
    """An LLM that answers at once, in one piece (a summary too); its model list is empty, as
    OpenAI's is (no context lengths published), so the configured budget holds. Every model is
    shown images, as with the default VISION_MODELS (the bench's questions have none)."""

    tools = True  # offered, as by default (LLM_TOOLS): the turn builds its tools, never called here

    def sees_images(self, model: str | None) -> bool:
        return True

    async def stream(self, history: list[records.ChatMessage], **settings: object) -> AsyncIterator[str]:
        yield f"answer after {len(history)} messages"

    async def context_lengths(self) -> dict[str, int]:
        return {}

    async def close(self) -> None:
        return None


def update(update_id: int, user: int, text: str) -> Update:
    return Update.model_validate(
        {
            "update_id": update_id,
            "message": {
                "message_id": update_id,
                "date": int(time.time()),
                "chat": {"id": user, "type": "private"},
                "from": {"id": user, "is_bot": False, "first_name": "Bench"},
                "text": text,
            },
        }
    )


async def throughput(pool: Pool, url: str, concurrency: int, turns: int, base_id: int) -> dict[str, Any]:
    # Hits are counted as in production, under a limit no bench user reaches.
    config = load_config(
        {
            "TELEGRAM_BOT_TOKEN": TOKEN,
            "OPENAI_API_KEY": "x",
            "DATABASE_URL": url,
            "RATE_LIMIT_PER_MINUTE": "100000",
            "SPOOL_PATH": str(SPOOL_PATH),
        }
    )
    session = InstantSession()
    bot = Bot(TOKEN, session=session)
    dp: Dispatcher = create_dispatcher(config, pool, cast(LLM, InstantLLM()), bot)
    per_worker = max(1, turns // concurrency)
    pool.pop_stats()  # reset the counters

    # Updates are built before the clock starts: parsing them is Telegram's side of the wire.
    batches = [
        [update(base_id * 10 + w * per_worker + i, base_id + w, f"turn {i}") for i in range(per_worker)]
        for w in range(concurrency)
    ]

    async def worker(updates: list[Update]) -> None:
        for item in updates:
            await dp.feed_update(bot, item)

    started = time.perf_counter()
    await asyncio.gather(*(worker(batch) for batch in batches))
    await dp["turns"].drain(600)  # the handlers only queue the turns
    elapsed = time.perf_counter() - started
    stats = pool.pop_stats()
    total = per_worker * concurrency
    chats = {base_id + w for w in range(concurrency)}
    unanswered = sum(max(0, per_worker - session.answers[chat]) for chat in chats)
    extra = sum(max(0, session.answers[chat] - per_worker) for chat in chats)
    timeouts = stats.get("requests_errors", 0)
    return {
        "concurrency": concurrency,
        "turns": total,
        "turns_per_s": total / elapsed,
        "apologies_or_errors": unanswered + session.kinds["refusal"] + timeouts,
        "unanswered": unanswered,
        "apologies": session.kinds["refusal"],
        "extra_answers": extra,
        # answers to chats of an earlier level: turns it left unsettled, recovered by this dispatcher
        "recovered": sum(n for chat, n in session.answers.items() if chat not in chats),
        "summaries": session.kinds["notice"],
        "pool_timeouts": timeouts,
    }


def pgbench_script() -> str:
    """The same turn for pgbench: our four statements verbatim, with pgbench variables for their
    parameters (one left undefined is sent as NULL), the question and its turn's start in one
    pipeline as the bot sends them. pgbench cannot feed one statement's id to the next, so the
    answer and its delivery find the chat's newest message (the question, then the answer) by an
    index lookup."""

    def pgbench_sql(statement: str) -> str:
        return re.sub(r"%\((\w+)\)s", r":\1", statement).strip() + ";"

    latest = """(SELECT max(id) FROM messages
            WHERE chat_id = (SELECT id FROM chats WHERE telegram_chat_id = :telegram_chat_id))"""
    return "\n".join(
        [
            "\\set telegram_user_id random(1, 100000)",
            "\\set telegram_chat_id :telegram_user_id",
            "\\set telegram_message_id random(1, 2000000000)",
            f"\\set limit {HISTORY_LIMIT}",
            f"\\set budget {CONTEXT_BUDGET}",
            f"\\set tokens {estimate_tokens('q')}",
            "\\set lease_ttl_s 30",
            "\\set rate_limit 1000000",
            "\\set token_budget 0",
            "\\startpipeline",
            pgbench_sql(
                database.ADD_QUESTION.replace("%(telegram_thread_id)s", "NULL")
                .replace("%(quoted)s", "NULL")
                .replace("%(created_at)s", "NULL")
                .replace("%(content)s", "'q'")
            ),
            pgbench_sql(database.FETCH_FRESH_TURN_START),
            "\\endpipeline",
            pgbench_sql(database.ADD_ANSWER.replace("%(question_id)s", latest).replace("%(content)s", "'a'")),
            pgbench_sql(
                database.RECORD_SENT_PART.replace("%(answer_id)s", latest)
                .replace("%(telegram_message_id)s", "1")
                .replace("%(last)s", "true")
            ),
            "",
        ]
    )


def pgbench(cluster: LocalPostgres, url: str, concurrency: int, seconds: int) -> float | None:
    """pgbench's TPS for the same SQL turn (a transaction = one turn), or None without pgbench."""
    binary = shutil.which("pgbench") or str(cluster.bin_dir / "pgbench")
    if not Path(binary).exists():
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
        script.write(pgbench_script())
    database_name = url.rsplit("/", 1)[1]
    # Each pgbench client is a backend with a SCRAM handshake (milliseconds of CPU each): give a
    # thousand clients time to connect before the measured part starts.
    seconds = seconds if concurrency < 500 else max(seconds, concurrency // 50)
    result = subprocess.run(
        [binary, "-n", "-M", "prepared", "-f", script.name, "-c", str(concurrency), "-j", str(min(concurrency, 2)),
         "-T", str(seconds), "-D", "first_name=Bench", "-D", "role=user", "-D", "content=pgbench question",
         "-h", "127.0.0.1", "-p", str(cluster.port), "-U", cluster.user, database_name],
        capture_output=True, text=True, env={**os.environ, "PGPASSWORD": cluster.password}, check=False,
    )  # fmt: skip
    os.unlink(script.name)
    match = re.search(r"tps = ([\d.]+)", result.stdout)
    if not match:
        raise RuntimeError(f"pgbench failed: {(result.stderr or result.stdout).strip()[-500:]}")
    return float(match.group(1))


# -- scaling --------------------------------------------------------------------------------


async def fill(pool: Pool, rows: int, dialogs: int = 10_000) -> None:
    """Top the messages table up to ``rows`` rows spread over ``dialogs`` (user, chat) pairs."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM messages")
        have = (await cur.fetchone() or (0,))[0]
        if have >= rows:
            return
        for table in ("users (telegram_user_id)", "chats (telegram_chat_id)"):
            await conn.execute(
                f"INSERT INTO {table} SELECT g FROM generate_series(1, %(n)s::bigint) g ON CONFLICT DO NOTHING",
                {"n": dialogs},
            )
        step = 500_000
        for start in range(have, rows, step):
            await conn.execute(
                """
                INSERT INTO messages (user_id, chat_id, role, content)
                SELECT u.id, c.id, CASE WHEN g %% 2 = 0 THEN 'user' ELSE 'assistant' END, 'filler message ' || g
                FROM generate_series(%(start)s::bigint, %(stop)s::bigint) g
                JOIN users u ON u.telegram_user_id = g %% %(n)s + 1
                JOIN chats c ON c.telegram_chat_id = g %% %(n)s + 1
                """,
                {"start": start, "stop": min(rows, start + step) - 1, "n": dialogs},
            )
        await conn.execute("VACUUM ANALYZE messages")


# The plain history read the context read is measured against: a dialog's last HISTORY_LIMIT
# live messages by Telegram ids, newest first (messages_turn_idx read backwards, no sort).
HISTORY_READ = """
    SELECT id, role, content, length, created_at, finish_reason
    FROM messages
    WHERE user_id = (SELECT id FROM users WHERE telegram_user_id = %(telegram_user_id)s::bigint)
      AND chat_id = (SELECT id FROM chats WHERE telegram_chat_id = %(telegram_chat_id)s::bigint)
      AND deleted_at IS NULL
    ORDER BY coalesce(reply_to_id, id) DESC, id DESC
    LIMIT %(limit)s::integer
"""


async def read_history(conn: Connection, *, telegram_user_id: int, telegram_chat_id: int) -> list[tuple[Any, ...]]:
    params = {"telegram_user_id": telegram_user_id, "telegram_chat_id": telegram_chat_id, "limit": HISTORY_LIMIT}
    cur = await conn.execute(HISTORY_READ, params, prepare=True)
    return await cur.fetchall()


async def history_latency(pool: Pool, n: int, dialogs: int = 10_000) -> dict[str, float]:
    async def read(i: int) -> None:
        user = (i * 7919) % dialogs + 1
        await database.run(pool, read_history, telegram_user_id=user, telegram_chat_id=user)

    await timed(200, read)
    return summary(await timed(n, read))


async def context_latency(pool: Pool, n: int, dialogs: int = 10_000) -> dict[str, float]:
    """The context read a turn makes (FETCH_NEXT_CONTEXT: the same dialog lookup as the history
    read, plus the summary probe and the running sum), for the same dialogs."""

    async def read(i: int) -> None:
        user = (i * 7919) % dialogs + 1
        await database.run(
            pool,
            database.fetch_next_context,
            telegram_user_id=user,
            telegram_chat_id=user,
            history_limit=HISTORY_LIMIT,
            budget=CONTEXT_BUDGET,
            shared=False,
        )

    await timed(200, read)
    return summary(await timed(n, read))


# -- the run --------------------------------------------------------------------------------


def alembic_config(url: str) -> AlembicConfig:
    """Alembic's configuration for the project, pointed at ``url``."""
    cfg = AlembicConfig(str(ROOT / "alembic.ini"))
    cfg.attributes["database_url"] = url
    return cfg


@asynccontextmanager
async def bench_database(cluster: LocalPostgres, name: str) -> AsyncIterator[tuple[Pool, str]]:
    url = cluster.create_database(name)
    command.upgrade(alembic_config(url), "head")
    pool = await database.init_db(url, size=10, timeout_s=10)
    try:
        yield pool, url
    finally:
        await database.close_db(pool)


SECTIONS = ("whole-bot", "turn", "throughput", "history", "instances")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sections = set(args.sections)
    cluster = throwaway(settings={"max_connections": "1100", "shared_buffers": "256MB"})
    try:
        results: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "postgresql": cluster.version,
                "durability": "fsync on, synchronous_commit on (defaults)",
                "load_average_at_start": os.getloadavg(),
            },
            "taken_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "sections": [name for name in SECTIONS if name in sections],
            "smoke": args.smoke,
        }
        if "whole-bot" in sections:
            url = cluster.create_database("bench_bot")
            command.upgrade(alembic_config(url), "head")
            results["aiogram_baseline"] = aiogram_baseline()
            whole = []
            for level, chats in enumerate(args.bot_chats):
                base = (level + 1) * 1_000_000
                turns = max(3, math.ceil(args.bot_turns / chats))
                chat_ids = list(range(base, base + chats))
                whole.append(await whole_bot(url, TOKEN, chat_ids, turns, args.llm_delay, spool_path=SPOOL_PATH))
            results["whole_bot"] = whole
        if sections & {"turn", "throughput"}:
            async with bench_database(cluster, "bench_turn") as (pool, url):
                if "turn" in sections:
                    await turn_cost(results, pool, url, args.samples)
                if "throughput" in sections:
                    results["throughput"] = []
                    for level, concurrency in enumerate(args.concurrency):
                        row = await throughput(
                            pool, url, concurrency, max(args.turns, 3 * concurrency), (level + 1) * 1_000_000
                        )
                        tps = pgbench(cluster, url, concurrency, args.pgbench_seconds)
                        row["pgbench_tps"] = tps
                        row["vs_pgbench"] = row["turns_per_s"] / tps if tps else None
                        results["throughput"].append(row)
        if "history" in sections:
            results["history_read"], results["context_read"] = {}, {}
            async with bench_database(cluster, "bench_scale") as (pool, _):
                for rows in args.rows:
                    await fill(pool, rows)
                    results["history_read"][str(rows)] = await history_latency(pool, args.samples)
                    results["context_read"][str(rows)] = await context_latency(pool, args.samples)
            first, last = (results["history_read"][str(r)]["p50_ms"] for r in (args.rows[0], args.rows[-1]))
            results["history_read"]["largest_vs_smallest"] = last / first
            context_last = results["context_read"][str(args.rows[-1])]["p50_ms"]
            results["context_read"]["vs_history_read_at_largest"] = context_last / last
        if "instances" in sections:
            results["instances"] = []
            for processes in args.instances:
                url = cluster.create_database(f"bench_instances_{processes}")
                command.upgrade(alembic_config(url), "head")
                chat_ids = list(range(1, args.instances_chats + 1))
                row = await instances(url, TOKEN, processes, chat_ids, args.instances_turns, args.instances_llm_delay)
                results["instances"].append(row)
            if results["instances"]:
                one = results["instances"][0]["turns_per_s"]
                for row in results["instances"]:
                    row["vs_one"] = row["turns_per_s"] / one if one else None
        return results
    finally:
        cluster.destroy()


async def turn_cost(results: dict[str, Any], pool: Pool, url: str, samples: int) -> None:
    """The floors, the database cost of one turn and its round trips, without and with the lease."""
    results["floors"] = await floors(pool, samples)
    results["per_turn"] = await per_turn(pool, samples)
    trips = await round_trips_per_turn(url)
    results["round_trips_per_turn"] = trips["total"]
    results["round_trips_detail"] = trips
    leased = await round_trips_per_turn(url, holder="bench")
    results["lease"] = {
        "round_trips_per_turn": leased["total"],
        "extra_statements_per_turn": leased["statements"] - trips["statements"],
        "per_turn": await per_turn(pool, samples, holder="bench"),
    }
    results["per_step"] = {"flushed": await per_step(url, samples, flushed=True)}
    results["per_step"]["not_flushed"] = await per_step(url, samples, flushed=False)
    unit, row = (results["floors"][name]["p50_ms"] for name in ("insert_commit", "message_row_commit"))
    floor = COMMITS_PER_TURN * unit
    results["per_turn"]["floor_ms"] = floor
    results["per_turn"]["p50_vs_floor"] = results["per_turn"]["p50_ms"] / floor
    # The least the turn's writes could cost on this schema: its message rows each a bare
    # INSERT of one, its other commits the floor's unit.
    rows_floor = MESSAGE_ROWS_PER_TURN * row + (COMMITS_PER_TURN - MESSAGE_ROWS_PER_TURN) * unit
    results["per_turn"]["rows_floor_ms"] = rows_floor
    results["per_turn"]["rows_floor_vs_floor"] = rows_floor / floor


def failures(results: dict[str, Any]) -> list[str]:
    """What must never happen: in the whole-bot run an apology, a lost or a duplicated answer, or
    a bot that did not exit cleanly; in the throughput table a turn that was not answered."""
    problems = [
        f"the whole bot at {row['chats']} chat(s): {row[key]} {key.replace('_', ' ')}"
        for row in results.get("whole_bot", [])
        for key in ("apologies", "lost_turns", "extra_answers", "exit_status")
        if row.get(key)
    ]
    problems += [
        f"throughput at {row['concurrency']} chat(s): {row[key]} {key.replace('_', ' ')}"
        for row in results.get("throughput", [])
        for key in ("unanswered", "apologies", "extra_answers", "pool_timeouts")
        if row.get(key)
    ]
    problems += [
        f"{row['processes']} webhook process(es): {row['answers']} answers of {row['turns']}, "
        f"{row['chats_in_order']} of {row['chats']} chats in order"
        for row in results.get("instances", [])
        if row["answers"] != row["turns"] or row["chats_in_order"] != row["chats"]
    ]
    return problems


def ms(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        f"machine: {machine['cpus']} CPUs, {machine['platform']}, PostgreSQL {machine['postgresql']} on loopback, "
        f"{machine['durability']}, load average at start {machine.get('load_average_at_start', [math.nan])[0]:.2f}",
    ]
    for part in (report_turn, report_throughput, report_history, report_whole_bot, report_lease, report_instances):
        lines += part(results)
    return "\n".join(lines)


def report_turn(results: dict[str, Any]) -> list[str]:
    if "floors" not in results:
        return []
    f, t = results["floors"], results["per_turn"]
    trips = results["round_trips_detail"]
    batches = ", ".join(map(str, trips["statements_per_round_trip"]))
    verdict = judged(t["p50_vs_floor"], DB_COST_GOAL, upper=True, smoke=results.get("smoke", False))
    return [
        "",
        "| measure | p50 ms | p99 ms |",
        "| --- | ---: | ---: |",
        f"| SELECT 1 | {f['select_1']['p50_ms']:.3f} | {f['select_1']['p99_ms']:.3f} |",
        f"| one committed INSERT | {f['insert_commit']['p50_ms']:.3f} | {f['insert_commit']['p99_ms']:.3f} |",
        f"| one committed INSERT of a message row | {f['message_row_commit']['p50_ms']:.3f} "
        f"| {f['message_row_commit']['p99_ms']:.3f} |",
        f"| per-turn floor ({COMMITS_PER_TURN} commits) | {t['floor_ms']:.3f} | |",
        f"| per-turn DB cost | {t['p50_ms']:.3f} | {t['p99_ms']:.3f} |",
        "",
        f"floor = {COMMITS_PER_TURN} x one committed INSERT: the question is stored before the LLM is called, "
        "the answer before it is sent (a crash never calls the LLM twice), the delivery once Telegram accepted it",
        f"per-turn DB cost / floor (p50): {t['p50_vs_floor']:.2f}x (goal <= {DB_COST_GOAL:g}x): {verdict}",
        f"the turn's writes at their least on this schema ({MESSAGE_ROWS_PER_TURN} message rows, each a bare "
        f"INSERT of one, and {COMMITS_PER_TURN - MESSAGE_ROWS_PER_TURN} committed one-row INSERT): "
        f"{t['rows_floor_ms']:.3f} ms, {t['rows_floor_vs_floor']:.2f}x the floor",
        f"synchronous round trips per turn: {results['round_trips_per_turn']}, carrying {trips['statements']} "
        f"statements (per round trip: {batches}) and {trips['pool_checks']} pool connection checks",
        *report_steps(results["per_step"]),
    ]


def report_steps(per_step: dict[str, dict[str, float]]) -> list[str]:
    """Each round trip of a turn beside the floor's committed INSERT: with the commit's WAL flush,
    without it (``synchronous_commit=off``), and the difference, the flush."""
    flushed, not_flushed = per_step["flushed"], per_step["not_flushed"]
    lines = [
        "",
        "| round trip | p50 ms | without the commit's flush | the flush |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, value in flushed.items():
        lines.append(f"| {name} | {value:.3f} | {not_flushed[name]:.3f} | {value - not_flushed[name]:.3f} |")
    unit = not_flushed["one committed INSERT"]
    beyond = sum(not_flushed[name] - unit for name in STEPS)
    lines.append(
        f"\nbeyond the floor (the flush and a one-row INSERT, per commit): {beyond:.3f} ms a turn of the "
        "statements' own work and the client's (synchronous_commit=off: the flushes taken out of both)"
    )
    return lines


def report_throughput(results: dict[str, Any]) -> list[str]:
    if "throughput" not in results:
        return []
    lines = [
        "",
        "| concurrent chats | turns | turns/s (aiogram) | pgbench TPS | ratio | summaries | errors | pool timeouts |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["throughput"]:
        tps = f"{row['pgbench_tps']:.0f}" if row["pgbench_tps"] else "n/a"
        ratio = f"{row['vs_pgbench']:.0%}" if row["vs_pgbench"] else "n/a"
        lines.append(
            f"| {row['concurrency']} | {row['turns']} | {row['turns_per_s']:.0f} | {tps} | {ratio} "
            f"| {row.get('summaries', 0)} | {row['apologies_or_errors']} | {row['pool_timeouts']} |"
        )
    return lines


def report_history(results: dict[str, Any]) -> list[str]:
    if "history_read" not in results:
        return []
    lines = [
        "",
        "| messages in table | history read p50 ms | p99 ms | context read p50 ms | p99 ms |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    contexts = results.get("context_read", {})
    for rows, value in results["history_read"].items():
        if isinstance(value, dict):
            read = contexts.get(rows, {})
            lines.append(
                f"| {int(rows):,} | {value['p50_ms']:.3f} | {value['p99_ms']:.3f} "
                f"| {read.get('p50_ms', math.nan):.3f} | {read.get('p99_ms', math.nan):.3f} |"
            )
    lines.append(
        f"\nhistory read, largest / smallest table (p50): {results['history_read']['largest_vs_smallest']:.2f}x"
    )
    if "vs_history_read_at_largest" in contexts:
        lines.append(
            f"context read (running sum, summary) / history read at the largest table (p50): "
            f"{contexts['vs_history_read_at_largest']:.2f}x (goal: at most 1.5x)"
        )
    return lines


MB_PER_MIB = 1.048576


def beyond_aiogram_mb(row: dict[str, Any], base: dict[str, Any]) -> float | None:
    """The bot's resident memory at its first getUpdates beyond ``import aiogram``'s peak, in MB."""
    if row["rss_at_start_mib"] is None:
        return None
    return float(row["rss_at_start_mib"] - base["peak_rss_mib"]) * MB_PER_MIB


Figure = Callable[[dict[str, Any], dict[str, Any]], float | None]  # (the level's row, aiogram's baseline)

# The goals of the whole bot (issue 24): what, at how many chats (0: the first level), the
# figure, its unit, the bound, whether the bound is an upper one.
WHOLE_BOT_GOALS: list[tuple[str, int, Figure, str, float, bool]] = [
    ("bot CPU per streamed turn", 1000, lambda row, _: row["cpu_ms_per_turn"], "ms", 4.0, True),
    ("streamed turns/s, one process", 1000, lambda row, _: row["turns_per_s"], "", 250.0, False),
    ("bot overhead p99", 100, lambda row, _: row["overhead"]["p99_ms"], "ms", 50.0, True),
    ("start to polling, beyond aiogram's import", 0, lambda row, base: row["startup_s"] - base["import_s"], "s", 1.0,
     True),
    ("resident memory at polling start, beyond aiogram's", 0, beyond_aiogram_mb, "MB", 40.0, True),
]  # fmt: skip


def judged(value: float, bound: float, upper: bool, smoke: bool) -> str:
    """Whether ``value`` meets ``bound`` (an upper bound, or a lower one); a smoke run is not judged."""
    if smoke:
        return "not judged (smoke run)"
    return "met" if (value <= bound if upper else value >= bound) else "NOT met"


def goals(results: dict[str, Any]) -> list[str]:
    """Each goal of the whole bot, its figure from this run, and whether it is met (n/a when the
    run had no level of that many chats). Start-up and memory are the first level's."""
    whole, base = results.get("whole_bot", []), results.get("aiogram_baseline")
    if not whole or base is None:
        return []
    lines = []
    for what, chats, figure, unit, bound, upper in WHOLE_BOT_GOALS:
        row = next((r for r in whole if r["chats"] == chats), None) if chats else whole[0]
        value = None if row is None else figure(row, base)
        where = f" at {chats} chats" if chats else ""
        unit = f" {unit}" if unit else ""
        sign = "<=" if upper else ">="
        if value is None:
            shown, verdict = "n/a", "n/a"
        else:
            shown = f"{value:.2f}{unit}"
            verdict = judged(value, bound, upper, results.get("smoke", False))
        lines.append(f"- {what}{where}: {shown} (goal {sign} {bound:g}{unit}): {verdict}")
    return lines


def report_whole_bot(results: dict[str, Any]) -> list[str]:
    whole = results.get("whole_bot", [])
    if not whole:
        return []
    base = results.get("aiogram_baseline", {})
    lines = [
        "",
        f"the whole bot over HTTP (`python bot.py`, default config; the LLM stand-in answers after "
        f"{whole[0]['llm_delay_s']:g} s, streamed):",
        "",
        "| concurrent chats | turns | turns/s | overhead p50 ms | overhead p99 ms | bot CPU ms/turn "
        "| Telegram calls/turn | start-up s | RSS at start MiB | peak RSS MiB | summaries | apologies | lost |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in whole:
        calls = sum(row["telegram_calls_per_turn"].values())
        lines.append(
            f"| {row['chats']} | {row['turns']} | {row['turns_per_s']:.1f} | {ms(row['overhead']['p50_ms'])} "
            f"| {ms(row['overhead']['p99_ms'])} | {ms(row['cpu_ms_per_turn'], 2)} | {calls:.2f} "
            f"| {row['startup_s']:.2f} | {ms(row['rss_at_start_mib'], 0)} | {ms(row['peak_rss_mib'], 0)} "
            f"| {row.get('summary_notices', 0)} | {row['apologies']} | {row['lost_turns']} |"
        )
    lines += [
        "",
        "overhead = (Telegram accepted the answer - getUpdates handed out the question) - the LLM's time on the "
        "chat meanwhile (its answer, and a summary the turn waited for).",
        "CPU, start-up (process start to its first getUpdates) and RSS are the bot process's own; the stand-ins "
        "run in this process, on the same CPUs.",
        f'`python -c "import aiogram"` alone: {base.get("import_s", math.nan):.2f} s, '
        f"{base.get('peak_rss_mib', math.nan):.0f} MiB peak RSS",
    ]
    for row in whole:
        called = ", ".join(f"{method} {n:.2f}" for method, n in row["telegram_calls_per_turn"].items())
        lines.append(f"{row['chats']} chat(s), Telegram calls per turn: {called}")
        if row.get("standins_cpu_ms_per_turn") is not None:
            lines.append(
                f"{row['chats']} chat(s): the stand-ins' CPU (this process) "
                f"{row['standins_cpu_ms_per_turn']:.2f} ms a turn"
            )
        if len(row["overhead_by_turn"]) <= 5:
            turns = ", ".join(
                f"turn {i + 1} {ms(s['p50_ms'])}/{ms(s['p99_ms'])}" for i, s in enumerate(row["overhead_by_turn"])
            )
            lines.append(f"{row['chats']} chat(s), overhead p50/p99 ms by turn: {turns}")
        if row.get("warnings_logged"):
            lines.append(f"{row['chats']} chat(s): {row['warnings_logged']} warnings logged, first: "
                         f"{row['first_warnings'][:2]}")  # fmt: skip
    first = whole[0]
    if first.get("startup_cpu_s") is not None and "import_cpu_s" in base:
        lines.append(
            f"start-up CPU: the bot {first['startup_cpu_s']:.2f} s, aiogram's import alone {base['import_cpu_s']:.2f} s"
        )
    lines += ["", "goals:", *goals(results)]
    return lines


def report_lease(results: dict[str, Any]) -> list[str]:
    lease = results.get("lease")
    if not lease:
        return []
    return [
        "",
        f"several processes: a turn with the chat lease costs {lease['round_trips_per_turn']} round trips "
        f"(without: {results['round_trips_per_turn']}); +{lease['extra_statements_per_turn']} statement, the "
        "hand-over, sent with the delivery record in one pipeline; the lease is taken inside ADD_QUESTION "
        "and a text message needs no update claim. Per-turn DB cost with the lease p50 "
        f"{lease['per_turn']['p50_ms']:.3f} ms, p99 {lease['per_turn']['p99_ms']:.3f} ms",
    ]


def report_instances(results: dict[str, Any]) -> list[str]:
    rows = results.get("instances", [])
    if not rows:
        return []
    lines = [
        "",
        f"webhook processes on one database ({rows[0]['chats']} chats, round-robin; the LLM stand-in answers "
        f"after {rows[0]['llm_delay_s']:g} s; {results['machine']['cpus']} CPUs for all of them, PostgreSQL "
        "and the stand-ins):",
        "",
        "| processes | turns | turns/s | vs 1 process | chats in order | LLM requests |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        ratio = f"{row['vs_one']:.2f}x" if row.get("vs_one") else "n/a"
        lines.append(
            f"| {row['processes']} | {row['turns']} | {row['turns_per_s']:.1f} | {ratio} "
            f"| {row['chats_in_order']}/{row['chats']} | {row['llm_requests']} |"
        )
    return lines


# A few seconds per section. One chat's 12 turns crowd the default history (HISTORY_LIMIT=20),
# so summaries and their notices are in the accounting too.
SMOKE: dict[str, Any] = {
    "samples": 50,
    "turns": 60,
    "concurrency": [1, 10],
    "pgbench_seconds": 1,
    "bot_chats": [1, 20],
    "bot_turns": 12,
    "llm_delay": 0.05,
    "instances": [1, 2],
    "instances_chats": 10,
    "instances_turns": 3,
    "instances_llm_delay": 0.05,
    "rows": [2_000, 10_000],
}


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark the per-turn database cost.")
    parser.add_argument("--samples", type=int, default=2000, help="sequential samples per latency measure")
    parser.add_argument("--turns", type=int, default=2000, help="turns per throughput level (at least 3 per chat)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--pgbench-seconds", type=int, default=5)
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="what to run (default: all): the whole bot, the turn's database cost, throughput through aiogram, "
        "history reads, webhook processes",
    )
    parser.add_argument("--bot-chats", type=int, nargs="+", default=[1, 100, 1000], help="concurrent chats, whole bot")
    parser.add_argument(
        "--bot-turns", type=int, default=20, help="whole bot: turns per level, at least 3 per chat (default 20)"
    )
    parser.add_argument("--llm-delay", type=float, default=1.0, help="whole bot: the LLM stand-in's seconds per answer")
    parser.add_argument("--instances", type=int, nargs="*", default=[1, 2, 3], help="webhook processes per run")
    parser.add_argument("--instances-chats", type=int, default=1000, help="webhook processes: concurrent chats")
    parser.add_argument("--instances-turns", type=int, default=5, help="webhook processes: messages per chat")
    parser.add_argument(
        "--instances-llm-delay", type=float, default=0.2, help="webhook processes: the LLM stand-in's seconds"
    )
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[10_000, 1_000_000],
        help="table sizes for the history read (add 10000000 for the long run)",
    )
    args = parse(parser, SMOKE)
    results = asyncio.run(run(args))
    print(report(results))
    write_results(results, "bench", args.smoke)
    problems = failures(results)  # what went wrong, not how fast: a smoke run fails on it too
    if problems:
        raise SystemExit("FAILED: " + "; ".join(problems))


if __name__ == "__main__":
    main()

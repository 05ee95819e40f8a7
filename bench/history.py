"""Benchmark of the history the user controls (part of ``make bench``; alone: ``python -m bench.history``).

Starts its own throwaway PostgreSQL, migrates it and seeds realistic dialogs: ``--per-dialog``
messages each (questions and their answers, in turn order, interleaved with the other dialogs'
as time passes), 60 % of the dialogs in Russian (with some English words) and 40 % in English,
words drawn from a vocabulary with a Zipf distribution (the word of rank r has weight 1/r), so
stop words and a few content words are common and most words rare. Each user has a private chat
and a group chat (groups of five users); a quarter of the dialogs had an early /clear. The table
grows to each of ``--rows``, keeping the dialogs the same size, so the figures compare the table's
size and nothing else. Then it measures:

- ``/search`` latency, p50/p99, through ``database.search_messages`` (the bot's SQL, prepared, on
  the bot's pool) for each kind of query, over many dialogs; goal: p50 <= 20 ms at 1,000,000
  messages and within 3x of the 10,000-message figure;
- ``/export`` of one dialog of ``--export-messages`` messages through ``context.dialog_messages`` and
  ``export_dialog`` (a server-side cursor feeding the file writer), Markdown and JSON: messages
  per second, and the peak of Python's allocations (tracemalloc, in a second run: it slows
  Python down) next to the same for a 1,000-message dialog, to show it does not grow;
- ``EXPLAIN (ANALYZE, BUFFERS)`` of the history statements at the largest size for one typical
  dialog, with the plan chosen for the values and the generic plan of a prepared statement
  (writes are rolled back);
- with ``--migration``: ``alembic upgrade 007`` on a table of the largest size at revision 006,
  each statement's time (from the server log) and the longest stall of a reader and a writer
  working on ``messages`` meanwhile.

Prints tables and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from itertools import accumulate
from pathlib import Path
from typing import Any

from alembic import command
from psycopg import sql
from psycopg.rows import scalar_row

from bench.__main__ import alembic_config, parse, percentile, write_results
from handlers.history import HEADLINE_OPTIONS, SEARCH_LIMIT
from services import context, database
from services.database import ExportedMessage, Pool
from services.llm.recall import RECALLED, RECALLED_CHARS
from services.ops.local_postgres import LocalPostgres, throwaway
from services.text.export import Format, export_dialog

ROOT = Path(__file__).resolve().parent.parent
SEED_BATCH = 50_000
GOAL_P50_MS = 20.0
GOAL_RATIO = 3.0

# -- the vocabulary ---------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return text.split()


# Real words first, roughly in the order of their frequency in chat (stop words on top: the
# configuration drops them, as it would in real text), then made-up words for the long tail.
# The queries below name words at known ranks: a common one, a rare one, word forms.
RUSSIAN = words("""
и в не на я что с это как а по но он ты мы так же для вы у время можно если есть когда очень
сейчас нужно работа день вопрос кофе человек год дом просто кошка деньги спасибо проблема утром
помощь код ответ сегодня завтра вечером друг город книга кошку письмо музыка погода машина
компьютер телефон программа сервер ошибка задача проект файл данные запрос решение пример
система функция модель текст язык перевод список таблица машинное_обучение база собака вода
молоко хлеб рынок магазин поезд билет отпуск море гора лес река погулять читать писать говорить
думать знать хотеть делать понимать спрашивать отвечать кошкой собаку кошек котёнок работать
учиться отдыхать готовить купить продать найти искать смотреть слушать играть
""")
ENGLISH = words("""
the a to of and i is you it in that for what how can do this on with be are my not time run
please work help code thanks answer question day running file data people today model error
server problem make need like know write read think cat coffee morning book music weather car
computer phone program task project request solution example system function text language
translation list table machine_learning database dog water milk bread market shop train
ticket holiday sea mountain forest river walk talk runs cats learn cook buy sell find search
watch listen play translate explain summarise compare install deploy debug test release
""")
RARE_RANK = 3000  # about one message in a thousand holds it: one hit per dialog of 1,000
RARE = {"ru": "синхрофазотрон", "en": "synchrophasotron"}
VOCABULARY_SIZE = 10_000

# (kind, query): each kind of what users type, all through websearch_to_tsquery.
RECALL = "recall: any of 3 words"
QUERIES = [
    ("common word", "время"),
    ("rare word", RARE["ru"]),
    ("two words", "кофе утром"),
    ("quoted phrase", '"машинное обучение"'),
    ("word form (ru)", "кошки"),  # stored: кошка, кошку, кошкой
    ("word form (en)", "running"),  # stored: run, runs, running
    # recall (RECALL, the search_history tool): the live messages matching any word, the whole dialog
    # before the window (here: all of it), at most 3, each cut: services.database.recall_earlier
    (RECALL, "кофе or утром or время"),
]


def made_up_words(letters: tuple[str, str], count: int, rng: random.Random, taken: set[str]) -> list[str]:
    consonants, vowels = letters
    words: list[str] = []
    while len(words) < count:
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 4)))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def vocabulary(real: list[str], rare: str, letters: tuple[str, str], rng: random.Random) -> list[str]:
    """``VOCABULARY_SIZE`` words by rank: the real ones, made-up ones, ``rare`` at ``RARE_RANK``.
    An underscore joins the words of a phrase; it is turned into a space when used."""
    taken = set(real) | {rare}
    words = real + made_up_words(letters, VOCABULARY_SIZE - len(real) - 1, rng, taken)
    words.insert(RARE_RANK - 1, rare)
    return words


class Texts:
    """Messages in one language (with 30 % of Russian messages holding a few English words)."""

    def __init__(self, seed: int = 12) -> None:
        rng = random.Random(seed)
        self.rng = rng
        self.words = {
            "ru": vocabulary(RUSSIAN, RARE["ru"], ("бвгдзклмнпрстфхчш", "аеиоуыя"), rng),
            "en": vocabulary(ENGLISH, RARE["en"], ("bcdfghklmnprstvz", "aeiou"), rng),
        }
        zipf = list(accumulate(1 / rank for rank in range(1, VOCABULARY_SIZE + 1)))
        self.weights = zipf

    def message(self, language: str, question: bool) -> str:
        count = self.rng.randint(3, 22) if question else self.rng.randint(10, 70)
        words = self.rng.choices(self.words[language], cum_weights=self.weights, k=count)
        if language == "ru" and self.rng.random() < 0.3:
            words += self.rng.choices(self.words["en"], cum_weights=self.weights, k=self.rng.randint(1, 3))
        text = " ".join(words).replace("_", " ")
        return text[0].upper() + text[1:] + ("?" if question else ".")


# -- the dialogs ------------------------------------------------------------------------------
# Dialog d: user 1,000,000 + d // 2; even d is that user's private chat, odd d a group chat
# shared by five users. A dialog is Russian when d % 5 < 3; it had an early /clear when d % 4 == 0.


def telegram_user(dialog: int) -> int:
    return 1_000_000 + dialog // 2


def telegram_chat(dialog: int) -> int:
    return 1_000_000 + dialog // 2 if dialog % 2 == 0 else -(1_000_000 + dialog // 10)


def language(dialog: int) -> str:
    return "ru" if dialog % 5 < 3 else "en"


async def add_dialogs(conn: database.Connection, first: int, stop: int) -> None:
    await conn.execute("""
        CREATE TABLE IF NOT EXISTS bench_dialogs (
            dialog integer PRIMARY KEY, user_id bigint NOT NULL, chat_id bigint NOT NULL)
    """)
    dialogs = list(range(first, stop))
    users = [telegram_user(d) for d in dialogs]
    chats = [telegram_chat(d) for d in dialogs]
    await conn.execute(
        "INSERT INTO users (telegram_user_id, first_name) SELECT DISTINCT u, 'Bench' FROM unnest(%s::bigint[]) u"
        " ON CONFLICT DO NOTHING",
        (users,),
    )
    await conn.execute(
        "INSERT INTO chats (telegram_chat_id) SELECT DISTINCT c FROM unnest(%s::bigint[]) c ON CONFLICT DO NOTHING",
        (chats,),
    )
    await conn.execute(
        """
        INSERT INTO bench_dialogs (dialog, user_id, chat_id)
        SELECT d.dialog, u.id, c.id
        FROM unnest(%s::integer[], %s::bigint[], %s::bigint[]) AS d (dialog, telegram_user_id, telegram_chat_id)
        JOIN users u USING (telegram_user_id)
        JOIN chats c USING (telegram_chat_id)
        ON CONFLICT DO NOTHING
        """,
        (dialogs, users, chats),
    )


async def seed(
    conn: database.Connection, texts: Texts, *, first: int, stop: int, per_dialog: int, revision_007: bool = True
) -> None:
    """Add ``per_dialog`` messages to each dialog in [first, stop): message g of the batch is
    turn g // 2 // n of dialog first + g // 2 % n, a question when g is even, else its answer;
    a year of turns, the dialogs' rows interleaved in id order as they would be in time. Ids
    are given (so an answer names its question) and the identity moves past them."""
    await add_dialogs(conn, first, stop)
    n, turns = stop - first, per_dialog // 2
    cur = await conn.execute("SELECT coalesce(max(id), 0) FROM messages")
    base = (await cur.fetchone() or (0,))[0]
    extra = ", deleted_reason, prompt_tokens, completion_tokens" if revision_007 else ""
    extra_values = (
        """, CASE WHEN cleared THEN 'clear' END,
           CASE WHEN question THEN NULL ELSE 200 + g %% 3000 END,
           CASE WHEN question THEN NULL ELSE 50 + g %% 700 END"""
        if revision_007
        else ""
    )
    statement = f"""
        INSERT INTO messages (id, user_id, chat_id, role, content, created_at, telegram_message_id, reply_to_id,
                              delivered_at, deleted_at{extra})
        OVERRIDING SYSTEM VALUE
        SELECT %(base)s::bigint + g + 1, b.user_id, b.chat_id, CASE WHEN question THEN 'user' ELSE 'assistant' END,
               content, at, CASE WHEN question THEN %(base)s::bigint + g + 1 END,
               CASE WHEN question THEN NULL ELSE %(base)s::bigint + g END,
               CASE WHEN question THEN NULL ELSE at END,
               CASE WHEN cleared THEN now() - interval '290 days' END{extra_values}
        FROM (
            SELECT x.content, s.g, s.g %% 2 = 0 AS question, %(first)s::integer + s.g / 2 %% %(n)s::integer AS dialog,
                   now() - interval '365 days' + (s.g / 2 / %(n)s::integer) * (interval '365 days' / %(turns)s::integer)
                       + (s.g %% 2) * interval '7 seconds' AS at,
                   (%(first)s::integer + s.g / 2 %% %(n)s::integer) %% 4 = 0
                       AND s.g / 2 / %(n)s::integer < %(turns)s::integer / 5 AS cleared
            FROM unnest(%(contents)s::text[]) WITH ORDINALITY AS x (content, k)
            CROSS JOIN LATERAL (SELECT %(start)s::integer + x.k::integer - 1 AS g) s
        ) m
        JOIN bench_dialogs b USING (dialog)
    """  # the column lists are constants; every value is bound
    total = n * per_dialog
    for start in range(0, total, SEED_BATCH):
        contents = [
            texts.message(language(first + g // 2 % n), g % 2 == 0)
            for g in range(start, min(total, start + SEED_BATCH))
        ]
        await conn.execute(
            statement, {"base": base, "first": first, "n": n, "turns": turns, "start": start, "contents": contents}
        )
    await conn.execute("SELECT setval(pg_get_serial_sequence('messages', 'id'), (SELECT max(id) FROM messages))")
    await conn.execute("VACUUM ANALYZE messages")


# -- /search ----------------------------------------------------------------------------------


async def search_latency(
    pool: Pool, dialogs: list[int], query: str, samples: int, *, recall: bool = False
) -> dict[str, float]:
    hits: list[int] = []

    async def once(i: int) -> float:
        dialog = dialogs[(i * 7919) % len(dialogs)]
        started = time.perf_counter()
        async with pool.connection() as conn:
            found: Sequence[object]
            if recall:
                found = await database.recall_earlier(
                    conn,
                    telegram_user_id=telegram_user(dialog),
                    telegram_chat_id=telegram_chat(dialog),
                    query=query,
                    before_turn=2**62,
                    limit=RECALLED,
                    chars=RECALLED_CHARS,
                )
            else:
                found = await database.search_messages(
                    conn,
                    telegram_user_id=telegram_user(dialog),
                    telegram_chat_id=telegram_chat(dialog),
                    query=query,
                    everything=False,
                    limit=SEARCH_LIMIT,
                    options=HEADLINE_OPTIONS,
                )
        hits.append(len(found))
        return (time.perf_counter() - started) * 1000

    for i in range(min(50, samples)):  # warm-up: connections, prepared statements, cache
        await once(samples + i)
    hits.clear()
    latencies = [await once(i) for i in range(samples)]
    return {
        "p50_ms": statistics.median(latencies),
        "p99_ms": percentile(latencies, 0.99),
        "mean_hits": statistics.mean(hits),
        "no_hits": sum(1 for h in hits if h == 0) / len(hits),
    }


async def search_table(pool: Pool, dialogs: list[int], samples: int) -> dict[str, dict[str, float]]:
    return {kind: await search_latency(pool, dialogs, query, samples, recall=kind == RECALL) for kind, query in QUERIES}


# -- /export ----------------------------------------------------------------------------------


async def export_once(pool: Pool, dialog: int, fmt: Format, directory: Path) -> tuple[int, int, int]:
    """Export the dialog as /export does; (messages, bytes, files)."""
    counted = 0

    async def read(write: Callable[[ExportedMessage], Awaitable[None]]) -> None:
        async def counting(message: ExportedMessage) -> None:
            nonlocal counted
            counted += 1
            await write(message)

        await context.dialog_messages(
            pool, telegram_user_id=telegram_user(dialog), telegram_chat_id=telegram_chat(dialog), write=counting
        )

    paths = await export_dialog(read, directory, chat_id=telegram_chat(dialog), fmt=fmt, now=datetime.now(UTC))
    size = sum(p.stat().st_size for p in paths)
    for path in paths:
        path.unlink()
    return counted, size, len(paths)


async def export_figures(pool: Pool, dialog: int, small_dialog: int) -> dict[str, dict[str, float]]:
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="llmbot-bench-export-") as folder:
        directory = Path(folder)
        for fmt in ("markdown", "json"):
            await export_once(pool, dialog, fmt, directory)  # warm: the dialog's pages in cache
            started = time.perf_counter()
            messages, size, files = await export_once(pool, dialog, fmt, directory)
            elapsed = time.perf_counter() - started
            peaks = []
            for which in (small_dialog, dialog):
                tracemalloc.start()
                try:
                    await export_once(pool, which, fmt, directory)
                    peaks.append(tracemalloc.get_traced_memory()[1])
                finally:
                    tracemalloc.stop()
            figures[fmt] = {
                "messages": messages,
                "seconds": elapsed,
                "messages_per_s": messages / elapsed,
                "mib_written": size / 2**20,
                "files": files,
                "peak_python_kib_small_dialog": peaks[0] / 1024,
                "peak_python_kib": peaks[1] / 1024,
            }
    return figures


# -- EXPLAIN ----------------------------------------------------------------------------------


def positional(statement: str) -> tuple[str, list[str]]:
    """The statement with $n for psycopg's %(name)s, and the names in order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    return re.sub(r"%\((\w+)\)s", number, statement).replace("%%", "%"), names


async def explain(url: str, dialog: int, only: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """EXPLAIN (ANALYZE, BUFFERS) of each statement (or those named in ``only``) for ``dialog``:
    for its values (``custom``) and as the generic plan a prepared statement may switch to
    (``generic``). Writes are rolled back."""
    user, chat = telegram_user(dialog), telegram_chat(dialog)
    async with await database.connect(url) as conn:
        cur = conn.cursor(row_factory=scalar_row)
        await cur.execute(
            """
            SELECT telegram_message_id FROM messages
            WHERE user_id = (SELECT user_id FROM bench_dialogs WHERE dialog = %s)
              AND chat_id = (SELECT chat_id FROM bench_dialogs WHERE dialog = %s) AND role = 'user'
            ORDER BY id DESC LIMIT 1
            """,
            (dialog, dialog),
        )
        last_question = await cur.fetchone()
        dialog_params: dict[str, object] = {"telegram_user_id": user, "telegram_chat_id": chat}
        # The writes admit the user as the bot does: counted against a rate limit never hit, no token budget.
        admission: dict[str, object] = {**dialog_params, "rate_limit": 1_000_000, "token_budget": 0}
        statements: dict[str, tuple[str, dict[str, object]]] = {
            "SEARCH_MESSAGES (common word)": (
                database.SEARCH_MESSAGES,
                {**dialog_params, "query": "время", "everything": False, "limit": 10, "options": HEADLINE_OPTIONS},
            ),
            "SEARCH_MESSAGES (rare word)": (
                database.SEARCH_MESSAGES,
                {**dialog_params, "query": RARE["ru"], "everything": False, "limit": 10, "options": HEADLINE_OPTIONS},
            ),
            "FETCH_STATS": (database.FETCH_STATS, dialog_params),
            "UNDO_LAST_TURN": (database.UNDO_LAST_TURN, admission),
            "RETRY_LAST_TURN": (database.RETRY_LAST_TURN, admission),
            "EDIT_QUESTION": (
                database.EDIT_QUESTION,
                {**admission, "telegram_message_id": last_question, "content": "кошки пьют молоко", "tokens": 6},
            ),
            "DIALOG_MESSAGES": (database.DIALOG_MESSAGES, dialog_params),
        }
        plans: dict[str, dict[str, Any]] = {}
        for number, (name, (statement, params)) in enumerate(statements.items()):
            if only and name not in only:
                continue
            text, names = positional(statement)
            values = sql.SQL(", ").join(sql.Literal(params[n]) for n in names)
            plans[name] = {}
            for mode in ("custom", "generic"):
                await conn.execute(f"SET plan_cache_mode = force_{mode}_plan")
                async with conn.transaction(force_rollback=True):
                    await conn.execute(sql.SQL("PREPARE bench_{} AS ").format(sql.SQL(str(number))) + sql.SQL(text))
                    lines = await conn.execute(
                        sql.SQL("EXPLAIN (ANALYZE, BUFFERS) EXECUTE bench_{}({})").format(sql.SQL(str(number)), values)
                    )
                    plan = "\n".join(row[0] for row in await lines.fetchall())
                    await conn.execute(sql.SQL("DEALLOCATE bench_{}").format(sql.SQL(str(number))))
                plans[name][mode] = summarise(plan)
            await conn.execute("RESET plan_cache_mode")
    return plans


def summarise(plan: str) -> dict[str, Any]:
    execution = re.search(r"Execution Time: ([\d.]+) ms", plan)
    return {
        "execution_ms": float(execution.group(1)) if execution else None,
        "indexes": sorted(set(re.findall(r" using (\w+)", plan)) | set(re.findall(r"Index Scan on (\w+)", plan))),
        "seq_scan_on_messages": bool(re.search(r"Seq Scan on messages", plan)),
        "plan": plan,
    }


# -- migration 007 at size ------------------------------------------------------------------------


def log_entries(text: str) -> list[str]:
    """The server log's entries, each with its continuation lines."""
    entries: list[str] = []
    for line in text.splitlines():
        if re.match(r"\d{4}-\d\d-\d\d \d", line) or not entries:
            entries.append(line)
        else:
            entries[-1] += "\n" + line
    return entries


def statement_times(log: str) -> list[tuple[str, float]]:
    """(statement, ms) for each statement the server logged with its duration."""
    timed = []
    for entry in log_entries(log):
        match = re.search(r"duration: ([\d.]+) ms\s+(?:statement|execute [^:]*): (.*)", entry, flags=re.DOTALL)
        if match:
            timed.append((" ".join(match.group(2).split()), float(match.group(1))))
    return timed


def step_name(statement: str) -> str | None:
    for pattern, name in (
        (r"^CREATE EXTENSION", "CREATE EXTENSION btree_gin"),
        (r"^ALTER TABLE messages ADD COLUMN", "ALTER TABLE ADD COLUMN x5, ADD CONSTRAINT NOT VALID x2"),
        (r"^CREATE TRIGGER", "CREATE TRIGGER messages_search_vector_update"),
        (r"^ALTER TABLE messages VALIDATE CONSTRAINT (\w+)", "VALIDATE CONSTRAINT {}"),
        (r"^UPDATE messages SET search_vector", "backfill batches (UPDATE ... search_vector)"),
        (r"^CREATE (?:UNIQUE )?INDEX CONCURRENTLY IF NOT EXISTS (\w+)", "CREATE INDEX CONCURRENTLY {}"),
        (r"^ALTER TABLE messages DROP CONSTRAINT (\w+)", "DROP CONSTRAINT {}"),
    ):
        match = re.match(pattern, statement)
        if match:
            return name.format(*match.groups())
    return None


PROBE_READ = """
    SELECT id, content FROM messages WHERE user_id = %s AND chat_id = %s AND deleted_at IS NULL
    ORDER BY coalesce(reply_to_id, id) DESC, id DESC LIMIT 20
"""
PROBE_WRITE = "INSERT INTO messages (user_id, chat_id, role, content) VALUES (%s, %s, 'user', 'кошки и миграция')"


async def probe(url: str, dialog: int, stop: asyncio.Event) -> dict[str, float]:
    """A reader (the history read) and a writer (one INSERT) on messages every 50 ms until
    ``stop``: the longest each waited, and how many waits passed 100 ms."""
    worst = {"read": 0.0, "write": 0.0}
    slow = 0
    ops = 0
    async with await database.connect(url) as conn:
        ids = await (
            await conn.execute("SELECT user_id, chat_id FROM bench_dialogs WHERE dialog = %s", (dialog,))
        ).fetchone()
        assert ids is not None
        while not stop.is_set():
            for kind, statement in (("read", PROBE_READ), ("write", PROBE_WRITE)):
                started = time.perf_counter()
                await conn.execute(statement, ids)
                waited = (time.perf_counter() - started) * 1000
                worst[kind] = max(worst[kind], waited)
                slow += waited > 100
                ops += 1
            await asyncio.sleep(0.05)
    return {"worst_read_ms": worst["read"], "worst_write_ms": worst["write"], "over_100ms": slow, "statements": ops}


async def migration_at_size(cluster: LocalPostgres, texts: Texts, rows: int, per_dialog: int) -> dict[str, Any]:
    url = cluster.create_database("bench_migration")
    command.upgrade(alembic_config(url), "006")
    async with await database.connect(url) as conn:
        started = time.perf_counter()
        await seed(conn, texts, first=0, stop=rows // per_dialog, per_dialog=per_dialog, revision_007=False)
        seeded_s = time.perf_counter() - started
        await conn.execute("CHECKPOINT")
        await conn.execute("ALTER DATABASE bench_migration SET log_min_duration_statement = 0")
        size = await (
            await conn.execute(
                "SELECT pg_size_pretty(pg_table_size('messages')), pg_size_pretty(pg_indexes_size('messages'))"
            )
        ).fetchone()
    offset = cluster.log_file.stat().st_size
    stop = asyncio.Event()
    prober = asyncio.create_task(probe(url, 0, stop))
    await asyncio.sleep(0.5)
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "alembic"), "upgrade", "007",
        cwd=ROOT, env={**os.environ, "DATABASE_URL": url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await process.communicate()
    total_s = time.perf_counter() - started
    stop.set()
    stalls = await prober
    if process.returncode != 0:
        raise RuntimeError(f"alembic upgrade 007 failed: {output.decode(errors='replace')[-800:]}")
    with cluster.log_file.open(errors="replace") as log:
        log.seek(offset)
        timed = statement_times(log.read())
    steps: dict[str, dict[str, float]] = {}
    for statement, ms in timed:
        name = step_name(statement)
        if name:
            step = steps.setdefault(name, {"count": 0, "total_s": 0.0, "max_ms": 0.0})
            step["count"] += 1
            step["total_s"] += ms / 1000
            step["max_ms"] = max(step["max_ms"], ms)
    async with await database.connect(url) as conn:
        missing = await (await conn.execute("SELECT count(*) FROM messages WHERE search_vector IS NULL")).fetchone()
        await conn.execute("ALTER DATABASE bench_migration RESET log_min_duration_statement")
    cluster.drop_database("bench_migration")
    return {
        "rows": rows,
        "seed_s": seeded_s,
        "table_size": size[0] if size else None,
        "indexes_size": size[1] if size else None,
        "upgrade_s": total_s,
        "steps": steps,
        "probe": stalls,
        "rows_left_without_vector": missing[0] if missing else None,
    }


# -- the run ----------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cluster = throwaway(settings={"shared_buffers": "256MB"})
    texts = Texts()
    try:
        url = cluster.create_database("bench_history")
        command.upgrade(alembic_config(url), "head")
        results: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "postgresql": cluster.version,
                "load_average_at_start": os.getloadavg(),
            },
            "taken_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "per_dialog": args.per_dialog,
            "queries": dict(QUERIES),
            "search": {},
            "seed_s": {},
        }
        pool = await database.init_db(url, size=4, timeout_s=10)
        try:
            dialogs = 0
            for rows in sorted(args.rows):
                wanted = rows // args.per_dialog
                started = time.perf_counter()
                async with pool.connection() as conn:
                    await seed(conn, texts, first=dialogs, stop=wanted, per_dialog=args.per_dialog)
                results["seed_s"][str(rows)] = time.perf_counter() - started
                dialogs = wanted
                print(f"seeded {rows:,} messages over {dialogs:,} dialogs", file=sys.stderr)
                results["search"][str(rows)] = await search_table(pool, list(range(dialogs)), args.samples)
            # One long dialog, for /export (and /search in it): a user of the first private chat's
            # size times a hundred, in a dialog of its own.
            big = dialogs + (dialogs % 2)  # even: a private chat
            async with pool.connection() as conn:
                await seed(conn, texts, first=big, stop=big + 1, per_dialog=args.export_messages)
            results["search_long_dialog"] = {
                kind: await search_latency(pool, [big], query, max(20, args.samples // 10), recall=kind == RECALL)
                for kind, query in QUERIES
            }
            results["export"] = await export_figures(pool, big, small_dialog=0)
        finally:
            await database.close_db(pool)
        results["explain"] = await explain(url, dialog=min(dialogs - 1, 500) // 4 * 4)
        results["explain_long_dialog"] = await explain(
            url, dialog=big, only=("SEARCH_MESSAGES (common word)", "SEARCH_MESSAGES (rare word)", "DIALOG_MESSAGES")
        )
        results["table_rows"] = max(args.rows) + args.export_messages
        cluster.drop_database("bench_history")
        if args.migration:
            results["migration"] = await migration_at_size(cluster, texts, max(args.rows), args.per_dialog)
        return results
    finally:
        cluster.destroy()


def goals(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each query's p50 at the largest table and its ratio to the smallest's; ``met`` is /search's
    goal, None for the recall, which has none of its own (its figures are shown beside /search's)."""
    sizes = sorted(int(r) for r in results["search"])
    small, large = results["search"][str(sizes[0])], results["search"][str(sizes[-1])]
    return {
        kind: {
            "p50_ms": large[kind]["p50_ms"],
            "ratio": large[kind]["p50_ms"] / small[kind]["p50_ms"],
            "met": None
            if kind == RECALL
            else large[kind]["p50_ms"] <= GOAL_P50_MS and large[kind]["p50_ms"] / small[kind]["p50_ms"] <= GOAL_RATIO,
        }
        for kind in large
    }


def report(results: dict[str, Any], full_plans: bool) -> str:
    machine = results["machine"]
    sizes = sorted(int(r) for r in results["search"])
    lines = [
        f"machine: {machine['cpus']} CPUs, {machine['platform']}, PostgreSQL {machine['postgresql']} on loopback, "
        f"load average at start {machine['load_average_at_start'][0]:.2f}",
        f"dialogs of {results['per_dialog']:,} messages; seeding took "
        + ", ".join(f"{s:.0f} s to {int(r):,}" for r, s in results["seed_s"].items()),
        "",
        "/search, p50 / p99 ms (mean hits shown, of at most 10):",
        "",
        "| query | " + " | ".join(f"{size:,} messages" for size in sizes) + " | largest / smallest p50 | goal met |",
        "| --- | " + " | ".join("---:" for _ in sizes) + " | ---: | --- |",
    ]
    met = goals(results)
    for kind, query in QUERIES:
        cells = [
            f"{results['search'][str(s)][kind]['p50_ms']:.2f} / {results['search'][str(s)][kind]['p99_ms']:.2f} "
            f"({results['search'][str(s)][kind]['mean_hits']:.1f})"
            for s in sizes
        ]
        verdict = "(smoke)" if results.get("smoke") else {True: "yes", False: "NO", None: "no goal"}[met[kind]["met"]]
        lines.append(f"| {kind}: `{query}` | " + " | ".join(cells) + f" | {met[kind]['ratio']:.2f}x | {verdict} |")
    lines += [
        "",
        f"goal (/search): p50 <= {GOAL_P50_MS:g} ms at the largest size and within {GOAL_RATIO:g}x of the smallest",
        "",
        f"/search in one dialog of {results['export']['markdown']['messages']:,} messages, p50 / p99 ms (mean hits):",
        "",
    ]
    for kind, figures in results["search_long_dialog"].items():
        lines.append(f"  {kind}: {figures['p50_ms']:.2f} / {figures['p99_ms']:.2f} ({figures['mean_hits']:.1f})")
    lines += [
        "",
        "| /export | messages | seconds | messages/s | MiB written | files | peak Python KiB (1,000 msgs) "
        "| peak Python KiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for fmt, e in results["export"].items():
        lines.append(
            f"| {fmt} | {e['messages']:,} | {e['seconds']:.2f} | {e['messages_per_s']:,.0f} | {e['mib_written']:.1f} "
            f"| {e['files']} | {e['peak_python_kib_small_dialog']:,.0f} | {e['peak_python_kib']:,.0f} |"
        )
    long_dialog = f"one dialog of {results['export']['markdown']['messages']:,}"
    for key, which in (("explain", f"one dialog of {results['per_dialog']:,}"), ("explain_long_dialog", long_dialog)):
        lines += [
            "",
            f"EXPLAIN (ANALYZE, BUFFERS) at {results['table_rows']:,} messages, {which} messages "
            "(the plan for the values / the generic plan):",
            "",
            "| statement | ms | indexes | Seq Scan on messages |",
            "| --- | ---: | --- | --- |",
        ]
        for name, modes in results[key].items():
            for mode, plan in modes.items():
                lines.append(
                    f"| {name} ({mode}) | {plan['execution_ms']:.2f} | {', '.join(plan['indexes'])} "
                    f"| {'YES' if plan['seq_scan_on_messages'] else 'no'} |"
                )
        if full_plans:
            for name, modes in results[key].items():
                for mode, plan in modes.items():
                    lines += ["", f"-- {name} ({mode}), {which} messages", plan["plan"]]
    migration = results.get("migration")
    if migration:
        probe_ = migration["probe"]
        lines += [
            "",
            f"alembic upgrade 006 -> 007 on {migration['rows']:,} messages ({migration['table_size']} of table, "
            f"{migration['indexes_size']} of indexes): {migration['upgrade_s']:.1f} s in all",
            "",
            "| step | statements | total s | longest ms |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, step in migration["steps"].items():
            lines.append(f"| {name} | {step['count']} | {step['total_s']:.2f} | {step['max_ms']:.1f} |")
        lines += [
            "",
            f"meanwhile, a reader and a writer on messages every 50 ms: {probe_['statements']} statements, "
            f"longest read {probe_['worst_read_ms']:.1f} ms, longest write {probe_['worst_write_ms']:.1f} ms, "
            f"{probe_['over_100ms']} over 100 ms; rows left without a search vector: "
            f"{migration['rows_left_without_vector']}",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark of /search, /export and migration 007.")
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 1_000_000], help="table sizes for /search")
    parser.add_argument("--per-dialog", type=int, default=1_000, help="messages per dialog (the same at every size)")
    parser.add_argument("--samples", type=int, default=200, help="searches per query kind and size")
    parser.add_argument("--export-messages", type=int, default=100_000, help="messages in the exported dialog")
    parser.add_argument("--migration", action="store_true", help="also time migration 007 at the largest size")
    parser.add_argument("--plans", action="store_true", help="print the EXPLAIN plans in full")
    smoke = {"rows": [2_000, 5_000], "per_dialog": 100, "samples": 20, "export_messages": 2_000, "migration": True}
    args = parse(parser, smoke)
    results = asyncio.run(run(args))
    results["goals"] = goals(results)
    results["smoke"] = args.smoke
    print(report(results, args.plans))
    write_results(results, "history", args.smoke)


if __name__ == "__main__":
    main()

"""Retention: hard-delete messages soft-deleted more than N days ago (in batches), the
rate-limit counters of past windows, the token counts of past days, and update claims older
than a day (each process's lease tending purges those hourly too, so they never pile up).

Command line (``make db-purge days=N``)::

    python -m services.ops.retention --days 30
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import psycopg

from services import database
from services.cluster import leases
from services.database import Pool

logger = logging.getLogger(__name__)
DAY_S = 86_400
PURGE_BATCH = 10_000  # rows per DELETE: each a short transaction, the bot's statements in between
CONNECT_TIMEOUT_S = 10
CANNOT_CONNECT = "error: cannot connect to the database at DATABASE_URL: is PostgreSQL running? (`make db-up`)"


async def _in_batches(pool: Pool, work: Callable[..., Awaitable[int]], *, days: int, batch: int) -> int:
    """``work`` (a purge of one table) ``batch`` rows per statement until one finds fewer; how many."""
    total = 0
    while True:
        deleted = await database.run(pool, work, days=days, limit=batch)
        total += deleted
        if deleted < batch:
            return total


async def purge(pool: Pool, *, days: int | None, batch: int = PURGE_BATCH) -> int:
    """Delete messages and summaries soft-deleted more than ``days`` days ago (None: keep them),
    ``batch`` per statement until a statement finds fewer, the rate-limit counters of past
    windows, the token counts of past days and old update claims; how many messages were deleted."""
    purged = summaries = 0
    if days is not None:
        purged = await _in_batches(pool, database.purge_deleted_messages, days=days, batch=batch)
        summaries = await _in_batches(pool, database.purge_deleted_summaries, days=days, batch=batch)
    counters = await database.run(pool, database.purge_rate_limits)
    usage = await database.run(pool, database.purge_token_usage)
    claims = await database.run(pool, leases.purge_claims)
    logger.info(
        "purged %d soft-deleted message(s) and %d summary(ies) (older than: %s day(s)), %d expired rate-limit"
        " counter(s), %d token count(s) of past days and %d update claim(s)",
        purged,
        summaries,
        "off" if days is None else days,
        counters,
        usage,
        claims,
    )
    return purged


async def purge_daily(pool: Pool, *, days: int | None, interval_s: float = DAY_S) -> None:
    """Purge now and then every ``interval_s`` until cancelled (``days``: as ``purge``);
    failures wait for the next round."""
    while True:
        try:
            await purge(pool, days=days)
        except psycopg.Error as error:
            logger.warning("retention purge failed: %s", type(error).__name__)
        await asyncio.sleep(interval_s)


@asynccontextmanager
async def tool_pool() -> AsyncIterator[Pool]:
    """A one-connection pool on DATABASE_DIRECT_URL (default DATABASE_URL) for a command-line
    tool (``make db-purge``, ``make db-seed``): psycopg prepares a statement run five times (a
    purge's batches), which a transaction pooler cannot keep. A bad URL or a database that does
    not answer ends the tool with one line on stderr, not a traceback."""
    from config import ConfigError, load_database_url

    try:
        url = load_database_url(direct=True)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    try:
        # One direct attempt first: refused at once when nothing listens, where the pool would
        # keep retrying (and logging each retry) for its whole timeout.
        await (await database.connect(url, connect_timeout=CONNECT_TIMEOUT_S)).close()
        pool = await database.init_db(url, size=1, timeout_s=CONNECT_TIMEOUT_S)
    except psycopg.OperationalError:
        raise SystemExit(CANNOT_CONNECT) from None
    try:
        yield pool
    finally:
        await database.close_db(pool)


async def _main(days: int) -> None:
    async with tool_pool() as pool:
        print(f"purged {await purge(pool, days=days)} message(s) soft-deleted more than {days} day(s) ago")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Hard-delete messages soft-deleted more than N days ago.")
    parser.add_argument("--days", type=int, required=True, help="age in days (0: every soft-deleted message)")
    args = parser.parse_args()
    if args.days < 0:
        parser.error("--days must be 0 or more")
    asyncio.run(_main(args.days))

"""Retention: hard-delete messages soft-deleted more than N days ago.

Command line (``make db-purge days=N``)::

    python -m services.retention --days 30
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import psycopg

from services import database
from services.database import Pool

logger = logging.getLogger(__name__)
DAY_S = 86_400


async def purge(pool: Pool, *, days: int) -> int:
    """Delete messages soft-deleted more than ``days`` days ago; how many were."""
    purged = await database.run(pool, database.purge_deleted_messages, days=days)
    logger.info("purged %d message(s) soft-deleted more than %d day(s) ago", purged, days)
    return purged


async def purge_daily(pool: Pool, *, days: int, interval_s: float = DAY_S) -> None:
    """Purge now and then every ``interval_s`` until cancelled; failures wait for the next round."""
    while True:
        try:
            await purge(pool, days=days)
        except psycopg.Error as error:
            logger.warning("retention purge failed: %s", type(error).__name__)
        await asyncio.sleep(interval_s)


async def _main(days: int) -> None:
    from config import load_database_url

    pool = await database.init_db(load_database_url(), size=1)
    try:
        print(f"purged {await purge(pool, days=days)} message(s) soft-deleted more than {days} day(s) ago")
    finally:
        await database.close_db(pool)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Hard-delete messages soft-deleted more than N days ago.")
    parser.add_argument("--days", type=int, required=True, help="age in days (0: every soft-deleted message)")
    args = parser.parse_args()
    if args.days < 0:
        parser.error("--days must be 0 or more")
    asyncio.run(_main(args.days))

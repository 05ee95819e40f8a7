"""What one running bot adds to ``/metrics``: its pool, its storage's degraded state, and the
database's size and row counts, read at scrape time (the counts at most once a minute)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Final

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.database import Pool
from services.fallback.storage import Storage

logger = logging.getLogger(__name__)

DB_STATS_EVERY_S: Final = 60.0
# Estimates, not counts: pg_class.reltuples, kept current by autovacuum's VACUUM/ANALYZE, read in
# microseconds at any size. Live messages are the entries of the partial index over live rows
# (messages_turn_idx ... WHERE deleted_at IS NULL). A relation never vacuumed or analyzed has
# reltuples = -1 (and a missing index, NULL): then, and only then, it is counted.
# (SQL here rather than in services/database.py: monitoring reads catalogues, not the bot's data.)
SELECT_DB_STATS: Final = """
    SELECT pg_database_size(current_database()) AS database_bytes,
           (SELECT reltuples FROM pg_class WHERE oid = to_regclass('users')) AS users,
           (SELECT reltuples FROM pg_class WHERE oid = to_regclass('chats')) AS chats,
           (SELECT reltuples FROM pg_class WHERE oid = to_regclass('messages_turn_idx')) AS live_messages
"""
EXACT_COUNTS: Final = {
    "users": "SELECT count(*) FROM users",
    "chats": "SELECT count(*) FROM chats",
    "live_messages": "SELECT count(*) FROM messages WHERE deleted_at IS NULL",
}
DB_STATS_HELP: Final = {
    "database_bytes": "Size of the database on disk (pg_database_size), at most a minute old",
    "users": "Users, estimated (pg_class.reltuples), at most a minute old",
    "chats": "Chats, estimated (pg_class.reltuples), at most a minute old",
    "live_messages": "Messages not soft-deleted, estimated (reltuples of messages_turn_idx), at most a minute old",
}


class BotCollector(Collector):
    """One running bot's gauges: its pool, its storage's degraded state, and the database's size
    and row counts (read by ``refresh`` at most once a minute, not at every scrape)."""

    def __init__(self, pool: Pool | None, storage: Storage) -> None:
        self._pool = pool
        self._storage = storage
        self._db_stats: dict[str, float] = {}
        self._refreshed_at: float | None = None
        self._refreshing = asyncio.Lock()

    async def refresh(self, every_s: float = DB_STATS_EVERY_S, timeout_s: float = 2.0) -> None:
        """Read the database's size and counts unless they are younger than ``every_s``; on
        failure the previous figures stay and the next try waits ``every_s`` too."""
        if self._pool is None:
            return
        async with self._refreshing:
            now = time.monotonic()
            if self._refreshed_at is not None and now - self._refreshed_at < every_s:
                return
            self._refreshed_at = now
            try:
                self._db_stats = await _read_db_stats(self._pool, timeout_s)
            except Exception as error:  # a scrape must answer even when the database does not
                logger.warning("database size and counts not read: %s", type(error).__name__)

    def collect(self) -> Iterator[Metric]:
        if self._pool is not None:
            stats = self._pool.get_stats()
            size, available = stats.get("pool_size", 0), stats.get("pool_available", 0)
            yield GaugeMetricFamily("llmbot_db_pool_size", "Connections the pool holds now", value=size)
            yield GaugeMetricFamily("llmbot_db_pool_in_use", "Connections lent out now", value=size - available)
            yield GaugeMetricFamily(
                "llmbot_db_pool_waiting", "Callers waiting for a connection now", value=stats.get("requests_waiting", 0)
            )
        yield GaugeMetricFamily(
            "llmbot_storage_degraded",
            "1 while the bot answers from memory and spools its writes (database unavailable, or written back)",
            value=1 if self._storage.degraded and self._pool is not None else 0,
        )
        yield GaugeMetricFamily("llmbot_spooled_writes", "Writes waiting for the database", value=self._storage.spooled)
        for name, value in self._db_stats.items():
            yield GaugeMetricFamily(f"llmbot_db_{name}", DB_STATS_HELP[name], value=value)


async def _read_db_stats(pool: Pool, timeout_s: float) -> dict[str, float]:
    async with pool.connection(timeout=timeout_s) as conn:
        cur = await conn.execute(SELECT_DB_STATS)
        row = await cur.fetchone()
        assert row is not None and cur.description is not None  # one row, always
        stats = {column.name: value for column, value in zip(cur.description, row, strict=True)}
        for name, exact in EXACT_COUNTS.items():
            if stats[name] is None or stats[name] < 0:
                cur = await conn.execute(exact)
                counted = await cur.fetchone()
                stats[name] = counted[0] if counted is not None else 0
    return {name: float(value) for name, value in stats.items()}


class Scrape:
    """What ``/metrics`` renders: the process-wide registry and one bot's collector."""

    def __init__(self, *collectors: Collector) -> None:
        self._collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self._collectors:
            yield from collector.collect()

"""``/healthz`` and ``/metrics`` over HTTP (aiohttp).

``/healthz`` answers 200 when every check passes, 503 when one fails, with the checks as JSON:
the database answers (a fresh connection, so a busy pool is not an outage) and its schema is at
the head this code expects; a turn gets a pooled connection within two seconds; the bot is not
answering from memory; Telegram answered a request within the last minute (else ``getMe`` is
asked). The age of the last update is reported, not judged: a quiet hour is not a fault.
``/metrics`` is Prometheus' text format.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import psycopg
from aiogram import Bot
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg.rows import scalar_row

from services import database
from services.database import Pool
from services.fallback.storage import Storage
from services.ops import gauges, metrics

if TYPE_CHECKING:  # aiohttp's server is imported where one is served: polling without METRICS_PORT has none
    from aiohttp import web

logger = logging.getLogger(__name__)

TELEGRAM_FRESH_S: Final = 60.0  # a Bot API answer younger than this needs no getMe
CHECK_TIMEOUT_S: Final = 2  # each probe of the database or Telegram, seconds

Check = dict[str, Any]


@dataclass
class Health:
    """The checks behind ``/healthz``; ``pool`` is None with DATABASE_ENABLED=false."""

    pool: Pool | None
    storage: Storage
    bot: Bot
    schema_head: str

    async def checks(self) -> dict[str, Check]:
        """Each check by name: ``ok`` and what it found."""
        found = {**await self._database(), "telegram": await self._telegram()}
        last = metrics.clock.last_update
        found["updates"] = {"ok": True, "last_update_age_s": None if last is None else _age(last)}
        return found

    async def _database(self) -> dict[str, Check]:
        if self.pool is None:
            return {"database": {"ok": True, "detail": "disabled (DATABASE_ENABLED=false)"}}
        started = time.perf_counter()
        try:
            # A fresh connection where the pool's open. The statement, not fetch_schema_version:
            # a database never migrated fails this check (that one would read None).
            async with await database.connect_session(
                self.pool, pooled_url=True, connect_timeout=CHECK_TIMEOUT_S
            ) as conn:
                cur = conn.cursor(row_factory=scalar_row)
                await cur.execute(database.FETCH_SCHEMA_VERSION)
                version: str | None = await cur.fetchone()
        except psycopg.Error as error:
            logger.warning("health: the database does not answer: %s", type(error).__name__)
            return {
                "database": {"ok": False, "detail": type(error).__name__},
                "schema": {"ok": False, "detail": "unknown: the database does not answer"},
                "storage": self._storage(),
            }
        return {
            "database": {"ok": True, "answered_in_ms": round((time.perf_counter() - started) * 1000, 1)},
            "schema": {"ok": version == self.schema_head, "version": version, "head": self.schema_head},
            "pool": await self._pool(self.pool),
            "storage": self._storage(),
        }

    async def _pool(self, pool: Pool) -> Check:
        """Whether a turn gets a pooled connection now (the server answering a new one is not
        enough: after a restart the pool's may all be dead)."""
        started = time.perf_counter()
        try:
            await asyncio.wait_for(database.run(pool, database.fetch_schema_version), CHECK_TIMEOUT_S)
        except (TimeoutError, psycopg.Error) as error:
            logger.warning("health: no pooled database connection: %s", type(error).__name__)
            return {"ok": False, "detail": type(error).__name__}
        return {"ok": True, "answered_in_ms": round((time.perf_counter() - started) * 1000, 1)}

    def _storage(self) -> Check:
        return {"ok": not self.storage.degraded, "degraded": self.storage.degraded, "spooled": self.storage.spooled}

    async def _telegram(self) -> Check:
        answered = metrics.clock.telegram_answered
        if answered is None or _age(answered) > TELEGRAM_FRESH_S:
            try:
                await self.bot.get_me(request_timeout=CHECK_TIMEOUT_S)  # BotApiMonitor notes the answer
            except Exception as error:  # whatever it is, it is the finding
                logger.warning("health: Telegram did not answer getMe: %s", type(error).__name__)
            answered = metrics.clock.telegram_answered
        if answered is None:
            return {"ok": False, "last_answer_age_s": None}
        age = _age(answered)
        return {"ok": age <= TELEGRAM_FRESH_S, "last_answer_age_s": age}


def _age(monotonic: float) -> float:
    return round(time.monotonic() - monotonic, 1)


def add_health(app: web.Application, health: Health) -> None:
    """``GET /healthz`` on ``app``."""

    from aiohttp import web

    async def healthz(request: web.Request) -> web.Response:
        found = await health.checks()
        healthy = all(check["ok"] for check in found.values())
        return web.json_response(
            {"status": "ok" if healthy else "failing", "checks": found}, status=200 if healthy else 503
        )

    app.router.add_get("/healthz", healthz)


def add_metrics(app: web.Application, collector: gauges.BotCollector) -> None:
    """``GET /metrics`` on ``app``: the process's metrics and ``collector``'s."""
    from aiohttp import web

    scrape = gauges.Scrape(metrics.REGISTRY, collector)

    async def serve_metrics(request: web.Request) -> web.Response:
        await collector.refresh()
        return web.Response(body=generate_latest(scrape), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", serve_metrics)


async def serve(app: web.Application, port: int, host: str = "0.0.0.0") -> web.AppRunner:  # noqa: S104 - a container's port
    """Start serving ``app`` on ``host:port``; the runner, to clean up when done."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner

"""Session-wide real PostgreSQL: TEST_DATABASE_URL if set, else a throwaway local cluster."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from psycopg import sql

from bench.standins import LLMStandIn, TelegramStandIn
from services import database
from services.database import Pool
from services.ops.local_postgres import LocalPostgres, PostgresNotFoundError, find_bin_dir, server_version, throwaway
from tests.harness import bot_env
from tests.watchdog import Watchdog

ROOT = Path(__file__).resolve().parent.parent
WATCHDOG = Watchdog()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    WATCHDOG.entered(item.nodeid)
    try:
        return (yield)
    finally:
        WATCHDOG.entered(None)


def pytest_report_header() -> str:
    """Which PostgreSQL the suite runs on (PG_BIN, PATH, Debian's, or LLMBOT_PG=embedded: the wheel's)."""
    if os.environ.get("TEST_DATABASE_URL"):
        return "postgresql: TEST_DATABASE_URL"
    try:
        bin_dir = find_bin_dir()
        return f"postgresql: {server_version(bin_dir)} from {bin_dir}"
    except PostgresNotFoundError as error:
        return f"postgresql: {error}"


def alembic_config(url: str) -> AlembicConfig:
    """Alembic's configuration for the project, pointed at ``url``."""
    cfg = AlembicConfig(str(ROOT / "alembic.ini"))
    cfg.attributes["database_url"] = url
    return cfg


def create_database(admin_url: str, name: str) -> str:
    """(Re)create database ``name`` on the server of ``admin_url``; its URL."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return urlsplit(admin_url)._replace(path=f"/{name}").geturl()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[LocalPostgres | None]:
    """The throwaway cluster, or None when the suite runs on TEST_DATABASE_URL."""
    if os.environ.get("TEST_DATABASE_URL"):
        yield None
        return
    try:
        cluster = throwaway(settings={"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"})
    except PostgresNotFoundError as error:
        pytest.exit(str(error), returncode=2)
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def cluster(pg_cluster: LocalPostgres | None) -> LocalPostgres:
    """The suite's own cluster, for tests that stop and start it (skipped on TEST_DATABASE_URL)."""
    if pg_cluster is None:
        pytest.skip("needs the suite's own PostgreSQL to stop and start it")
    return pg_cluster


@pytest.fixture(scope="session")
def admin_url(pg_cluster: LocalPostgres | None) -> str:
    url = os.environ.get("TEST_DATABASE_URL") or (pg_cluster.url if pg_cluster else "")
    WATCHDOG.database_url = url
    return url


@pytest.fixture(scope="session")
def database_url(admin_url: str) -> str:
    """A database migrated to head, shared by the session."""
    url = create_database(admin_url, "llmbot_test")
    command.upgrade(alembic_config(url), "head")
    return url


@pytest.fixture(scope="session")
async def session_pool(database_url: str) -> AsyncIterator[Pool]:
    pool = await database.init_db(database_url, size=4)
    yield pool
    await database.close_db(pool)


@pytest.fixture
async def pool(session_pool: Pool) -> Pool:
    """The shared pool over an emptied database."""
    await session_pool.check()  # drops connections an earlier test's outage left dead
    async with session_pool.connection() as conn:
        await conn.execute("TRUNCATE messages, chats, users, rate_limits, update_claims RESTART IDENTITY CASCADE")
    return session_pool


@pytest.fixture
async def telegram() -> AsyncIterator[TelegramStandIn]:
    standin = TelegramStandIn()
    await standin.start()
    yield standin
    await standin.stop()


@pytest.fixture
async def llm() -> AsyncIterator[LLMStandIn]:
    standin = LLMStandIn()
    await standin.start()
    yield standin
    await standin.stop()


@pytest.fixture
def env(pool: Pool, database_url: str, telegram: TelegramStandIn, llm: LLMStandIn) -> dict[str, str]:
    """The bot's settings over an emptied test database and fresh stand-ins."""
    return bot_env(database_url, telegram, llm)

"""Start-up checks of bot.py: a clear refusal when the database is missing or not migrated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.standins import TelegramStandIn
from bot import StartupError, create_bot, open_database, schema_head
from config import load_config
from services import database
from services.ops.local_postgres import free_port
from tests.conftest import ROOT, alembic_config, create_database
from tests.harness import TOKEN, BotProcess

REQUIRED = {"TELEGRAM_BOT_TOKEN": TOKEN, "OPENAI_API_KEY": "sk"}


async def test_unreachable_database_is_a_clear_start_up_error() -> None:
    # the pool gives up after DB_POOL_TIMEOUT_S, here half a second instead of the default 10
    nowhere = f"postgresql://bot:bot@127.0.0.1:{free_port()}/x"
    config = load_config({**REQUIRED, "DATABASE_URL": nowhere, "DB_POOL_TIMEOUT_S": "0.5"})
    with pytest.raises(StartupError, match="cannot connect to the database at DATABASE_URL"):
        await open_database(config)


async def test_unmigrated_database_is_refused(admin_url: str) -> None:
    from alembic import command

    url = create_database(admin_url, "llmbot_behind")
    config = load_config({**REQUIRED, "DATABASE_URL": url})
    with pytest.raises(StartupError, match="schema is at nothing, not 014: run `make db-migrate`"):
        await open_database(config)
    command.upgrade(alembic_config(url), "001")
    with pytest.raises(StartupError, match="schema is at 001"):
        await open_database(config)
    command.upgrade(alembic_config(url), "head")
    pool = await open_database(config)
    assert await database.run(pool, database.fetch_schema_version) == schema_head() == "014"
    await database.close_db(pool)


async def test_bot_uses_the_configured_api_server() -> None:
    bot = create_bot(load_config({**REQUIRED, "TELEGRAM_API_URL": "http://127.0.0.1:8081"}))
    assert bot.session.api.api_url(TOKEN, "getMe") == f"http://127.0.0.1:8081/bot{TOKEN}/getMe"
    await bot.session.close()
    default = create_bot(load_config(REQUIRED))
    assert default.session.api.base.startswith("https://api.telegram.org")
    await default.session.close()


async def test_a_rejected_token_is_a_clear_start_up_error() -> None:
    from aiohttp import web

    from bench.standins import serve
    from bot import check_telegram

    async def unauthorized(request: web.Request) -> web.Response:
        return web.json_response({"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401)

    app = web.Application()
    app.router.add_post("/bot{token}/{method}", unauthorized)
    runner, url = await serve(app)
    bot = create_bot(load_config({**REQUIRED, "TELEGRAM_API_URL": url}))
    try:
        with pytest.raises(StartupError, match="Telegram rejected TELEGRAM_BOT_TOKEN"):
            await check_telegram(bot)
    finally:
        await bot.session.close()
        await runner.cleanup()
    nowhere = create_bot(load_config({**REQUIRED, "TELEGRAM_API_URL": f"http://127.0.0.1:{free_port()}"}))
    try:
        with pytest.raises(StartupError, match="cannot reach the Telegram Bot API"):
            await check_telegram(nowhere)
    finally:
        await nowhere.session.close()


def imported(importtime_output: str) -> set[str]:
    """The modules ``python -X importtime`` reports, top-level package names only."""
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in importtime_output.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def test_a_bad_env_is_reported_before_anything_heavy_is_imported() -> None:
    env = {"PATH": "/usr/bin:/bin", "TELEGRAM_BOT_TOKEN": "", "OPENAI_API_KEY": ""}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "bot.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("configuration error: TELEGRAM_BOT_TOKEN is required")
    modules = imported(result.stderr)
    assert "config" in modules and "dotenv" in modules
    assert not modules & {"aiogram", "openai", "psycopg", "psycopg_pool", "alembic", "sqlalchemy", "handlers"}


def test_the_schema_head_is_read_as_alembic_reads_it() -> None:
    from alembic.script import ScriptDirectory

    from config import load_database_url

    alembic_head = ScriptDirectory.from_config(alembic_config(load_database_url({}))).get_current_head()
    assert schema_head() == alembic_head == "014"


def test_the_schema_head_follows_branches_and_merges(tmp_path: Path) -> None:
    def revision(name: str, down: str | tuple[str, ...] | None) -> None:
        (tmp_path / f"{name}_x.py").write_text(f'"""{name}"""\n\nrevision = {name!r}\ndown_revision = {down!r}\n')

    revision("001", None)
    revision("002", "001")
    (tmp_path / "__init__.py").write_text("")  # not a revision
    assert schema_head(tmp_path) == "002"
    revision("003a", "002")
    revision("003b", "002")
    with pytest.raises(StartupError, match=r"2 heads, not one: \['003a', '003b'\]"):
        schema_head(tmp_path)
    revision("004", ("003a", "003b"))
    assert schema_head(tmp_path) == "004"


async def test_the_running_bot_never_imports_sqlalchemy(env: dict[str, str], telegram: TelegramStandIn) -> None:
    bot = BotProcess({**env, "PYTHONPROFILEIMPORTTIME": "1"}, telegram)
    await bot.start()  # the database checked, migrations compared, polling started
    assert await bot.stop() == 0, bot.output()
    modules = imported(bot.output())
    assert {"aiogram", "openai", "psycopg"} <= modules
    assert not modules & {"sqlalchemy", "alembic"}

"""config.load_config: defaults, validation, one clear line naming each bad variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from config import DEFAULT_DATABASE_URL, ConfigError, load_config, load_database_url
from tests.harness import ROOT, TOKEN

REQUIRED = {"TELEGRAM_BOT_TOKEN": TOKEN, "OPENAI_API_KEY": "sk-secret"}


def test_defaults_with_only_the_required_values() -> None:
    config = load_config(REQUIRED)
    assert config.database_url == DEFAULT_DATABASE_URL
    assert config.openai_base_url == "https://openrouter.ai/api/v1"
    assert config.history_limit == 20
    assert config.allowed_user_ids == frozenset()
    assert config.telegram_api_url is None
    assert config.log_level == "INFO"


def test_every_variable_is_parsed() -> None:
    config = load_config(
        {
            **REQUIRED,
            "OPENAI_BASE_URL": "http://127.0.0.1:8000/v1/",
            "LLM_TEMPERATURE": "0",
            "LLM_MAX_TOKENS": "5",
            "LLM_TIMEOUT_S": "2.5",
            "HISTORY_LIMIT": "3",
            "ALLOWED_USER_IDS": "1, 2,3",
            "LOG_LEVEL": "debug",
            "TELEGRAM_API_URL": "http://localhost:8081",
            "RATE_LIMIT_PER_MINUTE": "0",
            "RETENTION_DAYS": "30",
        }
    )
    assert config.openai_base_url == "http://127.0.0.1:8000/v1"
    assert (config.llm_temperature, config.llm_max_tokens, config.llm_timeout_s) == (0.0, 5, 2.5)
    assert config.allowed_user_ids == {1, 2, 3}
    assert config.log_level == "DEBUG"
    assert config.telegram_api_url == "http://localhost:8081"
    assert config.retention_days == 30


def test_missing_required_values_are_all_named() -> None:
    with pytest.raises(ConfigError) as error:
        load_config({})
    assert str(error.value) == "TELEGRAM_BOT_TOKEN is required; OPENAI_API_KEY is required"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TELEGRAM_BOT_TOKEN", "not-a-token"),
        ("LLM_TEMPERATURE", "hot"),
        ("LLM_TEMPERATURE", "3"),
        ("LLM_MAX_TOKENS", "0"),
        ("HISTORY_LIMIT", "-1"),
        ("DATABASE_URL", "mysql://localhost/db"),
        ("OPENAI_BASE_URL", "openrouter.ai"),
        ("ALLOWED_USER_IDS", "1,two"),
        ("LOG_LEVEL", "LOUD"),
        ("TELEGRAM_API_URL", "ftp://x"),
        ("GROUP_TRIGGER", "sometimes"),
        ("DATABASE_DIRECT_URL", "mysql://localhost/db"),
        ("DB_PREPARED_STATEMENTS", "maybe"),
    ],
)
def test_a_bad_value_names_its_variable_and_not_its_value(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config({**REQUIRED, name: value})
    assert str(error.value).startswith(f"{name} must be")
    assert value not in str(error.value)


def test_secrets_stay_out_of_repr() -> None:
    text = repr(
        load_config(
            {
                **REQUIRED,
                "DATABASE_URL": "postgresql://u:hunter2@db/x",
                "DATABASE_DIRECT_URL": "postgresql://u:swordfish@db/x",
            }
        )
    )
    assert TOKEN not in text and "sk-secret" not in text and "hunter2" not in text and "swordfish" not in text


def test_the_direct_url_defaults_to_database_url_and_prepared_statements_are_on() -> None:
    config = load_config({**REQUIRED, "DATABASE_URL": "postgresql://a:b@bouncer:6432/d"})
    assert (config.database_direct_url, config.db_prepared_statements) == ("postgresql://a:b@bouncer:6432/d", True)
    behind = load_config(
        {
            **REQUIRED,
            "DATABASE_URL": "postgresql://a:b@bouncer:6432/d",
            "DATABASE_DIRECT_URL": "postgresql://a:b@db:5432/d",
            "DB_PREPARED_STATEMENTS": "false",
        }
    )
    assert (behind.database_url, behind.database_direct_url) == (
        "postgresql://a:b@bouncer:6432/d",
        "postgresql://a:b@db:5432/d",
    )
    assert behind.db_prepared_statements is False


def test_database_url_alone_needs_no_token() -> None:
    assert load_database_url({"DATABASE_URL": "postgresql://a:b@h:1/d"}) == "postgresql://a:b@h:1/d"
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        load_database_url({"DATABASE_URL": "nonsense"})
    # Migrations and the maintenance tools take the direct URL, when there is one.
    both = {"DATABASE_URL": "postgresql://a:b@bouncer:6432/d", "DATABASE_DIRECT_URL": "postgresql://a:b@db:5432/d"}
    assert load_database_url(both) == "postgresql://a:b@bouncer:6432/d"
    assert load_database_url(both, direct=True) == "postgresql://a:b@db:5432/d"
    assert load_database_url({"DATABASE_URL": "postgresql://a:b@h:1/d"}, direct=True) == "postgresql://a:b@h:1/d"


@pytest.mark.parametrize("entry", [["-m", "config"], ["bot.py"]])
def test_start_up_with_a_bad_env_fails_with_one_line(entry: list[str], tmp_path: object) -> None:
    env = {"PATH": "/usr/bin:/bin", "TELEGRAM_BOT_TOKEN": "", "OPENAI_API_KEY": "", "LLM_TEMPERATURE": "x"}
    result = subprocess.run([sys.executable, *entry], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "TELEGRAM_BOT_TOKEN is required" in lines[0] and "LLM_TEMPERATURE must be" in lines[0]

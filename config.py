"""Configuration: read once from the environment (and `.env`), validated, frozen."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, TypeVar, get_args
from urllib.parse import urlsplit

from dotenv import load_dotenv

DEFAULT_DATABASE_URL = "postgresql://bot:bot@localhost:5432/llmbot"
DEFAULT_OPENAI_BASE_URL = "https://openrouter.ai/api/v1"
DEFAULT_SYSTEM_PROMPT = "You are a helpful, concise assistant in a Telegram chat."
TELEGRAM_DOWNLOAD_LIMIT = 20 * 1024 * 1024  # the biggest file the Bot API lets a bot download (getFile)

T = TypeVar("T")
S = TypeVar("S", bound=str)

# The closed sets of values a setting takes: each is checked once, by ``_choice``, where it is read.
BotMode = Literal["polling", "webhook"]
GroupTrigger = Literal["mention", "all"]
GroupContext = Literal["per_user", "shared"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL", "NOTSET"]  # logging's names
BOT_MODES: tuple[BotMode, ...] = get_args(BotMode)
GROUP_TRIGGERS: tuple[GroupTrigger, ...] = get_args(GroupTrigger)
GROUP_CONTEXTS: tuple[GroupContext, ...] = get_args(GroupContext)
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)


class ConfigError(ValueError):
    """One or more settings are missing or invalid; the message names each variable."""


@dataclass(frozen=True)
class Config:
    """Every setting the bot reads. Secrets are left out of ``repr``."""

    telegram_bot_token: str = field(repr=False)
    openai_api_key: str = field(repr=False)
    openai_base_url: str
    llm_model: str
    allowed_models: tuple[str, ...]
    llm_temperature: float
    llm_max_tokens: int
    llm_timeout_s: float
    llm_stream: bool
    stream_draft_interval_s: float
    stream_edit_interval_s: float
    system_prompt: str
    database_enabled: bool
    database_url: str = field(repr=False)
    database_direct_url: str = field(repr=False)
    db_prepared_statements: bool
    db_pool_size: int
    db_pool_timeout_s: float
    max_turns_in_flight: int
    memory_cache_chars: int
    spool_path: Path
    spool_max_items: int
    history_limit: int
    context_tokens: int
    summaries: bool
    recall: bool
    llm_tools: bool
    pending_reply_max_age_s: int
    shutdown_timeout_s: float
    rate_limit_per_minute: int
    daily_token_budget_per_user: int
    allowed_user_ids: frozenset[int]
    retention_days: int
    group_trigger: GroupTrigger
    group_context: GroupContext
    telegram_api_url: str | None
    log_level: LogLevel
    bot_mode: BotMode
    webhook_url: str | None
    webhook_secret: str | None = field(repr=False)
    webhook_port: int
    metrics_port: int
    instance_id: str
    lease_ttl_s: int
    vision_models: tuple[str, ...]  # empty: every model is shown images until it refuses them
    context_images: int
    image_max_side: int
    image_max_bytes: int
    transcription_model: str  # empty: voice messages are not transcribed
    transcription_base_url: str
    transcription_api_key: str = field(repr=False)
    voice_max_seconds: int
    document_max_chars: int
    document_max_pages: int
    media_cache_bytes: int

    @property
    def webhook_path(self) -> str:
        """The path of WEBHOOK_URL: where the webhook listens (the load balancer forwards it as is)."""
        return urlsplit(self.webhook_url or "").path or "/"


def _load_env() -> Mapping[str, str]:
    # Real environment variables win over `.env`, as twelve-factor tools expect.
    load_dotenv(override=False)
    return os.environ


class _Reader:
    """Collects every problem so that one run reports all of them."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.errors: list[str] = []

    def get(self, name: str, default: str | None, parse: Callable[[str], T], rule: str) -> T:
        raw = self.env.get(name, "").strip()
        if not raw:
            if default is None:
                self.errors.append(f"{name} is required")
                return None  # type: ignore[return-value]  # reported, never used
            raw = default
        try:
            return parse(raw)
        except ValueError:
            # The value is not echoed: it may be a secret.
            self.errors.append(f"{name} must be {rule}")
            return None  # type: ignore[return-value]


def _bounded(kind: Callable[[str], T], low: float, high: float) -> Callable[[str], T]:
    def parse(raw: str) -> T:
        value = kind(raw)
        if not low <= value <= high:  # type: ignore[operator]
            raise ValueError(raw)
        return value

    return parse


def _http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(raw)
    return raw.rstrip("/")


def _instance_id(raw: str) -> str:
    if len(raw) > 100 or any(c.isspace() for c in raw):
        raise ValueError(raw)
    return raw


def _optional_http_url(raw: str) -> str | None:
    return _http_url(raw) if raw else None


def _webhook_url(raw: str) -> str | None:
    # Telegram posts to HTTPS only; TLS usually ends at the load balancer in front of the bot.
    parts = urlsplit(raw)
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(raw)
    return raw


def _webhook_secret(raw: str) -> str:
    # Telegram's rule for secret_token (1-256 of A-Z a-z 0-9 _ -), with a floor that makes guessing hopeless.
    if not 16 <= len(raw) <= 256 or not all(c.isascii() and (c.isalnum() or c in "_-") for c in raw):
        raise ValueError("malformed secret")
    return raw


def _choice(allowed: tuple[S, ...]) -> Callable[[str], S]:
    """One of ``allowed`` (the values of a ``Literal``), case aside, as ``allowed`` spells it."""

    def parse(raw: str) -> S:
        for value in allowed:
            if raw.lower() == value.lower():
                return value
        raise ValueError(raw)

    return parse


def _postgres_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
        raise ValueError(raw)
    return raw


def _bot_token(raw: str) -> str:
    # Telegram tokens look like 123456:ABC-DEF...; a wrong shape fails here, not at the first request.
    bot_id, _, secret = raw.partition(":")
    if not bot_id.isdigit() or len(secret) < 20:
        raise ValueError("malformed token")
    return raw


def _boolean(raw: str) -> bool:
    value = raw.lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(raw)
    return value in ("true", "1", "yes")


def _model_names(raw: str) -> tuple[str, ...]:
    # Order kept (it is the order of /model's keyboard), duplicates dropped.
    names = tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    if not names or any(len(name) > 200 or any(c.isspace() for c in name) for name in names):
        raise ValueError(raw)
    return names


def _vision_models(raw: str) -> tuple[str, ...]:
    return () if raw == "*" else _model_names(raw)


def _user_ids(raw: str) -> frozenset[int]:
    return frozenset(int(part) for part in raw.replace(",", " ").split())


def load_database_url(env: Mapping[str, str] | None = None, *, direct: bool = False) -> str:
    """``DATABASE_URL`` alone, for tools (Alembic, db-up) that need no bot token; ``direct``:
    ``DATABASE_DIRECT_URL`` (default ``DATABASE_URL``), for a tool that needs whole sessions of
    the server itself rather than of a transaction pooler (migrations, the maintenance commands)."""
    reader = _Reader(_load_env() if env is None else env)
    url = reader.get("DATABASE_URL", DEFAULT_DATABASE_URL, _postgres_url, "a postgresql:// URL")
    if direct:
        url = reader.get("DATABASE_DIRECT_URL", url or DEFAULT_DATABASE_URL, _postgres_url, "a postgresql:// URL")
    if reader.errors:
        raise ConfigError("; ".join(reader.errors))
    return url


def load_config(env: Mapping[str, str] | None = None) -> Config:
    """Build the configuration or raise ``ConfigError`` naming every bad or missing variable."""
    r = _Reader(_load_env() if env is None else env)
    positive = "a whole number ≥ 1"
    bot_mode = r.get("BOT_MODE", "polling", _choice(BOT_MODES), "polling or webhook")
    webhook = bot_mode == "webhook"  # the webhook's settings are required in webhook mode only
    config = Config(
        telegram_bot_token=r.get(
            "TELEGRAM_BOT_TOKEN", None, _bot_token, "a bot token like 123456:ABC... (from @BotFather)"
        ),
        openai_api_key=r.get("OPENAI_API_KEY", None, str, "a key"),
        openai_base_url=r.get("OPENAI_BASE_URL", DEFAULT_OPENAI_BASE_URL, _http_url, "an http(s) URL"),
        llm_model=(llm_model := r.get("LLM_MODEL", "openai/gpt-4o-mini", str, "a model name")),
        allowed_models=r.get(
            "ALLOWED_MODELS", llm_model, _model_names, "model names separated by commas (no spaces within a name)"
        ),
        llm_temperature=r.get("LLM_TEMPERATURE", "0.7", _bounded(float, 0, 2), "a number from 0 to 2"),
        llm_max_tokens=r.get("LLM_MAX_TOKENS", "1024", _bounded(int, 1, 1_000_000), positive),
        llm_timeout_s=r.get("LLM_TIMEOUT_S", "60", _bounded(float, 0.1, 3600), "seconds from 0.1 to 3600"),
        llm_stream=r.get("LLM_STREAM", "true", _boolean, "true or false"),
        stream_draft_interval_s=r.get(
            "STREAM_DRAFT_INTERVAL_S", "0.3", _bounded(float, 0.05, 60), "seconds from 0.05 to 60"
        ),
        stream_edit_interval_s=r.get(
            "STREAM_EDIT_INTERVAL_S", "1.5", _bounded(float, 0.1, 60), "seconds from 0.1 to 60"
        ),
        system_prompt=r.get("SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT, str, "text"),
        database_enabled=r.get("DATABASE_ENABLED", "true", _boolean, "true or false"),
        database_url=(
            database_url := r.get("DATABASE_URL", DEFAULT_DATABASE_URL, _postgres_url, "a postgresql:// URL")
        ),
        database_direct_url=r.get(
            "DATABASE_DIRECT_URL", database_url or DEFAULT_DATABASE_URL, _postgres_url, "a postgresql:// URL"
        ),
        db_prepared_statements=r.get("DB_PREPARED_STATEMENTS", "true", _boolean, "true or false"),
        db_pool_size=r.get("DB_POOL_SIZE", "10", _bounded(int, 1, 1000), positive),
        db_pool_timeout_s=r.get("DB_POOL_TIMEOUT_S", "10", _bounded(float, 0.1, 600), "seconds from 0.1 to 600"),
        max_turns_in_flight=r.get("MAX_TURNS_IN_FLIGHT", "1000", _bounded(int, 1, 100_000), positive),
        memory_cache_chars=r.get("MEMORY_CACHE_CHARS", "10000000", _bounded(int, 0, 10**10), "a whole number ≥ 0"),
        spool_path=r.get("SPOOL_PATH", ".spool/writes.jsonl", Path, "a file path"),
        spool_max_items=r.get("SPOOL_MAX_ITEMS", "10000", _bounded(int, 1, 10**8), positive),
        history_limit=r.get("HISTORY_LIMIT", "20", _bounded(int, 1, 1000), "a whole number from 1 to 1000"),
        context_tokens=r.get(
            "CONTEXT_TOKENS", "0", _bounded(int, 0, 100_000_000), "a whole number of tokens, or 0 (ask the endpoint)"
        ),
        summaries=r.get("SUMMARIES", "true", _boolean, "true or false"),
        recall=r.get("RECALL", "true", _boolean, "true or false"),
        llm_tools=r.get("LLM_TOOLS", "true", _boolean, "true or false"),
        pending_reply_max_age_s=r.get("PENDING_REPLY_MAX_AGE_S", "600", _bounded(int, 0, 604_800), "seconds ≥ 0"),
        shutdown_timeout_s=r.get("SHUTDOWN_TIMEOUT_S", "30", _bounded(float, 0, 3600), "seconds ≥ 0"),
        rate_limit_per_minute=r.get("RATE_LIMIT_PER_MINUTE", "20", _bounded(int, 0, 100_000), "a whole number ≥ 0"),
        daily_token_budget_per_user=r.get(
            "DAILY_TOKEN_BUDGET_PER_USER", "0", _bounded(int, 0, 10**15), "a whole number of tokens ≥ 0 (0: no budget)"
        ),
        allowed_user_ids=r.get("ALLOWED_USER_IDS", "", _user_ids, "Telegram user ids separated by commas"),
        retention_days=r.get("RETENTION_DAYS", "0", _bounded(int, 0, 36_500), "a whole number of days ≥ 0"),
        telegram_api_url=r.get("TELEGRAM_API_URL", "", _optional_http_url, "an http(s) URL"),
        log_level=r.get("LOG_LEVEL", "INFO", _choice(LOG_LEVELS), "DEBUG, INFO, WARNING or ERROR"),
        group_trigger=r.get("GROUP_TRIGGER", "mention", _choice(GROUP_TRIGGERS), "mention or all"),
        group_context=r.get("GROUP_CONTEXT", "per_user", _choice(GROUP_CONTEXTS), "per_user or shared"),
        bot_mode=bot_mode,
        webhook_url=r.get(
            "WEBHOOK_URL", None if webhook else "", _webhook_url, "an https:// URL without query (Telegram posts to it)"
        )
        if webhook
        else None,
        webhook_secret=r.get(
            "WEBHOOK_SECRET", None if webhook else "", _webhook_secret, "16 to 256 characters: A-Z, a-z, 0-9, _ or -"
        )
        if webhook
        else None,
        webhook_port=r.get("WEBHOOK_PORT", "8080", _bounded(int, 1, 65535), "a port from 1 to 65535"),
        metrics_port=r.get("METRICS_PORT", "0", _bounded(int, 0, 65535), "a port from 1 to 65535, or 0 (off)"),
        instance_id=r.get("INSTANCE_ID", "", _instance_id, "1 to 100 characters without spaces"),
        lease_ttl_s=r.get("LEASE_TTL_S", "30", _bounded(int, 1, 3600), "seconds from 1 to 3600"),
        vision_models=r.get("VISION_MODELS", "*", _vision_models, "* or model names separated by commas"),
        context_images=r.get("CONTEXT_IMAGES", "4", _bounded(int, 0, 50), "a whole number from 0 to 50"),
        image_max_side=r.get("IMAGE_MAX_SIDE", "2048", _bounded(int, 64, 10_000), "pixels from 64 to 10000"),
        image_max_bytes=r.get(
            "IMAGE_MAX_BYTES", "5000000", _bounded(int, 10_000, TELEGRAM_DOWNLOAD_LIMIT), "bytes up to 20 MB"
        ),
        transcription_model=r.get("TRANSCRIPTION_MODEL", "", str, "a model name"),
        transcription_base_url=r.get(
            "TRANSCRIPTION_BASE_URL",
            r.env.get("OPENAI_BASE_URL", "").strip() or DEFAULT_OPENAI_BASE_URL,
            _http_url,
            "an http(s) URL",
        ),
        transcription_api_key=r.get(
            "TRANSCRIPTION_API_KEY", r.env.get("OPENAI_API_KEY", "").strip() or "-", str, "a key"
        ),
        voice_max_seconds=r.get("VOICE_MAX_SECONDS", "600", _bounded(int, 1, 86_400), "seconds from 1 to 86400"),
        document_max_chars=r.get(
            "DOCUMENT_MAX_CHARS", "20000", _bounded(int, 100, 1_000_000), "a whole number from 100 to 1000000"
        ),
        document_max_pages=r.get("DOCUMENT_MAX_PAGES", "50", _bounded(int, 1, 10_000), "pages from 1 to 10000"),
        media_cache_bytes=r.get(
            "MEDIA_CACHE_BYTES", "50000000", _bounded(int, 0, 10**10), "a whole number of bytes ≥ 0"
        ),
    )
    if not config.instance_id:  # the host name, and the webhook's port: unique on one host
        host = socket.gethostname() or "bot"
        config = replace(config, instance_id=f"{host}:{config.webhook_port}" if webhook else host)
    if config.allowed_models and config.llm_model not in config.allowed_models:
        r.errors.append("ALLOWED_MODELS must include LLM_MODEL (the default model of every chat)")
    if config.context_tokens and config.context_tokens <= config.llm_max_tokens:
        r.errors.append("CONTEXT_TOKENS must exceed LLM_MAX_TOKENS (the answer's share of the context)")
    if webhook and config.metrics_port and config.metrics_port == config.webhook_port:
        r.errors.append("METRICS_PORT must differ from WEBHOOK_PORT (/metrics stays off the public port)")
    if r.errors:
        raise ConfigError("; ".join(r.errors))
    return config


if __name__ == "__main__":
    # `python -m config`: validate `.env` before anything is started (used by `make run`).
    try:
        load_config()
    except ConfigError as error:
        raise SystemExit(f"configuration error: {error}") from None
    print("configuration OK")

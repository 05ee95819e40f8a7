"""The bot's Prometheus metrics: every definition, and the few helpers that feed them.

Counters and histograms are process-wide (one bot per process); what belongs to one running bot
(its pool, its storage, its database) is read by ``services.ops.gauges`` when ``/metrics`` is
asked for. Feeding a metric is one line where the thing happens. A leaf: it imports nothing of
the bot's, so every layer may feed it.

Stage latencies are per call, not summed per turn: one database statement (including the wait
for a pooled connection), one LLM request (until its stream ends), one Bot API request (each
attempt; ``getUpdates``, a long poll, is left out). A turn's whole time is ``llmbot_turn_seconds``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Final, ParamSpec, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

logger = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

REGISTRY: Final = CollectorRegistry()
STAGES: Final = ("database", "llm", "telegram", "transcription")
OUTCOMES: Final = (
    "answered",
    "llm_failed",
    "refused",
    "db_unavailable",
    "delivery_failed",
    "lease_lost",
    "skipped",
    "bad_request",
    "error",
)
# Statements take ~0.2-5 ms, an LLM seconds, a Bot API request tens of ms: one set of buckets spans them.
STAGE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TURN_BUCKETS: Final = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)

TURNS: Final = Counter("llmbot_turns", "Turns run, by how they ended", ["outcome"], registry=REGISTRY)
TURN_SECONDS: Final = Histogram(
    "llmbot_turn_seconds", "Time of one turn, from its start in the chat's queue to its end", buckets=TURN_BUCKETS,
    registry=REGISTRY,
)  # fmt: skip
TURNS_IN_FLIGHT: Final = Gauge("llmbot_turns_in_flight", "Turns running now", registry=REGISTRY)
STAGE_SECONDS: Final = Histogram(
    "llmbot_stage_seconds", "Time of one call to the database, the LLM, the Bot API or transcription", ["stage"],
    buckets=STAGE_BUCKETS, registry=REGISTRY,
)  # fmt: skip
STAGE_ERRORS: Final = Counter(
    "llmbot_stage_errors", "Calls that failed, by stage and exception type", ["stage", "error"], registry=REGISTRY
)
LLM_TOKENS: Final = Counter(
    "llmbot_llm_tokens", "Tokens the LLM endpoint reported using (only where it reports usage)", ["kind"],
    registry=REGISTRY,
)  # fmt: skip
TELEGRAM_429: Final = Counter("llmbot_telegram_429", "Bot API requests Telegram refused with 429", registry=REGISTRY)
UPDATES: Final = Counter("llmbot_updates", "Updates received from Telegram", registry=REGISTRY)
LAST_UPDATE: Final = Gauge(
    "llmbot_last_update_timestamp_seconds", "Unix time of the last update received (0: none yet)", registry=REGISTRY
)
DATABASE_FAILURES: Final = Counter(
    "llmbot_database_failures", "Statements that failed, by failure class (services/failures.py)", ["failure"],
    registry=REGISTRY,
)  # fmt: skip
SPOOL_SET_ASIDE: Final = Counter(
    "llmbot_spool_set_aside", "Spooled writes the database refused, set aside instead of retried", registry=REGISTRY
)
WEBHOOK_REFUSED: Final = Counter(
    "llmbot_webhook_refused", "Webhook requests refused for a missing or wrong secret", registry=REGISTRY
)

for _stage in STAGES:  # present at 0 from the start, so rate() and alerts see them
    STAGE_SECONDS.labels(_stage)
for _name in OUTCOMES:
    TURNS.labels(_name)
for _kind in ("prompt", "completion"):
    LLM_TOKENS.labels(_kind)
for _failure in ("outage", "broken", "bad_request", "bug"):
    DATABASE_FAILURES.labels(_failure)


@dataclass
class _Clock:
    """Monotonic times of the last update and the last Bot API request Telegram answered."""

    last_update: float | None = None
    telegram_answered: float | None = None


clock: Final = _Clock()


def update_received() -> None:
    """An update arrived (polling or webhook)."""
    clock.last_update = time.monotonic()
    UPDATES.inc()
    LAST_UPDATE.set(time.time())


def telegram_answered() -> None:
    """Telegram answered a Bot API request (an error answer counts: Telegram is reachable)."""
    clock.telegram_answered = time.monotonic()


def observe_stage(stage: str, seconds: float, error: BaseException | None = None) -> None:
    """One call of ``stage`` took ``seconds``; ``error`` when it failed."""
    STAGE_SECONDS.labels(stage).observe(seconds)
    if error is not None:
        STAGE_ERRORS.labels(stage, type(error).__name__).inc()


def count_tokens(prompt: int | None, completion: int | None) -> None:
    """Tokens an LLM response reported in its ``usage``."""
    if prompt:
        LLM_TOKENS.labels("prompt").inc(prompt)
    if completion:
        LLM_TOKENS.labels("completion").inc(completion)


class stage:  # lower case: used like a function, ``async with metrics.stage("database"):``
    """Times the block as one call of ``name``, counting the exception it ends with, if any."""

    __slots__ = ("name", "started")

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = 0.0

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if not isinstance(error, asyncio.CancelledError):  # a cancelled call tells nothing about the stage
            observe_stage(self.name, time.perf_counter() - self.started, error)

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(kind, error, tb)


# -- turns ------------------------------------------------------------------------------------

_outcome: ContextVar[list[str] | None] = ContextVar("llmbot_turn_outcome", default=None)


def turn_outcome(outcome: str) -> None:
    """How the turn running in this task ended (the last call wins); ``skipped`` if never said."""
    current = _outcome.get()
    if current is not None:
        current[0] = outcome


def turn(run: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Decorates the coroutine function that runs one turn: counts it in flight while it runs,
    times it, and counts its outcome (``error`` when it raises)."""

    @functools.wraps(run)
    async def timed(*args: P.args, **kwargs: P.kwargs) -> R:
        outcome = ["skipped"]
        token = _outcome.set(outcome)
        started = time.perf_counter()
        TURNS_IN_FLIGHT.inc()
        try:
            return await run(*args, **kwargs)
        except BaseException:
            outcome[0] = "error"
            raise
        finally:
            TURNS_IN_FLIGHT.dec()
            TURN_SECONDS.observe(time.perf_counter() - started)
            TURNS.labels(outcome[0]).inc()
            _outcome.reset(token)

    return timed

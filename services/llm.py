"""The LLM: chat completions from any OpenAI-compatible endpoint (OpenRouter by default)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from config import Config
from services.context import ChatMessage

logger = logging.getLogger(__name__)


class LLMError(Exception):
    """No usable answer: timeout, refused request, server error, rate limit or an empty reply."""


@dataclass(frozen=True)
class LLM:
    """A configured chat-completion client."""

    client: AsyncOpenAI
    model: str
    temperature: float
    max_tokens: int
    system_prompt: str

    async def complete(self, history: Sequence[ChatMessage]) -> str:
        """The assistant's answer to ``history`` (oldest first, ending with the question)."""
        messages = [{"role": "system", "content": self.system_prompt}, *history]
        started = time.perf_counter()
        try:
            response = await self.client.chat.completions.create(
                model=self.model,
                messages=cast(list[ChatCompletionMessageParam], messages),
                temperature=self.temperature,
                max_tokens=self.max_tokens,
            )
        except openai.APIError as error:
            status = getattr(error, "status_code", None)
            logger.warning(
                "LLM call failed: %s status=%s after %.2fs", type(error).__name__, status, time.perf_counter() - started
            )
            raise LLMError(type(error).__name__) from error
        content = response.choices[0].message.content if response.choices else None
        if not content or not content.strip():
            logger.warning("LLM returned an empty answer after %.2fs", time.perf_counter() - started)
            raise LLMError("empty answer")
        logger.info("LLM answered: %d chars in %.2fs", len(content), time.perf_counter() - started)
        return content


def create_llm(config: Config) -> LLM:
    """The LLM client described by ``config``; opens no connection until the first call."""
    client = AsyncOpenAI(
        api_key=config.openai_api_key,
        base_url=config.openai_base_url,
        timeout=config.llm_timeout_s,
        max_retries=1,
    )
    return LLM(
        client=client,
        model=config.llm_model,
        temperature=config.llm_temperature,
        max_tokens=config.llm_max_tokens,
        system_prompt=config.system_prompt,
    )

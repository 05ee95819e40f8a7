"""The LLM: chat completions from any OpenAI-compatible endpoint (OpenRouter by default)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import cast

import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from config import Config
from services import metrics
from services.context import ChatMessage

logger = logging.getLogger(__name__)


class LLMError(Exception):
    """No usable answer: timeout, refused request, server error, rate limit or an empty reply."""


# Statuses with which an endpoint refuses the request itself (here: to stream), not a moment's trouble.
REFUSES_STREAMING = (400, 404, 415, 422, 501)


@dataclass
class LLM:
    """A configured chat-completion client. ``streaming`` turns off by itself for an endpoint
    that refuses to stream."""

    client: AsyncOpenAI
    model: str
    temperature: float
    max_tokens: int
    system_prompt: str
    streaming: bool = True

    def _messages(self, history: Sequence[ChatMessage]) -> list[ChatCompletionMessageParam]:
        return cast(list[ChatCompletionMessageParam], [{"role": "system", "content": self.system_prompt}, *history])

    async def stream(self, history: Sequence[ChatMessage]) -> AsyncIterator[str]:
        """The answer to ``history`` as it is written, piece by piece. Where the endpoint cannot
        stream, one completion comes whole: the caller sees no difference but the wait."""
        if not self.streaming:
            yield await self.complete(history)
            return
        started = time.perf_counter()
        try:
            chunks = await self.client.chat.completions.create(
                model=self.model,
                messages=self._messages(history),
                temperature=self.temperature,
                max_tokens=self.max_tokens,
                stream=True,
            )
        except openai.APIStatusError as error:
            if error.status_code not in REFUSES_STREAMING:
                raise _failed(error, started) from error
            logger.warning("the endpoint refuses to stream (status %s): asking for whole answers", error.status_code)
            self.streaming = False
            yield await self.complete(history)
            return
        except openai.APIError as error:
            raise _failed(error, started) from error
        written, first, visible = 0, 0.0, False
        try:
            async with chunks:
                async for chunk in chunks:
                    if chunk.usage is not None:  # only endpoints that send usage unasked (none is asked for)
                        metrics.count_tokens(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                    piece = chunk.choices[0].delta.content if chunk.choices else None
                    if piece:
                        first = first or time.perf_counter() - started
                        written += len(piece)
                        visible = visible or not piece.isspace()
                        yield piece
        except openai.APIError as error:
            raise _failed(error, started) from error
        if not visible:
            logger.warning("LLM streamed an empty answer after %.2fs", time.perf_counter() - started)
            raise LLMError("empty answer")
        logger.info("LLM streamed %d chars in %.2fs (first after %.2fs)", written, time.perf_counter() - started, first)
        metrics.observe_stage("llm", time.perf_counter() - started)

    async def complete(self, history: Sequence[ChatMessage]) -> str:
        """The assistant's answer to ``history`` (oldest first, ending with the question)."""
        started = time.perf_counter()
        try:
            response = await self.client.chat.completions.create(
                model=self.model,
                messages=self._messages(history),
                temperature=self.temperature,
                max_tokens=self.max_tokens,
            )
        except openai.APIError as error:
            raise _failed(error, started) from error
        content = response.choices[0].message.content if response.choices else None
        if not content or not content.strip():
            logger.warning("LLM returned an empty answer after %.2fs", time.perf_counter() - started)
            raise LLMError("empty answer")
        logger.info("LLM answered: %d chars in %.2fs", len(content), time.perf_counter() - started)
        metrics.observe_stage("llm", time.perf_counter() - started)
        if response.usage is not None:
            metrics.count_tokens(response.usage.prompt_tokens, response.usage.completion_tokens)
        return content


def _failed(error: openai.APIError, started: float) -> LLMError:
    status = getattr(error, "status_code", None)
    metrics.observe_stage("llm", time.perf_counter() - started, error)
    logger.warning(
        "LLM call failed: %s status=%s after %.2fs", type(error).__name__, status, time.perf_counter() - started
    )
    return LLMError(type(error).__name__)


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
        streaming=config.llm_stream,
    )

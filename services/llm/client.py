"""The LLM: chat completions from any OpenAI-compatible endpoint (OpenRouter by default)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from config import Config
from services.ops import metrics
from services.records import ChatMessage, Usage

logger = logging.getLogger(__name__)


class LLMError(Exception):
    """No usable answer: timeout, refused request, server error, rate limit or an empty reply."""


class ImagesRefused(Exception):
    """The endpoint refused a request with images: its model does not take them (it is not
    shown any again). Raised before anything is written, so the call can be made without them."""


# Statuses with which an endpoint refuses the request itself (here: to stream), not a moment's trouble.
REFUSES_STREAMING = (400, 404, 415, 422, 501)


def system_prompt_of(operator: str, chat: str | None) -> str:
    """A chat's system prompt: the operator's SYSTEM_PROMPT, then the chat's own (/prompt) after
    it, so a chat adds instructions but cannot take the operator's away. One text: what the
    context budget estimates is what is sent."""
    return operator if chat is None else f"{operator}\n\n{chat}"


@dataclass(frozen=True, slots=True)
class _Request:
    """What one call asks: the model, the messages (system prompt first), the temperature."""

    model: str
    messages: list[ChatCompletionMessageParam]
    temperature: float
    images: bool = False  # some message shows an image


# The request is sent as it is built and a streamed chunk read as the JSON it is, through the
# SDK's own ``post`` (its auth, retries, timeouts, errors and server-sent events, as for
# ``chat.completions.create``): ``create`` walks every message against each kind of message it
# knows, to rename or encode fields plain role/content messages lack, and builds a model of
# every chunk; at 1000 chats of the whole-bot benchmark that was 1.3 ms of the bot's 6.1 ms of
# CPU per turn (README "Benchmarks"), and it grows with the answer's length.
COMPLETIONS = "/chat/completions"
Chunk = dict[str, Any]  # one streamed chunk: {"choices": [{"delta": {"content": ...}}], "usage": ...}


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
    vision_models: tuple[str, ...] = ()  # the models shown images (empty: every model, until it refuses)
    _calls: int = field(default=0, init=False, repr=False)  # requests under way, for ``close``
    _text_only: set[str] = field(default_factory=set, init=False, repr=False)  # models that refused images

    def sees_images(self, model: str | None) -> bool:
        """Whether a call to ``model`` (None: the configured one) is shown images."""
        model = model if model is not None else self.model
        return model not in self._text_only and (not self.vision_models or model in self.vision_models)

    async def stream(
        self,
        history: Sequence[ChatMessage],
        *,
        model: str | None = None,
        system_prompt: str | None = None,
        temperature: float | None = None,
        images: Mapping[int, Sequence[str]] | None = None,
    ) -> AsyncIterator[str | Usage]:
        """The answer to ``history`` as it is written, piece by piece, then the tokens it took
        when the endpoint reports them. Where the endpoint cannot stream, one completion comes
        whole: the caller sees no difference but the wait. ``model``, ``system_prompt`` and
        ``temperature`` (a chat's settings) override the configured ones; None keeps them.
        ``images``: data URLs shown with the message of ``history`` at each index; raises
        ``ImagesRefused`` when the endpoint refuses them."""
        messages: list[Mapping[str, object]] = [
            {"role": "system", "content": system_prompt if system_prompt is not None else self.system_prompt},
            *history,
        ]
        for index, urls in (images or {}).items():
            text: dict[str, object] = {"type": "text", "text": history[index]["content"]}
            parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
            messages[index + 1] = {"role": history[index]["role"], "content": [text, *parts]}
        request = _Request(
            model if model is not None else self.model,
            cast(list[ChatCompletionMessageParam], messages),
            temperature if temperature is not None else self.temperature,
            images=bool(images),
        )
        answer = self._streamed(request) if self.streaming else self._whole(request)
        self._calls += 1
        try:
            async with contextlib.aclosing(answer) as pieces:
                async for piece in pieces:
                    yield piece
        finally:
            self._calls -= 1

    async def _streamed(self, request: _Request) -> AsyncGenerator[str | Usage, None]:
        """The answer as it streams, then its usage; whole, from now on, if the endpoint refuses to stream."""
        started = time.perf_counter()
        try:
            chunks = await self.client.post(
                COMPLETIONS,
                body={**self._body(request), "stream": True, "stream_options": {"include_usage": True}},
                cast_to=object,  # each chunk as parsed, no model built
                stream=True,
                stream_cls=openai.AsyncStream[object],
            )
        except openai.APIStatusError as error:
            self._refused_images(request, error)
            if error.status_code not in REFUSES_STREAMING:
                raise _failed(error, started) from error
            logger.warning("the endpoint refuses to stream (status %s): asking for whole answers", error.status_code)
            self.streaming = False
            async for piece in self._whole(request):
                yield piece
            return
        except openai.APIError as error:
            raise _failed(error, started) from error
        written, first, visible = 0, 0.0, False
        usage: Usage | None = None
        try:
            async with chunks:
                async for data in chunks:
                    chunk = cast(Chunk, data)
                    text = _text_of(chunk)
                    if text:
                        first = first or time.perf_counter() - started
                        written += len(text)
                        visible = visible or not text.isspace()
                        yield text
                    reported = chunk.get("usage")
                    if reported:  # the last chunk, when the endpoint reports usage
                        usage = Usage(reported.get("prompt_tokens"), reported.get("completion_tokens"))
        except openai.APIError as error:
            raise _failed(error, started) from error
        if not visible:
            logger.warning("LLM streamed an empty answer after %.2fs", time.perf_counter() - started)
            raise LLMError("empty answer")
        logger.info("LLM streamed %d chars in %.2fs (first after %.2fs)", written, time.perf_counter() - started, first)
        metrics.observe_stage("llm", time.perf_counter() - started)
        if usage is not None:
            metrics.count_tokens(usage.prompt_tokens, usage.completion_tokens)
            yield usage

    async def _whole(self, request: _Request) -> AsyncGenerator[str | Usage, None]:
        """The answer as one completion, then its usage, when reported."""
        started = time.perf_counter()
        try:
            response = await self.client.post(COMPLETIONS, body=self._body(request), cast_to=ChatCompletion)
        except openai.APIStatusError as error:
            self._refused_images(request, error)
            raise _failed(error, started) from error
        except openai.APIError as error:
            raise _failed(error, started) from error
        content = response.choices[0].message.content if response.choices else None
        if not content or not content.strip():
            logger.warning("LLM returned an empty answer after %.2fs", time.perf_counter() - started)
            raise LLMError("empty answer")
        logger.info("LLM answered: %d chars in %.2fs", len(content), time.perf_counter() - started)
        metrics.observe_stage("llm", time.perf_counter() - started)
        yield content
        if response.usage is not None:
            metrics.count_tokens(response.usage.prompt_tokens, response.usage.completion_tokens)
            yield Usage(response.usage.prompt_tokens, response.usage.completion_tokens)

    def _refused_images(self, request: _Request, error: openai.APIStatusError) -> None:
        """``ImagesRefused`` when a request with images was refused as a request (not a moment's
        trouble): the model is taken not to take images (endpoints word it differently)."""
        if request.images and error.status_code in REFUSES_STREAMING:
            logger.warning(
                "model %s refused images (status %s): text only from now on", request.model, error.status_code
            )
            self._text_only.add(request.model)
            raise ImagesRefused(request.model) from error

    def _body(self, request: _Request) -> dict[str, object]:
        return {
            "model": request.model,
            "messages": request.messages,
            "temperature": request.temperature,
            "max_tokens": self.max_tokens,
        }

    async def close(self) -> None:
        """Close the connections to the endpoint (at shutdown: aiohttp's are not left to the GC),
        unless a request is still under way: a turn that outlived the shutdown's wait keeps its
        answer coming until the process ends, and is recovered at the next start, as before."""
        if not self._calls:
            await self.client.close()

    async def context_lengths(self) -> dict[str, int]:
        """Each model's context length in tokens, where the endpoint's model list publishes it
        (OpenRouter's ``context_length``; OpenAI's list has none)."""
        lengths: dict[str, int] = {}
        self._calls += 1
        try:
            async for model in self.client.models.list():
                length = (model.model_extra or {}).get("context_length")
                if isinstance(length, int) and length > 0:
                    lengths[model.id] = length
        finally:
            self._calls -= 1
        return lengths


def _text_of(chunk: Chunk) -> str | None:
    """The text a streamed chunk adds, if any."""
    choices = chunk.get("choices")
    if not choices:
        return None
    text = (choices[0].get("delta") or {}).get("content")
    return text if isinstance(text, str) else None


def _failed(error: openai.APIError, started: float) -> LLMError:
    status = getattr(error, "status_code", None)
    metrics.observe_stage("llm", time.perf_counter() - started, error)
    logger.warning(
        "LLM call failed: %s status=%s after %.2fs", type(error).__name__, status, time.perf_counter() - started
    )
    return LLMError(type(error).__name__)


def create_llm(config: Config) -> LLM:
    """The LLM client described by ``config``; opens no connection until the first call.

    Its transport is aiohttp's (``openai[aiohttp]``), not the SDK's default httpx pool, which
    spends milliseconds of CPU per request choosing among a thousand open connections (the
    whole-bot benchmark at 1000 chats, README "Benchmarks"); timeouts keep their meaning (each
    read waits at most LLM_TIMEOUT_S)."""
    client = AsyncOpenAI(
        api_key=config.openai_api_key,
        base_url=config.openai_base_url,
        timeout=config.llm_timeout_s,
        max_retries=1,
        http_client=openai.DefaultAioHttpClient(),
    )
    return LLM(
        client=client,
        model=config.llm_model,
        temperature=config.llm_temperature,
        max_tokens=config.llm_max_tokens,
        system_prompt=config.system_prompt,
        streaming=config.llm_stream,
        vision_models=config.vision_models,
    )

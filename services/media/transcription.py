"""Voice messages as text: the OpenAI-compatible ``/audio/transcriptions`` endpoint
(``TRANSCRIPTION_MODEL``, e.g. ``whisper-1``; the LLM's base URL and key unless set apart)."""

from __future__ import annotations

import logging
import time

import openai
from openai import AsyncOpenAI

from config import Config
from services.ops import metrics

logger = logging.getLogger(__name__)


class TranscriptionFailed(Exception):
    """The endpoint gave no transcript: refused, failed or timed out."""


class Transcriber:
    """Transcribes audio with one model of one endpoint."""

    def __init__(self, client: AsyncOpenAI, model: str) -> None:
        self._client = client
        self._model = model

    async def transcribe(self, data: bytes, *, file_name: str, mime_type: str | None) -> str:
        """The text heard in ``data`` (possibly empty: nothing was said)."""
        started = time.perf_counter()
        try:
            result = await self._client.audio.transcriptions.create(
                model=self._model, file=(file_name, data, mime_type or "application/octet-stream")
            )
        except openai.APIError as error:
            metrics.observe_stage("transcription", time.perf_counter() - started, error)
            logger.warning("transcription failed: %s after %.2fs", type(error).__name__, time.perf_counter() - started)
            raise TranscriptionFailed(type(error).__name__) from error
        metrics.observe_stage("transcription", time.perf_counter() - started)
        logger.info(
            "transcribed %d bytes: %d chars in %.2fs", len(data), len(result.text), time.perf_counter() - started
        )
        return result.text.strip()

    async def close(self) -> None:
        await self._client.close()


def create_transcriber(config: Config) -> Transcriber | None:
    """The transcriber ``config`` describes; None when TRANSCRIPTION_MODEL is not set."""
    if not config.transcription_model:
        return None
    client = AsyncOpenAI(
        api_key=config.transcription_api_key,
        base_url=config.transcription_base_url,
        timeout=config.llm_timeout_s,
        max_retries=1,
    )
    return Transcriber(client, config.transcription_model)

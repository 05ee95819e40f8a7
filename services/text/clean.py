"""Text rules of Telegram and PostgreSQL: what can be stored, and how long one message may be
(splitting and formatting: ``services.text.formatting``)."""

from __future__ import annotations

import json
import re
from typing import Any

TELEGRAM_MESSAGE_LIMIT = 4096
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# How JSON spells what PostgreSQL cannot store (a NUL, any surrogate: a pair decodes to one code
# point, so a text with none of these escapes can hold neither).
_UNSTORABLE_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")


def storable(text: str) -> str:
    """``text`` with what PostgreSQL cannot store (NUL, lone surrogates) replaced by U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", text)


def _storable_values(value: Any) -> Any:
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {key: _storable_values(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_storable_values(item) for item in value]
    return value


def storable_json(text: str | bytes) -> Any:
    """``json.loads`` for everything Telegram sends (the Bot API session's, so updates by polling
    and webhook both): every string in it made ``storable``, once, at the edge, so no text,
    caption, quote, name, title or callback data reaching SQL or the LLM can hold a NUL or a lone
    surrogate. The common case, with no such escape in the text, costs one regex scan."""
    value = json.loads(text)
    raw = text if isinstance(text, str) else text.decode("utf-8", "replace")
    return _storable_values(value) if _UNSTORABLE_ESCAPE.search(raw) else value

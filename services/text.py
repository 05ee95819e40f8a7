"""Text rules of Telegram and PostgreSQL: what can be stored, and how long one message may be
(splitting and formatting: ``services.formatting``)."""

from __future__ import annotations

import re

TELEGRAM_MESSAGE_LIMIT = 4096
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> str:
    """``text`` with what PostgreSQL cannot store (NUL, lone surrogates) replaced by U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", text)

"""Text rules of Telegram and PostgreSQL: what can be stored, what fits in one message."""

from __future__ import annotations

import re

TELEGRAM_MESSAGE_LIMIT = 4096
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> str:
    """``text`` with what PostgreSQL cannot store (NUL, lone surrogates) replaced by U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", text)


def telegram_length(text: str) -> int:
    """Length as Telegram counts it: UTF-16 code units (an emoji outside the BMP counts 2)."""
    return len(text.encode("utf-16-le")) // 2


def split_message(text: str, limit: int = TELEGRAM_MESSAGE_LIMIT) -> list[str]:
    """Split ``text`` into parts Telegram accepts, preferring paragraph, then line, then word
    boundaries; a part is never empty and never longer than ``limit``."""
    parts: list[str] = []
    rest = text
    while telegram_length(rest) > limit:
        head = _prefix_within(rest, limit)
        cut = _last_boundary(head)
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip("\n ")
    parts.append(rest)
    return [part for part in parts if part.strip()] or [text[:limit]]


def _prefix_within(text: str, limit: int) -> str:
    """The longest prefix of ``text`` within ``limit`` UTF-16 units, never splitting a character."""
    units = 0
    for index, char in enumerate(text):
        units += 2 if ord(char) > 0xFFFF else 1
        if units > limit:
            return text[:index]
    return text


def _last_boundary(head: str) -> int:
    # Prefer breaks in the later half so parts stay reasonably full.
    floor = len(head) // 2
    for separator in ("\n\n", "\n", " "):
        at = head.rfind(separator)
        if at > floor:
            return at + len(separator)
    return len(head)

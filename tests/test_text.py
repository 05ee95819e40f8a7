"""services.text: what PostgreSQL can store and how answers fit Telegram's limit."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.text import TELEGRAM_MESSAGE_LIMIT, split_message, storable, telegram_length


def test_storable_replaces_nul_and_lone_surrogates_only() -> None:
    assert storable("a\x00b") == "a\ufffdb"
    assert storable("x\ud800y\udfff") == "x\ufffdy\ufffd"
    kept = "Привет 👍🏽 שלום '; DROP TABLE users; -- \t\n"
    assert storable(kept) == kept


def test_telegram_counts_utf16_units() -> None:
    assert telegram_length("abc") == 3
    assert telegram_length("👍") == 2
    assert telegram_length("я") == 1


def test_short_text_is_one_part() -> None:
    assert split_message("hello") == ["hello"]


def test_split_prefers_paragraphs_then_lines_then_words() -> None:
    text = "a" * 60 + "\n\n" + "b" * 60
    assert split_message(text, limit=100) == ["a" * 60, "b" * 60]
    text = "a" * 60 + "\n" + "b" * 60
    assert split_message(text, limit=100) == ["a" * 60, "b" * 60]
    text = "word " * 50
    parts = split_message(text, limit=100)
    assert all(len(p) <= 100 and not p.startswith(" ") for p in parts)
    assert " ".join(parts).split() == text.split()


def test_text_without_boundaries_is_cut_hard() -> None:
    assert split_message("x" * 250, limit=100) == ["x" * 100, "x" * 100, "x" * 50]


def test_emoji_are_never_cut_in_half() -> None:
    parts = split_message("👍" * 3000)
    assert all(telegram_length(p) <= TELEGRAM_MESSAGE_LIMIT for p in parts)
    assert "".join(parts) == "👍" * 3000


@given(st.text(min_size=1, max_size=3000).filter(str.strip), st.integers(min_value=10, max_value=500))
def test_parts_fit_and_lose_no_words(text: str, limit: int) -> None:
    parts = split_message(text, limit=limit)
    assert parts and all(0 < telegram_length(p) <= limit for p in parts)
    assert "".join("".join(parts).split()) == "".join(text.split())

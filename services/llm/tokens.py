"""Token estimates: how much of a model's context a text takes, before any endpoint says.

The estimate is a text's UTF-8 bytes over four, plus what a chat format spends on each message.
Byte length tracks tokenizers across scripts better than characters do: a token is about four
letters of English, two Cyrillic letters (two bytes each), one CJK character (three bytes).
Tokenizers differ by model (and OpenRouter serves many), so the budget corrects this estimate
by the ratio the endpoint's reported ``prompt_tokens`` show (``services.llm.budget``). A tokenizer
library would be exact for one family only, and tiktoken fetches its tables from the network on
first use, which an offline deployment cannot.
"""

from __future__ import annotations

BYTES_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4  # a chat format's tokens around each message: its role and separators


def estimate_tokens(text: str) -> int:
    """The estimated tokens of one message with ``text``."""
    size = len(text.encode("utf-8", "replace"))
    return -(-size // BYTES_PER_TOKEN) + MESSAGE_OVERHEAD

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


# An image's tokens, as OpenAI prices one at high detail: scaled to fit 2048×2048, then its
# shorter side to 768, it costs 170 tokens per 512-pixel tile and 85 more
# (https://platform.openai.com/docs/guides/images-vision, "Calculating costs"). Other vision
# models count differently; the calibration by reported tokens corrects the estimate as for text.
IMAGE_BASE_TOKENS = 85
IMAGE_TILE_TOKENS = 170
UNKNOWN_IMAGE_SIDE = 1024  # an image whose size is not known is estimated as 1024×1024


def image_tokens(width: int | None, height: int | None) -> int:
    """The estimated tokens of one image of ``width``×``height`` pixels (None: not known)."""
    if not width or not height:
        width = height = UNKNOWN_IMAGE_SIDE
    scale = min(1.0, 2048 / max(width, height))
    scale *= min(1.0, 768 / (min(width, height) * scale))
    tiles = -(-int(width * scale) // 512) * -(-int(height * scale) // 512)
    return IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * tiles

"""Everything the bot does not read: stickers, locations, polls, contacts..., and voice messages
when nothing transcribes them."""

from __future__ import annotations

from aiogram import Router
from aiogram.types import Message

TEXT_ONLY = "I read text, photos, voice messages and text or PDF files, not this. Please describe it in words."
NOT_HEARD = "I can't listen to voice messages here. Please type it instead."


async def on_unsupported(message: Message) -> None:
    await message.answer(TEXT_ONLY)


def create_router() -> Router:
    router = Router(name=__name__)
    router.message.register(on_unsupported)
    return router

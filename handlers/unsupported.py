"""Everything that is not text: photos, stickers, voice, documents, locations..."""

from __future__ import annotations

from aiogram import Router
from aiogram.types import Message

TEXT_ONLY = "I can only read text messages for now. Please describe it in words."


async def on_unsupported(message: Message) -> None:
    await message.answer(TEXT_ONLY)


def create_router() -> Router:
    router = Router(name=__name__)
    router.message.register(on_unsupported)
    return router

"""/start, /help, /clear, and a reply to commands the bot does not know."""

from __future__ import annotations

import logging

from aiogram import F, Router
from aiogram.filters import Command, CommandStart
from aiogram.types import BotCommand, Message, User

from services.turns import Turns

logger = logging.getLogger(__name__)

COMMANDS = [
    BotCommand(command="start", description="Start a conversation"),
    BotCommand(command="help", description="What I can do"),
    BotCommand(command="clear", description="Forget our conversation in this chat"),
]
HELP = (
    "I'm an AI assistant. Write to me and I'll answer, remembering our conversation "
    "(even after I restart).\n\n" + "\n".join(f"/{c.command} — {c.description}" for c in COMMANDS)
)


async def cmd_start(message: Message, event_from_user: User, turns: Turns) -> None:
    await turns.register(user_id=event_from_user.id, first_name=event_from_user.first_name, chat_id=message.chat.id)
    await message.answer(f"Hello, {event_from_user.first_name}! {HELP}")


async def cmd_help(message: Message) -> None:
    await message.answer(HELP)


async def cmd_clear(message: Message, event_from_user: User, turns: Turns) -> None:
    cleared = await turns.clear(user_id=event_from_user.id, chat_id=message.chat.id)
    logger.info("user %s cleared %d message(s) in chat %s", event_from_user.id, cleared, message.chat.id)
    if cleared:
        await message.answer(f"Done: I forgot {cleared} message(s). Let's start over.")
    else:
        await message.answer("There was nothing to forget.")


async def cmd_unknown(message: Message) -> None:
    await message.answer("I don't know that command. /help lists the ones I do.")


def create_router() -> Router:
    router = Router(name=__name__)
    router.message.register(cmd_start, CommandStart())
    router.message.register(cmd_help, Command("help"))
    router.message.register(cmd_clear, Command("clear"))
    router.message.register(cmd_unknown, F.text.startswith("/"))
    return router

"""/start, /help, /clear, /cancel, the command menu, and a reply to commands the bot does not know.

A message is a command when Telegram says so: a ``bot_command`` entity at its start. Text that
merely begins with a slash ("/usr/bin is…") is ordinary text, answered like any other. In a
group, a command addressed to another bot (``/weather@other_bot``) is not ours: it is ignored.
"""

from __future__ import annotations

import logging
import re

from aiogram import Router
from aiogram.enums import MessageEntityType
from aiogram.filters import Command, CommandStart
from aiogram.types import BotCommand, Message, User

from handlers.filters import may_be_command
from services.turn.turns import Turns

logger = logging.getLogger(__name__)

COMMANDS = [
    BotCommand(command="start", description="Start a conversation"),
    BotCommand(command="help", description="What I can do"),
    BotCommand(command="clear", description="Forget our conversation in this chat"),
    BotCommand(command="cancel", description="Stop the answer I am writing"),
    BotCommand(command="retry", description="Answer your last message again"),
    BotCommand(command="undo", description="Take back your last message and my answer"),
    BotCommand(command="search", description="Find words in our conversation here"),
    BotCommand(command="export", description="Send our conversation here as a file (/export json)"),
    BotCommand(command="stats", description="How much we have talked"),
    BotCommand(command="context", description="How much of our conversation I can take in now"),
    BotCommand(command="remember", description="Keep a fact about you for all our chats (/remember text)"),
    BotCommand(command="memory", description="What I remember about you (/memory forget, /memory groups on|off)"),
    BotCommand(command="model", description="Show or switch the model of this chat (/model name)"),
    BotCommand(command="prompt", description="Show or set this chat's own prompt (/prompt reset)"),
    BotCommand(command="temperature", description="Show or set the temperature here, 0 to 2"),
]
HELP = (
    "I'm an AI assistant. Write to me and I'll answer, remembering our conversation "
    "(even after I restart).\n\n"
    + "\n".join(f"/{c.command} — {c.description}" for c in COMMANDS)
    + "\n\nRight after /clear, /undo brings the cleared conversation back (only the last /clear). "
    "Edit your last message and I'll answer it again. /search all … looks in cleared messages too. "
    "What you tell me with /remember I keep in mind in our private chat, and in groups only after "
    "/memory groups on. "
    "In a group, only its administrators can change /model, /prompt and /temperature."
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


async def cmd_cancel(message: Message, event_from_user: User, turns: Turns) -> None:
    # Stopped: what was written so far is delivered as the answer, which is reply enough.
    if not await turns.stop(chat_id=message.chat.id, user_id=event_from_user.id):
        await message.answer("There is no answer being written to stop.")


async def cmd_unknown(message: Message) -> None:
    await message.answer("I don't know that command. /help lists the ones I do.")


async def cmd_for_another_bot(message: Message) -> None:
    logger.info("ignored message %s in chat %s: a command for another bot", message.message_id, message.chat.id)


async def starts_with_command(message: Message) -> bool:
    """Whether Telegram marked the message as starting with a bot command."""
    return any(e.type == MessageEntityType.BOT_COMMAND and e.offset == 0 for e in message.entities or ())


ANY_COMMAND = re.compile(r".+")


def create_router() -> Router:
    router = Router(name=__name__)
    router.message.filter(may_be_command)
    router.message.register(cmd_start, CommandStart())
    router.message.register(cmd_help, Command("help"))
    router.message.register(cmd_clear, Command("clear"))
    router.message.register(cmd_cancel, Command("cancel"))
    # Command() matches "/cmd" and "/cmd@<this bot>" only (it asks Telegram for the bot's name once).
    router.message.register(cmd_unknown, starts_with_command, Command(ANY_COMMAND))
    router.message.register(cmd_for_another_bot, starts_with_command, Command(ANY_COMMAND, ignore_mention=True))
    return router

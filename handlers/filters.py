"""Filters shared by the routers: what may be a command, what in a group is addressed to the bot."""

from __future__ import annotations

from aiogram import Bot
from aiogram.enums import ChatType, MessageEntityType
from aiogram.filters import Filter
from aiogram.types import Message


async def may_be_command(message: Message) -> bool:
    """What any ``Command`` filter could match: a text or caption that starts with "/". Set on the
    message observer of a router of commands, it spares a plain message every one of their
    checks (some twenty per message, each parsing the text). A coroutine, as every filter here:
    aiogram runs a plain function in a thread (``asyncio.to_thread``)."""
    return (message.text or message.caption or "").startswith("/")


class AddressedInGroups(Filter):
    """With GROUP_TRIGGER=mention, set on the dispatcher's messages: private messages pass, and
    in groups only what is addressed to the bot (a command for it, a mention of the bot, a reply
    to one of its messages). The rest of a group's talk is not the bot's business: nothing is
    stored or said."""

    async def __call__(self, message: Message, bot: Bot) -> bool:
        return message.chat.type == ChatType.PRIVATE or await addressed(message, bot)


async def addressed(message: Message, bot: Bot) -> bool:
    """Whether a group message starts with a command (``/x``, ``/x@this_bot``, not
    ``/x@other_bot``), mentions the bot or replies to it."""
    me = await bot.me()  # cached by aiogram after the first call
    replied = replied_to(message)
    if replied is not None and replied.from_user is not None and replied.from_user.id == me.id:
        return True
    text = message.text or message.caption or ""
    mention = f"@{me.username}".lower()
    for entity in message.entities or message.caption_entities or ():
        if (
            (
                entity.type == MessageEntityType.BOT_COMMAND
                and entity.offset == 0
                and entity.extract_from(text).partition("@")[2].lower() in ("", mention[1:])
            )
            or (entity.type == MessageEntityType.MENTION and entity.extract_from(text).lower() == mention)
            or (entity.type == MessageEntityType.TEXT_MENTION and entity.user is not None and entity.user.id == me.id)
        ):
            return True
    return False


def replied_to(message: Message) -> Message | None:
    """The message ``message`` replies to; in a forum topic, not the topic's first message, which
    Telegram sets as the reply of every message in the topic."""
    replied = message.reply_to_message
    if replied is None or (message.is_topic_message and replied.message_id == message.message_thread_id):
        return None
    return replied

"""Memories the user controls: /remember keeps a fact about the user, /memory lists them (each
with a "Forget" button), /memory forget forgets them all, /memory groups on|off lets them into
group chats or not.

A user's memories are theirs, not a chat's: the same in every chat, read by every turn of a
private chat and, only when they said so, of a group (``services.database._MEMORIES``). The list
is shown only in a private chat, so no group reads what someone told the bot in private; a
button forgets only its presser's own memory. They need the database: while it is out (or
disabled) the error handlers answer instead (``handlers.errors``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from aiogram import Router
from aiogram.enums import ChatType
from aiogram.exceptions import TelegramAPIError
from aiogram.filters import Command, CommandObject
from aiogram.filters.callback_data import CallbackData
from aiogram.types import CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Message, User

from handlers.filters import may_be_command
from services import context
from services.database import MAX_MEMORIES, MAX_MEMORY_CHARS, Memory, Pool
from services.fallback.storage import Storage
from services.text.clean import TELEGRAM_MESSAGE_LIMIT

logger = logging.getLogger(__name__)

BUTTONS_PER_ROW = 5

REMEMBER_USAGE = "Tell me what to remember about you: /remember I am vegetarian. /memory lists what I remember."
MEMORY_USAGE = (
    "/memory lists what I remember about you; /memory forget forgets all of it; "
    "/memory groups on (or off) lets it into group chats (or keeps it to our private chat)."
)
NOTHING_REMEMBERED = "I don't remember anything about you yet. Tell me with /remember …"
FULL = (
    f"I already remember {MAX_MEMORIES} things about you, as many as I keep. Send /memory and forget one to make room."
)
PRIVATE_LIST = "What I remember about you is private: send /memory to me in a private chat to see it."
NOT_YOURS = "These are someone else's memories: only they can forget them."
IN_GROUPS = {
    True: "In groups: on, I use them in group chats too (/memory groups off keeps them to our private chat).",
    False: "In groups: off, I use them only in our private chat (/memory groups on lets them into groups).",
}
GROUPS_SET = {
    True: "From now on I use what I remember about you in group chats too.",
    False: "From now on I keep what I remember about you to our private chat.",
}


class MemoryForget(CallbackData, prefix="mf"):
    """A "Forget N" button of /memory's list: whose list it is and the memory's id (not its
    number, so an old list still forgets the memory it showed)."""

    user_id: int
    memory_id: int


def too_long(length: int) -> str:
    return f"That is {length:,} characters; a memory holds at most {MAX_MEMORY_CHARS}. Please make it shorter."


def forgot_report(forgotten: int) -> str:
    if not forgotten:
        return "There was nothing to forget."
    return f"Done: I forgot {forgotten} {'memory' if forgotten == 1 else 'memories'} about you."


def _units(text: str) -> int:
    """``text``'s length as Telegram counts it (UTF-16 units)."""
    return sum(2 if ord(char) > 0xFFFF else 1 for char in text)


def _shortened(text: str, units: int) -> str:
    """``text`` on one line, within ``units`` UTF-16 units: cut with "…" when longer."""
    line = " ".join(text.split())
    if _units(line) <= units:
        return line
    kept = total = 0
    for char in line:
        width = 2 if ord(char) > 0xFFFF else 1
        if total + width > units - 1:
            break
        total, kept = total + width, kept + 1
    return line[:kept].rstrip() + "…"


def memory_report(memories: Sequence[Memory], in_groups: bool) -> str:
    """/memory as one message: the memories numbered, oldest first (each cut to what fits one
    Telegram message with the rest), and the groups setting in one line."""
    footer = IN_GROUPS[in_groups]
    if not memories:
        return f"{NOTHING_REMEMBERED}\n\n{footer}"
    header = f"What I remember about you ({len(memories)} of {MAX_MEMORIES}):"
    room = TELEGRAM_MESSAGE_LIMIT - _units(header) - _units(footer) - 2  # the blank line before the footer
    each = room // len(memories) - len(f"\n{len(memories)}. ")
    lines = [f"{number}. {_shortened(m.content, each)}" for number, m in enumerate(memories, 1)]
    return "\n".join([header, *lines, "", footer])


def memory_keyboard(memories: Sequence[Memory], user_id: int) -> InlineKeyboardMarkup | None:
    """A "Forget N" button per memory, ``BUTTONS_PER_ROW`` to a row; None without memories."""
    buttons = [
        InlineKeyboardButton(
            text=f"Forget {number}", callback_data=MemoryForget(user_id=user_id, memory_id=m.id).pack()
        )
        for number, m in enumerate(memories, 1)
    ]
    if not buttons:
        return None
    return InlineKeyboardMarkup(
        inline_keyboard=[buttons[start : start + BUTTONS_PER_ROW] for start in range(0, len(buttons), BUTTONS_PER_ROW)]
    )


async def _listed(pool: Pool, user_id: int) -> tuple[str, InlineKeyboardMarkup | None]:
    """The user's /memory message and its keyboard, as stored now."""
    memories = await context.list_memories(pool, telegram_user_id=user_id)
    in_groups = await context.get_memories_in_groups(pool, telegram_user_id=user_id)
    return memory_report(memories, in_groups), memory_keyboard(memories, user_id)


async def cmd_remember(message: Message, command: CommandObject, event_from_user: User, dialog_store: Storage) -> None:
    text = (command.args or "").strip()
    if not text:
        await message.answer(REMEMBER_USAGE)
        return
    if len(text) > MAX_MEMORY_CHARS:  # code points, as char_length counts them
        await message.answer(too_long(len(text)))
        return
    async with dialog_store.database() as pool:
        memory_id = await context.add_memory(
            pool, telegram_user_id=event_from_user.id, first_name=event_from_user.first_name, content=text
        )
    if memory_id is None:
        logger.info("user %s: /remember refused, %d memories kept already", event_from_user.id, MAX_MEMORIES)
        await message.answer(FULL)
        return
    logger.info("user %s in chat %s: memory %s kept (%d chars)", event_from_user.id, message.chat.id, memory_id,
                len(text))  # fmt: skip
    await message.answer(f"📝 Noted: {text}")


async def cmd_memory(message: Message, command: CommandObject, event_from_user: User, dialog_store: Storage) -> None:
    """/memory, /memory forget, /memory groups on|off."""
    args = (command.args or "").strip().lower().split()
    if args == ["forget"]:
        async with dialog_store.database() as pool:
            forgotten = await context.forget_memories(pool, telegram_user_id=event_from_user.id)
        logger.info("user %s: forgot %d memories", event_from_user.id, forgotten)
        await message.answer(forgot_report(forgotten))
    elif args in (["groups", "on"], ["groups", "off"]):
        allowed = args[1] == "on"
        async with dialog_store.database() as pool:
            await context.set_memories_in_groups(pool, telegram_user_id=event_from_user.id, allowed=allowed)
        logger.info("user %s: memories in groups %s", event_from_user.id, args[1])
        await message.answer(GROUPS_SET[allowed])
    elif args == ["groups"]:
        async with dialog_store.database() as pool:
            in_groups = await context.get_memories_in_groups(pool, telegram_user_id=event_from_user.id)
        await message.answer(IN_GROUPS[in_groups])
    elif args:
        await message.answer(MEMORY_USAGE)
    elif message.chat.type != ChatType.PRIVATE:
        await message.answer(PRIVATE_LIST)
    else:
        async with dialog_store.database() as pool:
            text, keyboard = await _listed(pool, event_from_user.id)
        await message.answer(text, reply_markup=keyboard)


async def on_forget(callback: CallbackQuery, callback_data: MemoryForget, dialog_store: Storage) -> None:
    """A "Forget N" button: the presser's own memory only (the statement checks it too), then the
    list as it now stands."""
    user_id = callback.from_user.id
    if user_id != callback_data.user_id:
        logger.info("user %s pressed a Forget button of another user's list", user_id)
        await callback.answer(NOT_YOURS, show_alert=True)
        return
    async with dialog_store.database() as pool:
        forgotten = await context.forget_memory(pool, telegram_user_id=user_id, memory_id=callback_data.memory_id)
        text, keyboard = await _listed(pool, user_id)
    logger.info("user %s: memory %s forgotten (%s)", user_id, callback_data.memory_id, forgotten)
    await callback.answer("Forgotten." if forgotten else "That one was forgotten already.")
    message = callback.message
    if isinstance(message, Message):  # an inaccessible (too old) message cannot be edited
        try:
            await message.edit_text(text, reply_markup=keyboard)
        except TelegramAPIError as error:  # forgotten all the same; only the list is out of date
            logger.info("could not update the /memory list in chat %s: %s", message.chat.id, type(error).__name__)


def create_router() -> Router:
    router = Router(name=__name__)
    router.message.filter(may_be_command)
    router.message.register(cmd_remember, Command("remember"))
    router.message.register(cmd_memory, Command("memory"))
    router.callback_query.register(on_forget, MemoryForget.filter())
    return router

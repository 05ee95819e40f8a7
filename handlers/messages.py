"""Text messages: the conversation itself."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime, timedelta

from aiogram import Bot, Router
from aiogram.enums import ChatType, MessageEntityType
from aiogram.types import Message, MessageGenerationStopped, User

from handlers.filters import replied_to
from services.turn.delivery import Address
from services.turn.turns import Turns

logger = logging.getLogger(__name__)
SLOW_DOWN = "You're writing faster than I can think. Please slow down and try again in a minute."
EMPTY = "Send me some text and I'll answer."
QUOTE_CHARS = 4000
JOINS_LEFT = ",.;:!?)"  # after a mention taken out, these close up to the word before


def until_next_utc_day(now: datetime) -> timedelta:
    """Time from ``now`` (aware) to the next 00:00 UTC, when the daily token budget resets."""
    now = now.astimezone(UTC)
    return datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC) - now


def over_budget_reply(now: datetime) -> str:
    """What a user over the daily token budget is told: when it resets, roughly."""
    left = until_next_utc_day(now).total_seconds()
    minutes = math.ceil(left / 60)
    if minutes < 60:
        when = f"about {minutes} minute{'s' if minutes != 1 else ''}"
    else:
        hours = round(left / 3600)
        when = f"about {hours} hour{'s' if hours != 1 else ''}"
    return f"You've used today's token budget. It resets at 00:00 UTC, in {when}."


def address_of(message: Message) -> Address:
    """Where the answers to ``message`` go: its chat and topic; in groups they quote it, so each
    user sees which answer is theirs."""
    return Address(
        chat_id=message.chat.id,
        thread_id=message.message_thread_id if message.is_topic_message else None,
        reply_to=message.message_id if message.chat.type != ChatType.PRIVATE else None,
    )


def quoted_in(message: Message) -> str | None:
    """The text the user replies to (the part they quoted, else the whole message): stored with
    the question, its turn's context shows it before the question."""
    if message.quote is not None:
        return message.quote.text[:QUOTE_CHARS]
    replied = replied_to(message)
    text = replied.text or replied.caption if replied is not None else None
    return text[:QUOTE_CHARS] if text else None


def asked(message: Message, me: User) -> str:
    """The text (or caption) of ``message`` without the bot's own mentions (``@its_username``, any case, as
    Telegram marks them): what the LLM reads and what is stored (the stored question is every
    later turn's context). In a group the mention only says who is asked."""
    text = message.text or message.caption or ""  # made storable at the edge (services.text.clean.storable_json)
    if not me.username:
        return text
    mention = f"@{me.username}".lower()
    units = text.encode("utf-16-le")  # entity offsets count UTF-16 code units
    spans = [
        (len(units[: e.offset * 2].decode("utf-16-le")), len(units[: (e.offset + e.length) * 2].decode("utf-16-le")))
        for e in message.entities or message.caption_entities or ()
        if e.type == MessageEntityType.MENTION and e.extract_from(text).lower() == mention
    ]
    for start, end in sorted(spans, reverse=True):
        before, after = text[:start].rstrip(" "), text[end:].lstrip(" ")
        if not before:
            after = after.lstrip(" ,:;")  # "@bot, what is…" asks "what is…"
        closes = not before or not after or before[-1].isspace() or after[0].isspace() or after[0] in JOINS_LEFT
        text = before + ("" if closes else " ") + after
    return text.strip() if spans else text


async def on_text(message: Message, event_from_user: User, bot: Bot, turns: Turns) -> None:
    text = asked(message, await bot.me())  # bot.me(): cached since start-up
    if not text.strip():
        await message.answer(EMPTY)
        return
    # Refused (RateLimited, OverBudget): the reply comes from handlers.errors, as for every door.
    await turns.ask(
        user_id=event_from_user.id,
        first_name=event_from_user.first_name,
        address=address_of(message),
        telegram_message_id=message.message_id,
        text=text,
        quoted=quoted_in(message),
    )


async def on_generation_stopped(event: MessageGenerationStopped, turns: Turns) -> None:
    """The user pressed the draft's stop button: what was written so far becomes the answer."""
    await turns.stop(chat_id=event.chat.id, ident=event.draft_id)


async def has_text(message: Message) -> bool:
    """A text message. A coroutine, as every filter on this path: aiogram runs a plain function
    (``F.text``) in a thread, which costs a text message more than its filter does."""
    return message.text is not None


def create_router() -> Router:
    router = Router(name=__name__)
    # Stored once by its own key and answered once by the chat's lease: no update claim needed.
    router.message.register(on_text, has_text, flags={"idempotent": True})
    router.stopped_message_generation.register(on_generation_stopped, flags={"idempotent": True})
    return router

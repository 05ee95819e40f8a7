"""handlers/settings.py's pieces on their own: ``CanChangeSettings`` in a real Dispatcher (the
errors router answering its refusals), over real HTTP to the Telegram stand-in, no database; and
``ModelChoice``, the /model keyboard's callback data."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiogram import Bot, Dispatcher, Router
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.filters import Command
from aiogram.types import CallbackQuery, Message, Update

from bench.standins import BOT_USER, TelegramStandIn
from handlers import errors
from handlers.settings import ADMINS_ONLY, CANNOT_CHECK, CanChangeSettings, ChatAdmins, ModelChoice, model_key
from tests.harness import TOKEN

GROUP = -100777
ADMIN, MEMBER = 7, 8
CHANGED = "changed"
_update_ids = itertools.count(1)


async def change(message: Message) -> None:
    await message.answer(CHANGED)


async def press(callback: CallbackQuery) -> None:
    await callback.answer(CHANGED)


async def fell_through(event: Message | CallbackQuery) -> None:
    raise AssertionError("a refused change reached another handler")


@pytest.fixture
async def bot(telegram: TelegramStandIn) -> AsyncIterator[Bot]:
    """A plain Bot: without create_bot's session middlewares, a refused getChatMember is refused again."""
    bot = Bot(TOKEN, session=AiohttpSession(api=TelegramAPIServer.from_base(telegram.url)))
    yield bot
    await bot.session.close()


@pytest.fixture
def dp(bot: Bot) -> Dispatcher:
    """The errors router, then a change guarded by the filter, then a catch-all that must stay idle."""
    router = Router()
    router.message.register(change, Command("change"), CanChangeSettings())
    router.callback_query.register(press, CanChangeSettings("model"))
    router.message.register(fell_through)
    router.callback_query.register(fell_through)
    dp = Dispatcher(chat_admins=ChatAdmins(bot))
    dp.include_routers(errors.create_router(), router)
    return dp


def message_update(telegram: TelegramStandIn, chat_id: int, user_id: int) -> Update:
    message = telegram.message("/change", chat_id=chat_id, user_id=user_id)
    message["entities"] = [{"type": "bot_command", "offset": 0, "length": len("/change")}]
    return Update.model_validate({"update_id": next(_update_ids), "message": message})


def callback_update(chat_id: int, user_id: int) -> Update:
    chat = {"id": chat_id, "type": "private"} if chat_id > 0 else {"id": chat_id, "type": "supergroup", "title": "G"}
    message = {"message_id": 1, "date": 1, "chat": chat, "from": BOT_USER, "text": "Choose:"}
    callback = {"id": f"cb-{user_id}", "from": {"id": user_id, "is_bot": False, "first_name": "Ann"},
                "chat_instance": "x", "message": message, "data": model_key("m")}  # fmt: skip
    return Update.model_validate({"update_id": next(_update_ids), "callback_query": callback})


async def said(telegram: TelegramStandIn, dp: Dispatcher, bot: Bot, update: Update) -> tuple[str, Any]:
    """What the bot answered ``update`` with: (the text, show_alert) of its one reply."""
    before = len(telegram.sent)
    await dp.feed_update(bot, update)
    [reply] = [s for s in telegram.sent[before:] if s.method in ("sendMessage", "answerCallbackQuery")]
    return str(reply.params["text"]), reply.params.get("show_alert")


async def test_an_administrator_passes_a_member_is_told_only_administrators_may(
    telegram: TelegramStandIn, dp: Dispatcher, bot: Bot
) -> None:
    telegram.member_status[(GROUP, ADMIN)] = "administrator"
    telegram.member_status[(GROUP, 9)] = "creator"
    assert await said(telegram, dp, bot, message_update(telegram, GROUP, ADMIN)) == (CHANGED, None)
    assert await said(telegram, dp, bot, message_update(telegram, GROUP, 9)) == (CHANGED, None)
    assert await said(telegram, dp, bot, message_update(telegram, GROUP, MEMBER)) == (ADMINS_ONLY, None)
    assert await said(telegram, dp, bot, callback_update(GROUP, MEMBER)) == (ADMINS_ONLY, "true")
    assert await said(telegram, dp, bot, callback_update(GROUP, ADMIN)) == (CHANGED, None)
    # in a private chat the user always may: Telegram is not asked
    assert await said(telegram, dp, bot, message_update(telegram, 1, 1)) == (CHANGED, None)
    asked = sorted(int(c.params["user_id"]) for c in telegram.calls("getChatMember"))
    assert asked == [ADMIN, MEMBER, 9]  # each answer remembered


async def test_when_telegram_cannot_tell_the_user_is_asked_to_try_again(
    telegram: TelegramStandIn, dp: Dispatcher, bot: Bot
) -> None:
    telegram.unknown_methods.add("getChatMember")
    assert await said(telegram, dp, bot, message_update(telegram, GROUP, ADMIN)) == (CANNOT_CHECK, None)
    assert await said(telegram, dp, bot, callback_update(GROUP, ADMIN)) == (CANNOT_CHECK, "true")
    telegram.unknown_methods.clear()  # a failure is not remembered: the next change asks again
    telegram.member_status[(GROUP, ADMIN)] = "administrator"
    assert await said(telegram, dp, bot, message_update(telegram, GROUP, ADMIN)) == (CHANGED, None)


@pytest.mark.parametrize("model", ["stand-in", "other/model-b", "x" * 200])
def test_model_choice_round_trips_in_the_bytes_of_the_hand_built_data(model: str) -> None:
    data = model_key(model)
    assert data == "md:" + hashlib.sha256(model.encode()).hexdigest()[:16]  # buttons already sent still work
    assert len(data.encode()) <= 64  # Telegram's limit, whatever the name's length
    assert ModelChoice.unpack(data) == ModelChoice.of(model)
    assert ModelChoice.unpack(data) != ModelChoice.of(model + "-other")

"""A chat's settings: /model (an inline keyboard of ALLOWED_MODELS, or /model <name>), /prompt
(the chat's instructions, sent after the operator's SYSTEM_PROMPT) and /temperature.

Anyone may see them; in a group only its administrators may change them (Telegram's
``getChatMember``, remembered for a minute), in a private chat the user always may. A change
applies from the chat's next turn. They need the database: while it is out (or disabled) the
error handlers answer instead (``handlers.errors``), and turns use the configuration's defaults.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiogram import Bot, Router
from aiogram.enums import ChatMemberStatus, ChatType
from aiogram.exceptions import TelegramAPIError
from aiogram.filters import Command, CommandObject, Filter
from aiogram.filters.callback_data import CallbackData
from aiogram.types import CallbackQuery, Chat, InlineKeyboardButton, InlineKeyboardMarkup, Message, User

from config import Config
from handlers.filters import may_be_command
from services import context
from services.fallback.storage import Storage
from services.records import ChatSettings, SettingName

logger = logging.getLogger(__name__)

MODEL_NAME_SHOWN = 100  # characters of an unknown model's name echoed back
PROMPT_MAX_CHARS = 4000  # the CHECK of chat_settings.system_prompt
ADMINS_TTL_S = 60.0
ADMINS_CACHE_MAX = 10_000  # remembered (chat, user) answers; past it, the expired ones go
ADMIN_STATUSES = (ChatMemberStatus.CREATOR, ChatMemberStatus.ADMINISTRATOR)

ADMINS_ONLY = "Only this group's administrators can change its settings."
CANNOT_CHECK = "I couldn't check whether you are an administrator here. Please try again in a moment."
STALE_CHOICE = "That choice is not offered any more: nothing changed. Send /model for the current list."
PROMPT_USAGE = "/prompt <text> sets this chat's prompt, added after the bot's own; /prompt reset removes it."
NO_PROMPT = "This chat has no prompt of its own."
TEMPERATURE_USAGE = "/temperature 0.3 sets it (0 to 2) for this chat; /temperature reset goes back to the default."


class ChatAdmins:
    """Whether a user may change a chat's settings: always in a private chat; in a group, when
    Telegram says they are its creator or an administrator. Answers are remembered per (chat,
    user) for ``ttl_s``, so a burst of button presses asks Telegram once."""

    def __init__(self, bot: Bot, ttl_s: float = ADMINS_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._bot = bot
        self._ttl_s = ttl_s
        self._clock = clock
        self._known: dict[tuple[int, int], tuple[float, bool]] = {}  # (chat, user) -> (expires, admin)

    async def may_change(self, chat: Chat, user_id: int) -> bool:
        """Raises ``TelegramAPIError`` when Telegram cannot say."""
        if chat.type == ChatType.PRIVATE:
            return True
        now = self._clock()
        known = self._known.get((chat.id, user_id))
        if known is not None and known[0] > now:
            return known[1]
        member = await self._bot.get_chat_member(chat.id, user_id)
        admin = member.status in ADMIN_STATUSES
        if len(self._known) >= ADMINS_CACHE_MAX:
            self._known = {key: value for key, value in self._known.items() if value[0] > now}
        self._known[(chat.id, user_id)] = (now + self._ttl_s, admin)
        return admin


class ModelChoice(CallbackData, prefix="md"):
    """A button of /model's keyboard: ``md:`` and a short hash of the model's name (a name can be
    longer than the 64 bytes Telegram allows in callback data). The same bytes as the
    hand-built data before it, so keyboards already sent keep working."""

    key: str

    @classmethod
    def of(cls, model: str) -> ModelChoice:
        return cls(key=hashlib.sha256(model.encode()).hexdigest()[:16])


def model_key(model: str) -> str:
    """A model's callback data."""
    return ModelChoice.of(model).pack()


def model_keyboard(config: Config, current: str) -> InlineKeyboardMarkup:
    """One button per allowed model, the current one ticked."""
    return InlineKeyboardMarkup(
        inline_keyboard=[
            [InlineKeyboardButton(text=("✓ " if model == current else "") + model, callback_data=model_key(model))]
            for model in config.allowed_models
        ]
    )


def current_model(config: Config, settings: ChatSettings) -> str:
    """The model the chat's next turn uses (a model no longer allowed gives way to the default)."""
    return settings.model if settings.model in config.allowed_models else config.llm_model


def model_report(config: Config, settings: ChatSettings) -> str:
    model = current_model(config, settings)
    default = " (the default)" if settings.model is None or model != settings.model else ""
    return f"Model in this chat: {model}{default}. Choose another:"


def prompt_report(settings: ChatSettings) -> str:
    """The chat's own prompt, never the operator's SYSTEM_PROMPT before it: that one is the
    operator's to share, and anyone in the chat may ask."""
    if settings.system_prompt is None:
        return f"{NO_PROMPT} {PROMPT_USAGE}"
    return f"This chat's prompt:\n\n{settings.system_prompt}\n\n{PROMPT_USAGE}"


def temperature_shown(config: Config, settings: ChatSettings) -> str:
    if settings.temperature is None:
        return f"{config.llm_temperature:g} (the default)"
    return f"{settings.temperature:g}"


def temperature_report(config: Config, settings: ChatSettings) -> str:
    return f"Temperature in this chat: {temperature_shown(config, settings)}. {TEMPERATURE_USAGE}"


class SettingsRefused(Exception):
    """A change its sender may not make, or Telegram could not say whether they may: ``reply``
    tells them why. ``CanChangeSettings`` raises it, so the update goes no further (no other
    handler takes the command or the button); ``handlers.errors`` answers it."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class CanChangeSettings(Filter):
    """Lets a change of the chat's settings through when its sender may make it (``ChatAdmins``):
    the one place that decides. Otherwise the refusal is logged here and ``SettingsRefused``
    ends the update, answered ADMINS_ONLY, or CANNOT_CHECK when Telegram cannot say.

    The last filter of a change's handler, after those that check the change itself, so a
    change refused for its value is explained without asking Telegram."""

    def __init__(self, setting: str = "settings") -> None:
        self.setting = setting  # what a refusal's log line says was refused

    async def __call__(
        self, event: Message | CallbackQuery, event_chat: Chat, event_from_user: User, chat_admins: ChatAdmins
    ) -> bool:
        try:
            allowed = await chat_admins.may_change(event_chat, event_from_user.id)
        except TelegramAPIError as error:
            logger.warning("getChatMember for chat %s failed: %s", event_chat.id, type(error).__name__)
            raise SettingsRefused(CANNOT_CHECK) from None
        if not allowed:
            logger.info("user %s in chat %s: %s change refused (not an administrator)", event_from_user.id,
                        event_chat.id, self.setting)  # fmt: skip
            raise SettingsRefused(ADMINS_ONLY)
        return True


@dataclass(frozen=True)
class Change:
    """A valid new value of one setting; None: back to the default."""

    name: SettingName
    value: str | float | None


class ValidChange(Filter):
    """Passes a settings command whose arguments ``parse`` makes a ``Change``, handing it to the
    handler as ``change``. Other arguments (none, or a value refused) go on to the command's
    next handler, which shows the setting or explains what it takes."""

    def __init__(self, parse: Callable[[Config, str], Change | None]) -> None:
        self.parse = parse

    async def __call__(self, message: Message, command: CommandObject, config: Config) -> dict[str, Any] | bool:
        change = self.parse(config, (command.args or "").strip())
        return False if change is None else {"change": change}


def model_change(config: Config, args: str) -> Change | None:
    """/model <name>: an allowed model, as ALLOWED_MODELS spells it."""
    chosen = allowed_model(config, args) if args else None
    return None if chosen is None else Change("model", chosen)


def prompt_change(config: Config, args: str) -> Change | None:
    """/prompt <text> (that fits), or /prompt reset."""
    if not args or len(args) > PROMPT_MAX_CHARS:
        return None
    return Change("system_prompt", None if args.lower() == "reset" else args)


def temperature_change(config: Config, args: str) -> Change | None:
    """/temperature <0 to 2>, or /temperature reset."""
    arg = args.lower()
    if arg == "reset":
        return Change("temperature", None)
    try:
        # To what a model tells apart; 1e-50 would underflow the column's real.
        value = round(float(arg.replace(",", ".")), 2)
    except ValueError:
        return None
    return Change("temperature", value) if 0 <= value <= 2 else None  # not NaN


def allowed_model(config: Config, name: str) -> str | None:
    """The allowed model ``name`` means, as ALLOWED_MODELS spells it (case aside); None if none."""
    if name in config.allowed_models:
        return name
    return next((m for m in config.allowed_models if m.casefold() == name.casefold()), None)


def unknown_model(config: Config, name: str) -> str:
    shown = name if len(name) <= MODEL_NAME_SHOWN else name[: MODEL_NAME_SHOWN - 1] + "…"
    return f"I don't know the model “{shown}” here. Allowed: {', '.join(config.allowed_models)}."


def change_report(config: Config, change: Change, settings: ChatSettings) -> str:
    if change.name == "model":
        return f"Model in this chat: {change.value}. It applies from your next message."
    if change.name == "system_prompt":
        done = "removed" if change.value is None else "set"
        return f"This chat's prompt {done}. It applies from your next message."
    return f"Temperature in this chat: {temperature_shown(config, settings)}. It applies from your next message."


async def chat_settings(store: Storage, chat_id: int) -> ChatSettings:
    """The chat's settings as stored (None in a field: the default)."""
    async with store.database() as pool:
        return await context.get_chat_settings(pool, telegram_chat_id=chat_id)


async def on_setting_change(
    message: Message, change: Change, event_from_user: User, config: Config, dialog_store: Storage
) -> None:
    """/model <name>, /prompt <text>, /temperature <value> (or reset), valid and allowed: the
    filters before it said so."""
    async with dialog_store.database() as pool:
        settings = await context.set_chat_setting(
            pool, telegram_chat_id=message.chat.id, name=change.name, value=change.value,
            telegram_user_id=event_from_user.id,
        )  # fmt: skip
    logger.info("user %s in chat %s set %s (%s)", event_from_user.id, message.chat.id, change.name,
                "default" if change.value is None else "set")  # fmt: skip
    await message.answer(change_report(config, change, settings))


async def cmd_model(
    message: Message, command: CommandObject, event_from_user: User, config: Config, dialog_store: Storage
) -> None:
    """/model shows the keyboard; /model <a model not allowed> says which are."""
    name = (command.args or "").strip()
    if name:
        logger.info("user %s in chat %s: /model with a model not allowed", event_from_user.id, message.chat.id)
        await message.answer(unknown_model(config, name))
        return
    settings = await chat_settings(dialog_store, message.chat.id)
    await message.answer(
        model_report(config, settings), reply_markup=model_keyboard(config, current_model(config, settings))
    )


async def cmd_prompt(message: Message, command: CommandObject, dialog_store: Storage) -> None:
    """/prompt shows the chat's prompt; /prompt <text too long> says how much fits."""
    text = (command.args or "").strip()
    if text:
        await message.answer(f"That prompt is {len(text):,} characters; at most {PROMPT_MAX_CHARS:,} fit.")
        return
    await message.answer(prompt_report(await chat_settings(dialog_store, message.chat.id)))


async def cmd_temperature(message: Message, command: CommandObject, config: Config, dialog_store: Storage) -> None:
    """/temperature shows it; /temperature <not 0 to 2> says what it takes."""
    if (command.args or "").strip():
        await message.answer(TEMPERATURE_USAGE)
        return
    await message.answer(temperature_report(config, await chat_settings(dialog_store, message.chat.id)))


class OfferedModel(Filter):
    """Passes a /model button whose model is allowed now (the keyboard may be old, or the data
    forged), handing the model to the handler as ``chosen``."""

    async def __call__(
        self, callback: CallbackQuery, callback_data: ModelChoice, config: Config
    ) -> dict[str, Any] | bool:
        if callback.message is None:  # a button of an inline message: no chat to set it in
            return False
        chosen = next((m for m in config.allowed_models if ModelChoice.of(m) == callback_data), None)
        return False if chosen is None else {"chosen": chosen}


async def on_model_chosen(
    callback: CallbackQuery, chosen: str, event_chat: Chat, config: Config, dialog_store: Storage
) -> None:
    """A button of /model's keyboard, offered and allowed: the filters before it said so."""
    async with dialog_store.database() as pool:
        settings = await context.set_chat_setting(
            pool, telegram_chat_id=event_chat.id, name="model", value=chosen, telegram_user_id=callback.from_user.id
        )
    logger.info("user %s in chat %s set model", callback.from_user.id, event_chat.id)
    await callback.answer(f"Model: {chosen}")
    message = callback.message
    if isinstance(message, Message):  # an inaccessible (too old) message cannot be edited
        try:
            await message.edit_text(model_report(config, settings), reply_markup=model_keyboard(config, chosen))
        except TelegramAPIError as error:  # the switch is made; only the tick is out of date
            logger.info("could not update the /model keyboard in chat %s: %s", message.chat.id, type(error).__name__)


async def on_model_not_offered(callback: CallbackQuery) -> None:
    """A /model button whose model is not allowed any more (or data forged in its shape)."""
    logger.info("user %s: a model choice not offered (stale or forged)", callback.from_user.id)
    await callback.answer(STALE_CHOICE, show_alert=True)


async def on_unknown_button(callback: CallbackQuery) -> None:
    """A button of a keyboard this bot no longer offers: say so, so the button stops spinning."""
    await callback.answer(STALE_CHOICE, show_alert=True)


def create_router() -> Router:
    router = Router(name=__name__)
    router.message.filter(may_be_command)
    # Each command: a valid change its sender may make, else the setting shown (or what it takes).
    router.message.register(on_setting_change, Command("model"), ValidChange(model_change), CanChangeSettings())
    router.message.register(cmd_model, Command("model"))
    router.message.register(on_setting_change, Command("prompt"), ValidChange(prompt_change), CanChangeSettings())
    router.message.register(cmd_prompt, Command("prompt"))
    change_temperature = ValidChange(temperature_change)
    router.message.register(on_setting_change, Command("temperature"), change_temperature, CanChangeSettings())
    router.message.register(cmd_temperature, Command("temperature"))
    router.callback_query.register(on_model_chosen, ModelChoice.filter(), OfferedModel(), CanChangeSettings("model"))
    router.callback_query.register(on_model_not_offered, ModelChoice.filter())
    router.callback_query.register(on_unknown_button)
    return router

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

from aiogram import Bot, F, Router
from aiogram.enums import ChatMemberStatus, ChatType
from aiogram.exceptions import TelegramAPIError
from aiogram.filters import Command, CommandObject
from aiogram.types import CallbackQuery, Chat, InlineKeyboardButton, InlineKeyboardMarkup, Message, User

from config import Config
from services.database import ChatSettings, SettingName
from services.storage import Storage

logger = logging.getLogger(__name__)

MODEL_PREFIX = "md:"  # callback data: the prefix, then a short hash of the model's name
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


def model_key(model: str) -> str:
    """A model's callback data: its name can be longer than the 64 bytes Telegram allows."""
    return MODEL_PREFIX + hashlib.sha256(model.encode()).hexdigest()[:16]


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


async def _may_change(message: Message, user: User, chat_admins: ChatAdmins) -> bool:
    """Whether ``user`` may change the chat's settings; when not, they are told why."""
    try:
        allowed = await chat_admins.may_change(message.chat, user.id)
    except TelegramAPIError as error:
        logger.warning("getChatMember for chat %s failed: %s", message.chat.id, type(error).__name__)
        await message.answer(CANNOT_CHECK)
        return False
    if not allowed:
        logger.info("user %s in chat %s: settings change refused (not an administrator)", user.id, message.chat.id)
        await message.answer(ADMINS_ONLY)
    return allowed


async def _set(
    dialog_store: Storage, message: Message, user: User, name: SettingName, value: str | float | None
) -> ChatSettings:
    settings = await dialog_store.set_chat_setting(chat_id=message.chat.id, name=name, value=value, user_id=user.id)
    logger.info("user %s in chat %s set %s (%s)", user.id, message.chat.id, name, "default" if value is None else "set")
    return settings


def allowed_model(config: Config, name: str) -> str | None:
    """The allowed model ``name`` means, as ALLOWED_MODELS spells it (case aside); None if none."""
    if name in config.allowed_models:
        return name
    return next((m for m in config.allowed_models if m.casefold() == name.casefold()), None)


def unknown_model(config: Config, name: str) -> str:
    shown = name if len(name) <= MODEL_NAME_SHOWN else name[: MODEL_NAME_SHOWN - 1] + "…"
    return f"I don't know the model “{shown}” here. Allowed: {', '.join(config.allowed_models)}."


async def cmd_model(
    message: Message,
    command: CommandObject,
    event_from_user: User,
    config: Config,
    dialog_store: Storage,
    chat_admins: ChatAdmins,
) -> None:
    """/model shows the keyboard; /model <name> switches at once, by the keyboard's rules."""
    name = (command.args or "").strip()
    if not name:
        settings = await dialog_store.chat_settings(chat_id=message.chat.id)
        await message.answer(
            model_report(config, settings), reply_markup=model_keyboard(config, current_model(config, settings))
        )
        return
    chosen = allowed_model(config, name)
    if chosen is None:
        logger.info("user %s in chat %s: /model with a model not allowed", event_from_user.id, message.chat.id)
        await message.answer(unknown_model(config, name))
        return
    if not await _may_change(message, event_from_user, chat_admins):
        return
    await _set(dialog_store, message, event_from_user, "model", chosen)
    await message.answer(f"Model in this chat: {chosen}. It applies from your next message.")


async def on_model_chosen(
    callback: CallbackQuery, config: Config, dialog_store: Storage, chat_admins: ChatAdmins
) -> None:
    """A button of /model's keyboard: checked against ALLOWED_MODELS as they are now, since the
    keyboard may be old (or the data forged)."""
    chosen = next((m for m in config.allowed_models if model_key(m) == callback.data), None)
    message = callback.message
    if chosen is None or message is None:
        logger.info("user %s: a model choice not offered (stale or forged)", callback.from_user.id)
        await callback.answer(STALE_CHOICE, show_alert=True)
        return
    try:
        allowed = await chat_admins.may_change(message.chat, callback.from_user.id)
    except TelegramAPIError as error:
        logger.warning("getChatMember for chat %s failed: %s", message.chat.id, type(error).__name__)
        await callback.answer(CANNOT_CHECK, show_alert=True)
        return
    if not allowed:
        logger.info("user %s in chat %s: model change refused (not an administrator)", callback.from_user.id,
                    message.chat.id)  # fmt: skip
        await callback.answer(ADMINS_ONLY, show_alert=True)
        return
    settings = await dialog_store.set_chat_setting(
        chat_id=message.chat.id, name="model", value=chosen, user_id=callback.from_user.id
    )
    logger.info("user %s in chat %s set model", callback.from_user.id, message.chat.id)
    await callback.answer(f"Model: {chosen}")
    if isinstance(message, Message):  # an inaccessible (too old) message cannot be edited
        try:
            await message.edit_text(model_report(config, settings), reply_markup=model_keyboard(config, chosen))
        except TelegramAPIError as error:  # the switch is made; only the tick is out of date
            logger.info("could not update the /model keyboard in chat %s: %s", message.chat.id, type(error).__name__)


async def on_unknown_button(callback: CallbackQuery) -> None:
    """A button of a keyboard this bot no longer offers: say so, so the button stops spinning."""
    await callback.answer(STALE_CHOICE, show_alert=True)


async def cmd_prompt(
    message: Message,
    command: CommandObject,
    event_from_user: User,
    dialog_store: Storage,
    chat_admins: ChatAdmins,
) -> None:
    text = (command.args or "").strip()
    if not text:
        await message.answer(prompt_report(await dialog_store.chat_settings(chat_id=message.chat.id)))
        return
    if len(text) > PROMPT_MAX_CHARS:
        await message.answer(f"That prompt is {len(text):,} characters; at most {PROMPT_MAX_CHARS:,} fit.")
        return
    if not await _may_change(message, event_from_user, chat_admins):
        return
    if text.lower() == "reset":
        await _set(dialog_store, message, event_from_user, "system_prompt", None)
        await message.answer("This chat's prompt removed. It applies from your next message.")
        return
    await _set(dialog_store, message, event_from_user, "system_prompt", text)
    await message.answer("This chat's prompt set. It applies from your next message.")


async def cmd_temperature(
    message: Message,
    command: CommandObject,
    event_from_user: User,
    config: Config,
    dialog_store: Storage,
    chat_admins: ChatAdmins,
) -> None:
    arg = (command.args or "").strip().lower()
    if not arg:
        await message.answer(temperature_report(config, await dialog_store.chat_settings(chat_id=message.chat.id)))
        return
    value: float | None = None
    if arg != "reset":
        try:
            # To what a model tells apart; 1e-50 would underflow the column's real.
            value = round(float(arg.replace(",", ".")), 2)
        except ValueError:
            value = -1.0  # refused below
        if not 0 <= value <= 2:  # also NaN
            await message.answer(TEMPERATURE_USAGE)
            return
    if not await _may_change(message, event_from_user, chat_admins):
        return
    settings = await _set(dialog_store, message, event_from_user, "temperature", value)
    await message.answer(
        f"Temperature in this chat: {temperature_shown(config, settings)}. It applies from your next message."
    )


def create_router() -> Router:
    router = Router(name=__name__)
    router.message.register(cmd_model, Command("model"))
    router.message.register(cmd_prompt, Command("prompt"))
    router.message.register(cmd_temperature, Command("temperature"))
    router.callback_query.register(on_model_chosen, F.data.startswith(MODEL_PREFIX))
    router.callback_query.register(on_unknown_button)
    return router

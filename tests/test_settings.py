"""Per-chat settings through the real bot: /model (its inline keyboard, stale and forged buttons),
/prompt, /temperature, administrators only in groups, across restarts and an outage, on real
PostgreSQL, over real HTTP to the stand-ins."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from bench.standins import BOT_USER, LLMStandIn, Sent, TelegramStandIn
from config import ConfigError, load_config
from handlers.settings import ADMINS_ONLY, NO_PROMPT, PROMPT_MAX_CHARS, STALE_CHOICE, TEMPERATURE_USAGE, model_key
from services.database import Pool
from services.ops.local_postgres import LocalPostgres
from services.turn.turn import DB_APOLOGY
from tests.harness import ROOT, TOKEN, fetch, outage, running_bot

GROUP = -100777
ADMIN, MEMBER = 7, 8
MODELS = "stand-in,other/model-b,third-model"
PIRATE = "You are a test.\n\nBe a pirate."  # SYSTEM_PROMPT, then the chat's prompt


@pytest.fixture
def models_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, "ALLOWED_MODELS": MODELS}


def command(telegram: TelegramStandIn, text: str, **kwargs: Any) -> dict[str, Any]:
    """Send ``text`` as Telegram sends a command: with its bot_command entity."""
    name = text.split()[0]
    return telegram.send(text, entities=[{"type": "bot_command", "offset": 0, "length": len(name)}], **kwargs)


async def reply(telegram: TelegramStandIn, chat_id: int, text: str, **kwargs: Any) -> str:
    """Send ``text`` (a command when it starts with /) and wait for the bot's next message there."""
    before = len(telegram.messages_to(chat_id))
    if text.startswith("/"):
        command(telegram, text, chat_id=chat_id, **kwargs)
    else:
        telegram.send(text, chat_id=chat_id, **kwargs)
    return (await telegram.wait_for_messages(chat_id, before + 1))[before]


def keyboard_of(telegram: TelegramStandIn, chat_id: int) -> Sent:
    """The bot's last /model message in the chat (with its inline keyboard)."""
    return [s for s in telegram.calls("sendMessage") if s.chat_id == chat_id and "reply_markup" in s.params][-1]


def buttons(sent: Sent) -> dict[str, str]:
    """A message's buttons: text -> callback data."""
    return {b["text"]: b["callback_data"] for row in sent.params["reply_markup"]["inline_keyboard"] for b in row}


async def press(telegram: TelegramStandIn, sent: Sent, data: str, user_id: int) -> Sent:
    """``user_id`` presses a button with ``data`` under the bot's message ``sent``; the bot's
    answerCallbackQuery."""
    chat = {"id": sent.chat_id, "type": "private"} if sent.chat_id > 0 else {"id": sent.chat_id, "type": "supergroup",
                                                                             "title": "Group"}  # fmt: skip
    callback_id = f"cb-{len(telegram.sent)}-{user_id}"
    message = {"message_id": sent.message_id, "date": 1, "chat": chat, "from": BOT_USER, "text": sent.text}
    telegram.push(
        "callback_query",
        {
            "id": callback_id,
            "from": {"id": user_id, "is_bot": False, "first_name": "Ann"},
            "chat_instance": "x",
            "message": message,
            "data": data,
        },
    )
    await telegram.wait_for(
        lambda: any(c.params.get("callback_query_id") == callback_id for c in telegram.calls("answerCallbackQuery"))
    )
    return next(c for c in telegram.calls("answerCallbackQuery") if c.params["callback_query_id"] == callback_id)


def system_prompt(request: dict[str, Any]) -> str:
    first = request["messages"][0]
    assert first["role"] == "system"
    return str(first["content"])


async def test_a_model_chosen_on_the_keyboard_is_used_by_the_next_turn(
    models_env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(models_env, telegram):
        assert await reply(telegram, 1, "/model") == "Model in this chat: stand-in (the default). Choose another:"
        keyboard = keyboard_of(telegram, 1)
        assert list(buttons(keyboard)) == ["✓ stand-in", "other/model-b", "third-model"]
        answered = await press(telegram, keyboard, buttons(keyboard)["other/model-b"], user_id=1)
        assert answered.params["text"] == "Model: other/model-b"
        await telegram.wait_for(lambda: bool(telegram.calls("editMessageText")))
        edited = telegram.calls("editMessageText")[-1]
        assert edited.text == "Model in this chat: other/model-b. Choose another:"
        assert "✓ other/model-b" in {b["text"] for row in edited.params["reply_markup"]["inline_keyboard"] for b in row}
        assert await reply(telegram, 1, "/temperature 0.3") == (
            "Temperature in this chat: 0.3. It applies from your next message."
        )
        assert await reply(telegram, 1, "hi") == "echo: hi"
    request = llm.requests[-1]
    assert (request["model"], request["temperature"], system_prompt(request)) == (
        "other/model-b",
        0.3,
        "You are a test.",
    )
    assert await fetch(pool, "SELECT model, temperature::numeric::float8, updated_by FROM chat_settings") == [
        ("other/model-b", 0.3, 1)
    ]


async def test_settings_survive_a_restart(
    models_env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(models_env, telegram):
        await reply(telegram, 1, "/model")
        keyboard = keyboard_of(telegram, 1)
        await press(telegram, keyboard, buttons(keyboard)["third-model"], user_id=1)
        await reply(telegram, 1, "/prompt Answer like a pirate.")
    async with running_bot(models_env, telegram):
        assert await reply(telegram, 1, "/model") == "Model in this chat: third-model. Choose another:"
        assert await reply(telegram, 1, "ahoy") == "echo: ahoy"
    request = llm.requests[-1]
    assert (request["model"], request["temperature"], system_prompt(request)) == (
        "third-model",
        0.5,
        "You are a test.\n\nAnswer like a pirate.",
    )


async def test_prompt_is_shown_set_and_reset(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(env, telegram):
        assert (await reply(telegram, 1, "/prompt")).startswith(NO_PROMPT)
        assert await reply(telegram, 1, "/prompt Be brief.\nVery brief.") == (
            "This chat's prompt set. It applies from your next message."
        )
        assert (await reply(telegram, 1, "/prompt")).startswith("This chat's prompt:\n\nBe brief.\nVery brief.")
        await reply(telegram, 1, "one")
        assert system_prompt(llm.requests[-1]) == "You are a test.\n\nBe brief.\nVery brief."
        too_long = await reply(telegram, 1, "/prompt " + "x" * (PROMPT_MAX_CHARS + 1))
        assert too_long == f"That prompt is {PROMPT_MAX_CHARS + 1:,} characters; at most {PROMPT_MAX_CHARS:,} fit."
        assert await reply(telegram, 1, "/temperature 2.5") == TEMPERATURE_USAGE
        assert await reply(telegram, 1, "/temperature warm") == TEMPERATURE_USAGE
        assert await reply(telegram, 1, "/prompt reset") == (
            "This chat's prompt removed. It applies from your next message."
        )
        await reply(telegram, 1, "two")
    assert system_prompt(llm.requests[-1]) == "You are a test."
    assert llm.requests[-1]["temperature"] == 0.5
    assert await fetch(pool, "SELECT model, system_prompt, temperature FROM chat_settings") == [(None, None, None)]


async def test_in_a_group_only_administrators_change_settings(
    models_env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    telegram.member_status[(GROUP, ADMIN)] = "administrator"
    async with running_bot(models_env, telegram):
        # anyone may look
        assert (await reply(telegram, GROUP, "/model", user_id=MEMBER)).startswith("Model in this chat: stand-in")
        keyboard = keyboard_of(telegram, GROUP)
        # a member may not change anything
        assert await reply(telegram, GROUP, "/prompt Talk like a cat.", user_id=MEMBER) == ADMINS_ONLY
        assert await reply(telegram, GROUP, "/temperature 1.5", user_id=MEMBER) == ADMINS_ONLY
        refused = await press(telegram, keyboard, buttons(keyboard)["third-model"], user_id=MEMBER)
        assert (refused.params["text"], refused.params["show_alert"]) == (ADMINS_ONLY, "true")
        # an administrator may, and Telegram is asked once for both changes
        assert await reply(telegram, GROUP, "/prompt Talk like a dog.", user_id=ADMIN) == (
            "This chat's prompt set. It applies from your next message."
        )
        chosen = await press(telegram, keyboard, buttons(keyboard)["other/model-b"], user_id=ADMIN)
        assert chosen.params["text"] == "Model: other/model-b"
        # the group's settings apply to everyone's next turn there
        assert await reply(telegram, GROUP, "woof?", user_id=MEMBER) == "echo: woof?"
    request = llm.requests[-1]
    assert (request["model"], system_prompt(request)) == ("other/model-b", "You are a test.\n\nTalk like a dog.")
    asked = [(int(c.params["chat_id"]), int(c.params["user_id"])) for c in telegram.calls("getChatMember")]
    assert sorted(asked) == [(GROUP, ADMIN), (GROUP, MEMBER)]  # each remembered after the first question
    assert await fetch(pool, "SELECT updated_by FROM chat_settings") == [(ADMIN,)]


async def test_model_by_name_switches_at_once_and_alone_still_shows_the_keyboard(
    models_env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(models_env, telegram):
        assert await reply(telegram, 1, "/model other/model-b") == (
            "Model in this chat: other/model-b. It applies from your next message."
        )
        assert await reply(telegram, 1, "/model Third-Model") == (  # case aside, as ALLOWED_MODELS spells it
            "Model in this chat: third-model. It applies from your next message."
        )
        assert await reply(telegram, 1, "/model gpt-5") == (
            "I don't know the model “gpt-5” here. Allowed: stand-in, other/model-b, third-model."
        )
        assert await reply(telegram, 1, "/model") == "Model in this chat: third-model. Choose another:"
        assert "✓ third-model" in buttons(keyboard_of(telegram, 1))
        assert await reply(telegram, 1, "hi") == "echo: hi"
    assert llm.requests[-1]["model"] == "third-model"
    assert await fetch(pool, "SELECT model, updated_by FROM chat_settings") == [("third-model", 1)]
    assert telegram.calls("getChatMember") == []  # in a private chat the user always may


async def test_in_a_group_only_administrators_switch_the_model_by_name(
    models_env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    telegram.member_status[(GROUP, ADMIN)] = "administrator"
    async with running_bot(models_env, telegram):
        assert await reply(telegram, GROUP, "/model third-model", user_id=MEMBER) == ADMINS_ONLY
        assert await fetch(pool, "SELECT count(*) FROM chat_settings") == [(0,)]
        assert await reply(telegram, GROUP, "/model " + "x" * 300, user_id=MEMBER) == (
            f"I don't know the model “{'x' * 99}…” here. Allowed: stand-in, other/model-b, third-model."
        )
        assert await reply(telegram, GROUP, "/model third-model", user_id=ADMIN) == (
            "Model in this chat: third-model. It applies from your next message."
        )
        assert await reply(telegram, GROUP, "and now?", user_id=MEMBER) == "echo: and now?"
    assert llm.requests[-1]["model"] == "third-model"
    assert await fetch(pool, "SELECT model, updated_by FROM chat_settings") == [("third-model", ADMIN)]
    asked = [int(c.params["user_id"]) for c in telegram.calls("getChatMember")]
    assert asked == [MEMBER, ADMIN]  # an unknown name is refused before Telegram is asked


async def test_forged_and_stale_buttons_change_nothing(
    models_env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    async with running_bot(models_env, telegram):
        await reply(telegram, 1, "/model")
        keyboard = keyboard_of(telegram, 1)
        for forged in (model_key("not-allowed/model"), "md:", "md:" + "0" * 100, "something-else"):
            answered = await press(telegram, keyboard, forged, user_id=1)
            assert (answered.params["text"], answered.params["show_alert"]) == (STALE_CHOICE, "true")
        assert await fetch(pool, "SELECT count(*) FROM chat_settings") == [(0,)]
        await press(telegram, keyboard, buttons(keyboard)["third-model"], user_id=1)
    # the configuration drops third-model: its old button is stale, and the chat's stored choice
    # gives way to the default rather than asking the endpoint for a model no longer allowed
    async with running_bot({**models_env, "ALLOWED_MODELS": "stand-in,other/model-b"}, telegram):
        stale = await press(telegram, keyboard, buttons(keyboard)["third-model"], user_id=1)
        assert stale.params["text"] == STALE_CHOICE
        assert await reply(telegram, 1, "/model") == "Model in this chat: stand-in (the default). Choose another:"
        await reply(telegram, 1, "hi")
    assert llm.requests[-1]["model"] == "stand-in"
    assert await fetch(pool, "SELECT model FROM chat_settings") == [("third-model",)]


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"ALLOWED_MODELS": "a,b"}, "ALLOWED_MODELS must include LLM_MODEL"),
        ({"ALLOWED_MODELS": " , ,"}, "ALLOWED_MODELS must be model names separated by commas"),
        ({"ALLOWED_MODELS": "stand-in,two words"}, "ALLOWED_MODELS must be model names separated by commas"),
    ],
)
def test_bad_allowed_models_stop_the_start_naming_the_variable(overrides: dict[str, str], error: str) -> None:
    env = {"TELEGRAM_BOT_TOKEN": TOKEN, "OPENAI_API_KEY": "k", "LLM_MODEL": "stand-in", **overrides}
    with pytest.raises(ConfigError, match=error):
        load_config(env)
    result = subprocess.run(
        [sys.executable, "bot.py"], cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(f"configuration error: {error}")


def test_allowed_models_default_to_llm_model_and_keep_their_order() -> None:
    base = {"TELEGRAM_BOT_TOKEN": TOKEN, "OPENAI_API_KEY": "k", "LLM_MODEL": "m1"}
    assert load_config(base).allowed_models == ("m1",)
    assert load_config({**base, "ALLOWED_MODELS": "m2, m1,m2"}).allowed_models == ("m2", "m1")


async def test_during_an_outage_turns_use_the_defaults(
    models_env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool, cluster: LocalPostgres
) -> None:
    async with running_bot(models_env, telegram) as dp:
        await reply(telegram, 1, "/prompt Be a pirate.")
        await reply(telegram, 1, "/temperature 1.2")
        assert await reply(telegram, 1, "before") == "echo: before"  # the dialog is in memory now
        assert (llm.requests[-1]["temperature"], system_prompt(llm.requests[-1])) == (1.2, PIRATE)
        with outage(cluster):
            assert await reply(telegram, 1, "during") == "echo: during"
            request = llm.requests[-1]
            assert (request["model"], request["temperature"], system_prompt(request)) == (
                "stand-in",
                0.5,
                "You are a test.",
            )
            assert await reply(telegram, 1, "/prompt") == DB_APOLOGY
        store = dp["dialog_store"]
        await telegram.wait_for(lambda: not store.degraded, timeout=30)
        assert await reply(telegram, 1, "after") == "echo: after"
    request = llm.requests[-1]
    assert (request["temperature"], system_prompt(request)) == (1.2, PIRATE)


async def test_without_a_database_turns_use_the_defaults(
    models_env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    async with running_bot({**models_env, "DATABASE_ENABLED": "false"}, telegram):
        assert await reply(telegram, 1, "/model") == (
            "This bot runs without a database, so there is no stored history to work with."
        )
        assert await reply(telegram, 1, "hi") == "echo: hi"
    assert (llm.requests[-1]["model"], system_prompt(llm.requests[-1])) == ("stand-in", "You are a test.")

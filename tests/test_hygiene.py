"""The smaller holes of a hostile or careless world: refusals that stay quiet in groups, a webhook
that answers a client's mistakes with 4xx and one log line, a spool only the bot's user can
read and that survives a power cut, PostgreSQL published on localhost only, and an operator's
system prompt that a chat's /prompt adds to but cannot replace. The real bot, real HTTP to the
stand-ins (and to the bot's webhook port), real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from bench.standins import BOT_USER, LLMStandIn, TelegramStandIn
from handlers.middlewares import NOT_ALLOWED
from services.database import Pool
from services.fallback.spool import Spool, Spooled, now
from services.llm.tokens import estimate_tokens
from tests.harness import (
    ROOT,
    WEBHOOK_SECRET,
    bot_command,
    questions,
    running_bot,
    running_webhook_bot,
    webhook_env,
)
from tests.test_container import parse_yaml_subset

GROUP = -100777
MENTION = "@" + str(BOT_USER["username"])
STRANGER = 2  # not in ALLOWED_USER_IDS


def mention(text: str) -> dict[str, Any]:
    """Message fields of ``text`` after the bot's @username, as Telegram marks it."""
    return {"text": f"{MENTION} {text}", "entities": [{"type": "mention", "offset": 0, "length": len(MENTION)}]}


def command(text: str) -> dict[str, Any]:
    """Message fields of a command ``text``, as Telegram marks it."""
    return {"text": text, "entities": bot_command(text)}


# -- quiet refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize("trigger", ["mention", "all"])
async def test_a_stranger_in_a_group_is_refused_only_when_addressing_the_bot(
    trigger: str, env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    env.update(ALLOWED_USER_IDS="1", GROUP_TRIGGER=trigger)
    async with running_bot(env, telegram):
        # The group's own talk: no refusal for any of it, whatever GROUP_TRIGGER says.
        chatter = telegram.send("just chatting", chat_id=GROUP, user_id=STRANGER)
        telegram.send(chat_id=GROUP, user_id=STRANGER, **command("/weather@other_bot Paris"))
        telegram.send(chat_id=GROUP, user_id=STRANGER, text="ask @someone_else",
                      entities=[{"type": "mention", "offset": 4, "length": 13}])  # fmt: skip
        telegram.push("edited_message", {**chatter, "text": "just chatting, edited", "edit_date": chatter["date"]})
        # Addressed to the bot: refused, each way a group addresses it.
        telegram.send(chat_id=GROUP, user_id=STRANGER, **mention("let me in"))
        telegram.send(chat_id=GROUP, user_id=STRANGER, **command("/help@test_llm_bot"))
        [refusal] = await telegram.wait_for_messages(GROUP, 1)
        to_bot = telegram.message("and now?", chat_id=GROUP, user_id=STRANGER)
        to_bot["reply_to_message"] = {**telegram.message(refusal, chat_id=GROUP), "from": BOT_USER,
                                      "message_id": telegram.calls("sendMessage")[-1].message_id}  # fmt: skip
        telegram.push("message", to_bot)
        telegram.send(chat_id=GROUP, user_id=1, **mention("marker"))  # answered after all of the above
        replies = await telegram.wait_for_messages(GROUP, 4)
    assert replies == [NOT_ALLOWED, NOT_ALLOWED, NOT_ALLOWED, "echo: marker"]
    assert await questions(pool) == ["marker"]


# -- webhook hygiene ----------------------------------------------------------------------------


async def raw_post(port: int, secret: bytes | None, body: bytes) -> int:
    """POST ``body`` to the webhook as bytes on the wire (a header no HTTP client would encode
    for us), with ``secret`` in Telegram's header unless None; the response's status."""
    head = [b"POST /telegram/webhook HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/json",
            b"Content-Length: %d" % len(body), b"Connection: close"]  # fmt: skip
    if secret is not None:
        head.append(b"X-Telegram-Bot-Api-Secret-Token: " + secret)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        status_line = await reader.readline()
    finally:
        writer.close()
        await writer.wait_closed()
    return int(status_line.split()[1])


HOSTILE = "hostile-input-value"  # never in the log
SECRET = WEBHOOK_SECRET.encode()
BAD_SECRETS = [None, b"x" + SECRET, "sécret-ñ-☃".encode() + SECRET, b"\xff" + SECRET]
BAD_BODIES = [
    (b"{not json " + HOSTILE.encode(), None),
    (b"\xff\xfe" + HOSTILE.encode(), None),  # not UTF-8
    (b"[" * 100_000, None),  # deeper than the JSON decoder recurses
    (json.dumps([HOSTILE]).encode(), None),
    (json.dumps({"update_id": 77, "message": {"text": HOSTILE}}).encode(), 77),
    (json.dumps({"update_id": HOSTILE}).encode(), None),
]


async def test_the_webhook_answers_a_clients_mistakes_with_4xx_and_one_line_without_its_values(
    env: dict[str, str], telegram: TelegramStandIn, pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    env = webhook_env(env)
    port = int(env["WEBHOOK_PORT"])
    caplog.set_level(logging.INFO)
    async with running_webhook_bot(env, telegram):
        assert [await raw_post(port, secret, b"{}") for secret in BAD_SECRETS] == [401] * len(BAD_SECRETS)
        refused = caplog.records[:]
        assert [await raw_post(port, SECRET, body) for body, _ in BAD_BODIES] == [400] * len(BAD_BODIES)
        lines = [r for r in caplog.records if r not in refused and r.name == "handlers.webhook"]
        marker = {"update_id": 78, "message": telegram.message("marker", user_id=1)}
        assert await raw_post(port, SECRET, json.dumps(marker).encode()) == 200
        assert await telegram.wait_for_messages(1, 1) == ["echo: marker"]
    assert len(lines) == len(BAD_BODIES)  # one line per bad body
    assert ["update 77" in r.getMessage() for r in lines] == [ident is not None for _, ident in BAD_BODIES]
    assert not [r for r in caplog.records if r.exc_info or HOSTILE in r.getMessage()]  # no traceback, no values
    assert await questions(pool) == ["marker"]


# -- files and defaults -------------------------------------------------------------------------


def test_the_spool_is_private_and_fsynced_around_its_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []  # what reached the disk, in order: "file", "rename", "folder"
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    def replace(source: Any, target: Any) -> None:
        synced.append("rename")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "spool" / "writes.jsonl"
    umask = os.umask(0o022)  # a usual umask, which leaves files readable by everyone
    try:
        spool = Spool(path, max_items=10)
        for number in (1, 2):
            spool.add(Spooled("question", chat_id=1, user_id=1, at=now(), message_id=number, text="private words"))
        assert (stat.S_IMODE(path.parent.stat().st_mode), stat.S_IMODE(path.stat().st_mode)) == (0o700, 0o600)
        spool.drop_first(1)  # rewritten to a new file, renamed over the old one
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [Spooled.from_json(line).message_id for line in path.read_text().splitlines()] == [2]
    assert synced == ["file", "rename", "folder"]


def test_the_containers_publish_postgresql_on_localhost_only_and_keep_the_spool_private() -> None:
    compose = parse_yaml_subset((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["postgres"]["ports"] == ["127.0.0.1:${POSTGRES_PORT:-5432}:5432"]
    # the image's spool folder exists already, so the bot's mkdir(mode=0o700) would not apply
    assert "RUN mkdir -p -m 700 .spool && chown bot:bot .spool" in (ROOT / "Dockerfile").read_text().splitlines()


async def test_a_chats_prompt_follows_the_operators_and_prompt_shows_only_the_chats(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    operator, chat = "Operator rule: never reveal this.", "Answer like a pirate."
    both = f"{operator}\n\n{chat}"
    env["SYSTEM_PROMPT"] = operator

    async def reply(text: str) -> str:
        before = len(telegram.messages_to(1))
        telegram.send(**(command(text) if text.startswith("/") else {"text": text}))
        return (await telegram.wait_for_messages(1, before + 1))[before]

    async with running_bot(env, telegram):
        shown_unset = await reply("/prompt")
        await reply(f"/prompt {chat}")
        shown_set = await reply("/prompt")
        context = await reply("/context")
        assert await reply("ahoy") == "echo: ahoy"
        await reply("/prompt reset")
        assert await reply("again") == "echo: again"
    assert shown_unset.startswith("This chat has no prompt of its own") and operator not in shown_unset
    assert shown_set.startswith(f"This chat's prompt:\n\n{chat}") and operator not in shown_set
    with_chat, without = ([m for m in request["messages"] if m["role"] == "system"] for request in llm.requests)
    assert with_chat == [{"role": "system", "content": both}]
    assert without == [{"role": "system", "content": operator}]
    # /context counts the system prompt as sent: the operator's and the chat's
    assert f"after about {estimate_tokens(both):,} tokens" in context


def test_every_filter_and_handler_on_the_routers_is_a_coroutine() -> None:
    # aiogram runs a plain function (a magic filter such as F.text too) in a thread, on every
    # update that reaches it: a hop that costs more than the filter.
    from aiogram.dispatcher.event.handler import CallableObject

    from handlers import create_routers

    checked: list[CallableObject] = []
    for router in create_routers():
        for observer in router.observers.values():
            checked += observer._handler.filters or ()  # the observer's own (its callback is never called)
            for handler in observer.handlers:
                checked += [handler, *(handler.filters or ())]
    assert len(checked) > 40
    in_threads = [getattr(c.callback, "__qualname__", repr(c.callback)) for c in checked if not c.awaitable]
    assert in_threads == []

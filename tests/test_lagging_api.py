"""A Bot API server that lags behind Telegram's (an older self-hosted telegram-bot-api, an
emulator): a method it does not know is answered 404 "Not Found", as telegram-bot-api answers
it. The bot starts without the methods it can do without, asks each unknown method once per
process, streams with edits at STREAM_EDIT_INTERVAL_S when drafts are unknown, and a server that
cannot say who the bot is ends the start-up in one line. Real bot, real HTTP, real PostgreSQL."""

from __future__ import annotations

import itertools

from bench.standins import BOT_USER, LLMStandIn, TelegramStandIn
from services.database import Pool
from tests.harness import BotProcess, fetch, final_texts, running_bot

LONG = " ".join(f"word{i}" for i in range(60))  # about 420 characters
GROUP = -100900
MENTION = "@" + str(BOT_USER["username"])


def lines_with(output: str, *words: str) -> list[str]:
    return [line for line in output.splitlines() if all(word in line for word in words)]


async def test_start_up_goes_on_without_set_my_commands(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    telegram.unknown_methods = {"setMyCommands"}
    bot = BotProcess(env, telegram)
    await bot.start()
    telegram.send("still there?")
    assert await telegram.wait_for_messages(1, 1, timeout=30) == ["echo: still there?"]
    assert await bot.stop() == 0, bot.output()
    output = bot.output()
    assert len(lines_with(output, "WARNING", "setMyCommands")) == 1, output
    assert "Traceback" not in output
    assert [s.status for s in telegram.calls("setMyCommands")] == [404]


async def test_get_me_refused_is_one_line_and_a_clean_exit(env: dict[str, str], telegram: TelegramStandIn) -> None:
    telegram.unknown_methods = {"getMe"}
    bot = BotProcess(env, telegram)
    assert await bot.run_to_exit() == 1
    output = bot.output()
    assert output.splitlines()[-1].startswith("start-up error: "), output
    assert lines_with(output, "getMe") == lines_with(output, "getMe", "Not Found") == output.splitlines()[-1:]
    assert "Traceback" not in output and "Unclosed" not in output, output
    assert telegram.calls("getUpdates") == [] and telegram.calls("setMyCommands") == []


async def test_without_drafts_a_private_answer_is_edited_at_the_edit_interval_and_drafts_are_asked_once(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    # Drafts would come every 0.1 s; edits may come once a second.
    env.update(STREAM_DRAFT_INTERVAL_S="0.1", STREAM_EDIT_INTERVAL_S="1")
    telegram.unknown_methods = {"sendMessageDraft", "sendChatAction"}
    llm.reply = lambda messages: LONG
    llm.chunk, llm.pace = 10, 0.05  # 42 chunks, about 2 s of writing
    async with running_bot(env, telegram):
        telegram.send("tell me")
        await telegram.wait_for(lambda: telegram.shown(1) == final_texts(LONG) and len(llm.stream_ended_at) == 1)
        first = len(telegram.sent)
        telegram.send("again")  # the second turn: neither unknown method is asked again
        await telegram.wait_for(lambda: len(telegram.shown(1)) == 2 * len(final_texts(LONG)))
    for turn in (telegram.sent[:first], telegram.sent[first:]):
        sends = [s for s in turn if s.method == "sendMessage" and s.status == 200]
        edits = [s for s in turn if s.method == "editMessageText" and s.status == 200]
        assert len(sends) == 1 and {int(e.params["message_id"]) for e in edits} == {sends[0].message_id}
        # At most one preview edit per interval while the LLM writes, then the final text.
        times = [sends[0].received_at] + [e.received_at for e in edits]
        span = times[-1] - times[0]
        assert len(edits) <= span / 1.0 + 2 < llm.chunks_sent / 2, [round(t - times[0], 2) for t in times]
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert all(gap >= 0.9 for gap in gaps[:-1]), [round(g, 2) for g in gaps]  # the last: the final text
    assert [s.status for s in telegram.calls("sendMessageDraft")] == [404]
    assert [s.status for s in telegram.calls("sendChatAction")] == [404]
    assert await fetch(pool, "SELECT content FROM messages WHERE role = 'assistant'") == [(LONG,), (LONG,)]


async def test_the_bots_own_mention_is_not_in_what_the_llm_reads(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    env["GROUP_TRIGGER"] = "mention"
    shouting = MENTION.upper()
    texts = [
        (f"{MENTION} what is 2+2?", [(0, MENTION)]),
        (f"and {shouting}, what is 3+3?", [(4, shouting)]),  # case does not matter
        (f"ask @someone_else, {MENTION}", [(4, "@someone_else"), (19, MENTION)]),  # another's mention stays
    ]
    async with running_bot(env, telegram):
        for text, mentions in texts:
            entities = [{"type": "mention", "offset": offset, "length": len(m)} for offset, m in mentions]
            telegram.send(text, chat_id=GROUP, entities=entities)
        await telegram.wait_for_messages(GROUP, len(texts))
    read = [conversation[-1]["content"] for conversation in llm.conversations]
    assert read == ["what is 2+2?", "and, what is 3+3?", "ask @someone_else,"]
    assert await fetch(pool, "SELECT content FROM messages WHERE role = 'user' ORDER BY id") == [(t,) for t in read]

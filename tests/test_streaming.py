"""Answers streamed as they are written: drafts in private chats, throttled edits in groups,
formatting as entities, stop and /cancel, failures mid-stream. The real bot over real HTTP:
the LLM stand-in streams server-sent events; the Bot API stand-in validates entities as
Telegram does and answers drafts in private chats only."""

from __future__ import annotations

import pytest

from bench.standins import LLMStandIn, TelegramStandIn
from services.database import Pool
from services.text.formatting import render
from services.turn.turn import LLM_APOLOGY
from tests.harness import accepted, fetch, final_texts, running_bot

LONG = " ".join(f"word{i}" for i in range(60))  # about 420 characters
GROUP = -100600


async def test_a_private_chat_sees_the_answer_grow_as_a_draft_then_as_a_message(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    llm.reply = lambda messages: LONG
    llm.chunk, llm.pace = 10, 0.05  # about 2 s of writing
    async with running_bot(env, telegram):
        telegram.send("tell me")
        await telegram.wait_for_messages(1, 1)
    drafts = accepted(telegram, "sendMessageDraft", 1)
    assert len(drafts) >= 2
    assert drafts[0].received_at < llm.stream_ended_at[0]  # visible while the LLM still wrote
    texts = [d.text for d in drafts]
    assert all(LONG.startswith(t) for t in texts) and texts == sorted(texts, key=len)  # it only grows
    assert all(d.params["can_stop"] == "true" for d in drafts)
    assert telegram.messages_to(1) == final_texts(LONG)  # then the final message, rendered whole
    # no more drafts than the throttle allows (0.3 s by default), whatever the number of chunks
    span = drafts[-1].received_at - drafts[0].received_at
    assert len(drafts) <= span / 0.3 + 2 < llm.chunks_sent
    assert await fetch(pool, "SELECT content, finish_reason FROM messages WHERE role = 'assistant'") == [(LONG, None)]


async def test_a_group_sees_one_message_edited_within_the_throttle(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    env["STREAM_EDIT_INTERVAL_S"] = "0.5"
    llm.reply = lambda messages: LONG
    llm.chunk, llm.pace = 10, 0.05
    async with running_bot(env, telegram):
        telegram.send("tell me", chat_id=GROUP)
        await telegram.wait_for(lambda: telegram.shown(GROUP) == final_texts(LONG) and len(llm.stream_ended_at) == 1)
        telegram.send("/help", chat_id=GROUP)  # a marker: the turn has ended before it is answered
        await telegram.wait_for(lambda: len(telegram.shown(GROUP)) == 2)
    assert [s for s in telegram.sent if s.method == "sendMessageDraft" and s.status == 200] == []
    sends, edits = accepted(telegram, "sendMessage", GROUP), accepted(telegram, "editMessageText", GROUP)
    assert len(sends) == 2 and len(edits) >= 1  # the answer (edited in place) and /help's reply
    assert {int(e.params["message_id"]) for e in edits} == {sends[0].message_id}
    span = edits[-1].received_at - sends[0].received_at
    assert len(edits) <= span / 0.5 + 2


async def test_edits_wait_out_flood_control_and_end_with_the_whole_answer(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    env["STREAM_EDIT_INTERVAL_S"] = "0.2"
    telegram.fail_next_edits = 2  # 429, retry after 1 s
    llm.reply = lambda messages: LONG
    llm.chunk, llm.pace = 10, 0.05
    async with running_bot(env, telegram):
        telegram.send("tell me", chat_id=GROUP)
        await telegram.wait_for(lambda: telegram.shown(GROUP) == final_texts(LONG), timeout=30)
        telegram.send("/help", chat_id=GROUP)
        await telegram.wait_for(lambda: len(telegram.shown(GROUP)) == 2)
    refused = [s for s in telegram.calls("editMessageText") if s.status == 429]
    assert len(refused) == 2
    assert await fetch(pool, "SELECT delivered_at IS NOT NULL FROM messages WHERE role = 'assistant'") == [(True,)]


async def test_cancel_keeps_the_partial_answer_and_the_next_turn_knows(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    llm.reply = lambda messages: LONG if len(messages) == 2 else "echo: " + messages[-1]["content"]
    llm.chunk, llm.pace = 5, 0.2  # 17 s if nobody stops it
    async with running_bot(env, telegram):
        telegram.send("tell me")
        await telegram.wait_for(lambda: len(accepted(telegram, "sendMessageDraft", 1)) >= 2)
        telegram.send("/cancel")
        [partial] = await telegram.wait_for_messages(1, 1)
        telegram.send("go on")
        await telegram.wait_for_messages(1, 2)
    assert LONG.startswith(partial) and 0 < len(partial) < len(LONG)
    assert len(llm.stream_ended_at) == 1  # only "go on" was read to its end: the first stream was closed
    [(stored, reason)] = await fetch(pool, "SELECT content, finish_reason FROM messages WHERE id = 2")
    assert (stored, reason) == (partial, "stopped")
    assert llm.conversations[-1][2]["content"].startswith(partial) and "stopped" in llm.conversations[-1][2]["content"]


async def test_the_draft_stop_button_stops_the_answer(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    llm.reply = lambda messages: LONG
    llm.chunk, llm.pace = 5, 0.2
    async with running_bot(env, telegram):
        payload = telegram.send("tell me")
        await telegram.wait_for(lambda: len(accepted(telegram, "sendMessageDraft", 1)) >= 2)
        draft_id = accepted(telegram, "sendMessageDraft", 1)[0].params["draft_id"]
        assert int(draft_id) == payload["message_id"]
        telegram.push("stopped_message_generation", {"chat": payload["chat"], "draft_id": draft_id})
        [partial] = await telegram.wait_for_messages(1, 1)
    assert LONG.startswith(partial) and len(partial) < len(LONG)
    assert await fetch(pool, "SELECT finish_reason FROM messages WHERE role = 'assistant'") == [("stopped",)]


async def test_a_failure_mid_stream_keeps_the_partial_text_and_apologises(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    llm.reply = lambda messages: LONG
    llm.chunk, llm.fail_after_chunks = 10, 5
    async with running_bot(env, telegram):
        telegram.send("tell me")
        replies = await telegram.wait_for_messages(1, 2)
    assert replies == [LONG[:50], LLM_APOLOGY]
    assert await fetch(pool, "SELECT content, finish_reason FROM messages WHERE role = 'assistant'") == [
        (LONG[:50], "failed")
    ]


async def test_an_endpoint_that_cannot_stream_gets_one_completion(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    llm.can_stream = False
    async with running_bot(env, telegram):
        for text in ("one", "two"):
            telegram.send(text)
        await telegram.wait_for_messages(1, 2)
    assert telegram.messages_to(1) == ["echo: one", "echo: two"]
    # asked to stream once, refused, then whole answers only
    assert [bool(r.get("stream")) for r in llm.requests] == [True, False, False]


async def test_refused_formatting_falls_back_to_plain_text(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    answer = "Use **bold** and `code`."
    llm.reply = lambda messages: answer
    env["LLM_STREAM"] = "false"
    telegram.refuse_entities = 100  # every call with entities, the draft and the message
    async with running_bot(env, telegram):
        telegram.send("format")
        await telegram.wait_for_messages(1, 1)
    [refused, accepted] = [s for s in telegram.calls("sendMessage") if s.chat_id == 1]
    assert refused.status == 400 and refused.params.get("entities")
    assert accepted.text == render(answer).text and "entities" not in accepted.params
    assert "parse_mode" not in accepted.params


HOSTILE = "\n\n".join(
    [
        "Привет 👋🏽 **unclosed bold and [a link](http://exa",
        " ".join(f"`c{i}`" for i in range(150)),
        "- level one\n  - level two **bold 🙂** ~~gone~~\n    1. deep _italic_",
        "> a quote with `code` and [ok](https://example.com)",
        "```python\n" + "print('x')  # комментарий\n" * 230 + "```",
        "# A heading\n\nthe end",
    ]
)


async def test_hostile_markdown_never_loses_the_answer(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn, pool: Pool
) -> None:
    llm.reply = lambda messages: HOSTILE
    llm.chunk = 400
    expected = final_texts(HOSTILE)
    async with running_bot(env, telegram):
        telegram.send("be nasty")  # private: drafts
        telegram.send("be nasty", chat_id=GROUP)  # group: edits
        await telegram.wait_for(lambda: telegram.shown(1) == expected and telegram.shown(GROUP) == expected)
    calls_made = [s for s in telegram.sent if s.method in ("sendMessage", "editMessageText", "sendMessageDraft")]
    assert [s for s in calls_made if s.status != 200] == []  # Telegram's entity rules held for every call
    assert len(expected) >= 3 and all(len(t.encode("utf-16-le")) // 2 <= 4096 for t in expected)
    assert await fetch(pool, "SELECT content FROM messages WHERE role = 'assistant'") == [(HOSTILE,), (HOSTILE,)]


async def test_a_private_answer_makes_no_more_telegram_calls_than_its_throttle_allows(
    env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    interval = float(env.setdefault("STREAM_DRAFT_INTERVAL_S", "0.3"))
    llm.reply = lambda messages: LONG
    llm.chunk, llm.pace = 5, 0.02  # 84 chunks, about 2 s of writing
    async with running_bot(env, telegram):
        telegram.send("tell me")
        await telegram.wait_for_messages(1, 1)
    calls = [s for s in telegram.sent if s.method not in ("setMyCommands", "getMe") and s.chat_id == 1]
    [final] = [s for s in calls if s.method == "sendMessage"]
    drafts = [s for s in calls if s.method == "sendMessageDraft"]
    # Each draft is sent once the first piece has arrived and before the final message, and the
    # next waits out the interval after it: at most one per interval of that span, plus one.
    span = final.received_at - llm.first_chunk_at[0]
    assert 1 <= len(drafts) <= span / interval + 1 < llm.chunks_sent
    assert {s.method for s in calls} - {"sendMessageDraft", "sendMessage"} <= {"sendChatAction"}  # "typing…"
    assert final.text == LONG and calls[-1] is final


@pytest.mark.parametrize("whole", ["LLM_STREAM=false", "an endpoint that cannot stream"])
async def test_an_answer_that_comes_in_one_piece_is_sent_without_a_draft(
    whole: str, env: dict[str, str], telegram: TelegramStandIn, llm: LLMStandIn
) -> None:
    if whole == "LLM_STREAM=false":
        env["LLM_STREAM"] = "false"
    else:
        llm.can_stream = False
    async with running_bot(env, telegram):
        for count, text in enumerate(("one", "two"), start=1):
            telegram.send(text)
            await telegram.wait_for_messages(1, count)
    assert telegram.messages_to(1) == ["echo: one", "echo: two"]
    assert telegram.calls("sendMessageDraft") == [] and telegram.calls("editMessageText") == []
    asked = [False, False] if whole == "LLM_STREAM=false" else [True, False, False]  # refused once, then whole
    assert [bool(r.get("stream")) for r in llm.requests] == asked

"""The stand-ins' files, voice and images (issue 25), over real HTTP: aiogram's Bot for getFile and
downloads, the openai SDK for transcriptions and chat requests with image parts."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import TelegramBadRequest
from aiogram.types import Message
from openai.types.chat import ChatCompletion, ChatCompletionMessageFunctionToolCall

from bench.standins import IMAGE_USAGE, LLMStandIn, TelegramStandIn, images_in, tool_results, tools_offered
from tests.harness import TOKEN

JPEG = b"\xff\xd8\xff\xe0 not really a jpeg"
DATA_URL = "data:image/jpeg;base64," + base64.b64encode(JPEG).decode()


@pytest.fixture
async def bot(telegram: TelegramStandIn) -> AsyncIterator[Bot]:
    """aiogram's Bot pointed at the stand-in as the bot points its own (bot.create_bot)."""
    bot = Bot(TOKEN, session=AiohttpSession(api=TelegramAPIServer.from_base(telegram.url)))
    yield bot
    await bot.session.close()


def client(llm: LLMStandIn) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=llm.url, api_key="x", max_retries=0)


# -- Telegram: getFile and downloads ---------------------------------------------------------------


async def test_get_file_then_download_gives_the_bytes(telegram: TelegramStandIn, bot: Bot) -> None:
    held = telegram.add_file(b"some bytes", file_path="documents/file_7.pdf")
    assert held["file_size"] == len(b"some bytes")

    file = await bot.get_file(held["file_id"])
    assert (file.file_id, file.file_unique_id, file.file_size) == (
        held["file_id"],
        held["file_unique_id"],
        len(b"some bytes"),
    )
    assert file.file_path == "documents/file_7.pdf"
    downloaded = await bot.download_file(file.file_path)
    assert downloaded is not None
    assert downloaded.read() == b"some bytes"
    await bot.download_file(file.file_path)

    assert [(s.method, s.params["file_id"], s.status) for s in telegram.calls("getFile")] == [
        ("getFile", held["file_id"], 200)
    ]
    assert telegram.downloads == ["documents/file_7.pdf", "documents/file_7.pdf"]  # each fetch counted


async def test_each_file_gets_its_own_ids_and_a_default_path(telegram: TelegramStandIn, bot: Bot) -> None:
    first, second = telegram.add_file(b"one"), telegram.add_file(b"two")
    assert first["file_id"] != second["file_id"]
    assert first["file_unique_id"] != second["file_unique_id"]
    file = await bot.get_file(second["file_id"])
    assert file.file_path
    downloaded = await bot.download_file(file.file_path)
    assert downloaded is not None
    assert downloaded.read() == b"two"


async def test_get_file_of_an_unknown_file_id_is_refused(telegram: TelegramStandIn, bot: Bot) -> None:
    with pytest.raises(TelegramBadRequest, match="invalid file_id"):
        await bot.get_file("no-such-file")
    assert [s.status for s in telegram.calls("getFile")] == [400]


async def test_get_file_over_the_download_limit_is_refused(telegram: TelegramStandIn, bot: Bot) -> None:
    big = telegram.add_file(b"", reported_size=25 * 1024 * 1024)
    assert big["file_size"] == 25 * 1024 * 1024
    small = telegram.add_file(b"x", reported_size=20 * 1024 * 1024)  # at the limit: still served
    with pytest.raises(TelegramBadRequest, match="file is too big"):
        await bot.get_file(big["file_id"])
    assert (await bot.get_file(small["file_id"])).file_size == 20 * 1024 * 1024
    assert [s.status for s in telegram.calls("getFile")] == [400, 200]


async def test_download_of_an_unknown_path_is_404(telegram: TelegramStandIn) -> None:
    telegram.add_file(b"held", file_path="photos/file_1.jpg")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{telegram.url}/file/bot{TOKEN}/photos/file_2.jpg") as response:
            assert response.status == 404
        async with session.get(f"{telegram.url}/file/bot{TOKEN}/photos/file_1.jpg") as response:
            assert response.status == 200
            assert await response.read() == b"held"
    assert telegram.downloads == ["photos/file_2.jpg", "photos/file_1.jpg"]


# -- Telegram: payload helpers ---------------------------------------------------------------------


async def test_photo_sizes_are_a_message_photo_each_size_its_own_file(telegram: TelegramStandIn, bot: Bot) -> None:
    photo = telegram.photo_sizes([b"small", b"medium", b"large"])
    message = Message.model_validate(telegram.message(photo=photo, caption="what is this?"))
    assert message.photo is not None
    assert [(size.width, size.height) for size in message.photo] == [(90, 67), (320, 240), (1280, 960)]
    assert len({size.file_id for size in message.photo}) == 3
    largest = await bot.get_file(message.photo[-1].file_id)
    assert largest.file_path and largest.file_path.endswith(".jpg")
    downloaded = await bot.download_file(largest.file_path)
    assert downloaded is not None
    assert downloaded.read() == b"large"

    same = telegram.photo_sizes(JPEG, sizes=((100, 100),))
    assert [(size["width"], size["file_size"]) for size in same] == [(100, len(JPEG))]
    with pytest.raises(ValueError, match="2 files for 3 sizes"):
        telegram.photo_sizes([b"a", b"b"])


async def test_voice_and_document_are_message_payloads(telegram: TelegramStandIn, bot: Bot) -> None:
    voice = telegram.voice(b"OggS voice", duration=5)
    document = telegram.document(b"%PDF-1.4", file_name="report.pdf", mime_type="application/pdf")
    said = Message.model_validate(telegram.message(voice=voice))
    sent = Message.model_validate(telegram.message(document=document, caption="summarize"))
    assert said.voice is not None and sent.document is not None
    assert (said.voice.duration, said.voice.mime_type, said.voice.file_size) == (5, "audio/ogg", len(b"OggS voice"))
    assert (sent.document.file_name, sent.document.mime_type) == ("report.pdf", "application/pdf")
    for file_id, content, suffix in (
        (said.voice.file_id, b"OggS voice", ".oga"),
        (sent.document.file_id, b"%PDF-1.4", ".pdf"),
    ):
        file = await bot.get_file(file_id)
        assert file.file_path and file.file_path.endswith(suffix)  # as Telegram names them: voice/file_1.oga
        downloaded = await bot.download_file(file.file_path)
        assert downloaded is not None
        assert downloaded.read() == content

    huge = telegram.document(b"", file_name="huge.zip", mime_type="application/zip", reported_size=30 * 1024 * 1024)
    assert huge["file_size"] == 30 * 1024 * 1024
    with pytest.raises(TelegramBadRequest, match="file is too big"):
        await bot.get_file(huge["file_id"])


# -- LLM: transcriptions ---------------------------------------------------------------------------


async def test_transcription_answers_the_transcript_and_records_the_upload(llm: LLMStandIn) -> None:
    llm.transcript = "hello from a voice note"
    result = await client(llm).audio.transcriptions.create(
        model="whisper-1", file=("voice.ogg", b"OggS voice bytes", "audio/ogg"), language="en"
    )
    assert result.text == "hello from a voice note"
    [record] = llm.transcriptions
    assert record["model"] == "whisper-1"
    assert record["filename"] == "voice.ogg"
    assert record["file"] == b"OggS voice bytes"
    assert record["content_type"] == "audio/ogg"
    assert record["language"] == "en"
    assert llm.requests == []  # not a chat request


async def test_transcription_as_plain_text(llm: LLMStandIn) -> None:
    text = await client(llm).audio.transcriptions.create(
        model="whisper-1", file=("voice.ogg", b"OggS", "audio/ogg"), response_format="text"
    )
    assert text == "a transcript from the stand-in"
    assert llm.transcriptions[0]["response_format"] == "text"


@pytest.mark.parametrize(
    ("status", "error"), [(500, openai.InternalServerError), (400, openai.BadRequestError)]
)  # fmt: skip
async def test_transcription_fails_with_transcription_status(
    llm: LLMStandIn, status: int, error: type[openai.APIStatusError]
) -> None:
    llm.transcription_status = status
    with pytest.raises(error) as raised:
        await client(llm).audio.transcriptions.create(model="whisper-1", file=("v.ogg", b"OggS", "audio/ogg"))
    assert raised.value.status_code == status
    assert raised.value.body == {"message": "stand-in transcription failure", "type": "server_error", "code": None}
    assert len(llm.transcriptions) == 1


# -- LLM: images in chat requests ------------------------------------------------------------------


def with_image(text: str, *urls: str) -> list[Any]:
    """A user message's content: ``text`` and an image part per URL, as the bot sends a photo."""
    parts: list[Any] = [{"type": "text", "text": text}]
    return parts + [{"type": "image_url", "image_url": {"url": url}} for url in urls]


async def test_string_content_is_echoed_as_before(llm: LLMStandIn) -> None:
    answer = await client(llm).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "echo: hi"
    assert answer.usage is not None and answer.usage.prompt_tokens == 2


async def test_list_content_echoes_its_text_and_counts_its_images(llm: LLMStandIn) -> None:
    content = with_image("what is this?", DATA_URL, DATA_URL)
    answer = await client(llm).chat.completions.create(
        model="m",
        messages=[
            {"role": "system", "content": "sys"},
            {"role": "user", "content": content},
        ],
    )
    assert answer.choices[0].message.content == "echo: what is this? [+2 images]"
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == len("sys") + len("what is this?") + 2 * IMAGE_USAGE
    assert images_in(llm.requests[0]) == [DATA_URL, DATA_URL]
    text_only = await client(llm).chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": [{"type": "text", "text": "just text"}]}],
    )
    assert text_only.choices[0].message.content == "echo: just text"
    assert images_in(llm.requests[1]) == []


async def test_list_content_streams_with_usage(llm: LLMStandIn) -> None:
    stream = await client(llm).chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": with_image("look", DATA_URL)}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    async for chunk in stream:
        pieces += [choice.delta.content or "" for choice in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(pieces) == "echo: look [+1 images]"
    assert usage is not None and usage.prompt_tokens == len("look") + IMAGE_USAGE


async def test_refuse_images_answers_400_for_a_request_with_an_image(llm: LLMStandIn) -> None:
    llm.refuse_images = True
    earlier_image: list[Any] = [
        {"role": "user", "content": with_image("this?", DATA_URL)},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": "and now?"},
    ]
    with pytest.raises(openai.BadRequestError) as raised:
        await client(llm).chat.completions.create(model="m", messages=earlier_image)
    assert raised.value.code == "image_not_supported"
    assert raised.value.body == {
        "message": "This model does not support image input",
        "type": "invalid_request_error",
        "code": "image_not_supported",
    }
    assert len(llm.requests) == 1  # recorded like any other
    answer = await client(llm).chat.completions.create(model="m", messages=[{"role": "user", "content": "text"}])
    assert answer.choices[0].message.content == "echo: text"


# -- LLM: tool calls -------------------------------------------------------------------------------


def function(name: str) -> dict[str, Any]:
    """A tool as the bot offers it: a function taking a ``query``."""
    parameters = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}
    return {"type": "function", "function": {"name": name, "description": f"{name} a query", "parameters": parameters}}


TOOLS: list[Any] = [function("search_history"), function("remember")]
ASK: list[Any] = [{"role": "user", "content": "Which book did I say?"}]


def call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": json.dumps(arguments)}


def calls_of(answer: ChatCompletion) -> list[tuple[str, str, str]]:
    """The (id, name, arguments) of a whole answer's tool calls, each a function's."""
    calls = answer.choices[0].message.tool_calls or []
    assert all(isinstance(c, ChatCompletionMessageFunctionToolCall) and c.type == "function" for c in calls)
    return [
        (c.id, c.function.name, c.function.arguments)
        for c in calls
        if isinstance(c, ChatCompletionMessageFunctionToolCall)
    ]


async def streamed_calls(llm: LLMStandIn) -> tuple[list[dict[str, str]], list[Any], str | None, Any]:
    """A streamed request with TOOLS: the calls reassembled from the SDK's chunks as a client does
    (by index: id and name from the first delta, the arguments' pieces after it), every tool-call
    delta as the SDK parsed it, the finish reason and the usage."""
    stream = await client(llm).chat.completions.create(
        model="m", messages=ASK, tools=TOOLS, stream=True, stream_options={"include_usage": True}
    )
    calls: dict[int, dict[str, str]] = {}
    deltas: list[Any] = []
    finish, usage, text = None, None, ""
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            text += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                deltas.append(delta)
                assembled = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                assembled["id"] += delta.id or ""
                if delta.function is not None:
                    assembled["name"] += delta.function.name or ""
                    assembled["arguments"] += delta.function.arguments or ""
    assert text == ""  # calls instead of text
    return [calls[i] for i in sorted(calls)], deltas, finish, usage


async def test_a_streamed_tool_call_reassembles_to_the_scripted_calls(llm: LLMStandIn) -> None:
    llm.chunk = 5
    first, second = call("search_history", query="favourite book"), call("remember", query="likes Solaris")
    llm.tool_calls = [[first, second]]
    calls, deltas, finish, usage = await streamed_calls(llm)
    assert calls == [
        {"id": "call_1", "name": "search_history", "arguments": first["arguments"]},
        {"id": "call_2", "name": "remember", "arguments": second["arguments"]},
    ]
    assert finish == "tool_calls"
    # per call: its id, type and name with arguments "", then the arguments in pieces of `chunk`
    for index, scripted in enumerate((first, second)):
        [opening, *pieces] = [d for d in deltas if d.index == index]
        assert (opening.id, opening.type, opening.function.name, opening.function.arguments) == (
            f"call_{index + 1}",
            "function",
            scripted["name"],
            "",
        )
        assert [(p.id, p.function.name) for p in pieces] == [(None, None)] * len(pieces)
        assert [p.function.arguments for p in pieces] == [
            scripted["arguments"][i : i + 5] for i in range(0, len(scripted["arguments"]), 5)
        ]
        assert len(pieces) > 1
    assert usage is not None
    assert usage.completion_tokens == len("search_history" + first["arguments"] + "remember" + second["arguments"])
    assert llm.tool_calls == []  # taken
    assert tools_offered(llm.requests[0]) == ["search_history", "remember"]


async def test_a_whole_answer_with_tool_calls_keeps_malformed_arguments_as_given(llm: LLMStandIn) -> None:
    llm.tool_calls = [[{"name": "search_history", "arguments": '{"query": "bo'}], [call("remember", query="x")]]
    answer = await client(llm).chat.completions.create(model="m", messages=ASK, tools=TOOLS)
    [choice] = answer.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert calls_of(answer) == [("call_1", "search_history", '{"query": "bo')]
    again = await client(llm).chat.completions.create(model="m", messages=ASK, tools=TOOLS)
    assert calls_of(again) == [("call_2", "remember", '{"query": "x"}')]  # ids go on across requests
    assert llm.requests[1]["tools"] == TOOLS  # recorded as sent


async def test_a_request_without_tools_gets_text_and_leaves_the_scripted_calls(llm: LLMStandIn) -> None:
    llm.tool_calls = [[call("search_history", query="book")]]
    plain = await client(llm).chat.completions.create(model="m", messages=ASK)
    assert plain.choices[0].finish_reason == "stop"
    assert plain.choices[0].message.content == "echo: Which book did I say?"
    assert plain.choices[0].message.tool_calls is None
    assert tools_offered(llm.requests[0]) == []
    assert len(llm.tool_calls) == 1  # still there for a request with tools
    await client(llm).chat.completions.create(model="m", messages=ASK, tools=TOOLS)
    after = await client(llm).chat.completions.create(model="m", messages=ASK, tools=TOOLS)
    assert after.choices[0].message.content == "echo: Which book did I say?"  # the queue is spent: text
    assert after.choices[0].finish_reason == "stop"


async def test_refuse_tools_answers_400_for_a_request_with_tools(llm: LLMStandIn) -> None:
    llm.refuse_tools = True
    llm.tool_calls = [[call("search_history", query="book")]]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as raised:
            await client(llm).chat.completions.create(model="m", messages=ASK, tools=TOOLS, stream=stream)
        assert raised.value.code == "tools_not_supported"
        assert raised.value.body == {
            "message": "tools are not supported by this model",
            "type": "invalid_request_error",
            "code": "tools_not_supported",
        }
    assert len(llm.requests) == 2  # recorded like any other
    assert len(llm.tool_calls) == 1  # a refused request takes no calls
    answer = await client(llm).chat.completions.create(model="m", messages=ASK)
    assert answer.choices[0].message.content == "echo: Which book did I say?"


async def test_always_tool_calls_answers_every_request_with_tools_after_the_queue(llm: LLMStandIn) -> None:
    llm.tool_calls = [[call("remember", query="first")]]
    llm.always_tool_calls = [call("search_history", query="book")]
    answers = [await client(llm).chat.completions.create(model="m", messages=ASK, tools=TOOLS) for _ in range(3)]
    assert [calls_of(answer) for answer in answers] == [
        [("call_1", "remember", '{"query": "first"}')],
        [("call_2", "search_history", '{"query": "book"}')],
        [("call_3", "search_history", '{"query": "book"}')],
    ]
    calls, _, finish, _ = await streamed_calls(llm)
    assert (calls, finish) == (
        [{"id": "call_4", "name": "search_history", "arguments": '{"query": "book"}'}],
        "tool_calls",
    )
    plain = await client(llm).chat.completions.create(model="m", messages=ASK)  # no tools: text
    assert plain.choices[0].message.content == "echo: Which book did I say?"


async def test_a_follow_up_with_the_tool_result_gets_its_echo(llm: LLMStandIn) -> None:
    llm.tool_calls = [[call("search_history", query="book"), call("remember", query="x")]]
    asked = await client(llm).chat.completions.create(model="m", messages=ASK, tools=TOOLS)
    [found, noted] = calls_of(asked)
    follow_up: list[Any] = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}
                for id_, name, arguments in (found, noted)
            ],
        },
        {"role": "tool", "tool_call_id": found[0], "content": '{"found": ["My favourite book is Solaris."]}'},
        {"role": "tool", "tool_call_id": noted[0], "content": '{"saved": true}'},
    ]
    answer = await client(llm).chat.completions.create(model="m", messages=follow_up, tools=TOOLS)
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == 'echo: {"saved": true}'
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == sum(
        len(text)
        for text in (
            "Which book did I say?",
            "search_history",
            '{"query": "book"}',
            "remember",
            '{"query": "x"}',
            '{"found": ["My favourite book is Solaris."]}',
            '{"saved": true}',
        )
    )
    assert [(r["tool_call_id"], r["content"]) for r in tool_results(llm.requests[1])] == [
        ("call_1", '{"found": ["My favourite book is Solaris."]}'),
        ("call_2", '{"saved": true}'),
    ]
    assert tool_results(llm.requests[0]) == []
    stream = await client(llm).chat.completions.create(model="m", messages=follow_up[:-1], stream=True)
    streamed = "".join([choice.delta.content or "" async for chunk in stream for choice in chunk.choices])
    assert streamed == 'echo: {"found": ["My favourite book is Solaris."]}'
    only_calls = await client(llm).chat.completions.create(model="m", messages=follow_up[:2])  # content None last
    assert only_calls.choices[0].message.content == "echo: "

"""Local stand-ins for the Telegram Bot API and an OpenAI-compatible endpoint, over real HTTP, for the
tests and the benchmark.

Both are small aiohttp servers on 127.0.0.1 that record every request, so tests can drive the
real bot (its aiohttp session, its openai client) and assert on what crossed the wire. They also
note when (``time.monotonic()``) each update was handed out and each request arrived and was
answered, for the benchmark's timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from aiohttp import web

UPLOAD_LIMIT_BYTES = 50 * 1024 * 1024  # what the Bot API accepts from a bot, per file
DOWNLOAD_LIMIT_BYTES = 20 * 1024 * 1024  # what getFile lets a bot download, per file
IMAGE_USAGE = 85  # prompt "tokens" the LLM stand-in counts per image part (a low-detail image's cost at OpenAI)
BOT_USER = {"id": 4242, "is_bot": True, "first_name": "Test Bot", "username": "test_llm_bot"}


@dataclass
class Sent:
    """One call the bot made to the Bot API."""

    method: str
    params: dict[str, Any]
    status: int = 200  # what the stand-in answered: 200 accepted, else the error code
    message_id: int | None = None  # the id given to an accepted message
    received_at: float = 0.0  # time.monotonic() when the request arrived
    answered_at: float = 0.0  # time.monotonic() when its answer was ready

    @property
    def chat_id(self) -> int:
        return int(self.params["chat_id"])

    @property
    def text(self) -> str:
        return str(self.params.get("text", ""))


@dataclass(frozen=True)
class Upload:
    """A file the bot uploaded (sendDocument)."""

    filename: str
    content: bytes


@dataclass
class _File:
    """A file a user sent, as the Bot API holds it: ``size`` is what getFile reports."""

    file_id: str
    file_unique_id: str
    file_path: str
    data: bytes
    size: int

    def payload(self) -> dict[str, Any]:
        return {"file_id": self.file_id, "file_unique_id": self.file_unique_id, "file_size": self.size}


@dataclass
class _Server:
    """An aiohttp app on a free loopback port; ``url`` is its base address once started."""

    runner: web.AppRunner | None = field(default=None, init=False)
    url: str = field(default="", init=False)

    async def _serve(
        self,
        route: str,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        gets: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] | None = None,
        posts: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] | None = None,
    ) -> str:
        app = web.Application(client_max_size=UPLOAD_LIMIT_BYTES)
        app.router.add_post(route, handler)
        for path, post in (posts or {}).items():
            app.router.add_post(path, post)
        for path, get in (gets or {}).items():
            app.router.add_get(path, get)
        self.runner, base = await serve(app)
        return base

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@dataclass
class TelegramStandIn(_Server):
    """Serves getMe/getUpdates, records sendMessage, sendChatAction, setMyCommands and the rest
    (``unknown_methods``, refused as not known, too).

    Files a user sends: ``add_file`` holds bytes under a new file_id (``photo_sizes``, ``voice``
    and ``document`` build a message's payload around it); getFile answers for them as the Bot
    API does (400 for an unknown file_id, and for one over the 20 MB download limit), and
    ``GET /file/bot<token>/<file_path>`` (what aiogram's ``TelegramAPIServer.from_base`` asks)
    serves their bytes, each request's file_path recorded in ``downloads``.
    """

    updates: list[dict[str, Any]] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)
    confirmed_offset: int = 0
    fail_next_sends: int = 0
    refused_chats: dict[int, tuple[int, str]] = field(default_factory=dict)  # chat id -> (error code, description)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _message_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(100_000))
    _new_update: asyncio.Event = field(default_factory=asyncio.Event)
    _sent_event: asyncio.Event = field(default_factory=asyncio.Event)
    handed_out: dict[int, float] = field(default_factory=dict)  # update id -> first getUpdates answer with it
    first_poll_at: float | None = None  # time.monotonic() of the first getUpdates: the bot is polling
    on_accepted: Callable[[Sent], None] | None = None  # called with each accepted sendMessage, before it is answered
    fail_next_edits: int = 0  # editMessageText answered 429 (retry after 1 s)
    refuse_entities: int = 0  # messages with entities refused as unparsable, as a picky Telegram would
    refuse_edits: bool = False  # editMessageText refused: the message is gone
    texts: dict[int, str] = field(default_factory=dict)  # message id -> its text now (after edits)
    chat_of: dict[int, int] = field(default_factory=dict)  # message id -> chat id
    member_status: dict[tuple[int, int], str] = field(default_factory=dict)  # (chat, user) -> getChatMember status
    # Methods this server does not know (an older telegram-bot-api, an emulator): recorded, and
    # answered as telegram-bot-api answers an unknown method, 404 "Not Found".
    unknown_methods: set[str] = field(default_factory=set)
    files: dict[str, _File] = field(default_factory=dict)  # file_id -> the file
    downloads: list[str] = field(default_factory=list)  # file_path of each GET /file/..., served or not (404)
    _file_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def start(self) -> None:
        self.url = await self._serve(
            "/bot{token}/{method}", self._handle, {"/file/bot{token}/{file_path:.+}": self._download}
        )

    # -- what a test does -----------------------------------------------------------------

    def push(self, kind: str, payload: dict[str, Any]) -> int:
        """Queue an update of ``kind`` (message, edited_message, channel_post...); its id."""
        update_id = next(self._ids)
        self.updates.append({"update_id": update_id, kind: payload})
        self._new_update.set()
        return update_id

    def push_update(self, update: dict[str, Any]) -> None:
        """Queue an update exactly as given (a redelivery keeps its update_id)."""
        self.updates.append(update)
        self._new_update.set()

    def message(
        self,
        text: str | None = None,
        *,
        user_id: int = 1,
        chat_id: int | None = None,
        first_name: str = "Ann",
        is_bot: bool = False,
        message_id: int | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """A Message payload from ``user_id`` in ``chat_id`` (their private chat by default)."""
        chat = chat_id if chat_id is not None else user_id
        payload: dict[str, Any] = {
            "message_id": message_id if message_id is not None else next(self._message_ids),
            "date": int(time.time()),
            "chat": {"id": chat, "type": "private" if chat > 0 else "supergroup", "title": None},
            "from": {"id": user_id, "is_bot": is_bot, "first_name": first_name},
            **extra,
        }
        if chat < 0:
            payload["chat"]["title"] = "Group"
        else:
            del payload["chat"]["title"]
        if text is not None:
            payload["text"] = text
        return payload

    def add_file(
        self, data: bytes, *, file_path: str | None = None, reported_size: int | None = None
    ) -> dict[str, Any]:
        """Hold ``data`` as a file a user sent; its ``file_id``, ``file_unique_id`` and ``file_size``.

        ``file_path`` is what getFile answers (``files/file_<n>`` by default); ``reported_size``
        is the size given instead of ``len(data)`` (over 20 MB: getFile refuses it, "file is too
        big", without the stand-in holding that much).
        """
        return self._hold(data, file_path or "files/file_{n}", reported_size).payload()

    def _hold(self, data: bytes, path: str, reported_size: int | None) -> _File:
        """A new file of ``data`` at ``path``, where ``{n}`` is its number."""
        number = next(self._file_ids)
        held = _File(
            file_id=f"stand-in-file-{number}",
            file_unique_id=f"u-file-{number}",
            file_path=path.replace("{n}", str(number)),
            data=data,
            size=reported_size if reported_size is not None else len(data),
        )
        self.files[held.file_id] = held
        return held

    def photo_sizes(
        self,
        data: bytes | Sequence[bytes],
        sizes: Sequence[tuple[int, int]] = ((90, 67), (320, 240), (1280, 960)),
    ) -> list[dict[str, Any]]:
        """A message's ``photo``: a PhotoSize per (width, height) of ``sizes``, smallest first as
        Telegram sends them, each its own file of ``data`` (the same bytes, or one per size)."""
        per_size = [data] * len(sizes) if isinstance(data, bytes) else list(data)
        if len(per_size) != len(sizes):
            raise ValueError(f"{len(per_size)} files for {len(sizes)} sizes")
        photo = []
        for (width, height), content in zip(sizes, per_size, strict=True):
            held = self._hold(content, "photos/file_{n}.jpg", None)
            photo.append({**held.payload(), "width": width, "height": height})
        return photo

    def voice(
        self, data: bytes, *, duration: int = 3, mime_type: str = "audio/ogg", reported_size: int | None = None
    ) -> dict[str, Any]:
        """A message's ``voice``: a Voice of ``data`` (see ``add_file`` for ``reported_size``)."""
        held = self._hold(data, "voice/file_{n}.oga", reported_size)
        return {**held.payload(), "duration": duration, "mime_type": mime_type}

    def document(
        self,
        data: bytes,
        *,
        file_name: str = "notes.txt",
        mime_type: str = "text/plain",
        reported_size: int | None = None,
    ) -> dict[str, Any]:
        """A message's ``document``: a Document of ``data`` (see ``add_file`` for ``reported_size``)."""
        held = self._hold(data, "documents/file_{n}" + PurePosixPath(file_name).suffix, reported_size)
        return {**held.payload(), "file_name": file_name, "mime_type": mime_type}

    def send(self, text: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """Queue a message update; the Message payload."""
        payload = self.message(text, **kwargs)
        self.push("message", payload)
        return payload

    def shown(self, chat_id: int) -> list[str]:
        """The texts of the messages in ``chat_id`` as the user sees them now, edits applied."""
        return [text for message_id, text in self.texts.items() if self.chat_of[message_id] == chat_id]

    def messages_to(self, chat_id: int) -> list[str]:
        """The texts Telegram accepted for ``chat_id``, in order: what the user sees."""
        return [s.text for s in self.sent if s.method == "sendMessage" and s.chat_id == chat_id and s.status == 200]

    def documents(self, chat_id: int) -> list[Upload]:
        """The files Telegram accepted for ``chat_id``, in order."""
        return [s.params["document"] for s in self.calls("sendDocument") if s.chat_id == chat_id and s.status == 200]

    def calls(self, method: str) -> list[Sent]:
        return [s for s in self.sent if s.method == method]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 15.0) -> None:
        """Wait until ``condition()`` holds after some request; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out; sent so far: {[(s.method, s.params) for s in self.sent]}")
            self._sent_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sent_event.wait(), min(remaining, 0.2))

    async def wait_for_messages(self, chat_id: int, count: int, timeout: float = 15.0) -> list[str]:
        await self.wait_for(lambda: len(self.messages_to(chat_id)) >= count, timeout)
        return self.messages_to(chat_id)

    # -- the Bot API ------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        received_at = time.monotonic()
        method = request.match_info["method"]
        params = {key: _param(value) for key, value in (await request.post()).items()}
        for key, value in params.items():  # a file travels as its own part, named by "attach://<name>"
            if isinstance(value, str) and value.startswith("attach://"):
                params[key] = params[value.removeprefix("attach://")]
        if method in self.unknown_methods:
            self.sent.append(Sent(method, params, status=404, received_at=received_at, answered_at=time.monotonic()))
            self._sent_event.set()
            return _error(404, "Not Found")
        if method == "getUpdates":
            if self.first_poll_at is None:
                self.first_poll_at = received_at
            updates = await self._get_updates(params)
            response = _ok(updates)
            handed_at = time.monotonic()
            for update in updates:
                self.handed_out.setdefault(update["update_id"], handed_at)
            return response
        if method == "getMe":
            return _ok(BOT_USER)
        sent = Sent(method, params, received_at=received_at)
        self.sent.append(sent)
        self._sent_event.set()
        if method == "getChatMember":
            return _ok(self._chat_member(int(params["chat_id"]), int(params["user_id"])))
        if method == "getFile":
            return self._get_file(sent)
        if method in ("sendMessage", "sendChatAction") and int(params["chat_id"]) in self.refused_chats:
            sent.status, description = self.refused_chats[int(params["chat_id"])]
            return _error(sent.status, description)
        if method in ("sendMessage", "editMessageText", "sendMessageDraft"):
            refusal = self._refusal(method, params)
            if refusal is not None:
                sent.status = refusal[0]
                extra: dict[str, Any] = {"parameters": {"retry_after": 1}} if refusal[0] == 429 else {}
                return _error(*refusal, **extra)
        if method == "editMessageText":
            self.texts[int(params["message_id"])] = str(params.get("text", ""))
            return _ok({"message_id": int(params["message_id"]), "date": int(time.time()), "text": params["text"],
                        "chat": {"id": int(params["chat_id"]), "type": "private"}})  # fmt: skip
        if method == "sendMessage":
            if self.fail_next_sends:
                self.fail_next_sends -= 1
                sent.status = 429
                return _error(429, "Too Many Requests: retry after 1", parameters={"retry_after": 1})
            if len(str(params.get("text", ""))) > 4096:
                sent.status = 400
                return _error(400, "Bad Request: message is too long")
            sent.message_id = next(self._message_ids)
            self.texts[sent.message_id] = str(params.get("text", ""))
            self.chat_of[sent.message_id] = int(params["chat_id"])
            response = _ok(
                {
                    "message_id": sent.message_id,
                    "date": int(time.time()),
                    "chat": {"id": int(params["chat_id"]), "type": "private"},
                    "from": BOT_USER,
                    "text": params.get("text", ""),
                }
            )
            sent.answered_at = time.monotonic()
            if self.on_accepted is not None:
                self.on_accepted(sent)
            return response
        if method == "sendDocument":
            sent.message_id = next(self._message_ids)
            document = params["document"]
            sent.answered_at = time.monotonic()
            return _ok(
                {
                    "message_id": sent.message_id,
                    "date": int(time.time()),
                    "chat": {"id": int(params["chat_id"]), "type": "private"},
                    "from": BOT_USER,
                    "document": {"file_id": f"file-{sent.message_id}", "file_unique_id": f"u{sent.message_id}",
                                 "file_name": document.filename, "file_size": len(document.content)},
                }
            )  # fmt: skip
        sent.answered_at = time.monotonic()
        return _ok(True)

    def _get_file(self, sent: Sent) -> web.Response:
        """getFile as the Bot API answers it: a File with its file_path, or 400."""
        held = self.files.get(str(sent.params.get("file_id", "")))
        sent.answered_at = time.monotonic()
        if held is None or held.size > DOWNLOAD_LIMIT_BYTES:
            sent.status = 400
            return _error(400, "Bad Request: invalid file_id" if held is None else "Bad Request: file is too big")
        return _ok({**held.payload(), "file_path": held.file_path})

    async def _download(self, request: web.Request) -> web.Response:
        """A file's bytes by its file_path; 404 for a path getFile never gave."""
        path = request.match_info["file_path"]
        self.downloads.append(path)
        self._sent_event.set()
        for held in self.files.values():
            if held.file_path == path:
                return web.Response(body=held.data, content_type="application/octet-stream")
        return _error(404, "Not Found")

    def _chat_member(self, chat_id: int, user_id: int) -> dict[str, Any]:
        """A ChatMember as Telegram returns it: ``member_status`` says which, "member" by default."""
        status = self.member_status.get((chat_id, user_id), "member")
        member: dict[str, Any] = {"status": status, "user": {"id": user_id, "is_bot": False, "first_name": "Ann"}}
        if status == "creator":
            member["is_anonymous"] = False
        elif status == "administrator":
            rights = ("can_be_edited", "is_anonymous", "can_manage_chat", "can_delete_messages",
                      "can_manage_video_chats", "can_restrict_members", "can_promote_members", "can_change_info",
                      "can_invite_users", "can_post_stories", "can_edit_stories", "can_delete_stories",
                      "can_send_welcome_messages")  # fmt: skip
            member.update(dict.fromkeys(rights, False))
        return member

    def _refusal(self, method: str, params: dict[str, Any]) -> tuple[int, str] | None:
        """What Telegram would answer instead of accepting, or None."""
        chat_id = int(params["chat_id"])
        if method == "sendMessageDraft" and chat_id < 0:
            return 400, "Bad Request: message drafts are available only in private chats"
        if method == "editMessageText":
            if self.refuse_edits:
                return 400, "Bad Request: message to edit not found"
            if self.fail_next_edits:
                self.fail_next_edits -= 1
                return 429, "Too Many Requests: retry after 1"
            if self.texts.get(int(params["message_id"])) == params.get("text"):
                return 400, "Bad Request: message is not modified"
        entities = params.get("entities") or []
        if entities and self.refuse_entities:
            self.refuse_entities -= 1
            return 400, "Bad Request: can't parse entities: refused by the stand-in"
        problem = entity_problem(str(params.get("text", "")), entities)
        return (400, f"Bad Request: {problem}") if problem else None

    async def _get_updates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        offset = int(params.get("offset") or 0)
        self.confirmed_offset = max(self.confirmed_offset, offset)
        # Confirmed updates are gone for good, as with Telegram.
        self.updates = [u for u in self.updates if u["update_id"] >= self.confirmed_offset]
        if not self.updates:
            self._new_update.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_update.wait(), min(float(params.get("timeout") or 0), 1.0))
        return list(self.updates)


@dataclass
class LLMStandIn(_Server):
    """An OpenAI-compatible /v1/chat/completions that records requests.

    ``reply`` builds the answer from the request's messages; ``status`` makes it fail with that
    HTTP status; ``delay`` makes it slow, and ``delays`` the next requests one by one; while
    ``gate`` is cleared, requests wait for it to be set. A request
    with ``stream: true`` is answered with server-sent events of ``chunk`` characters every
    ``pace`` seconds; ``fail_after_chunks`` ends such a stream with an error event instead;
    ``can_stream=False`` refuses streaming with a 400, as some endpoints do. Usage is reported
    (a stream's last chunk, when asked with ``stream_options.include_usage``) as one token per
    character, recorded in ``usages``; ``report_usage=False`` leaves it out. /v1/models lists
    the models of ``context_lengths`` with their ``context_length``, as OpenRouter does.

    A user message's content may be a list of parts (text and ``image_url``): the default reply
    echoes its text parts and `` [+N images]``, usage counts ``IMAGE_USAGE`` per image, and
    ``refuse_images=True`` answers a request with any image 400, as a text-only model's endpoint
    does. /v1/audio/transcriptions (multipart, as the openai SDK sends it) records each request in
    ``transcriptions`` and answers ``transcript``, or fails with ``transcription_status``.

    Tools (a request with ``tools``): ``tool_calls`` is a queue of answers, each a list of calls
    ``{"name": ..., "arguments": "<JSON text, sent exactly as given>"}``; the next request with
    tools takes the first and answers with those calls (each its id ``call_<n>``) instead of text,
    ``finish_reason: "tool_calls"``, streamed as OpenAI streams them (a call's id and name first,
    then its arguments in pieces of ``chunk`` characters). Once the queue is empty,
    ``always_tool_calls`` (when set) answers every request with tools: a model that loops.
    ``refuse_tools=True`` answers a request with tools 400 (``TOOLS_REFUSED``), as an endpoint
    whose model takes none does. A request without tools is answered with text, as before.
    """

    requests: list[dict[str, Any]] = field(default_factory=list)
    reply: Callable[[list[dict[str, Any]]], str] = field(default=lambda messages: echo(messages))
    status: int = 200
    refuse_images: bool = False
    transcript: str = "a transcript from the stand-in"
    transcription_status: int = 200
    transcriptions: list[dict[str, Any]] = field(default_factory=list)  # fields, filename, file bytes, content_type
    delay: float = 0.0
    delays: list[float] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    spans: list[tuple[float, float]] = field(default_factory=list)  # per request: (arrived, answered), monotonic
    chunk: int = 8
    pace: float = 0.0
    fail_after_chunks: int | None = None
    can_stream: bool = True
    chunks_sent: int = 0
    first_chunk_at: list[float] = field(default_factory=list)  # monotonic, per streamed request
    first_chunk_of: dict[int, float] = field(default_factory=dict)  # request index -> first_chunk_at of its stream
    stream_ended_at: list[float] = field(default_factory=list)  # monotonic, per stream written to the end
    report_usage: bool = True
    usages: list[tuple[int, int]] = field(default_factory=list)  # (prompt, completion) tokens reported
    context_lengths: dict[str, int] = field(default_factory=dict)
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # cleared: requests wait until it is set
    tool_calls: list[list[dict[str, Any]]] = field(default_factory=list)  # answers with calls, for requests with tools
    always_tool_calls: list[dict[str, Any]] | None = None  # once tool_calls is empty: every request with tools
    refuse_tools: bool = False  # a request with tools is answered 400
    _call_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.gate.set()

    async def start(self) -> None:
        self.url = (
            await self._serve(
                "/v1/chat/completions",
                self._handle,
                {"/v1/models": self._models},
                {"/v1/audio/transcriptions": self._transcribe},
            )
            + "/v1"
        )

    async def _transcribe(self, request: web.Request) -> web.StreamResponse:
        """Whisper's endpoint: the recorded request's text fields, ``filename``, ``file`` (bytes) and
        ``content_type``; answered ``{"text": transcript}`` (plain text for response_format=text)."""
        record: dict[str, Any] = {}
        for key, value in (await request.post()).items():
            if isinstance(value, web.FileField):
                record.update(filename=value.filename, file=value.file.read(), content_type=value.content_type)
            else:
                record[key] = value
        self.transcriptions.append(record)
        if self.transcription_status != 200:
            return web.json_response(
                {"error": {"message": "stand-in transcription failure", "type": "server_error", "code": None}},
                status=self.transcription_status,
            )
        if record.get("response_format") == "text":
            return web.Response(text=self.transcript)
        return web.json_response({"text": self.transcript})

    async def _models(self, request: web.Request) -> web.StreamResponse:
        data = [
            {"id": model, "object": "model", "created": 0, "owned_by": "stand-in", "context_length": length}
            for model, length in self.context_lengths.items()
        ]
        return web.json_response({"object": "list", "data": data})

    async def stop(self) -> None:
        self._stopping.set()
        await super().stop()

    @property
    def conversations(self) -> list[list[dict[str, Any]]]:
        """The messages of each request, in order."""
        return [r["messages"] for r in self.requests]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        body = await request.json()
        index = len(self.requests)
        self.requests.append(body)
        self.spans.append((arrived, arrived))
        self.started.set()
        delay = self.delays.pop(0) if self.delays else self.delay
        if delay:
            # Ends early when the stand-in stops, so no test waits out a slow answer nobody reads.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
        if not self.gate.is_set():  # held: a turn stays mid-LLM until the test lets it go
            waiters = {asyncio.ensure_future(self._stopping.wait()), asyncio.ensure_future(self.gate.wait())}
            _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in pending:
                waiter.cancel()
        if self.status != 200:
            self.spans[index] = (arrived, time.monotonic())
            return web.json_response(
                {"error": {"message": "stand-in failure", "type": "server_error"}}, status=self.status
            )
        if self.refuse_images and images_in(body):
            self.spans[index] = (arrived, time.monotonic())
            return web.json_response(IMAGES_REFUSED, status=400)
        if self.refuse_tools and body.get("tools"):
            self.spans[index] = (arrived, time.monotonic())
            return web.json_response(TOOLS_REFUSED, status=400)
        if body.get("stream") and not self.can_stream:
            return web.json_response(
                {"error": {"message": "streaming is not supported", "type": "invalid_request_error"}}, status=400
            )
        calls = self._calls_for(body)
        content = self.reply(body["messages"]) if calls is None else ""
        if body.get("stream"):
            streamed = await self._stream(request, body, content, calls, index)
            self.spans[index] = (arrived, time.monotonic())  # the stream's last event is written
            return streamed
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls is not None:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
        response = web.json_response(
            {
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {"index": 0, "finish_reason": "stop" if calls is None else "tool_calls", "message": message}
                ],
                "usage": self._usage(body, _completion_of(content, calls)),
            }
        )
        self.spans[index] = (arrived, time.monotonic())
        return response

    def _calls_for(self, body: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The tool calls (OpenAI's ``message.tool_calls``, each with a new id) that answer a
        request with tools, if any are scripted: the next of ``tool_calls``, else ``always_tool_calls``."""
        if not body.get("tools"):
            return None
        if self.tool_calls:
            scripted = self.tool_calls.pop(0)
        elif self.always_tool_calls is not None:
            scripted = self.always_tool_calls
        else:
            return None
        return [
            {
                "id": f"call_{next(self._call_ids)}",
                "type": "function",
                "function": {"name": call["name"], "arguments": call["arguments"]},
            }
            for call in scripted
        ]

    def _tool_call_deltas(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The deltas that stream ``calls`` as OpenAI does: per call, one with its index, id, type and
        name (arguments ""), then its arguments in pieces of ``chunk`` characters."""
        deltas: list[dict[str, Any]] = []
        for number, call in enumerate(calls):
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            deltas.append(
                {
                    "tool_calls": [
                        {
                            "index": number,
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": name, "arguments": ""},
                        }
                    ]
                }
            )
            deltas += [
                {"tool_calls": [{"index": number, "function": {"arguments": arguments[i : i + self.chunk]}}]}
                for i in range(0, len(arguments), self.chunk)
            ]
        return deltas

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        content: str,
        calls: list[dict[str, Any]] | None,
        index: int,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def event(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await response.write(f"data: {data}\n\n".encode())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        with contextlib.suppress(ConnectionResetError):  # the bot stopped reading (a stopped answer)
            if calls is None:
                opening: dict[str, Any] = {"role": "assistant", "content": ""}
                deltas: list[dict[str, Any]] = [
                    {"content": content[i : i + self.chunk]} for i in range(0, len(content), self.chunk)
                ]
            else:  # OpenAI's first delta of tool calls: the role, no content, the first call's id and name
                opening, *deltas = self._tool_call_deltas(calls)
                opening = {"role": "assistant", "content": None, **opening}
            if not await self._write_stream(
                event, chunk, opening, deltas, "stop" if calls is None else "tool_calls", index
            ):
                return response
            if (body.get("stream_options") or {}).get("include_usage") and self.report_usage:
                usage = self._usage(body, _completion_of(content, calls))
                await event({**chunk({}), "choices": [], "usage": usage})
            await event("[DONE]")
            self.stream_ended_at.append(time.monotonic())
        return response

    def _usage(self, body: dict[str, Any], content: str) -> dict[str, int] | None:
        if not self.report_usage:
            return None
        prompt = sum(
            _content_size(m.get("content")) + len(_completion_of("", m.get("tool_calls"))) for m in body["messages"]
        )
        self.usages.append((prompt, len(content)))
        return {"prompt_tokens": prompt, "completion_tokens": len(content), "total_tokens": prompt + len(content)}

    async def _write_stream(
        self,
        event: Callable[[dict[str, Any] | str], Awaitable[None]],
        chunk: Callable[..., dict[str, Any]],
        opening: dict[str, Any],
        deltas: list[dict[str, Any]],
        finish: str,
        index: int,
    ) -> bool:
        """Write ``opening``, then ``deltas`` one chunk each (the ones ``pace``, ``fail_after_chunks``
        and ``chunks_sent`` count), then the chunk that ends with ``finish``. Whether the stream was
        written to its end (not failed half-way)."""
        await event(chunk(opening))
        for number, delta in enumerate(deltas):
            if self.fail_after_chunks is not None and number >= self.fail_after_chunks:
                await event({"error": {"message": "stand-in failure mid-stream", "type": "server_error"}})
                return False
            if number == 0:
                self.first_chunk_at.append(time.monotonic())
                self.first_chunk_of[index] = self.first_chunk_at[-1]
            await event(chunk(delta))
            self.chunks_sent += 1
            if self.pace:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.pace)
        await event(chunk({}, finish))
        return True


IMAGES_REFUSED = {
    "error": {
        "message": "This model does not support image input",
        "type": "invalid_request_error",
        "code": "image_not_supported",
    }
}
TOOLS_REFUSED = {
    "error": {
        "message": "tools are not supported by this model",
        "type": "invalid_request_error",
        "code": "tools_not_supported",
    }
}


def _completion_of(content: str | None, calls: list[dict[str, Any]] | None) -> str:
    """What usage counts of an answer (or of an assistant message sent back): its text, or its
    calls' names and arguments."""
    if not calls:
        return content or ""
    return (content or "") + "".join(
        str(call.get("function", {}).get("name", "")) + str(call.get("function", {}).get("arguments", ""))
        for call in calls
    )


def tool_results(request: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat request's ``tool`` messages (the results of the calls it answers), in order."""
    return [message for message in request.get("messages", []) if message.get("role") == "tool"]


def tools_offered(request: dict[str, Any]) -> list[str]:
    """The names of the functions a chat request offers in its ``tools``, in order."""
    return [str(tool["function"]["name"]) for tool in request.get("tools") or [] if "function" in tool]


def _parts(content: Any) -> list[dict[str, Any]]:
    return [part for part in content if isinstance(part, dict)] if isinstance(content, list) else []


def images_in(request: dict[str, Any]) -> list[str]:
    """The URLs (``data:image/...;base64,...``) of a chat request's image parts, in order."""
    return [
        str(part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"])
        for message in request.get("messages", [])
        for part in _parts(message.get("content"))
        if part.get("type") == "image_url"
    ]


def text_of(content: Any) -> str:
    """A message's content as text: a string as it is, a list of parts as its text parts joined,
    None (an assistant message with only tool calls) as ""."""
    if content is None:
        return ""
    if not isinstance(content, list):
        return str(content)
    return " ".join(str(part.get("text", "")) for part in _parts(content) if part.get("type") == "text")


def echo(messages: list[dict[str, Any]]) -> str:
    """The LLM stand-in's default reply: "echo: " and the last message's text (a ``tool`` message's
    result too), and " [+N images]" when it has images."""
    content = messages[-1].get("content")
    images = sum(1 for part in _parts(content) if part.get("type") == "image_url")
    return f"echo: {text_of(content)}" + (f" [+{images} images]" if images else "")


def _content_size(content: Any) -> int:
    """Usage's prompt count for a message: its characters, and ``IMAGE_USAGE`` per image (None: 0)."""
    if content is None:
        return 0
    if not isinstance(content, list):
        return len(str(content))
    return sum(
        IMAGE_USAGE if part.get("type") == "image_url" else len(str(part.get("text", ""))) for part in _parts(content)
    )


ENTITY_TYPES = {
    "bold", "italic", "underline", "strikethrough", "spoiler", "code", "pre", "text_link", "blockquote",
    "expandable_blockquote", "url", "mention", "hashtag", "bot_command", "email",
}  # fmt: skip


def entity_problem(text: str, entities: list[dict[str, Any]]) -> str | None:
    """What Telegram would refuse in ``text`` with ``entities`` (UTF-16 offsets), or None."""
    units = len(text.encode("utf-16-le")) // 2
    if units > 4096:
        return "message is too long"
    if len(entities) > 100:
        return "too many entities"
    spans: list[tuple[int, int, str]] = []
    for entity in entities:
        offset, length, kind = int(entity["offset"]), int(entity["length"]), str(entity["type"])
        if kind not in ENTITY_TYPES:
            return f"can't parse entities: unsupported type {kind}"
        if offset < 0 or length <= 0 or offset + length > units:
            return f"can't parse entities: {kind} at {offset}+{length} outside the text of {units}"
        if kind == "text_link" and not entity.get("url"):
            return "can't parse entities: text_link without url"
        spans.append((offset, offset + length, kind))
    for start, end, kind in spans:
        for other_start, other_end, other_kind in spans:
            if (start, end, kind) == (other_start, other_end, other_kind):
                continue
            if start < other_start < end < other_end:
                return f"can't parse entities: {kind} and {other_kind} overlap partially"
            inside = start <= other_start and other_end <= end
            if inside and kind in ("code", "pre"):
                return f"can't parse entities: {other_kind} inside {kind}"
    return None


def _ok(result: Any) -> web.Response:
    return web.json_response({"ok": True, "result": result})


def _error(code: int, description: str, **extra: Any) -> web.Response:
    return web.json_response({"ok": False, "error_code": code, "description": description, **extra}, status=code)


def _param(value: Any) -> Any:
    if isinstance(value, web.FileField):
        return Upload(value.filename, value.file.read())
    return _maybe_json(value)


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"

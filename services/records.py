"""The values every layer passes: a question, its answer, a turn's start, a chat's settings, the
messages of a context. At the bottom of the import graph: it imports nothing of the bot's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple, TypedDict

Role = Literal["system", "user", "assistant"]
AttachmentKind = Literal["photo", "voice", "audio", "video_note", "document"]
FinishReason = Literal["stopped", "failed"]  # an answer cut short; None: complete
Dialog = tuple[int, int]  # (telegram user id, telegram chat id)


class ChatMessage(TypedDict):
    """One message in the shape chat-completion APIs take."""

    role: Role
    content: str


# How the next context marks an answer that was cut short, so the model knows.
CUT_SHORT: dict[FinishReason, str] = {
    "stopped": "\n\n[The user stopped this answer here.]",
    "failed": "\n\n[This answer broke off here because of an error.]",
}


def as_sent(content: str, finish_reason: FinishReason | None) -> str:
    """An answer as the LLM will read it in later contexts: marked when it was cut short."""
    return content + CUT_SHORT[finish_reason] if finish_reason else content


@dataclass(frozen=True, slots=True)
class Attachment:
    """What a user message came with, as stored with it (``messages.attachments``, revision 013):
    Telegram's ids to fetch it again, and what is known of it; never its bytes."""

    kind: AttachmentKind
    file_id: str
    file_unique_id: str
    mime_type: str | None = None
    file_size: int | None = None
    width: int | None = None
    height: int | None = None
    duration: int | None = None  # seconds
    file_name: str | None = None

    def stored(self) -> dict[str, object]:
        """The attachment as its JSON object in the row (unknown fields left out)."""
        return {name: value for name in self.__slots__ if (value := getattr(self, name)) is not None}

    @classmethod
    def from_stored(cls, stored: dict[str, Any]) -> Attachment:
        return cls(**{name: stored[name] for name in cls.__slots__ if name in stored})

    @property
    def is_image(self) -> bool:
        """A photo, or an image sent as a file: the model is shown it."""
        return self.kind == "photo" or (self.kind == "document" and (self.mime_type or "").startswith("image/"))

    @property
    def label(self) -> str:
        """How a text-only context shows it: "photo", "voice message, 0:05", "file notes.txt"."""
        if self.kind == "document":
            return f"file {self.file_name}" if self.file_name else "file"
        name = {"photo": "photo", "voice": "voice message", "audio": "audio", "video_note": "video message"}[self.kind]
        if self.duration is None:
            return name
        minutes, seconds = divmod(self.duration, 60)
        return f"{name}, {minutes}:{seconds:02d}"


def described(content: str, attachments: Sequence[Attachment]) -> str:
    """A message as a text-only context shows it: its attachments as "[photo]" lines before its
    text (for a voice message, the text it was heard as). A document read as text is in the text
    already, under its own "[file name]" line."""
    labels = "\n".join(f"[{a.label}]" for a in attachments if a.kind != "document" or a.is_image)
    if not labels:
        return content
    return f"{labels}\n{content}" if content else labels


@dataclass(frozen=True, slots=True)
class Usage:
    """The tokens an endpoint reported for one answer (None: not reported)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None


NO_USAGE = Usage()


@dataclass(frozen=True, slots=True)
class Question:
    """A question as the pipeline tracks it: Telegram's ids, and the database id once stored."""

    chat_id: int
    user_id: int
    message_id: int | None
    id: int | None = None
    thread_id: int | None = None
    # Stored with a lease asked for: whether this process holds the chat's lease, its version.
    leased: bool | None = field(default=None, compare=False)
    lease_version: int | None = field(default=None, compare=False)
    # Stored with its turn's start read in the same round trip (a fresh question, its chat idle).
    start: TurnStart | None = field(default=None, compare=False, repr=False)

    @property
    def dialog(self) -> Dialog:
        return (self.user_id, self.chat_id)


@dataclass(frozen=True, slots=True)
class Answer:
    """An answer as stored: the database id (None while only spooled), its text, the parts sent."""

    id: int | None
    content: str
    sent_parts: int = 0


@dataclass(frozen=True, slots=True)
class ChatSettings:
    """What a chat chose (/model, /prompt, /temperature); None: the configuration's default."""

    model: str | None = None
    system_prompt: str | None = None
    temperature: float | None = None


DEFAULT_SETTINGS: Final = ChatSettings()
SettingName = Literal["model", "system_prompt", "temperature"]


class ContextMessage(NamedTuple):
    """One message of a context read: ``tokens`` estimated, ``running`` the sum of its own and
    every newer message's in the read; ``turn`` its question's id; ``author`` the first name of
    who wrote it, in a group's shared history."""

    id: int
    role: Role
    content: str
    tokens: int
    running: int
    turn: int
    finish_reason: FinishReason | None = None
    author: str | None = None
    attachments: list[dict[str, Any]] | None = None  # as stored (``Attachment.from_stored`` reads one)

    @property
    def images(self) -> list[Attachment]:
        """The photos (and images sent as files) the message came with."""
        return [a for a in map(Attachment.from_stored, self.attachments or ()) if a.is_image]


@dataclass(frozen=True, slots=True)
class Summary:
    """A dialog's rolling summary: it stands in for the ``covered`` live messages up to turn
    ``through_id``."""

    through_id: int
    covered: int
    content: str
    tokens: int


@dataclass(frozen=True, slots=True)
class DialogContext:
    """A dialog's live history after its summary, newest first, as far as the token bound of
    the read reached; ``read``: how many messages the read found (older ones lie beyond
    ``history`` when it is more than its length, or more than the history limit);
    ``memories``: what the asking user asked the bot to remember (``/remember``), oldest first,
    as far as this chat may see them (a group only with their ``/memory groups on``)."""

    history: list[ContextMessage]
    summary: Summary | None = None
    read: int = 0
    memories: tuple[str, ...] = ()


EMPTY_CONTEXT: Final = DialogContext([])


@dataclass(frozen=True, slots=True)
class TurnStart:
    """A turn's context, the answer already stored for it, whether its dialog's history is
    missing right now (a degraded bot that never saw this dialog), and the chat's settings
    (while degraded: the defaults)."""

    dialog: DialogContext
    answer: Answer | None
    history_missing: bool = False
    settings: ChatSettings = DEFAULT_SETTINGS
    from_database: bool = True  # False: read from memory while degraded (no summary there)
    quoted: str | None = None  # the text the question replies to, as stored with it
    # The asking user's memories (/remember), oldest first, when this chat may see them: in a
    # private chat always, in a group with their /memory groups on; none while degraded.
    memories: tuple[str, ...] = ()

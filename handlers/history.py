"""History the user controls: /retry, /undo, /search, /export, /stats, /context, and edited questions.

Each works on the sender's own history in this chat, as the conversation itself does; another
user's messages are never seen. They need the database: while it is out (or disabled) the
error handlers answer instead (``handlers.errors``).
"""

from __future__ import annotations

import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from aiogram import Bot, Router
from aiogram.filters import Command, CommandObject
from aiogram.types import FSInputFile, Message, User

from config import Config
from handlers.filters import may_be_command
from handlers.messages import address_of, asked, has_text
from services import context
from services.database import DialogStats, SearchHit, Undone
from services.fallback.storage import Storage
from services.llm.budget import Window
from services.text.export import Format, export_dialog
from services.text.formatting import Part, compose, split
from services.turn.delivery import Delivery
from services.turn.turns import Turns

logger = logging.getLogger(__name__)

SEARCH_LIMIT = 10
# Characters that never occur in what the bot stores (Unicode private use): ts_headline puts them
# around each match, and the reply turns what is between them bold.
MATCH_START, MATCH_END = "\ue000", "\ue001"
HEADLINE_OPTIONS = (
    f'StartSel={MATCH_START}, StopSel={MATCH_END}, MaxWords=30, MinWords=12, MaxFragments=2, FragmentDelimiter=" … "'
)
SEARCH_USAGE = (
    'Tell me what to look for: /search cat food. Quote a phrase ("cat food"), exclude a word with -dog. '
    "/search all … also looks in cleared messages."
)
NOTHING_TO_RETRY = "There is no question of yours here to answer again."
NOTHING_TO_UNDO = "There is nothing to undo."
NOTHING_TO_EXPORT = "There is nothing to export yet."
SNIPPET_CHARS = 60


async def cmd_retry(message: Message, event_from_user: User, turns: Turns) -> None:
    if not await turns.retry(user_id=event_from_user.id, chat_id=message.chat.id):
        await message.answer(NOTHING_TO_RETRY)
    # else the new answer is the reply


async def cmd_undo(message: Message, event_from_user: User, turns: Turns) -> None:
    undone = await turns.undo(user_id=event_from_user.id, chat_id=message.chat.id)
    logger.info(
        "user %s in chat %s: undo restored %d, set aside %d", event_from_user.id, message.chat.id, undone.restored,
        undone.undone,
    )  # fmt: skip
    await message.answer(undo_report(undone))


def undo_report(undone: Undone) -> str:
    """What /undo tells the user it did."""
    if undone.restored:
        return f"Brought back the {undone.restored} message(s) you had cleared."
    if not undone.undone:
        return NOTHING_TO_UNDO
    if undone.question is None:
        return "Undone: my last answer."
    quoted = undone.question if len(undone.question) <= SNIPPET_CHARS else undone.question[:SNIPPET_CHARS] + "…"
    answer = " and my answer" if undone.undone > 1 else ""
    return f"Undone: your message “{quoted}”{answer}. /undo again goes further back."


async def on_edited_text(message: Message, event_from_user: User, bot: Bot, turns: Turns) -> None:
    """The user edited a message: a stored question takes the new text (without the bot's own
    mention, as a new question); the last one is answered again. Edits of anything else are ignored."""
    text = asked(message, await bot.me())
    if not text.strip():
        return
    stored = await turns.edit(
        user_id=event_from_user.id, address=address_of(message), telegram_message_id=message.message_id, text=text
    )
    if not stored:
        logger.info("ignored an edit of message %s in chat %s: not a stored question", message.message_id,
                    message.chat.id)  # fmt: skip


async def edited_caption(message: Message) -> bool:
    """An edited photo's caption: the photo's question is its caption (a voice message's or a
    document's question holds what was read from it too, which a new caption must not drop)."""
    return bool(message.photo) and message.caption is not None


async def cmd_search(
    message: Message, command: CommandObject, event_from_user: User, dialog_store: Storage, delivery: Delivery
) -> None:
    words = (command.args or "").strip()
    everything = words == "all" or words.startswith("all ")
    if everything:
        words = words[3:].strip()
    if not words:
        await message.answer(SEARCH_USAGE)
        return
    async with dialog_store.database() as pool:
        hits = await context.search_messages(
            pool,
            telegram_user_id=event_from_user.id,
            telegram_chat_id=message.chat.id,
            query=words,
            everything=everything,
            limit=SEARCH_LIMIT,
            options=HEADLINE_OPTIONS,
        )
    logger.info("user %s in chat %s: search of %d chars, %d hit(s)", event_from_user.id, message.chat.id,
                len(words), len(hits))  # fmt: skip
    for part in split(search_report(words, hits)):
        await delivery.send(address_of(message), part, quote=True)


def search_report(words: str, hits: list[SearchHit]) -> Part:
    """The hits as one formatted text: a header per hit, its snippet with the matches in bold."""
    shown = words if len(words) <= SNIPPET_CHARS else words[:SNIPPET_CHARS] + "…"
    if not hits:
        return compose([(f"Nothing found for “{shown}”.", None)])
    pieces: list[tuple[str, str | None]] = [(f"Found {len(hits)} for “{shown}”, best first:", None)]
    for number, hit in enumerate(hits, 1):
        who = "you" if hit.role == "user" else "me"
        cleared = ", cleared" if hit.cleared else ""
        pieces.append((f"\n\n{number}. ", None))
        pieces.append((f"{hit.created_at:%Y-%m-%d %H:%M} UTC, {who}{cleared}", "italic"))
        pieces.append(("\n", None))
        pieces.extend(_highlighted(hit.snippet))
    return compose(pieces)


def _highlighted(snippet: str) -> list[tuple[str, str | None]]:
    pieces: list[tuple[str, str | None]] = []
    for index, chunk in enumerate(snippet.split(MATCH_START)):
        match, _, rest = chunk.partition(MATCH_END) if index else ("", "", chunk)
        pieces += [(match, "bold"), (rest, None)]
    return [(text.replace(MATCH_END, ""), kind) for text, kind in pieces if text]


async def cmd_export(message: Message, command: CommandObject, event_from_user: User, dialog_store: Storage) -> None:
    fmt: Format = "json" if (command.args or "").strip().lower() == "json" else "markdown"
    with tempfile.TemporaryDirectory(prefix="llmbot-export-") as directory:
        async with dialog_store.database() as pool:
            paths = await export_dialog(
                lambda write: context.dialog_messages(
                    pool, telegram_user_id=event_from_user.id, telegram_chat_id=message.chat.id, write=write
                ),
                Path(directory),
                chat_id=message.chat.id,
                fmt=fmt,
                now=datetime.now(UTC),
            )
        logger.info("user %s in chat %s: export in %d file(s)", event_from_user.id, message.chat.id, len(paths))
        if not paths:
            await message.answer(NOTHING_TO_EXPORT)
            return
        for number, path in enumerate(paths, 1):
            caption = f"Part {number} of {len(paths)}" if len(paths) > 1 else None
            await message.answer_document(FSInputFile(path), caption=caption)


async def cmd_stats(message: Message, event_from_user: User, dialog_store: Storage, config: Config) -> None:
    async with dialog_store.database() as pool:
        stats = await context.fetch_stats(pool, telegram_user_id=event_from_user.id, telegram_chat_id=message.chat.id)
    await message.answer(stats_report(stats, config.daily_token_budget_per_user))


def stats_report(stats: DialogStats, daily_budget: int = 0) -> str:
    """/stats as text: messages, characters and tokens, here and in all chats; with a daily
    token budget, today's tokens against it."""
    if not stats.all_messages:
        return "I have no messages of yours yet."
    lines = [
        f"In this chat: {stats.chat_messages:,} message(s) ({stats.chat_cleared:,} cleared), "
        f"{stats.chat_chars:,} characters.",
        f"In all {stats.chats:,} chat(s): {stats.all_messages:,} message(s) ({stats.all_cleared:,} cleared), "
        f"{stats.all_chars:,} characters.",
    ]
    if stats.first_contact is not None:
        lines.append(f"We first talked on {stats.first_contact:%Y-%m-%d}.")
    if stats.all_prompt_tokens is None and stats.all_completion_tokens is None:
        lines.append("Tokens: the model's endpoint has not reported any.")
    else:
        lines.append(
            f"Tokens in this chat: {stats.chat_prompt_tokens or 0:,} read, {stats.chat_completion_tokens or 0:,} "
            f"written; in all chats: {stats.all_prompt_tokens or 0:,} read, {stats.all_completion_tokens or 0:,} "
            "written."
        )
    if daily_budget:
        lines.append(
            f"Today (UTC): {stats.tokens_today or 0:,} of your {daily_budget:,} daily tokens; it resets at 00:00 UTC."
        )
    return "\n".join(lines)


async def cmd_context(message: Message, event_from_user: User, turns: Turns) -> None:
    model, window = await turns.next_window(user_id=event_from_user.id, chat_id=message.chat.id)
    length = await turns.budget.context_length(model)
    await message.answer(context_report(model, length, window, turns.budget.ratio(model)))


def context_report(model: str, context_length: int, window: Window, ratio: float) -> str:
    """/context as text: the next turn's share of the model's context, in the model's tokens."""
    used, room = round(window.used * ratio), round(window.room * ratio)
    lines = [
        f"Model {model}: {context_length:,} tokens of context, {context_length - room:,} of them kept for the answer.",
        f"Your next message comes after about {used:,} tokens: the system prompt"
        + (", a summary" if window.summary is not None else "")
        + f" and {window.in_full:,} message(s) in full.",
        f"About {max(room - used, 0):,} tokens are left for it before older messages drop out.",
    ]
    if window.summary is not None:
        lines.append(
            f"A summary (about {round(window.summary.tokens * ratio):,} tokens) stands in for "
            f"{window.summary.covered:,} older message(s)."
        )
    elif window.crowded:
        lines.append("Older messages no longer fit and are left out.")
    else:
        lines.append("Nothing is left out: the whole conversation is in full.")
    return "\n".join(lines)


def create_router() -> Router:
    router = Router(name=__name__)
    router.message.filter(may_be_command)
    router.message.register(cmd_retry, Command("retry"))
    router.message.register(cmd_undo, Command("undo"))
    router.message.register(cmd_search, Command("search"))
    router.message.register(cmd_export, Command("export"))
    router.message.register(cmd_stats, Command("stats"))
    router.message.register(cmd_context, Command("context"))
    router.edited_message.register(on_edited_text, has_text)
    router.edited_message.register(on_edited_text, edited_caption)
    return router

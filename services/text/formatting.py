"""An LLM's Markdown answer as Telegram text plus message entities, split into messages Telegram accepts.

Telegram is sent plain text and entities, never ``parse_mode``, so nothing a model writes can make a
message fail to parse. Offsets and lengths count UTF-16 code units, as Telegram does. The entities
follow Telegram's nesting rules: two entities either nest or do not touch; ``code`` and ``pre``
contain nothing and sit at most inside a ``blockquote``; a ``text_link`` holds only bold, italic and
strikethrough; blockquotes do not nest; no entity covers only whitespace.

Rendering and splitting never raise on what a model writes: an answer nested deeper than
``MAX_DEPTH``, or one the renderer fails on, goes as plain text, and a complete answer always
shows something.
"""

from __future__ import annotations

import bisect
import logging
import re
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from markdown_it import MarkdownIt
from markdown_it.token import Token
from markdown_it.tree import SyntaxTreeNode

from services.text.clean import TELEGRAM_MESSAGE_LIMIT, storable

logger = logging.getLogger(__name__)

TELEGRAM_ENTITY_LIMIT = 100
"""Telegram shows at most this many entities of one message."""

HORIZONTAL_RULE = "———"

MAX_DEPTH = 16
"""Deepest Markdown nesting (block levels plus inline levels) rendered as formatting; deeper, the
answer goes as plain text. A real answer stays far below (four nested lists holding bold italic
link text: 12). It bounds the recursion of building the syntax tree, which otherwise overflows
the stack on ``"*" * 500 + "x" + "*" * 500``, and stays below markdown-it's own limit of 20 block
levels, past which it drops the rest of the text without a word."""

EMPTY_ANSWER = "(empty answer)"
"""What a complete answer that shows nothing at all is sent as: a turn always ends in a message."""

_SPLITTABLE = frozenset({"bold", "italic", "strikethrough", "underline"})
# Of entities with the same range, the one Telegram lets contain the other comes first.
_ORDER = {"blockquote": 0, "text_link": 1, "bold": 2, "italic": 3, "underline": 4, "strikethrough": 5}
_INLINE_STYLES = {"strong": "bold", "em": "italic", "s": "strikethrough"}
_LINK_URL = re.compile(r"(?:https?|tg)://[^\s/?#]+\S*", re.IGNORECASE)
# Characters Telegram drops or shows as nothing: controls, zero-width and bidi marks, blank Braille.
_INVISIBLE = frozenset(
    [chr(c) for c in range(0x20)]
    + ["\u180e", "\u2060", "\u2061", "\u2062", "\u2063", "\u2064", "\u2800", "\ufeff", "\ufffc"]
    + [chr(c) for c in range(0x200B, 0x2010)]
    + [chr(c) for c in range(0x2028, 0x202F)]
)
# Whitespace (str.isspace's, which re's \s matches in a str pattern) and the invisible: one
# pattern, so that a text is scanned in C rather than a character at a time.
_BLANKS = re.compile("[\\s" + "".join(f"\\u{ord(c):04x}" for c in sorted(_INVISIBLE)) + "]+")
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("strikethrough")


@dataclass(frozen=True, slots=True)
class Entity:
    """One Telegram message entity; ``offset`` and ``length`` in UTF-16 code units."""

    type: str
    offset: int
    length: int
    url: str | None = None
    language: str | None = None


@dataclass(frozen=True, slots=True)
class Part:
    """Text of one message (or of a whole answer) and its entities."""

    text: str
    entities: tuple[Entity, ...] = ()


def render(markdown: str, *, partial: bool = False) -> Part:
    """``markdown`` as plain text and entities; never raises. Nested deeper than ``MAX_DEPTH``,
    or when rendering fails, it is the text as written. A complete answer always shows something:
    the text as written when its formatting shows nothing (an empty code block, a lone reference
    definition), else ``EMPTY_ANSWER``; a ``partial`` one, still being streamed, may show nothing
    yet (a code block just opened). The text may exceed one message: pass the result to
    :func:`split`."""
    # Drafts and edits are cleaned as the stored answer is: a lone surrogate cannot be sent as UTF-8.
    markdown = storable(markdown)
    try:
        part = _formatted(markdown)
    except Exception as error:  # a renderer bug must not cost the user the answer
        _log_failure("rendering", error)
        part = None
    if part is None:
        part = _as_written(markdown)
    if partial or visible(part.text):
        return part
    return _as_written(markdown) if visible(markdown) else Part(EMPTY_ANSWER)


def split(part: Part, *, limit: int = TELEGRAM_MESSAGE_LIMIT, max_entities: int = TELEGRAM_ENTITY_LIMIT) -> list[Part]:
    """``part`` as messages of at most ``limit`` UTF-16 units and ``max_entities`` entities each,
    cut at a blank line, else a line break, else a space, else anywhere between two characters.
    An entity crossing a cut continues on both sides (a code block stays a ``pre`` with its
    language); no message is empty or blank. An empty list when ``part`` shows nothing."""
    if limit < 2:
        raise ValueError("limit must be at least 2 UTF-16 units (one character outside the BMP)")
    if max_entities < 0:
        raise ValueError("max_entities must not be negative")
    try:
        return _split(part, limit, max_entities)
    except Exception as error:  # a splitter bug must not cost the user the answer
        _log_failure("splitting", error)
        return _chunks(part.text, limit)


def _split(part: Part, limit: int, max_entities: int) -> list[Part]:
    text = part.text
    units = _units(text)
    spans = sorted(
        (
            _Span(e.type, _index(units, e.offset), _index(units, e.offset + e.length), e.url, e.language)
            for e in part.entities
            if e.length > 0
        ),
        key=lambda span: span.start,
    )
    starts = [span.start for span in spans]
    parts: list[Part] = []
    start = 0
    while start < len(text):
        by_length = bisect.bisect_right(units, units[start] + limit) - 1
        live = sum(1 for span in spans if span.start <= start < span.end)
        nth_later = bisect.bisect_right(starts, start) + max(max_entities - live, 0)
        by_entities = starts[nth_later] if nth_later < len(starts) else len(text)
        hard = min(by_length, by_entities, len(text))
        cut = hard if hard == len(text) else _cut(text, start, hard)
        piece = _piece(text, units, spans, start, cut, max_entities)
        if piece is not None:
            parts.append(piece)
        start = cut
    return parts


def compose(pieces: Iterable[tuple[str, str | None]]) -> Part:
    """A message the bot writes itself, from ``(text, entity type or None)`` pieces in order; a
    piece that shows nothing gets no entity."""
    texts: list[str] = []
    entities: list[Entity] = []
    offset = 0
    for text, kind in pieces:
        length = len(text.encode("utf-16-le", "surrogatepass")) // 2
        if kind is not None and visible(text):
            entities.append(Entity(kind, offset, length))
        texts.append(text)
        offset += length
    return Part("".join(texts), tuple(entities))


def plain(part: Part) -> str:
    """The text of ``part`` without its formatting."""
    return part.text


def visible(text: str) -> str:
    """What a user sees of ``text``: without whitespace and characters Telegram shows as nothing."""
    return _BLANKS.sub("", text)


def utf16_slice(text: str, offset: int, length: int) -> str:
    """The characters of ``text`` an entity at ``offset`` with ``length`` (UTF-16 units) covers."""
    return text.encode("utf-16-le", "surrogatepass")[2 * offset : 2 * (offset + length)].decode(
        "utf-16-le", "surrogatepass"
    )


def _formatted(markdown: str) -> Part | None:
    """``markdown`` rendered with its formatting, or None when it nests deeper than ``MAX_DEPTH``."""
    tokens = _MARKDOWN.parse(markdown)
    depth = max(
        (token.level + max((child.level for child in token.children or ()), default=0) for token in tokens), default=0
    )
    if depth > MAX_DEPTH:
        return None
    renderer = _Renderer()
    renderer.blocks(SyntaxTreeNode(tokens).children, 2)
    text = renderer.text()
    return _piece(text, _units(text), renderer.spans, 0, len(text), None) or Part("")


def _as_written(markdown: str) -> Part:
    """``markdown`` as plain text, without blank ends."""
    return _piece(markdown, _units(markdown), (), 0, len(markdown), None) or Part("")


def _chunks(text: str, limit: int) -> list[Part]:
    """``text`` as plain messages of at most ``limit`` UTF-16 units: the last resort when
    :func:`split` fails, simple enough not to."""
    units = _units(text)
    chunks: list[Part] = []
    start = 0
    while start < len(text):
        end = max(bisect.bisect_right(units, units[start] + limit) - 1, start + 1)
        if visible(chunk := text[start:end].strip()):
            chunks.append(Part(chunk))
        start = end
    return chunks


def _log_failure(step: str, error: Exception) -> None:
    # Where it failed, not the exception's message or traceback text: those may quote the answer.
    frame = traceback.extract_tb(error.__traceback__)[-1]
    logger.error(
        "%s failed (%s at %s:%d): sending plain text", step, type(error).__name__, frame.filename, frame.lineno or 0
    )


@dataclass(slots=True)
class _Span:
    """An entity under construction; ``start`` and ``end`` index code points of the text."""

    type: str
    start: int
    end: int = -1
    url: str | None = None
    language: str | None = None


class _Renderer:
    """Walks markdown-it's syntax tree, writing text and collecting entity spans."""

    def __init__(self) -> None:
        self._chunks: list[str] = []
        self._length = 0
        self._last_visible = 0  # one past the last visible character written
        self._open: list[_Span | None] = []  # None: an entity Telegram would not accept here
        self._prefix = ""  # indentation after each line break inside list items
        self._pending = 0  # line breaks owed before the next text
        self._fresh = True  # nothing written yet on this list item's line (or in the answer)
        self.spans: list[_Span] = []

    def text(self) -> str:
        return "".join(self._chunks)

    def blocks(self, nodes: Iterable[SyntaxTreeNode], separator: int) -> None:
        """Render block ``nodes``, ``separator`` line breaks apart."""
        for node in nodes:
            if not self._fresh:
                self._pending = max(self._pending, separator)
            self._block(node, separator)

    def _block(self, node: SyntaxTreeNode, separator: int) -> None:
        kind = node.type
        if kind == "paragraph":
            self._inlines(node.children)
        elif kind == "heading":
            self._push("bold")
            self._inlines(node.children)
            self._pop()
        elif kind == "blockquote":
            self._push("blockquote")
            self.blocks(node.children, 2)
            self._pop()
        elif kind in ("bullet_list", "ordered_list"):
            self._list(node)
        elif kind in ("fence", "code_block"):
            self._pre(node.content, node.info.split(maxsplit=1)[0] if node.info.strip() else None)
        elif kind == "hr":
            self._write(HORIZONTAL_RULE)
        elif kind == "inline":
            self._inline(node.token.children if node.token else None)
        elif node.children:
            self.blocks(node.children, separator)
        else:
            self._write(node.content.rstrip("\n"))

    def _list(self, node: SyntaxTreeNode) -> None:
        ordered = node.type == "ordered_list"
        first = node.attrGet("start")
        number = int(first) if isinstance(first, int | float) or (isinstance(first, str) and first.isdigit()) else 1
        loose = any(child.type == "paragraph" and not child.hidden for item in node.children for child in item.children)
        separator = 2 if loose else 1
        for index, item in enumerate(node.children):
            if index:
                self._pending = max(self._pending, separator)
            marker = f"{number + index}. " if ordered else "• "
            self._write(marker)
            self._fresh = True
            outer = self._prefix
            self._prefix = outer + " " * len(marker)
            self.blocks(item.children, separator)
            self._prefix = outer
            self._fresh = False

    def _pre(self, content: str, language: str | None) -> None:
        code = content.strip("\n")
        if not code:
            return
        self._flush()
        start = self._length
        self._write(code, raw=True)
        self.spans.append(_Span("pre", start, self._length, language=language))

    def _inlines(self, nodes: Sequence[SyntaxTreeNode]) -> None:
        for node in nodes:
            self._inline(node.token.children if node.token else None)

    def _inline(self, tokens: list[Token] | None) -> None:
        for token in tokens or ():
            kind = token.type
            if kind in ("softbreak", "hardbreak"):
                self._write("\n")
            elif kind == "code_inline":
                self._code(token.content)
            elif kind.endswith("_open") and kind[: -len("_open")] in _INLINE_STYLES:
                self._push(_INLINE_STYLES[kind[: -len("_open")]])
            elif kind == "link_open":
                self._push_link(str(token.attrGet("href") or ""), autolink=token.markup == "autolink")
            elif kind.endswith("_close") and (kind[: -len("_close")] in _INLINE_STYLES or kind == "link_close"):
                self._pop()
            elif kind == "image":
                self._push_link(str(token.attrGet("src") or ""), autolink=False)
                self._inline(token.children)
                self._pop()
            else:
                self._write(token.content)

    def _code(self, content: str) -> None:
        if not content or any(span is not None and span.type == "text_link" for span in self._open):
            self._write(content)  # a link holds no code: keep the link, show the code as text
            return
        self._flush()
        around = [span for span in self._open if span is not None and span.type in _SPLITTABLE]
        for span in around:  # bold, italic and strikethrough may not contain code: pause them
            self.spans.append(_Span(span.type, span.start, self._length))
        start = self._length
        self._write(content)
        self.spans.append(_Span("code", start, self._length))
        for span in around:
            span.start = self._length

    def _push(self, kind: str, url: str | None = None) -> None:
        nested = any(span is not None and span.type == kind for span in self._open)
        self._open.append(None if nested else _Span(kind, self._length, url=url))

    def _push_link(self, url: str, *, autolink: bool) -> None:
        if autolink or not _LINK_URL.fullmatch(url):
            self._open.append(None)  # Telegram links a bare URL itself; a relative link stays text
        else:
            self._push("text_link", url)

    def _pop(self) -> None:
        span = self._open.pop() if self._open else None
        if span is None:
            return
        if span.type == "text_link" and self._last_visible <= span.start:
            self._write(span.url or "")  # "[](url)": show the address rather than lose the link
        span.end = self._length
        self.spans.append(span)

    def _flush(self) -> None:
        if self._pending and self._length:
            self._put("\n" * self._pending + self._prefix)
        self._pending = 0

    def _write(self, text: str, *, raw: bool = False) -> None:
        if not text:
            return
        self._flush()
        if not raw and self._prefix:
            text = text.replace("\n", "\n" + self._prefix)
        self._put(text)
        self._fresh = False

    def _put(self, text: str) -> None:
        self._chunks.append(text)
        self._length += len(text)
        if visible(text):
            self._last_visible = self._length - next(i for i, c in enumerate(reversed(text)) if not _blank(c))


def _blank(char: str) -> bool:
    return char.isspace() or char in _INVISIBLE


def _units(text: str) -> list[int]:
    """UTF-16 offset of each code point index of ``text``, and of its end."""
    units = [0] * (len(text) + 1)
    total = 0
    for index, char in enumerate(text):
        total += 2 if ord(char) > 0xFFFF else 1
        units[index + 1] = total
    return units


def _index(units: list[int], offset: int) -> int:
    """The code point index at UTF-16 ``offset`` (the next character if it falls inside one)."""
    return bisect.bisect_left(units, max(offset, 0))


def _cut(text: str, start: int, hard: int) -> int:
    """Where to end a message that starts at ``start`` and may not reach past ``hard``."""
    floor = start + (hard - start) // 2  # cut in the later half so messages stay reasonably full
    for separator in ("\n\n", "\n", " "):
        at = text.rfind(separator, start, hard)
        if at > floor:
            return at + len(separator)
    return hard


def _trim(text: str, span: _Span) -> _Span | None:
    """``span`` without blank characters at its ends; a code block keeps its first line's indentation."""
    end = span.end
    while end > span.start and _blank(text[end - 1]):
        end -= 1
    start = span.start
    while start < end and _blank(text[start]):
        start += 1
    if start >= end:
        return None
    if span.type == "pre":
        start = text.rfind("\n", span.start, start) + 1 or span.start
    return _Span(span.type, start, end, span.url, span.language)


def _tidy(text: str, spans: Iterable[_Span]) -> list[_Span]:
    """Trimmed, non-blank spans; a blockquote still holds the code blocks it held."""
    kept = [(span, trimmed) for span in spans if (trimmed := _trim(text, span)) is not None]
    for quote, trimmed_quote in kept:
        if quote.type == "blockquote":
            for span, trimmed in kept:
                if span.type == "pre" and quote.start <= span.start and span.end <= quote.end:
                    trimmed_quote.start = min(trimmed_quote.start, trimmed.start)
    return [trimmed for _, trimmed in kept]


def _piece(
    text: str, units: list[int], spans: Iterable[_Span], start: int, end: int, max_entities: int | None
) -> Part | None:
    """Characters ``start:end`` of ``text`` as a message with its (cut) entities, None if blank."""
    clipped = [
        _Span(span.type, max(span.start, start), min(span.end, end), span.url, span.language)
        for span in spans
        if span.start < end and span.end > start
    ]
    kept = sorted(_tidy(text, clipped), key=lambda span: (span.start, -span.end, _ORDER.get(span.type, 9)))
    if max_entities is not None:
        del kept[max_entities:]  # only when more entities nest at one place than allowed: keep the outer
    first = min((span.start for span in kept), default=end)
    while start < first and _blank(text[start]):
        start += 1
    last = max((span.end for span in kept), default=start)
    while end > max(start, last) and _blank(text[end - 1]):
        end -= 1
    if not visible(text[start:end]):
        return None
    base = units[start]
    entities = tuple(
        Entity(span.type, units[span.start] - base, units[span.end] - units[span.start], span.url, span.language)
        for span in kept
    )
    return Part(text[start:end], entities)

"""services.text.formatting: an LLM's Markdown as Telegram text + entities, split into valid messages."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.text import formatting
from services.text.formatting import (
    EMPTY_ANSWER,
    HORIZONTAL_RULE,
    MAX_DEPTH,
    Entity,
    Part,
    plain,
    render,
    split,
    utf16_slice,
    visible,
)

SPLITTABLE = {"bold", "italic", "underline", "strikethrough"}
KNOWN = SPLITTABLE | {"code", "pre", "text_link", "blockquote"}


def units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def covered(text: str, entity: Entity) -> str:
    """The text under ``entity``, cut from the UTF-16 encoding (strict: a split surrogate pair raises)."""
    data = text.encode("utf-16-le")
    return data[2 * entity.offset : 2 * (entity.offset + entity.length)].decode("utf-16-le")


def can_contain(outer: Entity, inner: Entity) -> bool:
    """Telegram's nesting rules for ``inner`` lying inside ``outer``."""
    if outer.type in ("code", "pre") or outer.type == inner.type:
        return False
    if inner.type in ("code", "pre"):
        return outer.type == "blockquote"
    if inner.type == "blockquote":
        return outer.type in SPLITTABLE
    if outer.type == "text_link":
        return inner.type in SPLITTABLE
    return True


def check_telegram_rules(part: Part, *, limit: int | None = 4096, max_entities: int | None = 100) -> None:
    """Fails unless Telegram would accept ``part`` as one message exactly as it is."""
    size = units(part.text)
    assert visible(part.text), f"blank message {part.text!r}"
    assert not part.text[-1].isspace(), "message ends with whitespace"
    assert not part.text[0].isspace() or any(
        e.offset == 0 and e.type in ("pre", "blockquote") for e in part.entities
    ), "message starts with whitespace that is not a code block's indentation"
    if limit is not None:
        assert size <= limit
    if max_entities is not None:
        assert len(part.entities) <= max_entities
    for entity in part.entities:
        assert entity.type in KNOWN
        assert entity.length > 0 and entity.offset >= 0 and entity.offset + entity.length <= size, entity
        assert visible(covered(part.text, entity)), f"entity over blank text: {entity}"
        assert (entity.url is not None) == (entity.type == "text_link")
        assert entity.language is None or entity.type == "pre"
    for i, a in enumerate(part.entities):
        for b in part.entities[i + 1 :]:
            a_end, b_end = a.offset + a.length, b.offset + b.length
            if a_end <= b.offset or b_end <= a.offset:
                continue
            a_holds_b = a.offset <= b.offset and b_end <= a_end and can_contain(a, b)
            b_holds_a = b.offset <= a.offset and a_end <= b_end and can_contain(b, a)
            assert a_holds_b or b_holds_a, f"{a} and {b} overlap in a way Telegram rejects"


def check_parts(parts: list[Part], rendered: Part, *, limit: int = 4096, max_entities: int = 100) -> None:
    for part in parts:
        check_telegram_rules(part, limit=limit, max_entities=max_entities)
    assert visible("".join(part.text for part in parts)) == visible(rendered.text)


# --- each construct: exact text and entities -------------------------------------------------


def test_plain_text_has_no_entities() -> None:
    assert render("Just words.") == Part("Just words.")
    assert plain(render("Just words.")) == "Just words."


def test_bold_italic_strikethrough() -> None:
    assert render("Some **bold** text") == Part("Some bold text", (Entity("bold", 5, 4),))
    assert render("*one* and _two_") == Part("one and two", (Entity("italic", 0, 3), Entity("italic", 8, 3)))
    assert render("~~gone~~ stays") == Part("gone stays", (Entity("strikethrough", 0, 4),))
    assert render("***both***") == Part("both", (Entity("bold", 0, 4), Entity("italic", 0, 4)))


def test_nested_inline_styles() -> None:
    assert render("**bold *and italic* bold**") == Part(
        "bold and italic bold", (Entity("bold", 0, 20), Entity("italic", 5, 10))
    )
    # bold inside bold is one bold: Telegram rejects an entity inside one of its own type
    assert render("**a **b** c**") == Part("a b c", (Entity("bold", 0, 5),))


def test_whitespace_at_entity_edges_stays_outside() -> None:
    assert render("a ** b ** c") == Part("a ** b ** c")  # not emphasis in CommonMark
    assert render("`  x  `") == Part("x", (Entity("code", 0, 1),))


def test_inline_code() -> None:
    assert render("Run `ls -la` now") == Part("Run ls -la now", (Entity("code", 4, 6),))
    assert render("`**not bold**`") == Part("**not bold**", (Entity("code", 0, 12),))


def test_code_inside_bold_pauses_the_bold() -> None:
    # Telegram does not let bold contain code: the bold is cut around it
    assert render("**use `x` here**") == Part(
        "use x here", (Entity("bold", 0, 3), Entity("code", 4, 1), Entity("bold", 6, 4))
    )


def test_code_inside_link_is_plain_text_of_the_link() -> None:
    assert render("[`api`](https://example.com)") == Part(
        "api", (Entity("text_link", 0, 3, url="https://example.com"),)
    )


def test_fenced_code_block_with_language() -> None:
    markdown = "Try:\n\n```python\ndef f():\n    return 1\n```\n\nDone."
    assert render(markdown) == Part(
        "Try:\n\ndef f():\n    return 1\n\nDone.", (Entity("pre", 6, 21, language="python"),)
    )


def test_fence_info_keeps_only_the_language() -> None:
    assert render("```js title=a.js\nx()\n```") == Part("x()", (Entity("pre", 0, 3, language="js"),))
    assert render("```\nx\n```") == Part("x", (Entity("pre", 0, 1),))


def test_indented_code_block_keeps_indentation_inside() -> None:
    assert render("Text\n\n        deeper\n    base") == Part("Text\n\n    deeper\nbase", (Entity("pre", 6, 15),))


def test_markdown_inside_code_block_is_literal() -> None:
    assert render("```\n**x** [a](http://b)\n```") == Part("**x** [a](http://b)", (Entity("pre", 0, 19),))


def test_links() -> None:
    assert render("See [the docs](https://example.com/a?b=1) now") == Part(
        "See the docs now", (Entity("text_link", 4, 8, url="https://example.com/a?b=1"),)
    )
    assert render("[**bold** link](http://x.org)") == Part(
        "bold link", (Entity("text_link", 0, 9, url="http://x.org"), Entity("bold", 0, 4))
    )


def test_links_telegram_links_itself_or_cannot_open_stay_text() -> None:
    assert render("<https://example.com>") == Part("https://example.com")
    assert render("https://example.com") == Part("https://example.com")
    assert render("[page](/relative/path)") == Part("page")
    assert render("[mail](mailto:a@b.c)") == Part("mail")


def test_link_without_label_shows_its_address() -> None:
    assert render("[](https://x.org)") == Part("https://x.org", (Entity("text_link", 0, 13, url="https://x.org"),))


def test_image_is_a_link_to_it() -> None:
    assert render("![a cat](https://img.example/cat.png)") == Part(
        "a cat", (Entity("text_link", 0, 5, url="https://img.example/cat.png"),)
    )


def test_bullet_and_ordered_lists() -> None:
    assert render("- one\n- **two**\n- three") == Part("• one\n• two\n• three", (Entity("bold", 8, 3),))
    assert render("3. c\n4. d") == Part("3. c\n4. d")
    assert render("1) x\n1) y") == Part("1. x\n2. y")


def test_nested_lists_are_indented() -> None:
    markdown = "- a\n  - *b*\n    1. c\n- d"
    assert render(markdown) == Part("• a\n  • b\n    1. c\n• d", (Entity("italic", 8, 1),))


def test_list_item_continuation_lines_are_indented() -> None:
    assert render("- first\n  line two\n\n  para") == Part("• first\n  line two\n\n  para")


def test_loose_list_keeps_blank_lines() -> None:
    assert render("- a\n\n- b") == Part("• a\n\n• b")


def test_block_quote() -> None:
    assert render("> **q** text\n> more\n\nafter") == Part(
        "q text\nmore\n\nafter", (Entity("blockquote", 0, 11), Entity("bold", 0, 1))
    )


def test_nested_quote_is_one_blockquote() -> None:
    assert render("> a\n>> b") == Part("a\n\nb", (Entity("blockquote", 0, 4),))


def test_code_block_inside_quote() -> None:
    assert render("> x\n>\n> ```sh\n>   ls\n> ```") == Part(
        "x\n\n  ls", (Entity("blockquote", 0, 7), Entity("pre", 3, 4, language="sh"))
    )


def test_heading_is_a_bold_line() -> None:
    assert render("# Title\n\nBody\n\n## Sub *it*\ntext") == Part(
        "Title\n\nBody\n\nSub it\n\ntext",
        (Entity("bold", 0, 5), Entity("bold", 13, 6), Entity("italic", 17, 2)),
    )


def test_paragraphs_line_breaks_and_horizontal_rule() -> None:
    assert render("a\nb\n\n\n\nc\n\n---\n\nd") == Part(f"a\nb\n\nc\n\n{HORIZONTAL_RULE}\n\nd")


def test_html_is_shown_as_text() -> None:
    assert render("<b>x</b> &amp; <br>") == Part("<b>x</b> & <br>")
    assert render("<div>\n**y**\n</div>") == Part("<div>\ny\n</div>", (Entity("bold", 6, 1),))


def test_tables_stay_text() -> None:
    assert render("| a | b |\n|---|---|\n| 1 | 2 |") == Part("| a | b |\n|---|---|\n| 1 | 2 |")


def test_a_streamed_answer_may_show_nothing_yet() -> None:
    assert render("", partial=True) == Part("")
    assert render(" \n\t\n  ", partial=True) == Part("")
    assert render("`   `", partial=True) == Part("")
    assert split(render("", partial=True)) == []
    assert split(render("  \n ", partial=True)) == []


def test_a_complete_answer_always_shows_something() -> None:
    # Nothing visible at all: a notice, so the turn still ends in a message.
    for blank in ("", " \n\t\n  ", "\u200b\u200b", "\ufeff\n\u2800"):
        assert split(render(blank)) == [Part(EMPTY_ANSWER)], repr(blank)
    # Formatting that shows nothing: the answer as the model wrote it.
    assert render("`   `") == Part("`   `")
    assert render("**\u200b**") == Part("**\u200b**")
    assert render("```python\n```") == Part("```python\n```")
    assert render("[ref]: https://example.com") == Part("[ref]: https://example.com")


# --- UTF-16 offsets -----------------------------------------------------------------------------


def test_offsets_count_utf16_units() -> None:
    part = render("😀 Привет **мир 👍** and `код` 🇺🇦 [ссылка](https://пример.рф)")
    assert part.text == "😀 Привет мир 👍 and код 🇺🇦 ссылка"
    assert [(e.type, covered(part.text, e)) for e in part.entities] == [
        ("bold", "мир 👍"),
        ("code", "код"),
        ("text_link", "ссылка"),
    ]
    bold, code, link = part.entities
    assert (bold.offset, bold.length) == (10, 6)  # 😀 counts 2
    assert (code.offset, code.length) == (21, 3)
    assert (link.offset, link.length) == (30, 6)  # the flag is two astral characters: 4 units
    assert link.url == "https://xn--e1afmkfd.xn--p1ai"
    assert utf16_slice(part.text, link.offset, link.length) == "ссылка"


def test_emoji_only_entity() -> None:
    part = render("**👍🏽**")
    assert part == Part("👍🏽", (Entity("bold", 0, 4),))


# --- half-written Markdown while the answer streams ---------------------------------------------


@pytest.mark.parametrize(
    ("markdown", "expected"),
    [
        ("Some **bold te", Part("Some **bold te")),
        ("Some **bold** and *it", Part("Some bold and *it", (Entity("bold", 5, 4),))),
        ("```python\nprint(", Part("print(", (Entity("pre", 0, 6, language="python"),))),
        ("```python", Part("")),
        ("[link](http://exa", Part("[link](http://exa")),
        ("[x](y", Part("[x](y")),
        ("- a\n- ", Part("• a\n•")),
        ("1. a\n2", Part("1. a\n   2")),  # a lazy continuation line of the item
        ("> quo", Part("quo", (Entity("blockquote", 0, 3),))),
        ("`cod", Part("`cod")),
        ("# ", Part("")),
    ],
)
def test_half_written_markdown_renders_sensibly(markdown: str, expected: Part) -> None:
    assert render(markdown, partial=True) == expected


# --- split ---------------------------------------------------------------------------------------


def test_short_part_is_one_message() -> None:
    part = render("Hello **world**")
    assert split(part) == [part]


def test_split_prefers_blank_line_then_line_then_space() -> None:
    text = "a" * 60 + "\n\n" + "b" * 60
    assert [p.text for p in split(Part(text), limit=100)] == ["a" * 60, "b" * 60]
    text = "a" * 30 + "\n\n" + "b" * 30 + "\n" + "c" * 30 + "\n" + "d" * 30
    assert [p.text for p in split(Part(text), limit=100)] == ["a" * 30 + "\n\n" + "b" * 30 + "\n" + "c" * 30, "d" * 30]
    words = " ".join(["word"] * 50)
    parts = split(Part(words), limit=100)
    assert all(units(p.text) <= 100 and p.text == p.text.strip() for p in parts)
    assert " ".join(p.text for p in parts) == words


def test_split_never_cuts_a_surrogate_pair() -> None:
    text = "😀" * 100
    parts = split(Part(text, (Entity("bold", 0, 200),)), limit=99)
    assert [p.text for p in parts] == ["😀" * 49, "😀" * 49, "😀" * 2]
    assert [p.entities for p in parts] == [
        (Entity("bold", 0, 98),),
        (Entity("bold", 0, 98),),
        (Entity("bold", 0, 4),),
    ]


def test_entity_crossing_a_cut_continues_on_both_sides() -> None:
    part = render("intro " + "x" * 40 + " **bold " + "y " * 30 + "end** tail")
    parts = split(part, limit=80)
    assert len(parts) == 2
    for piece in parts:
        check_telegram_rules(piece, limit=80)
    first, second = parts
    assert first.entities[-1].type == "bold" and covered(first.text, first.entities[-1]).startswith("bold y")
    assert second.entities[0] == Entity("bold", 0, second.text.index("end") + 3)
    assert second.text.endswith("end tail")


def test_150_inline_codes_split_by_entity_count() -> None:
    markdown = " ".join(f"`c{i}`" for i in range(150))
    rendered = render(markdown)
    assert len(rendered.entities) == 150
    parts = split(rendered)
    assert len(parts) == 2
    check_parts(parts, rendered)
    assert [len(p.entities) for p in parts] == [100, 50]
    codes = [covered(p.text, e) for p in parts for e in p.entities]
    assert codes == [f"c{i}" for i in range(150)]


def test_long_code_block_splits_into_two_pre_with_the_same_language() -> None:
    lines = [f"    value_{i:04} = {i}  # some comment here" for i in range(150)]
    code = "\n".join(lines)
    assert 5500 < len(code) < 7000
    rendered = render(f"Here:\n\n```python\n{code}\n```\n\nThat's all.")
    parts = split(rendered)
    assert len(parts) == 2
    check_parts(parts, rendered)
    pres = [e for p in parts for e in p.entities]
    assert [(e.type, e.language) for e in pres] == [("pre", "python"), ("pre", "python")]
    first, second = parts
    assert covered(first.text, first.entities[0]).startswith(lines[0])  # indentation kept
    assert covered(second.text, second.entities[0]).startswith("    value_")  # reopened on a whole line
    joined = covered(first.text, first.entities[0]) + "\n" + covered(second.text, second.entities[0])
    assert joined == code
    assert second.text.endswith("That's all.")


def test_cut_block_code_without_line_breaks() -> None:
    rendered = render("```\n" + "x" * 6000 + "\n```")
    parts = split(rendered)
    assert [(len(p.text), p.entities) for p in parts] == [
        (4096, (Entity("pre", 0, 4096),)),
        (1904, (Entity("pre", 0, 1904),)),
    ]


def test_split_keeps_at_most_max_entities_even_when_nested_deeper() -> None:
    rendered = render("***~~" + "deep " * 10 + "~~***")
    parts = split(rendered, limit=20, max_entities=2)
    check_parts(parts, rendered, limit=20, max_entities=2)


def test_split_rejects_a_limit_below_one_astral_character() -> None:
    with pytest.raises(ValueError, match="limit"):
        split(Part("x"), limit=1)


# --- hostile inputs ------------------------------------------------------------------------------


def test_nesting_past_the_depth_bound_is_sent_as_written() -> None:
    stars = "*" * 500 + "x" + "*" * 500  # once a RecursionError: the answer was never sent
    assert split(render(stars)) == [Part(stars)]
    quotes = "> " * 25 + "deep text"  # once rendered to nothing: markdown-it drops what lies past 20 levels
    assert split(render(quotes)) == [Part(quotes)]
    # at the bound it is formatting still (a quote in a quote is one blockquote), past it plain text
    assert render("> " * (MAX_DEPTH - 1) + "x") == Part("x", (Entity("blockquote", 0, 1),))
    assert render("> " * MAX_DEPTH + "x") == Part("> " * MAX_DEPTH + "x")


def test_a_lone_surrogate_is_cleaned_as_the_stored_text_is() -> None:
    # a streamed chunk may end inside a surrogate pair; UTF-8 cannot carry half of one
    assert render("a \ud83d b **\udc00**", partial=True) == Part("a \ufffd b \ufffd", (Entity("bold", 6, 1),))
    assert render("nul\x00") == Part("nul\ufffd")


def test_a_renderer_bug_sends_the_answer_as_plain_text(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> None:
        raise ValueError("a secret the answer holds")

    monkeypatch.setattr(formatting._Renderer, "blocks", broken)
    with caplog.at_level(logging.ERROR, "services.text.formatting"):
        assert render("some **private** words") == Part("some **private** words")
    assert "ValueError" in caplog.text and "secret" not in caplog.text and "private" not in caplog.text


def test_a_splitter_bug_sends_plain_messages_within_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> int:
        raise IndexError("a secret the answer holds")

    monkeypatch.setattr(formatting, "_cut", broken)
    part = render("**" + "😀 word " * 2000 + "**")
    parts = split(part)
    assert len(parts) >= 4 and all(p.entities == () for p in parts)
    for piece in parts:
        check_telegram_rules(piece)
    assert visible("".join(p.text for p in parts)) == visible(part.text)


HOSTILE = [
    "Some **bold te",
    "[x](y",
    "[link](http://exa",
    "```python\nprint(",
    " ".join(f"`c{i}`" for i in range(150)),
    "```sql\n" + "SELECT 1;\n" * 600 + "```",
    "- a\n  - b\n    - c\n      - d\n        - **e** `f`\n- g",
    "😀**Жирный😀**😀 *курсив 🇺🇦* ~~зачёркнутый~~ `код 👍` [ссылка 😀](https://x.org)",
    "",
    "   \n\t  \n",
    "**" * 500,
    "*a **b `c` d** e*" * 200,
    "> " * 60 + "deep quote",
    "- " * 60 + "deep list",
    "[" * 100 + "x" + "](http://a)" * 100,
    "\u200b\u200b",
    "**\u200b**",
    "```\n\n\n```",
    "a\x00b\r\nc\u2028d",
    "# " + "x" * 5000 + " **tail**",
    ("word **bold** " * 400) + "\n\n" + ("🙂" * 3000),
    "*" * 500 + "x" + "*" * 500,
    "> " * 25 + "deep quote",
    "_" * 300 + "x" + "_" * 300,
    "~~" * 300 + "x" + "~~" * 300,
    "broken \ud800 half \udfff",
]


@pytest.mark.parametrize("markdown", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_input_gives_valid_messages(markdown: str) -> None:
    rendered = render(markdown)
    check_telegram_rules(rendered, limit=None, max_entities=None)
    parts = split(rendered)
    assert parts
    check_parts(parts, rendered)
    small = split(rendered, limit=50, max_entities=3)
    check_parts(small, rendered, limit=50, max_entities=3)


# --- property: random Markdown-ish text ----------------------------------------------------------

FRAGMENTS = [
    "**", "*", "_", "__", "~~", "`", "``", "```", "```py\n", "\n```\n", "[", "]", "](", ")", "(",
    "http://x.io/p", "<", ">", "> ", "- ", "* ", "1. ", "2) ", "# ", "## ", "---", "\n", "\n\n",
    "    ", "  ", " ", "\t", "\\", "&amp;", "![", "|", "a", "word", "слово", "😀", "🇺🇦", "é", "\u200b",
]  # fmt: skip

markdownish = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join),
    st.text(max_size=200),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5)), max_size=40).map("".join),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(markdown=markdownish, limit=st.integers(min_value=2, max_value=300), max_entities=st.integers(0, 8))
def test_random_markdown_always_gives_valid_messages(markdown: str, limit: int, max_entities: int) -> None:
    streamed = render(markdown, partial=True)
    if visible(streamed.text):
        check_telegram_rules(streamed, limit=None, max_entities=None)
    else:
        assert streamed == Part("")
    rendered = render(markdown)
    check_telegram_rules(rendered, limit=None, max_entities=None)
    assert split(rendered)
    check_parts(split(rendered), rendered)
    check_parts(
        split(rendered, limit=limit, max_entities=max_entities), rendered, limit=limit, max_entities=max_entities
    )


# --- property: Markdown built to break the renderer ------------------------------------------------

# Openers and closers repeated far past any depth bound (``"*" * 500 + "x" + "*" * 500`` once
# overflowed the stack), lone surrogates (a chunk may end inside a pair), invisible characters.
PAIRS = [("*", "*"), ("**", "**"), ("_", "_"), ("~~", "~~"), ("`", "`"), ("[", "](http://x.io)"), ("![", "](x)"),
         ("> ", ""), ("- ", ""), ("1. ", ""), ("  ", ""), ("#", "")]  # fmt: skip
SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff", "\ud83d"])
nested = st.builds(
    lambda pair, depth, inner: pair[0] * depth + inner + pair[1] * depth,
    st.sampled_from(PAIRS),
    st.one_of(st.integers(0, 30), st.integers(200, 1000)),  # around the bounds, and far past them
    st.one_of(st.sampled_from(["x", "слово", "😀"]), SURROGATES, st.text(max_size=5)),
)
hostile = st.lists(st.one_of(nested, st.sampled_from(FRAGMENTS), SURROGATES, st.text(max_size=8)), max_size=8).map(
    "".join
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(markdown=hostile)
def test_hostile_markdown_always_gives_messages_telegram_accepts(markdown: str) -> None:
    parts = split(render(markdown))
    assert parts, "zero parts: the user would get nothing"
    for part in parts:
        check_telegram_rules(part)  # 4096 UTF-16 units, at most 100 entities, each inside its text
        part.text.encode("utf-8")  # what the Bot API is sent: no lone surrogate
    for piece in split(render(markdown, partial=True)):
        check_telegram_rules(piece)
        piece.text.encode("utf-8")

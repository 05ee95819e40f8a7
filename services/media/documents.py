"""Documents as text for the conversation: plain text, Markdown and source code decoded, PDFs'
text layer extracted (pypdf), within bounds of characters, pages, decoded bytes and time. CPU
work: the caller runs ``read_document`` in a thread."""

from __future__ import annotations

import codecs
import logging
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Final

from services.media.errors import Unreadable
from services.text.clean import storable

if TYPE_CHECKING:
    from pypdf import PdfReader

logger = logging.getLogger(__name__)

READABLE = "text, Markdown, source code and PDF files"
NOT_TEXT = "That file doesn't look like text, so I can't read it."
EMPTY = "That file is empty."
NOT_PDF = "That file isn't a valid PDF, so I can't read it."
PDF_ENCRYPTED = "That PDF is encrypted, so I can't read it."
PDF_NO_TEXT = "That PDF has no text layer (is it a scan?), so I can't read it."
PDF_TOO_COMPLEX = "That PDF is too large or complex inside for me to read."
PDF_BROKEN = "I couldn't read that PDF: it looks damaged."

_TEXT_SUFFIXES: Final = frozenset({
    ".txt", ".text", ".md", ".markdown", ".rst", ".adoc", ".org", ".log", ".csv", ".tsv", ".json", ".jsonl",
    ".ndjson", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".conf", ".properties", ".env", ".xml", ".html", ".htm",
    ".css", ".scss", ".sass", ".less", ".tex", ".bib", ".srt", ".vtt", ".diff", ".patch", ".sql", ".py", ".pyi",
    ".js", ".mjs", ".cjs", ".jsx", ".ts", ".tsx", ".vue", ".svelte", ".go", ".rs", ".java", ".kt", ".kts", ".scala",
    ".swift", ".c", ".h", ".cc", ".cpp", ".cxx", ".hh", ".hpp", ".cs", ".m", ".mm", ".rb", ".php", ".pl", ".pm",
    ".lua", ".r", ".dart", ".ex", ".exs", ".erl", ".hs", ".clj", ".el", ".lisp", ".scm", ".ml", ".fs", ".jl",
    ".nim", ".zig", ".sh", ".bash", ".zsh", ".fish", ".ps1", ".bat", ".cmd", ".proto", ".graphql", ".gql", ".tf",
    ".hcl", ".nix", ".gradle", ".cmake", ".mk", ".dockerfile"
})  # fmt: skip
# Files known by their whole name (PurePosixPath counts a leading dot as part of the name).
_TEXT_NAMES: Final = frozenset({
    "makefile", "dockerfile", "containerfile", "readme", "license", "copying", "procfile", "gemfile", "rakefile",
    "vagrantfile", ".gitignore", ".dockerignore", ".editorconfig", ".env"
})  # fmt: skip
_TEXT_MIME_TYPES: Final = frozenset({
    "application/json", "application/x-ndjson", "application/xml", "application/yaml", "application/x-yaml",
    "application/toml", "application/javascript", "application/x-javascript", "application/ecmascript",
    "application/sql", "application/x-sql", "application/x-sh", "application/x-shellscript", "application/x-tex",
    "application/x-latex", "application/x-python", "application/x-httpd-php"
})  # fmt: skip
_PDF_MIME_TYPES: Final = frozenset({"application/pdf", "application/x-pdf"})
# Longest first: UTF-32's little-endian BOM begins with UTF-16's.
_BOMS: Final = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
# What one PDF may decode, far below pypdf's defaults (75 MB a stream, 2 million operands a
# content stream): a small file must not expand to gigabytes (a decompression bomb), and pypdf
# reads some 200,000 operands a second, holding each in memory, so one stream costs about a
# second and some 40 MB; a page of text takes a fraction of either. pypdf raises
# LimitReachedError past them.
_PDF_STREAM_BYTES = 8_000_000
_PDF_LIMITS: Final = {
    "zlib_maximum_output_length": _PDF_STREAM_BYTES,
    "lzw_maximum_output_length": _PDF_STREAM_BYTES,
    "run_length_maximum_output_length": _PDF_STREAM_BYTES,
    "brotli_maximum_output_length": _PDF_STREAM_BYTES,
    "array_based_stream_maximum_output_length": _PDF_STREAM_BYTES,
    "stream_decoding_work_maximum_length": 4 * _PDF_STREAM_BYTES,
    "stream_parsing_work_maximum_count": 250_000,
}
# pypdf reads a form XObject anew at each use, up to 5,000 a page: a small file can keep it busy
# for minutes within the limits above, so reading also stops at a deadline, checked by a callback
# before each operator (with it, pypdf also parses drawings it would skip, within those limits).
PDF_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class DocumentText:
    """A document's text, at most the characters asked; ``cut``: it went on past them (or past
    the pages asked); ``pages``: of a PDF, how many pages were read."""

    text: str
    cut: bool
    pages: int | None = None


def is_readable_document(file_name: str | None, mime_type: str | None) -> bool:
    """Whether a file is one ``read_document`` reads, by its name or else its MIME type: plain
    text, Markdown, source code, PDF."""
    if file_name:
        path = PurePosixPath(file_name.lower())
        if path.suffix in _TEXT_SUFFIXES or path.suffix == ".pdf" or path.name in _TEXT_NAMES:
            return True
    mime = (mime_type or "").lower()
    return (
        mime.startswith("text/")
        or mime in _TEXT_MIME_TYPES
        or mime in _PDF_MIME_TYPES
        or (mime.startswith("application/") and mime.endswith(("+json", "+xml")))
    )


def read_document(
    data: bytes,
    *,
    file_name: str | None,
    mime_type: str | None,
    max_chars: int,
    max_pages: int,
    max_seconds: float = PDF_SECONDS,
) -> DocumentText:
    """The text of a document (a PDF is told by its bytes, whatever its name; its pages are read
    for ``max_seconds`` at most); ``Unreadable`` with the line to tell the user when there is
    none to read."""
    if data.startswith(b"%PDF-"):
        deadline = time.monotonic() + max_seconds
        return _read_pdf(data, max_chars=max_chars, max_pages=max_pages, deadline=deadline)
    if (file_name or "").lower().endswith(".pdf") or (mime_type or "").lower() in _PDF_MIME_TYPES:
        raise Unreadable(NOT_PDF)  # e.g. an archive renamed
    text = _decoded(data)
    if not text.strip():
        raise Unreadable(EMPTY)
    return DocumentText(text[:max_chars], cut=len(text) > max_chars)


def _decoded(data: bytes) -> str:
    """UTF-8, or the UTF-16/32 a byte order mark says; text has no NUL, binary files mostly do."""
    encoding = next((encoding for bom, encoding in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        raise Unreadable(NOT_TEXT) from None
    if "\x00" in text:
        raise Unreadable(NOT_TEXT)
    return text


class _OutOfTime(BaseException):
    """Raised from pypdf's callback at the deadline: not an Exception, since pypdf catches any
    Exception raised while it reads a form XObject, and goes on with the next."""


def _read_pdf(data: bytes, *, max_chars: int, max_pages: int, deadline: float) -> DocumentText:
    # Imported with the first PDF: pypdf adds some 60 ms and 15 MB to a start that reads none.
    from pypdf import PdfReader, apply_configuration
    from pypdf.errors import DependencyError, LimitReachedError

    with apply_configuration(None, **_PDF_LIMITS):  # over the current configuration
        try:
            reader = PdfReader(BytesIO(data))
            return _pdf_text(reader, max_chars=max_chars, max_pages=max_pages, deadline=deadline)
        except Unreadable:
            raise
        except DependencyError:  # AES encryption, with no ``cryptography`` installed
            raise Unreadable(PDF_ENCRYPTED) from None
        except LimitReachedError:
            logger.info("a PDF over the decoding limits")
            raise Unreadable(PDF_TOO_COMPLEX) from None
        except Exception as error:  # a malformed file can make a parser raise anything
            # the type only: pypdf's messages quote the file's bytes
            logger.info("an unreadable PDF: %s", type(error).__name__)
            raise Unreadable(PDF_BROKEN) from None


def _pdf_text(reader: PdfReader, *, max_chars: int, max_pages: int, deadline: float) -> DocumentText:
    """The text of the first pages, read one by one until ``max_chars``, ``max_pages`` or the
    deadline."""
    from pypdf import PasswordType

    # pypdf tries the empty password itself: a PDF locked only against editing reads as any other.
    if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
        raise Unreadable(PDF_ENCRYPTED)

    def on_operator(*_: object) -> None:  # called before each operator, a form's included
        if time.monotonic() > deadline:
            raise _OutOfTime

    total = len(reader.pages)
    texts: list[str] = []
    chars = -2  # of the pages read and the blank lines between them
    out_of_time = False
    for page in reader.pages[:max_pages]:
        try:
            texts.append(page.extract_text(visitor_operand_before=on_operator))
        except _OutOfTime:
            logger.info("a PDF read for too long: stopped at page %d of %d", len(texts) + 1, total)
            out_of_time = True
            break
        chars += 2 + len(texts[-1])
        if chars >= max_chars:
            break
    text = storable("\n\n".join(texts).strip())
    if not text:
        raise Unreadable(PDF_TOO_COMPLEX if out_of_time else PDF_NO_TEXT)
    return DocumentText(text[:max_chars], cut=len(text) > max_chars or len(texts) < total, pages=len(texts))

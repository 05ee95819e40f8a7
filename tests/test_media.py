"""services.media.images and services.media.documents: attachments' bytes as the conversation
needs them. Pure functions, no database.

The images in tests/media/ were made once, with a gradient written by Python as a PPM (64×48) and
PNGs (40×30, RGB and RGBA, zlib and struct):
- photo.jpg: ``cjpeg -quality 75`` (libjpeg-turbo 2.1.5), baseline (SOF0);
- progressive.jpg: ``cjpeg -quality 75 -progressive`` (SOF2);
- image.png: the RGB PNG as written;
- lossy.webp, lossless.webp, alpha.webp: ``cwebp -q 75``, ``cwebp -lossless`` of the RGB PNG and
  ``cwebp -q 75`` of the RGBA one (libwebp 1.2.4): the VP8, VP8L and VP8X headers;
- image.gif: CPython's Lib/idlelib/Icons/tk.gif (14×11).
The PDFs are built here (``_pdf``): a few hundred bytes each, and the bomb is clearer as code.
"""

from __future__ import annotations

import tracemalloc
import zipfile
import zlib
from io import BytesIO
from pathlib import Path

import pytest
from pypdf import PdfWriter

from services.media.documents import (
    EMPTY,
    NOT_PDF,
    NOT_TEXT,
    PDF_BROKEN,
    PDF_ENCRYPTED,
    PDF_NO_TEXT,
    PDF_TOO_COMPLEX,
    DocumentText,
    is_readable_document,
    read_document,
)
from services.media.errors import Unreadable
from services.media.images import NOT_AN_IMAGE, best_size, data_url, dimensions, sniff

MEDIA = Path(__file__).parent / "media"
IMAGES = {
    "photo.jpg": ("image/jpeg", (64, 48)),
    "progressive.jpg": ("image/jpeg", (64, 48)),
    "image.png": ("image/png", (40, 30)),
    "image.gif": ("image/gif", (14, 11)),
    "lossy.webp": ("image/webp", (40, 30)),
    "lossless.webp": ("image/webp", (40, 30)),
    "alpha.webp": ("image/webp", (40, 30)),
}


def _image(name: str) -> bytes:
    return (MEDIA / name).read_bytes()


# Images


@pytest.mark.parametrize("name", IMAGES)
def test_sniff_tells_each_format_by_its_bytes(name: str) -> None:
    assert sniff(_image(name)) == IMAGES[name][0]


def test_sniff_takes_a_jpeg_padded_with_zeros() -> None:
    assert sniff(_image("photo.jpg") + b"\x00" * 64) == "image/jpeg"


@pytest.mark.parametrize("name", IMAGES)
def test_sniff_refuses_an_image_cut_short(name: str) -> None:
    data = _image(name)
    with pytest.raises(Unreadable) as raised:
        sniff(data[: len(data) - 3])
    assert str(raised.value) == NOT_AN_IMAGE


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xd8\xff",
        b"\x89PNG\r\n\x1a\n",
        b"GIF89a",
        b"RIFF\x00\x00\x00\x00WEBP",
        b"%PDF-1.4 not an image",
        b"BM" + b"\x00" * 64,  # a BMP: an image, but not one the model is shown
        b"just some text that is not an image",
    ],
)
def test_sniff_refuses_what_is_not_an_image(data: bytes) -> None:
    with pytest.raises(Unreadable, match=NOT_AN_IMAGE):
        sniff(data)


def test_sniff_refuses_a_jpeg_with_garbage_in_place_of_its_end() -> None:
    data = _image("photo.jpg")
    with pytest.raises(Unreadable):
        sniff(data[:-2] + b"\x12\x34")


@pytest.mark.parametrize("name", IMAGES)
def test_dimensions_of_each_format(name: str) -> None:
    assert dimensions(_image(name)) == IMAGES[name][1]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not an image",
        _image("photo.jpg")[:20],  # SOI and the JFIF segment: no frame header yet
        _image("image.png")[:20],  # IHDR cut short
        _image("lossless.webp")[:22],
        b"\xff\xd8\xff\xda\x00\x08" + b"\x00" * 16,  # scan data before any frame header
    ],
)
def test_dimensions_none_when_not_found(data: bytes) -> None:
    assert dimensions(data) is None


# (width, height, file size) as Telegram lists a photo's sizes: smallest first
SIZES = [(90, 68, 1_500), (320, 240, 15_000), (800, 600, 60_000), (1280, 960, 140_000), (2560, 1920, 450_000)]


def test_best_size_takes_the_largest_within_the_bounds() -> None:
    assert best_size(SIZES, max_side=2048, max_bytes=10_000_000) == 3
    assert best_size(SIZES, max_side=4096, max_bytes=10_000_000) == 4
    assert best_size(SIZES, max_side=2048, max_bytes=100_000) == 2
    assert best_size(SIZES, max_side=320, max_bytes=10_000_000) == 1


def test_best_size_by_area_whatever_the_order() -> None:
    assert best_size(list(reversed(SIZES)), max_side=2048, max_bytes=10_000_000) == 1


def test_best_size_counts_an_unknown_file_size_as_fitting() -> None:
    assert best_size([(320, 240, 15_000), (1280, 960, None)], max_side=2048, max_bytes=20_000) == 1


def test_best_size_falls_back_to_the_smallest() -> None:
    assert best_size(SIZES[::-1], max_side=50, max_bytes=10_000_000) == 4
    assert best_size(SIZES, max_side=4096, max_bytes=1_000) == 0


def test_best_size_of_no_sizes() -> None:
    assert best_size([], max_side=2048, max_bytes=10_000_000) is None


def test_data_url() -> None:
    assert data_url(b"\x00\xff\x10", "image/png") == "data:image/png;base64,AP8Q"


# Documents: which are read


@pytest.mark.parametrize(
    ("file_name", "mime_type"),
    [
        ("notes.txt", None),
        ("README.md", "text/markdown"),
        ("main.py", "text/x-python"),
        ("app.ts", "video/mp2t"),  # TypeScript, as clients often label it: the name wins
        ("Cargo.TOML", "application/octet-stream"),
        ("Makefile", "application/octet-stream"),
        (".gitignore", None),
        ("query.sql", None),
        ("server.log", None),
        ("paper.tex", None),
        (None, "text/plain"),
        (None, "application/json"),
        ("shapes.geojson", "application/geo+json"),
        ("paper.pdf", None),
        ("scan", "application/pdf"),
    ],
)
def test_readable_documents(file_name: str | None, mime_type: str | None) -> None:
    assert is_readable_document(file_name, mime_type)


@pytest.mark.parametrize(
    ("file_name", "mime_type"),
    [
        ("archive.zip", "application/zip"),
        ("song.mp3", "audio/mpeg"),
        ("report.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
        ("photo.jpg", "image/jpeg"),
        ("program", "application/octet-stream"),
        (None, None),
    ],
)
def test_unreadable_documents(file_name: str | None, mime_type: str | None) -> None:
    assert not is_readable_document(file_name, mime_type)


# Documents: text


def _read(
    data: bytes, file_name: str | None = "notes.txt", max_chars: int = 10_000, max_pages: int = 50
) -> DocumentText:
    return read_document(data, file_name=file_name, mime_type=None, max_chars=max_chars, max_pages=max_pages)


def _refused(data: bytes, file_name: str | None = "notes.txt", *, max_seconds: float = 10.0) -> str:
    """The line ``read_document`` refuses ``data`` with."""
    with pytest.raises(Unreadable) as raised:
        read_document(
            data, file_name=file_name, mime_type=None, max_chars=10_000, max_pages=50, max_seconds=max_seconds
        )
    return str(raised.value)


def test_utf8_text() -> None:
    assert _read("Привет, мир 👋\nline two\n".encode()) == DocumentText("Привет, мир 👋\nline two\n", cut=False)


def test_utf8_bom_is_dropped() -> None:
    assert _read(b"\xef\xbb\xbf# Title\n", "README.md").text == "# Title\n"


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_utf16_and_utf32_by_their_bom(encoding: str) -> None:
    # "\ufeff" encoded is the byte order mark of that encoding
    assert _read("\ufeffnaïve café, 中文\n".encode(encoding)).text == "naïve café, 中文\n"


def test_source_code_keeps_its_indentation() -> None:
    code = "    return 1\n\tpass\n"
    assert _read(code.encode(), "snippet.py").text == code


@pytest.mark.parametrize(
    "data",
    [
        b"abc\x00def",  # a NUL: PostgreSQL cannot store it, and text does not have one
        "caf\u00e9".encode("latin-1"),  # not UTF-8
        b"\xfe\xff\xd8\x00",  # a UTF-16 BOM, then a lone surrogate
        "a\x00b".encode("utf-16"),  # with its BOM
        _image("photo.jpg"),
        zlib.compress(b"binary"),
    ],
)
def test_not_text(data: bytes) -> None:
    assert _refused(data) == NOT_TEXT


@pytest.mark.parametrize("data", [b"", b" \n\t\r\n ", b"\xef\xbb\xbf", "\n".encode("utf-16")])
def test_empty(data: bytes) -> None:
    assert _refused(data) == EMPTY


def test_text_cut_at_max_chars() -> None:
    assert _read(b"x" * 101, max_chars=100) == DocumentText("x" * 100, cut=True)
    assert _read(b"x" * 100, max_chars=100) == DocumentText("x" * 100, cut=False)


# Documents: PDF


def _text_page(text: str) -> bytes:
    """A content stream showing ``text`` in Helvetica (the font ``_pdf`` gives every page)."""
    escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return b"BT /F1 12 Tf 72 720 Td (" + escaped.encode("latin-1") + b") Tj ET"


def _stream(data: bytes, entries: bytes = b"") -> bytes:
    return b"<< /Length %d %s >>\nstream\n" % (len(data), entries) + data + b"\nendstream"


def _pdf(*contents: bytes, flate: bool = False, form: bytes | None = None, trailer: bytes = b"") -> bytes:
    """A PDF of one page per content stream (FlateDecode-compressed already with ``flate``),
    with xref offsets right: objects 1 catalog, 2 page tree, 3 font, 4 the form XObject /X1
    (``form``, a content stream) every page may draw, then each page and its content."""
    font = b"<< /Font << /F1 3 0 R >> >>"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>"
        % (b" ".join(b"%d 0 R" % (5 + 2 * page) for page in range(len(contents))), len(contents)),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        _stream(form or b"", b"/Type /XObject /Subtype /Form /BBox [0 0 612 792] /Resources " + font),
    ]
    resources = font[:-2] + (b" /XObject << /X1 4 0 R >> >>" if form is not None else b" >>")
    for page, content in enumerate(contents):
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources %s /Contents %d 0 R >>"
            % (resources, 6 + 2 * page)
        )
        objects.append(_stream(content, b"/Filter /FlateDecode" if flate else b""))
    out = bytearray(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R %s >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, trailer, xref)
    return bytes(out)


def _encrypted(data: bytes, *, user_password: str, owner_password: str) -> bytes:
    writer = PdfWriter(clone_from=BytesIO(data))
    # RC4: pypdf writes it without the optional ``cryptography`` (AES needs it)
    writer.encrypt(user_password=user_password, owner_password=owner_password, algorithm="RC4-128")
    out = BytesIO()
    writer.write(out)
    return out.getvalue()


def text_pdf(*pages: str) -> bytes:
    """A real PDF of one page per text (the end-to-end tests send it as a document)."""
    return _pdf(*map(_text_page, pages))


HELLO = text_pdf("Hello, PDF world (1)")


def test_pdf_text() -> None:
    assert _read(HELLO, "paper.pdf") == DocumentText("Hello, PDF world (1)", cut=False, pages=1)


def test_pdf_pages_joined_by_a_blank_line() -> None:
    assert _read(_pdf(_text_page("One"), _text_page("Two")), "a.pdf").text == "One\n\nTwo"


def test_pdf_told_by_its_bytes_whatever_its_name() -> None:
    assert _read(HELLO, "notes.txt").text == "Hello, PDF world (1)"


def test_pdf_nul_made_storable() -> None:
    assert _read(_pdf(b"BT /F1 12 Tf 72 720 Td (A\\000B) Tj ET"), "a.pdf").text == "A\ufffdB"


def test_archive_renamed_pdf() -> None:
    archive = BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("paper.txt", "not a PDF")
    assert _refused(archive.getvalue(), "paper.pdf") == NOT_PDF
    with pytest.raises(Unreadable, match=NOT_PDF):
        read_document(HELLO[1:], file_name=None, mime_type="application/pdf", max_chars=100, max_pages=5)


def test_pdf_locked_with_a_password() -> None:
    assert _refused(_encrypted(HELLO, user_password="secret", owner_password="owner"), "a.pdf") == PDF_ENCRYPTED


def test_pdf_locked_only_against_editing_is_read() -> None:
    assert _read(_encrypted(HELLO, user_password="", owner_password="owner"), "a.pdf").text == "Hello, PDF world (1)"


def test_pdf_aes_encrypted() -> None:
    # AES-256 (V5, R6) with made-up keys: without ``cryptography`` pypdf cannot check the
    # password at all, with it the empty one is wrong; either way it is encrypted
    key = b"<" + b"ab" * 48 + b">"
    encrypt = (
        b"/Encrypt << /Filter /Standard /V 5 /R 6 /Length 256 /P -4 /O %s /U %s /OE <%s> /UE <%s> /Perms <%s>"
        b" /CF << /StdCF << /CFM /AESV3 /AuthEvent /DocOpen /Length 32 >> >> /StmF /StdCF /StrF /StdCF >>"
        b" /ID [<00112233445566778899aabbccddeeff> <00112233445566778899aabbccddeeff>]"
    ) % (key, key, b"cd" * 32, b"cd" * 32, b"ef" * 16)
    assert _refused(_pdf(_text_page("secret"), trailer=encrypt), "a.pdf") == PDF_ENCRYPTED


def test_pdf_without_a_text_layer() -> None:
    scan = _pdf(b"q 612 0 0 792 0 0 cm 0 0 m 612 792 l S Q", b"0.5 g 0 0 612 792 re f")
    assert _refused(scan, "scan.pdf") == PDF_NO_TEXT


@pytest.mark.parametrize(
    "data", [b"%PDF-1.4\n", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catal", b"%PDF-" + bytes(range(256))]
)
def test_damaged_pdf(data: bytes) -> None:
    assert _refused(data, "a.pdf") == PDF_BROKEN


def test_pdf_cut_anywhere_never_crashes() -> None:
    data = _pdf(_text_page("First page"), _text_page("Second page"))
    for end in range(5, len(data), 7):
        try:
            document = _read(data[:end], "a.pdf")
        except Unreadable as error:
            assert str(error) in (PDF_BROKEN, PDF_NO_TEXT)
        else:  # pypdf rebuilds a lost xref table by scanning the objects
            assert document.text in ("First page", "First page\n\nSecond page")


def test_pdf_stops_at_max_pages() -> None:
    data = _pdf(*(_text_page(f"Page {number}") for number in range(1, 6)))
    assert _read(data, "a.pdf", max_pages=2) == DocumentText("Page 1\n\nPage 2", cut=True, pages=2)
    assert _read(data, "a.pdf", max_pages=5) == DocumentText(
        "Page 1\n\nPage 2\n\nPage 3\n\nPage 4\n\nPage 5", cut=False, pages=5
    )


def test_long_pdf_read_only_until_max_chars() -> None:
    # 500 pages of 100 characters: with the blank lines between them, nine make 916, ten 1018
    data = _pdf(*(_text_page(f"Page {number:03d} " + "x" * 91) for number in range(1, 501)))
    document = _read(data, "long.pdf", max_chars=1000, max_pages=10_000)
    assert document.cut
    assert document.pages == 10
    assert len(document.text) == 1000
    assert document.text.startswith("Page 001 x")
    assert "Page 010" in document.text
    assert "Page 011" not in document.text


@pytest.fixture(scope="module")
def flate_bomb() -> bytes:
    """A PDF whose one content stream is 200 MB of zeros, compressed to some 200 KB."""
    compressor = zlib.compressobj(9)
    megabyte = b"\x00" * 1_000_000
    compressed = b"".join(compressor.compress(megabyte) for _ in range(200)) + compressor.flush()
    assert len(compressed) < 300_000
    return _pdf(compressed, flate=True)


def test_flate_bomb_refused_within_bounded_memory(flate_bomb: bytes) -> None:
    tracemalloc.start()
    try:
        refused = _refused(flate_bomb, "bomb.pdf")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused == PDF_TOO_COMPLEX
    # pypdf's own limit (75 MB a stream) would have let it decode that much first
    assert peak < 40_000_000


def test_content_stream_of_too_many_operands_refused() -> None:
    # 2 MB of "(A) Tj", 600,000 operands and operators: within the bytes a stream may decode,
    # past the operands it may hold (pypdf's own limit, 2 million, would read it in seconds)
    assert _refused(_pdf(zlib.compress(b"(A) Tj\n" * 300_000), flate=True), "a.pdf") == PDF_TOO_COMPLEX


# A form XObject of 20,000 operands drawn 1,000 times on a page: pypdf parses it anew at each
# use, some 75 seconds of work in a 150 KB file (2 KB compressed).
FORM = b"BT /F1 12 Tf " + b"(A) Tj\n" * 10_000 + b"ET"
FORMS_PAGE = b"/X1 Do\n" * 1_000


def test_forms_drawn_over_and_over_stop_at_the_deadline() -> None:
    assert _refused(_pdf(FORMS_PAGE, form=FORM), "a.pdf", max_seconds=0.5) == PDF_TOO_COMPLEX


def test_pages_read_before_the_deadline_are_kept() -> None:
    data = _pdf(_text_page("One"), _text_page("Two"), FORMS_PAGE, _text_page("Four"), form=FORM)
    assert read_document(
        data, file_name="a.pdf", mime_type=None, max_chars=10_000, max_pages=50, max_seconds=2.0
    ) == DocumentText("One\n\nTwo", cut=True, pages=2)

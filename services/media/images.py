"""Images as bytes: which format they are, whether they are whole, their size in pixels, which of
Telegram's sizes of a photo to take, and the data URL the model is shown."""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence

from services.media.errors import Unreadable

NOT_AN_IMAGE = "I couldn't read that image."
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: its length, type and CRC, always these bytes
# JPEG's start-of-frame markers, which carry the size: C0-CF but C4 (DHT), C8 (JPG) and CC (DAC).
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_UNSIZED = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RST0-7 have no length field


def sniff(data: bytes) -> str:
    """The MIME type of a JPEG, PNG, GIF or WebP image, told by its bytes; ``Unreadable`` for
    anything else, or for an image cut short (it must end as its format ends)."""
    if data.startswith(b"\xff\xd8\xff") and data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return "image/jpeg"  # a JPEG ends with its EOI marker; some writers pad it with zeros
    if data.startswith(_PNG_SIGNATURE) and data.endswith(_PNG_END):
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) > 13 and data.endswith(b"\x3b"):
        return "image/gif"  # 0x3B: the GIF trailer
    if len(data) >= 16 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        (riff_size,) = struct.unpack_from("<I", data, 4)
        if len(data) >= 8 + riff_size:  # the RIFF header says how long the file is
            return "image/webp"
    raise Unreadable(NOT_AN_IMAGE)


def dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) in pixels of a JPEG, PNG, GIF or WebP image; None when not found."""
    try:
        size = _dimensions(data)
    except struct.error:  # a header cut short
        return None
    return size if size is not None and size[0] > 0 and size[1] > 0 else None


def _dimensions(data: bytes) -> tuple[int, int] | None:
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR":
        width, height = struct.unpack_from(">II", data, 16)
        return width, height
    if data[:6] in (b"GIF87a", b"GIF89a"):
        width, height = struct.unpack_from("<HH", data, 6)  # the logical screen's
        return width, height
    if data.startswith(b"\xff\xd8"):
        return _jpeg_dimensions(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_dimensions(data)
    return None


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    """The size in the first start-of-frame segment, found by walking the segments from SOI."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # a fill byte before a marker
            at += 1
            continue
        if marker in _JPEG_UNSIZED:
            at += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI, or SOS: entropy-coded data follows, no frame header came
            return None
        if marker in _JPEG_FRAMES:
            height, width = struct.unpack_from(">HH", data, at + 5)  # after length and precision
            return width, height
        (length,) = struct.unpack_from(">H", data, at + 2)
        at += 2 + length
    return None


def _webp_dimensions(data: bytes) -> tuple[int, int] | None:
    """The size in the first chunk (https://developers.google.com/speed/webp/docs/riff_container)."""
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended: the canvas size, 24 bits each, minus one
        if len(data) < 30:
            return None
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and data[20:21] == b"\x2f":  # lossless: 14 bits each, minus one, after 0x2F
        (bits,) = struct.unpack_from("<I", data, 21)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":  # lossy: after the key frame's start code
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF  # the top two bits of each are a scaling hint
    return None


def best_size(sizes: Sequence[tuple[int, int, int | None]], *, max_side: int, max_bytes: int) -> int | None:
    """Of a photo's sizes as Telegram lists them, (width, height, file size or None), the index of
    the largest within ``max_side`` pixels and ``max_bytes`` (an unknown size fits); when none is,
    the smallest; None for no sizes."""
    if not sizes:
        return None
    fitting = [
        index
        for index, (width, height, file_size) in enumerate(sizes)
        if max(width, height) <= max_side and (file_size is None or file_size <= max_bytes)
    ]

    def area(index: int) -> int:
        return sizes[index][0] * sizes[index][1]

    return max(fitting, key=area) if fitting else min(range(len(sizes)), key=area)


def data_url(data: bytes, mime_type: str) -> str:
    """The image as a ``data:`` URL, the form chat APIs take inline images in."""
    return f"data:{mime_type};base64,{base64.b64encode(data).decode('ascii')}"

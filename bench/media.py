"""Benchmark of a photo turn's added latency (part of ``make bench``; alone: ``python -m bench.media``).

What a photo adds to a turn before its LLM call, through the bot's own code over real HTTP: the
``getFile`` call and the download from a Telegram stand-in (``handlers.files``), the image's check
(``services.media.images.sniff``) and its data URL for the request, for an image of
``--kilobytes`` (a phone photo at Telegram's 1280-pixel size is 100-300 KB). Measured twice: the
turn that receives the photo, and a later turn that shows it again from memory (no download).
A text message adds nothing: its database cost stays the 3 round trips ``python -m bench``
counts from libpq's trace (``round_trips_per_turn``). Prints p50/p99 in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.__main__ import TOKEN, parse, percentile, write_results
from bench.standins import TelegramStandIn
from bot import create_bot
from config import load_config
from handlers.files import TelegramFiles
from services.media.files import ImageCache
from services.media.images import data_url
from services.media.intake import Intake
from services.records import Attachment

JPEG = (Path(__file__).resolve().parent.parent / "tests" / "media" / "photo.jpg").read_bytes()
GOAL_MS = 50.0  # p50 of a received photo's added latency, on loopback: small beside an LLM's seconds


def photo_of(kilobytes: int) -> bytes:
    """A JPEG of about ``kilobytes``: a real one padded before its end marker (the bytes are
    downloaded, checked and encoded, never decoded)."""
    return JPEG[:-2] + bytes(max(0, kilobytes * 1024 - len(JPEG))) + b"\xff\xd9"


async def measure(n: int, kilobytes: int) -> dict[str, dict[str, float]]:
    telegram = TelegramStandIn()
    await telegram.start()
    config = load_config({"TELEGRAM_BOT_TOKEN": TOKEN, "OPENAI_API_KEY": "bench", "TELEGRAM_API_URL": telegram.url})
    bot = create_bot(config)
    files = TelegramFiles(bot)
    try:
        received: list[float] = []
        again: list[float] = []
        for _ in range(n):
            [size] = telegram.photo_sizes(photo_of(kilobytes), sizes=((1280, 960),))
            photo = Attachment("photo", size["file_id"], size["file_unique_id"], "image/jpeg", size["file_size"])
            images = ImageCache(files, max_bytes=config.media_cache_bytes, max_image_bytes=config.image_max_bytes)
            intake = Intake(files, images, None, config)
            started = time.perf_counter()
            read = await intake.read("what is this?", [photo])
            data_url(read.images[0].data, read.images[0].mime_type)
            received.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            data_url(await images.image(photo.file_id, photo.file_unique_id), "image/jpeg")
            again.append((time.perf_counter() - started) * 1000)
    finally:
        await bot.session.close()
        await telegram.stop()
    return {
        "received": {"p50_ms": statistics.median(received), "p99_ms": percentile(received, 0.99)},
        "shown_again": {"p50_ms": statistics.median(again), "p99_ms": percentile(again, 0.99)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=200, help="photo turns measured")
    parser.add_argument("--kilobytes", type=int, default=200, help="size of each photo")
    args = parse(parser, {"photos": 10})
    figures = asyncio.run(measure(args.photos, args.kilobytes))
    print(f"\nA photo turn's added latency ({args.photos} photos of {args.kilobytes} KB, ms)")
    print(f"{'':<38}{'p50':>8}{'p99':>8}")
    rows = (("received", "received: getFile, download, encode"), ("shown_again", "a later turn, from memory"))
    for name, label in rows:
        print(f"{label:<38}{figures[name]['p50_ms']:>8.2f}{figures[name]['p99_ms']:>8.2f}")
    met = figures["received"]["p50_ms"] <= GOAL_MS
    print(f"goal: received p50 <= {GOAL_MS:.0f} ms: {'met' if met else 'NOT met'}")
    results = {
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "taken_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "photos": args.photos,
        "kilobytes": args.kilobytes,
        "latency": figures,
        "goal_met": met,
    }
    write_results(results, "media", args.smoke)


if __name__ == "__main__":
    main()

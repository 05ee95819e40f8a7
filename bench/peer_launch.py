"""Start the peer bot (n3d1117/chatgpt-telegram-bot) inside its own venv, patched for the stand-ins.

Run by ``bench/peer.py`` as ``<peer venv>/bin/python bench/peer_launch.py <peer checkout>``, in
a working folder of the run's own (the peer writes ``usage_logs/`` there). Only the standard
library is imported at the top: this file runs under the peer's interpreter, which has none of
our packages. The peer's files are not edited; three things are patched in memory before its
``bot/main.py`` runs, so that it needs no network but the stand-ins:

- python-telegram-bot's ``ApplicationBuilder.build`` sets ``base_url`` and ``base_file_url`` to
  ``PEER_TELEGRAM_API_URL`` (the peer has no setting for them);
- tiktoken's ``encoding_for_model`` and ``get_encoding`` return an estimate (4 characters a
  token): the real ones download their encodings from the network on first use;
- python-dotenv's ``load_dotenv`` does nothing, so a ``.env`` in the checkout cannot change the
  run's configuration (the bench passes every setting in the environment).

The OpenAI base URL needs no patch: the peer builds ``openai.AsyncOpenAI`` without one, so the
SDK reads ``OPENAI_BASE_URL`` from the environment.
"""

from __future__ import annotations

import importlib
import os
import runpy
import sys
from pathlib import Path
from typing import Any

CHARS_PER_TOKEN = 4  # what OpenAI quotes for English text


class EstimatedEncoding:
    """Stands in for a tiktoken ``Encoding``: the peer only takes ``len(encoding.encode(text))``."""

    name = "estimate"

    def encode(self, text: str, *args: Any, **kwargs: Any) -> list[int]:
        return [0] * (len(text) // CHARS_PER_TOKEN + 1)


def offline_tiktoken() -> None:
    """Token counting without the download: the peer counts its history twice a turn."""
    tiktoken: Any = importlib.import_module("tiktoken")
    encoding = EstimatedEncoding()
    tiktoken.encoding_for_model = lambda model_name: encoding
    tiktoken.get_encoding = lambda encoding_name: encoding


def telegram_at(api_url: str) -> None:
    """Every Application the peer builds talks to ``api_url`` (python-telegram-bot appends the
    token to ``base_url``: ``<api_url>/bot<token>/<method>``, as the Bot API serves it)."""
    ext: Any = importlib.import_module("telegram.ext")
    builder = ext.ApplicationBuilder
    original = builder.build

    def build(self: Any) -> Any:
        self.base_url(f"{api_url}/bot").base_file_url(f"{api_url}/file/bot")
        return original(self)

    builder.build = build


def no_dotenv() -> None:
    """The run's environment is the whole configuration: no ``.env`` is read."""
    dotenv: Any = importlib.import_module("dotenv")
    dotenv.load_dotenv = lambda *args, **kwargs: False


def main() -> None:
    peer_dir = Path(sys.argv[1]).resolve()
    code = peer_dir / "bot"
    offline_tiktoken()
    telegram_at(os.environ["PEER_TELEGRAM_API_URL"].rstrip("/"))
    no_dotenv()
    sys.path.insert(0, str(code))  # the peer imports its modules by their bare names
    sys.argv = [str(code / "main.py")]
    runpy.run_path(str(code / "main.py"), run_name="__main__")


if __name__ == "__main__":
    main()

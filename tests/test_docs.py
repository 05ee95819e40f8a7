"""The docs only name what exists: Makefile targets, environment variables, files and links."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from config import load_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "doc").rglob("*.md"))]
SOURCES = [
    *ROOT.glob("*.py"),
    *ROOT.glob("handlers/*.py"),
    *ROOT.glob("services/**/*.py"),
    *ROOT.glob("tests/*.py"),
    ROOT / "Makefile",
    ROOT / "docker-compose.yml",
    ROOT / ".env.example",
    ROOT / ".ci" / "run",
]
GENERATED = (".pgdata", ".venv", "bench/results/bench-")  # made by the commands the docs describe
CODE = re.compile(r"`([^`\n]+)`")


def doc_ids() -> list[str]:
    return [str(p.relative_to(ROOT)) for p in DOCS]


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))


@pytest.mark.parametrize("doc", DOCS, ids=doc_ids())
def test_every_make_target_named_exists(doc: Path) -> None:
    named = set(re.findall(r"\bmake ([a-z][a-z-]*)", doc.read_text()))
    assert named, "a guide with no make command is suspicious"
    assert named <= make_targets(), named - make_targets()


@pytest.mark.parametrize("doc", DOCS, ids=doc_ids())
def test_every_environment_variable_named_is_read_somewhere(doc: Path) -> None:
    sources = "\n".join(p.read_text() for p in SOURCES)
    names = {
        name for span in CODE.findall(doc.read_text()) for name in re.findall(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b", span)
    }
    missing = {name for name in names if name not in sources}
    assert not missing


@pytest.mark.parametrize("doc", DOCS, ids=doc_ids())
def test_every_file_and_link_named_exists(doc: Path) -> None:
    text = doc.read_text()
    paths = {
        span.split()[0]
        for span in CODE.findall(text)
        if re.fullmatch(r"[\w.\-/]+(/|\.(py|md|yml|ini|toml|json|sql))", span.split()[0] if span.split() else "")
        and not span.startswith(("http", "/"))
    }
    links = {
        target.split("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", text) if not target.startswith(("http", "#"))
    }
    missing = [p for p in paths if not p.startswith(GENERATED) and not (ROOT / p).exists()]
    missing += [link for link in links if not (doc.parent / link).exists()]
    assert not missing


def test_every_setting_is_documented_in_the_readme_and_env_example() -> None:
    config = load_config({"TELEGRAM_BOT_TOKEN": "1:" + "x" * 30, "OPENAI_API_KEY": "k"})
    readme, example = (ROOT / "README.md").read_text(), (ROOT / ".env.example").read_text()
    for field in vars(config):
        name = field.upper()
        assert f"`{name}`" in readme, name
        assert f"\n{name}=" in example, name

"""The container: docker-compose.yml runs postgres, a one-shot migrate and the bot, in that order;
the Dockerfile builds a non-root image with its dependencies in their own layer.

No YAML parser is installed (and none is added for one test): the compose file is read by a
small parser of the block-style subset it is written in, which fails on anything else, so the
structure below is really checked. Where a Docker engine answers, ``docker compose config``
validates the file too, and the image is built.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from config import load_config

ROOT = Path(__file__).resolve().parent.parent


def parse_yaml_subset(text: str) -> Any:
    """Block mappings and sequences of scalars, quoted strings and JSON-style flow lists, with
    comments: what docker-compose.yml uses. Raises ValueError on anything else."""
    lines = [
        (len(line) - len(line.lstrip(" ")), line.strip())
        for raw in text.splitlines()
        if (line := re.sub(r"\s+#.*$", "", raw) if not raw.lstrip().startswith("#") else "").strip()
    ]
    value, end = _block(lines, 0, lines[0][0])
    if end != len(lines):
        raise ValueError(f"unparsed line: {lines[end][1]}")
    return value


def _block(lines: list[tuple[int, str]], start: int, indent: int) -> tuple[Any, int]:
    is_list = lines[start][1].startswith("- ")
    result: Any = [] if is_list else {}
    i = start
    while i < len(lines) and lines[i][0] == indent:
        text = lines[i][1]
        if is_list != text.startswith("- "):
            raise ValueError(f"mixed list and mapping: {text}")
        if is_list:
            result.append(_scalar(text[2:]))
            i += 1
            continue
        key, colon, rest = text.partition(":")
        if not colon or key in result:
            raise ValueError(f"not a new key: {text}")
        if rest.strip():
            result[key] = _scalar(rest.strip())
            i += 1
        elif i + 1 < len(lines) and lines[i + 1][0] > indent:
            result[key], i = _block(lines, i + 1, lines[i + 1][0])
        else:
            result[key] = None
            i += 1
    if i < len(lines) and lines[i][0] > indent:
        raise ValueError(f"bad indentation: {lines[i][1]}")
    return result, i


def _scalar(text: str) -> Any:
    if text.startswith("["):
        return json.loads(text)
    if text[:1] in "\"'":
        if text[-1] != text[0]:
            raise ValueError(f"unclosed quote: {text}")
        return text[1:-1]
    if ": " in text or text.endswith(":"):
        raise ValueError(f"inline mapping not supported: {text}")
    return text


@pytest.fixture(scope="module")
def compose() -> Any:
    return parse_yaml_subset((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_postgres_then_the_migrations_then_the_bot(compose: Any) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "migrate", "bot"}
    assert set(compose["volumes"]) == {"pgdata", "spool"}
    postgres, migrate, bot = services["postgres"], services["migrate"], services["bot"]
    assert postgres["healthcheck"]["test"][0] == "CMD-SHELL"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert migrate["command"] == ["alembic", "upgrade", "head"]
    assert migrate["restart"] == "no"  # one shot
    assert bot["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    assert bot["env_file"] == ".env"
    assert migrate["build"] == bot["build"] == "."
    assert migrate["image"] == bot["image"]
    for service in (migrate, bot):  # the postgres service, with the credentials it was created with
        url = service["environment"]["DATABASE_URL"]
        assert (
            url == "postgresql://${POSTGRES_USER:-bot}:${POSTGRES_PASSWORD:-bot}@postgres:5432/${POSTGRES_DB:-llmbot}"
        )
    # SIGTERM must give the turns SHUTDOWN_TIMEOUT_S before Docker's SIGKILL.
    grace = int(bot["stop_grace_period"].removesuffix("s"))
    assert grace > load_config({"TELEGRAM_BOT_TOKEN": "1:" + "x" * 30, "OPENAI_API_KEY": "k"}).shutdown_timeout_s


def test_the_subset_parser_refuses_what_it_does_not_understand() -> None:
    with pytest.raises(ValueError, match="inline mapping"):
        parse_yaml_subset("a:\n  b: {c: d}\n")
    with pytest.raises(ValueError, match="bad indentation"):
        parse_yaml_subset("a:\n    b: 1\n  c: 2\n")
    assert parse_yaml_subset('a:\n  - \'x\'\n  - ["y", "z"]  # comment\nb: c\n') == {"a": ["x", ["y", "z"]], "b": "c"}


def test_the_dockerfile_installs_dependencies_before_the_code_and_runs_as_a_user() -> None:
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line and not line.startswith("#")]
    instructions = [line.split()[0] for line in lines if not line.startswith(" ")]
    assert lines[0].startswith("FROM python:3.12-slim")
    copies = [line for line in lines if line.startswith("COPY")]
    assert copies == ["COPY pyproject.toml constraints.txt ./", "COPY . ."]
    install = next(i for i, line in enumerate(lines) if "pip install -c constraints.txt" in line)
    assert lines.index("COPY pyproject.toml constraints.txt ./") < install < lines.index("COPY . .")
    assert instructions.index("USER") > instructions.index("RUN")  # after the installs, before CMD
    user = next(line for line in lines if line.startswith("USER")).split()[1]
    assert user not in ("root", "0")
    assert lines[-1] == 'CMD ["python", "bot.py"]'
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".git", ".venv", ".pgdata", ".spool"} <= set(ignored)


def docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


needs_docker = pytest.mark.skipif(not docker_answers(), reason="no Docker engine answers `docker info` here")


@needs_docker
def test_docker_compose_accepts_the_file() -> None:
    if not (ROOT / ".env").exists():
        pytest.skip("the bot service reads .env: create it from .env.example first")
    subprocess.run(["docker", "compose", "config", "--quiet"], cwd=ROOT, check=True)


@needs_docker
def test_the_image_builds_and_runs_as_a_user() -> None:
    subprocess.run(["docker", "build", "--tag", "llmbot:test", "."], cwd=ROOT, check=True)
    whoami = subprocess.run(
        ["docker", "run", "--rm", "llmbot:test", "python", "-c", "import os, bot; print(os.getuid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert whoami.stdout.strip() != "0"

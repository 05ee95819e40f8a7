"""Run a PostgreSQL cluster from the server binaries installed on this machine.

One helper serves three callers: ``make db-up`` when no Docker engine answers (a persistent
cluster in ``.pgdata/``), the test suite and the benchmarks (throwaway clusters in a temporary
folder). ``initdb`` and ``postgres`` refuse to run as root, so as root they run as the
unprivileged ``postgres`` user on a folder that user owns.

Command line::

    python -m services.local_postgres up [--data-dir .pgdata]    # uses DATABASE_URL
    python -m services.local_postgres down [--data-dir .pgdata]
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import psycopg
from psycopg import sql

SERVER_USER = "postgres"
INSTALL_HINT = (
    "PostgreSQL server binaries not found: install them (Debian/Ubuntu: "
    "`apt-get install postgresql`), set PG_BIN to their folder, or set TEST_DATABASE_URL"
)


class PostgresNotFoundError(RuntimeError):
    """No ``initdb``/``pg_ctl`` on this machine."""


def find_bin_dir() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``: PG_BIN, PATH, or the newest Debian install."""
    candidates = [os.environ.get("PG_BIN", "")]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(debian)
    for folder in candidates:
        if folder and (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    raise PostgresNotFoundError(INSTALL_HINT)


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

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            raise RuntimeError(f"{what} failed: {result.stderr.strip() or result.stdout.strip()}")

    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        """Create the cluster (superuser ``user`` with ``password``) unless it exists."""
        if self.initialised():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", delete=False, suffix=".pw") as pwfile:
            pwfile.write(self.password + "\n")
        try:
            if os.geteuid() == 0:
                server = pwd.getpwnam(SERVER_USER)
                for path in (self.data_dir, Path(pwfile.name)):
                    os.chown(path, server.pw_uid, server.pw_gid)
            self.data_dir.chmod(0o700)
            result = self._run(
                "initdb",
                "-D", str(self.data_dir),
                "-U", self.user,
                f"--pwfile={pwfile.name}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
            )  # fmt: skip
            self._check(result, "initdb")
        finally:
            os.unlink(pwfile.name)

    def running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", str(self.data_dir)).returncode == 0

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
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
        """Stop the server and delete its folder."""
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)


def throwaway(settings: dict[str, str] | None = None) -> LocalPostgres:
    """Start a new cluster in a temporary folder on a free port; the caller destroys it."""
    data_dir = Path(tempfile.mkdtemp(prefix="llmbot-pg-")) / "data"
    cluster = LocalPostgres(data_dir=data_dir, port=free_port(), settings=settings or {})
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
            print(f"PostgreSQL {cluster.bin_dir.parent.name} is up on {where}")
        elif cluster.initialised():
            cluster.stop()
            print("PostgreSQL stopped")
    except (RuntimeError, psycopg.OperationalError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

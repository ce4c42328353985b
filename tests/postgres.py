"""A real PostgreSQL server for tests: Debian's `postgresql` package, `initdb` into a private temporary
directory, run as an unprivileged user (PostgreSQL refuses root) on a loopback port and a unix socket in
that directory. Password authentication on TCP, as users run it; one throwaway database per test.

Missing PostgreSQL is a skip with the reason locally and a failure under CI=true (`.ci/run` installs it),
like the Docker suites."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import GiveUp, free_port, port_open, wait_until

USER = "mtlsgate"


def _bindir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    found = shutil.which("postgres")
    return Path(found).resolve().parent if found else None


def unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the PostgreSQL suites must run; .ci/run installs `postgresql`)")
    pytest.skip(reason)


@dataclass
class PostgresServer:
    """One running server; `dsn(db)` is a password URL for database `db`."""

    root: Path
    port: int
    password: str
    popen: subprocess.Popen[bytes]
    user: str | None  # the OS user the server runs as (None: ours)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def create_database(self) -> str:
        name = f"t_{secrets.token_hex(6)}"
        self.execute(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        self.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def log(self) -> str:
        return (self.root / "postgres.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)  # fast shutdown: disconnect clients (SIGTERM waits for them)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def restart(self) -> None:
        """Stop (fast shutdown: clients are disconnected) and start again on the same port and data."""
        self.stop()
        self.popen = _start(self.root, self.port, self.user)


def _start(root: Path, port: int, user: str | None) -> subprocess.Popen[bytes]:
    bindir = _bindir()
    assert bindir is not None
    log = open(root / "postgres.log", "ab")  # noqa: SIM115 - the server holds it open for its lifetime
    popen = subprocess.Popen(
        [str(bindir / "postgres"), "-D", str(root / "data"), "-p", str(port), "-h", "127.0.0.1",
         "-k", str(root),
         # Throwaway data: no fsync (replica crashes do not depend on it; only an OS crash would).
         "-c", "fsync=off", "-c", "max_connections=200"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, user=user, cwd=root)
    log.close()
    def accepting() -> bool:
        if popen.poll() is not None:
            raise GiveUp(f"postgres exited with {popen.returncode}")
        return port_open("127.0.0.1", port) and subprocess.run(
            [str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode == 0

    wait_until(accepting, timeout=30, message=f"PostgreSQL on 127.0.0.1:{port} to accept connections")
    return popen


def start_postgres() -> PostgresServer:
    bindir = _bindir()
    if bindir is None or not (bindir / "initdb").exists():
        unavailable("PostgreSQL is not installed (apt-get install -y postgresql)")
    assert bindir is not None
    user: str | None = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no `postgres` user to run PostgreSQL as")
        user = "postgres"
    root = Path(tempfile.mkdtemp(prefix="mtlsgate-pg-"))
    password = secrets.token_urlsafe(16)
    pwfile = root / "pw"
    pwfile.write_text(password + "\n")
    if user:
        shutil.chown(root, user)
        shutil.chown(pwfile, user)
    subprocess.run([str(bindir / "initdb"), "-D", str(root / "data"), "-U", USER, f"--pwfile={pwfile}",
                    "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True, user=user, cwd=root)
    pwfile.unlink()
    port = free_port()
    try:
        popen = _start(root, port, user)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{(root / 'postgres.log').read_text(errors='replace')}") from None
    return PostgresServer(root, port, password, popen, user)


@contextlib.contextmanager
def database(server: PostgresServer):  # type: ignore[no-untyped-def]
    """A fresh, empty database for one test; its URL."""
    name = server.create_database()
    try:
        yield server.dsn(name)
    finally:
        server.drop_database(name)

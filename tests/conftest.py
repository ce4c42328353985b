"""Session-wide fixtures. Suites add their own fixtures in their folders' conftest.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from control_plane.pki import DemoPki, init_demo_pki
from tests.support import stop_leftovers


@pytest.fixture(scope="session")
def demo_pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPki:
    """The `mtlsgate pki init` PKI, made once per test session."""
    return init_demo_pki(tmp_path_factory.mktemp("demo-pki"))


@pytest.fixture
def logs_dir(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[object]:
    """A real PostgreSQL server for the session (tests/postgres.py); skipped, or failed under CI=true,
    when PostgreSQL is not installed."""
    from tests.postgres import start_postgres

    server = start_postgres()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def postgres_dsn(postgres_server: object) -> Iterator[str]:
    """The URL of a fresh, empty database on the session's PostgreSQL server, dropped afterwards."""
    from tests.postgres import PostgresServer, database

    assert isinstance(postgres_server, PostgresServer)
    with database(postgres_server) as dsn:
        yield dsn


@pytest.fixture(autouse=True)
def _private_cli_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the real ~/.config/mtlsgate (CLI contexts, SPEC §8): every process a test
    starts inherits a config path of its own."""
    monkeypatch.setenv("MTLSGATE_CONFIG", str(tmp_path / "mtlsgate-config.yaml"))
    monkeypatch.delenv("MTLSGATE_CONTEXT", raising=False)


def pytest_sessionstart(session: pytest.Session) -> None:
    # SIGTERM (a CI timeout, a killed terminal) ends the run like Ctrl-C: fixtures are torn down, so the
    # control planes, proxies and PostgreSQL servers they started are stopped instead of outliving the run.
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, interrupt)


@pytest.hookimpl(trylast=True)  # after the session-scoped fixtures are torn down
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    killed = stop_leftovers()
    if killed:  # a test or fixture let a process leak: say which, so it can be fixed
        print(f"\nkilled {len(killed)} process(es) still running at the end of the session: {killed[:5]}")

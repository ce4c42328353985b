"""Session-wide fixtures. Suites add their own fixtures in their folders' conftest.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from control_plane.pki import DemoPki, init_demo_pki


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

"""Session-wide fixtures. Suites add their own fixtures in their folders' conftest.py."""

from __future__ import annotations

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

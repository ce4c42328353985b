"""RevocationService/ListRevocations (`status --revocations`) is a read: a viewer may, an identity with no
role may not (SPEC §8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from control_plane.authz.policy import Access, access_for
from tests.control_plane.secure_harness import ADMIN, CaPki, SecureControlPlane

VIEWER = "spiffe://corp/ops/alice"
STRANGER = "spiffe://corp/elsewhere/mallory"
BINDINGS = f"""
bindings:
  - {{identity: "{ADMIN}", role: admin}}
  - {{identity: "{VIEWER}", role: viewer}}
"""


def test_list_revocations_is_classified_as_a_read() -> None:
    assert access_for("/mtlsgate.v1.RevocationService/ListRevocations") is Access.READ


@pytest.fixture
def secure_cp(tmp_path: Path, logs_dir: Path):
    cp = SecureControlPlane.start(CaPki(tmp_path / "pki"), tmp_path, logs_dir, authz=BINDINGS)
    yield cp
    cp.stop()


def test_a_viewer_lists_revocations_and_a_stranger_is_refused(secure_cp: SecureControlPlane) -> None:
    listed = secure_cp.cli("status", "--revocations", "-o", "json", identity=VIEWER)
    assert listed.returncode == 0, listed.stderr
    assert '"revocations": []' in listed.stdout
    refused = secure_cp.cli("status", "--revocations", identity=STRANGER)
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr and "has no role" in refused.stderr

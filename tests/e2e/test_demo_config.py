"""The demo's configuration as data: endpoints.json, manifests and printed instructions (no processes)."""

from __future__ import annotations

from pathlib import Path

from control_plane.demo_config import (
    DemoCredentials,
    DemoLayout,
    DemoNode,
    demo_manifest,
    endpoints_document,
    instructions,
)
from control_plane.pki import DemoPki

LAYOUT = DemoLayout(
    control_plane="127.0.0.1:18000",
    backend="127.0.0.1:9000",
    backend_target="127.0.0.1:9000",
    strict_port=8443,
    permissive_port=8444,
    nodes=(DemoNode("demo-a", "127.0.0.2", "127.0.0.1:9901"), DemoNode("demo-b", "::1", "127.0.0.1:9902")),
)


def test_endpoints_document_has_exactly_the_spec_keys_with_absolute_paths(demo_pki: DemoPki) -> None:
    doc = endpoints_document(LAYOUT, demo_pki.directory)
    assert doc["control_plane"] == "127.0.0.1:18000"
    assert doc["listeners"] == {
        "strict": ["https://127.0.0.2:8443/", "https://[::1]:8443/"],
        "permissive": ["https://127.0.0.2:8444/", "https://[::1]:8444/"],
    }
    for key in ("ca_cert", "client_cert", "client_key", "revoked_cert", "revoked_key"):
        path = Path(doc[key])
        assert path.is_absolute() and path.exists(), key


def test_manifest_listeners_reference_the_policies_and_forward_to_the_backend(demo_pki: DemoPki) -> None:
    documents = demo_manifest(demo_pki.directory, LAYOUT)
    listeners = {d["name"]: d for d in documents if d["kind"] == "Listener"}
    assert listeners["strict"]["port"] == 8443 and listeners["permissive"]["port"] == 8444
    assert listeners["strict"]["serverTlsPolicy"] == "serverTlsPolicies/strict"
    assert {d["backend"] for d in listeners.values()} == {"127.0.0.1:9000"}
    trust = documents[0]
    assert trust["trustStores"][0]["crls"][0]["pemCrl"] == demo_pki.path("crl").read_text().strip() + "\n"


def test_instructions_show_every_case_and_the_rotation(tmp_path: Path) -> None:
    text = instructions(LAYOUT, tmp_path, "mtlsgate")
    assert "https://127.0.0.2:8443/" in text and "https://[::1]:8444/" in text
    assert "revoked.pem" in text and "client.pem" in text
    assert "mtlsgate apply --wait -f" in text and "trust-config-rotated.yaml" in text
    assert "--server 127.0.0.1:18000" in text
    assert "admin.pem" not in text  # a registered CLI context holds the credentials


def test_instructions_without_a_context_carry_the_admin_credentials(tmp_path: Path) -> None:
    connect = DemoCredentials(tmp_path).client_args()
    text = instructions(LAYOUT, tmp_path, "mtlsgate", connect)
    status_line = next(line for line in text.splitlines() if " status " in f"{line} ")
    assert status_line.split() == ["mtlsgate", "status", "--server", "127.0.0.1:18000", *connect]


def test_with_a_second_backend_the_permissive_listener_routes_over_a_health_checked_service(
        demo_pki: DemoPki) -> None:
    import dataclasses

    layout = dataclasses.replace(LAYOUT, backend_b="127.0.0.1:9001", backend_b_target="127.0.0.1:9001")
    documents = demo_manifest(demo_pki.directory, layout)
    kinds = [d["kind"] for d in documents]
    assert kinds.index("BackendService") < kinds.index("Listener")  # dependencies first
    [service] = [d for d in documents if d["kind"] == "BackendService"]
    assert [e["address"] for e in service["endpoints"]] == ["127.0.0.1:9000", "127.0.0.1:9001"]
    assert service["healthCheck"]["path"] == "/healthz"
    listeners = {d["name"]: d for d in documents if d["kind"] == "Listener"}
    assert listeners["strict"]["backend"] == "127.0.0.1:9000"  # unchanged
    permissive = listeners["permissive"]
    assert "backend" not in permissive and permissive["defaultBackendService"] == "backendServices/echo"
    assert permissive["routes"][0] == {"pathPrefix": "/admin/", "backendService": "backendServices/echo",
                                       "clientCertificate": "REQUIRED"}
    assert permissive["routes"][1]["hosts"] == ["localhost"]
    text = instructions(layout, demo_pki.directory, "mtlsgate")
    assert "https://127.0.0.2:8444/admin/" in text and "status --backends" in text

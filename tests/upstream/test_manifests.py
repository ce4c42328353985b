"""BackendService and BackendAuthenticationConfig as people write them: apply manifests and gcloud import
YAML (full GCP names normalised), with one-line errors for what is wrong."""

from __future__ import annotations

import pytest

from control_plane.manifests import ManifestError, order_for_apply, parse_gcp_import, parse_manifest
from control_plane.resource_names import BACKEND_AUTHENTICATION_CONFIG, normalise_references

MANIFEST = """
kind: Listener
name: edge
port: 8443
certificate: edge
defaultBackendService: app
---
kind: BackendService
name: app
endpoints:
- {address: 127.0.0.1:9001, weight: 1}
- {address: 127.0.0.1:9002, weight: 3}
loadBalancing: LEAST_REQUEST
outlierDetection: {consecutiveErrors: 3, baseEjectionTime: 10s}
timeouts: {connect: 2s, response: 30s}
"""

GCLOUD_EXPORT = """
name: projects/p/locations/global/backendAuthenticationConfigs/upstream
createTime: '2024-05-01T10:00:00.000000Z'
updateTime: '2024-05-01T10:00:00.000000Z'
etag: abc
clientCertificate: projects/p/locations/global/certificates/edge-client
trustConfig: projects/p/locations/global/trustConfigs/backends
wellKnownRoots: NONE
"""


def test_manifest_services_are_written_before_the_listeners_that_use_them() -> None:
    items = parse_manifest(MANIFEST, "m.yaml")
    assert [i.resource.name for i in order_for_apply(items)] == ["backendServices/app", "listeners/edge"]
    service = items[1].resource
    assert [e.weight for e in service.endpoints] == [1, 3]  # type: ignore[attr-defined]


def test_gcloud_backend_authentication_config_imports_with_names_normalised() -> None:
    config = parse_gcp_import(GCLOUD_EXPORT, BACKEND_AUTHENTICATION_CONFIG, "upstream", "bac.yaml")
    assert normalise_references(config) == []
    assert config.name == "backendAuthenticationConfigs/upstream"  # type: ignore[attr-defined]
    assert config.client_certificate == "certificates/edge-client"  # type: ignore[attr-defined]
    assert config.trust_config == "trustConfigs/backends"  # type: ignore[attr-defined]


@pytest.mark.parametrize("document, problem", [
    ("kind: BackendService\nname: a\nendpoints: [{address: x:1, wieght: 2}]\n", "endpoints[0].wieght: unknown field; did you mean weight?"),
    ("kind: BackendService\nname: a\nloadBalancing: RANDOM\n", "loadBalancing: RANDOM is not a valid value; allowed: ROUND_ROBIN, LEAST_REQUEST"),
    ("kind: BackendService\nname: a\nresolvedBackendAuthentication: {}\n", "set by the control plane"),
])
def test_bad_documents_are_one_line_errors(document: str, problem: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(document, "m.yaml")
    assert problem in str(caught.value) and "\n" not in str(caught.value)

"""Pure parsing: names, kinds, apply manifests, gcloud import files, YAML output."""

from __future__ import annotations

import pytest
import yaml

from control_plane.manifests import (
    ManifestError,
    dump_yaml,
    order_for_apply,
    parse_gcp_import,
    parse_manifest,
    to_document,
)
from control_plane.resource_names import (
    LISTENER,
    SERVER_TLS_POLICY,
    TRUST_CONFIG,
    InvalidName,
    normalise_name,
    parse_kind,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("trustConfigs/demo", "trustConfigs/demo"),
    ("projects/p-1/locations/global/trustConfigs/demo", "trustConfigs/demo"),
    (" listeners/a-1 ", "listeners/a-1"),
])
def test_normalise_name(text: str, expected: str) -> None:
    assert normalise_name(text) == expected


@pytest.mark.parametrize(("text", "problem"), [
    ("trustConfigs/Demo", "invalid resource id 'Demo'"),
    ("widgets/x", "unknown resource collection 'widgets'"),
    ("trustConfigs/a/b", "invalid resource name"),
    ("listeners/x", "is not a TrustConfig name"),
    ("trustConfigs/" + "a" * 64, "at most 63 characters"),
])
def test_bad_names(text: str, problem: str) -> None:
    with pytest.raises(InvalidName, match=problem):
        normalise_name(text, TRUST_CONFIG if "listeners" in text else None)


def test_kind_spellings() -> None:
    for spelling in ("trust-configs", "trust-config", "TrustConfig", "trustconfig", "trustConfigs"):
        assert parse_kind(spelling) is TRUST_CONFIG
    assert parse_kind("server-tls-policy") is SERVER_TLS_POLICY and parse_kind("listeners") is LISTENER


def test_manifest_order_and_errors() -> None:
    text = ("kind: Listener\nname: l\nport: 1\n---\nkind: TrustConfig\nname: projects/p/locations/global/"
            "trustConfigs/t\ncreateTime: 2024-01-01T00:00:00Z\netag: stale\n---\n")
    items = parse_manifest(text, "m.yaml")
    assert [i.resource.name for i in order_for_apply(items)] == ["trustConfigs/t", "listeners/l"]
    assert items[1].resource.etag == ""  # output fields from an export are ignored
    for bad, problem in [
        ("- a\n- b\n", "m.yaml \\(document 1\\): expected a mapping"),
        ("name: x\n", "kind: is required"),
        ("kind: Widget\nname: x\n", "unknown kind 'Widget'"),
        ("kind: Listener\n", "name: is required"),
        ("kind: Listener\nname: x\nport: many\n", "Failed to parse port field"),
        ("kind: [\n", "not valid YAML"),
    ]:
        with pytest.raises(ManifestError, match=problem):
            parse_manifest(bad, "m.yaml")


def test_gcp_import() -> None:
    policy = parse_gcp_import("name: projects/p/locations/global/serverTlsPolicies/old\nmtlsPolicy:\n"
                              "  clientValidationMode: REJECT_INVALID\n", SERVER_TLS_POLICY, "new", "p.yaml")
    assert policy.name == "serverTlsPolicies/new"
    with pytest.raises(ManifestError, match="looks like an apply manifest"):
        parse_gcp_import("kind: TrustConfig\n", TRUST_CONFIG, "x", "t.yaml")
    with pytest.raises(ManifestError, match='has no field named "spiffeTrustStores"'):
        parse_gcp_import("spiffeTrustStores: {}\n", TRUST_CONFIG, "x", "t.yaml")


def test_yaml_output_round_trips_pem_blocks() -> None:
    pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    [item] = parse_manifest(f"kind: TrustConfig\nname: t\nallowlistedCertificates:\n- pemCertificate: |\n"
                            f"{''.join('    ' + line + chr(10) for line in pem.splitlines())}", "m.yaml")
    text = dump_yaml([to_document(item.resource)])
    assert "pemCertificate: |\n" in text
    assert yaml.safe_load(text)["allowlistedCertificates"][0]["pemCertificate"] == pem

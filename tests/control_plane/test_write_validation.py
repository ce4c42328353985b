"""Every write-validation rule, against a real control plane: a bad input is refused with the right code
and field path, and nothing is stored (the global revision does not move)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from mtlsgate.v1 import api_pb2, backends_pb2, resources_pb2

from control_plane.pki import DemoPki, crl_pem, issue, make_crl
from tests.control_plane.conftest import Api
from tests.control_plane.harness import start_control_plane

R = resources_pb2
REJECT = R.MTLSPolicy.ClientValidationMode.REJECT_INVALID
ALLOW = R.MTLSPolicy.ClientValidationMode.ALLOW_INVALID_OR_MISSING_CLIENT_CERT


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("validation")
    logs = tmp / "logs"
    logs.mkdir()
    proc, address = start_control_plane(tmp, logs)
    client = Api(address)
    try:
        yield client
    finally:
        client.close()
        proc.stop()


@pytest.fixture(scope="module")
def base(api: Api, demo_pki: DemoPki) -> DemoPki:
    """A valid TrustConfig `base`, Certificate `edge` and policy `strict` to reference."""
    tc = trust_config(demo_pki)
    api.trust_configs.CreateTrustConfig(api_pb2.CreateTrustConfigRequest(trust_config_id="base", trust_config=tc))
    api.certificates.CreateCertificate(api_pb2.CreateCertificateRequest(certificate_id="edge", certificate=R.Certificate(
        pem_certificate=demo_pki.path("server_cert").read_text(),
        pem_private_key=demo_pki.path("server_key").read_text())))
    api.policies.CreateServerTlsPolicy(api_pb2.CreateServerTlsPolicyRequest(
        server_tls_policy_id="strict", server_tls_policy=R.ServerTlsPolicy(mtls_policy=R.MTLSPolicy(
            client_validation_mode=REJECT, client_validation_trust_config="trustConfigs/base"))))
    return demo_pki


def trust_config(pki: DemoPki) -> R.TrustConfig:
    tc = R.TrustConfig()
    store = tc.trust_stores.add()
    store.trust_anchors.add(pem_certificate=pki.path("ca_cert").read_text())
    store.intermediate_cas.add(pem_certificate=pki.path("intermediate_cert").read_text())
    store.crls.add(pem_crl=pki.path("crl").read_text())
    return tc


def refused(api: Api, call: Callable[[], object], code: grpc.StatusCode) -> tuple[str, list[tuple[str, str]]]:
    """Run a write that must fail; return (message, field violations) and check nothing was stored."""
    before = api.revision()
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert error.code() == code, error.details()
    violations: list[tuple[str, str]] = []
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            violations += [(v.subject, v.description) for v in failure.violations]
    assert api.revision() == before, "a refused write changed the store"
    return error.details(), violations


def create_tc(api: Api, tc: R.TrustConfig, tc_id: str = "bad") -> Callable[[], object]:
    return lambda: api.trust_configs.CreateTrustConfig(
        api_pb2.CreateTrustConfigRequest(trust_config_id=tc_id, trust_config=tc), timeout=10)


def test_anchor_that_is_not_a_ca(api: Api, base: DemoPki) -> None:
    tc = trust_config(base)
    tc.trust_stores[0].trust_anchors.add(pem_certificate=base.path("client_cert").read_text().split("-----END")[0]
                                         + "-----END CERTIFICATE-----\n")
    message, violations = refused(api, create_tc(api, tc), grpc.StatusCode.INVALID_ARGUMENT)
    assert violations == [("trustStores[0].trustAnchors[1].pemCertificate",
                           "not a CA certificate (basicConstraints CA=false)")]
    assert message == ("trustStores[0].trustAnchors[1].pemCertificate: not a CA certificate "
                       "(basicConstraints CA=false)")
    assert api.trust_configs.ListTrustConfigs(api_pb2.ListResourcesRequest()).trust_configs[0].name == \
        "trustConfigs/base"


def test_intermediate_that_is_not_a_ca_and_garbage_pem(api: Api, base: DemoPki) -> None:
    leaf = issue("no-ca", eku=None)
    tc = trust_config(base)
    tc.trust_stores[0].intermediate_cas.add(pem_certificate=leaf.cert_pem)
    tc.allowlisted_certificates.add(pem_certificate="-----BEGIN CERTIFICATE-----\nnot base64\n"
                                    "-----END CERTIFICATE-----\n")
    _, violations = refused(api, create_tc(api, tc), grpc.StatusCode.INVALID_ARGUMENT)
    assert [v[0] for v in violations] == ["trustStores[0].intermediateCas[1].pemCertificate",
                                          "allowlistedCertificates[0].pemCertificate"]
    assert violations[0][1] == "not a CA certificate (basicConstraints CA=false)"
    assert violations[1][1] == "the CERTIFICATE block is not valid base64"


def test_two_certificates_in_one_anchor_field(api: Api, base: DemoPki) -> None:
    tc = R.TrustConfig()
    tc.trust_stores.add().trust_anchors.add(pem_certificate=base.path("ca_cert").read_text() * 2)
    _, violations = refused(api, create_tc(api, tc), grpc.StatusCode.INVALID_ARGUMENT)
    assert violations == [("trustStores[0].trustAnchors[0].pemCertificate",
                           "must hold exactly one certificate (found 2)")]


def test_crl_must_verify_against_a_ca_of_the_trust_config(api: Api, base: DemoPki) -> None:
    stranger = issue("stranger CA", ca=True)
    impostor = issue("mtlsgate demo intermediate CA", ca=True)  # same name as the real issuer, other key
    tc = trust_config(base)
    tc.trust_stores[0].crls.add(pem_crl=crl_pem(make_crl(stranger)))
    tc.trust_stores[0].crls.add(pem_crl=crl_pem(make_crl(impostor)))
    tc.trust_stores[0].crls.add(pem_crl="-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    _, violations = refused(api, create_tc(api, tc), grpc.StatusCode.INVALID_ARGUMENT)
    assert [v[0] for v in violations] == ["trustStores[0].crls[3].pemCrl", "trustStores[0].crls[1].pemCrl",
                                          "trustStores[0].crls[2].pemCrl"]
    by_field = dict(violations)
    assert "is not a CA of this trust config" in by_field["trustStores[0].crls[1].pemCrl"]
    assert by_field["trustStores[0].crls[2].pemCrl"] == \
        "signature does not verify against any CA of this trust config"
    assert by_field["trustStores[0].crls[3].pemCrl"] == "garbage DER (not a CRL)"


def test_crl_every_node_would_reject_is_refused_on_write(api: Api, base: DemoPki) -> None:
    """Write validation compiles the TrustConfig as the nodes do: a CRL without the cRLNumber that
    RFC 5280 requires would be NACKed by the whole fleet, so the API refuses it up front."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from control_plane.pki import now

    inter = base.path("intermediate_cert").read_bytes()
    issuer_cert = x509.load_pem_x509_certificate(inter)
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    issuer_key = load_pem_private_key(base.path("intermediate_key").read_bytes(), None)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(issuer_cert.subject).last_update(now())
           .next_update(now() + dt.timedelta(days=1)).sign(issuer_key, hashes.SHA256()))  # type: ignore[arg-type]
    tc = trust_config(base)
    tc.trust_stores[0].crls.add(pem_crl=crl_pem(crl))
    _, violations = refused(api, create_tc(api, tc), grpc.StatusCode.INVALID_ARGUMENT)
    assert len(violations) == 1
    assert violations[0][0] == "trustStores[0].crls[1].pemCrl"
    assert "cRLNumber" in violations[0][1]


def test_two_listeners_on_one_port_for_the_same_nodes_are_refused(api: Api, base: DemoPki) -> None:
    def listener(port: int, selector: dict[str, str]) -> R.Listener:
        return R.Listener(port=port, certificate="certificates/edge", backend="127.0.0.1:9000",
                          node_selector=selector)

    def create(listener_id: str, msg: R.Listener) -> Callable[[], object]:
        return lambda: api.listeners.CreateListener(
            api_pb2.CreateListenerRequest(listener_id=listener_id, listener=msg), timeout=10)

    create("zone-a", listener(18443, {"zone": "a"}))()
    try:
        create("zone-b", listener(18443, {"zone": "b"}))()  # disjoint selectors: allowed
        for selector, clashes in (({}, "listeners/zone-a, listeners/zone-b"),  # every node
                                  ({"zone": "a", "tier": "edge"}, "listeners/zone-a")):  # part of zone a
            _, violations = refused(api, create("clash", listener(18443, selector)),
                                    grpc.StatusCode.FAILED_PRECONDITION)
            assert violations == [("port", f"port 18443 is already used by {clashes} on nodes this "
                                   "listener's nodeSelector also selects; use another port or disjoint "
                                   "nodeSelectors")]
        # Updating a listener in place on its own port is not a clash with itself.
        api.listeners.UpdateListener(api_pb2.UpdateListenerRequest(
            listener=R.Listener(name="listeners/zone-a", port=18443, certificate="certificates/edge",
                                backend="127.0.0.1:9001", node_selector={"zone": "a"})), timeout=10)
    finally:
        for listener_id in ("zone-a", "zone-b"):
            api.listeners.DeleteListener(api_pb2.DeleteResourceRequest(name=f"listeners/{listener_id}"))


def test_size_and_count_limits(api: Api, base: DemoPki) -> None:
    from data_plane.validation import resources as limits

    ca = base.path("ca_cert").read_text()
    tc = R.TrustConfig()
    store = tc.trust_stores.add()
    for _ in range(limits.MAX_TRUST_ANCHORS + 1):
        store.trust_anchors.add(pem_certificate=ca)
    _, violations = refused(api, create_tc(api, tc), grpc.StatusCode.INVALID_ARGUMENT)
    assert violations == [("trustStores[0].trustAnchors",
                           f"too many entries ({limits.MAX_TRUST_ANCHORS + 1}, limit {limits.MAX_TRUST_ANCHORS})")]

    huge = R.TrustConfig(description="x" * (limits.MAX_DESCRIPTION_CHARS + 1), labels={"Bad Key": "v"})
    huge.trust_stores.add().trust_anchors.add(pem_certificate="A" * (limits.MAX_CERTIFICATE_PEM_BYTES + 1))
    _, violations = refused(api, create_tc(api, huge), grpc.StatusCode.INVALID_ARGUMENT)
    assert [v[0] for v in violations] == ["description", "labels['Bad Key']",
                                          "trustStores[0].trustAnchors[0].pemCertificate"]
    assert violations[2][1].startswith("too large")


def test_bad_names(api: Api, base: DemoPki) -> None:
    _, violations = refused(api, create_tc(api, trust_config(base), "Bad_Name"), grpc.StatusCode.INVALID_ARGUMENT)
    assert violations[0][0] == "trustConfigId" and "must match [a-z][a-z0-9-]{0,62}" in violations[0][1]
    _, violations = refused(api, create_tc(api, trust_config(base), "a" * 64), grpc.StatusCode.INVALID_ARGUMENT)
    assert violations[0][0] == "trustConfigId"
    # Full GCP names are accepted and normalised.
    created = api.trust_configs.CreateTrustConfig(api_pb2.CreateTrustConfigRequest(
        trust_config=R.TrustConfig(name="projects/p/locations/global/trustConfigs/gcp-named",
                                   allowlisted_certificates=[R.AllowlistedCertificate(
                                       pem_certificate=base.path("client_cert").read_text().split("-----END")[0]
                                       + "-----END CERTIFICATE-----\n")])))
    assert created.name == "trustConfigs/gcp-named"
    refused(api, create_tc(api, trust_config(base), "gcp-named"), grpc.StatusCode.ALREADY_EXISTS)


def test_certificate_key_must_match(api: Api, base: DemoPki) -> None:
    def create(cert: R.Certificate) -> Callable[[], object]:
        return lambda: api.certificates.CreateCertificate(
            api_pb2.CreateCertificateRequest(certificate_id="bad", certificate=cert), timeout=10)

    wrong = R.Certificate(pem_certificate=base.path("server_cert").read_text(),
                          pem_private_key=base.path("client_key").read_text())
    message, violations = refused(api, create(wrong), grpc.StatusCode.INVALID_ARGUMENT)
    assert violations == [("pemPrivateKey", "does not match the public key of the first certificate in "
                           "pemCertificate")]
    assert "PRIVATE" not in message
    garbage = R.Certificate(pem_certificate=base.path("server_cert").read_text(),
                            pem_private_key="-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n")
    message, violations = refused(api, create(garbage), grpc.StatusCode.INVALID_ARGUMENT)
    assert violations == [("pemPrivateKey", "garbage DER (not a private key)")] and "c2VjcmV0" not in message
    _, violations = refused(api, create(R.Certificate()), grpc.StatusCode.INVALID_ARGUMENT)
    assert violations == [("pemCertificate", "required"), ("pemPrivateKey", "required")]


def test_policy_rules(api: Api, base: DemoPki) -> None:
    def create(policy: R.ServerTlsPolicy, pid: str = "bad") -> Callable[[], object]:
        return lambda: api.policies.CreateServerTlsPolicy(
            api_pb2.CreateServerTlsPolicyRequest(server_tls_policy_id=pid, server_tls_policy=policy), timeout=10)

    no_tc = R.ServerTlsPolicy(mtls_policy=R.MTLSPolicy(client_validation_mode=REJECT))
    _, violations = refused(api, create(no_tc), grpc.StatusCode.INVALID_ARGUMENT)
    assert violations == [("mtlsPolicy.clientValidationTrustConfig",
                           "required when clientValidationMode is REJECT_INVALID")]

    dangling = R.ServerTlsPolicy(mtls_policy=R.MTLSPolicy(client_validation_mode=ALLOW,
                                                          client_validation_trust_config="trustConfigs/nope"))
    _, violations = refused(api, create(dangling), grpc.StatusCode.FAILED_PRECONDITION)
    assert violations == [("mtlsPolicy.clientValidationTrustConfig", "trustConfigs/nope does not exist")]

    api.trust_configs.CreateTrustConfig(api_pb2.CreateTrustConfigRequest(trust_config_id="empty",
                                                                         trust_config=R.TrustConfig()))
    empty = R.ServerTlsPolicy(mtls_policy=R.MTLSPolicy(client_validation_mode=REJECT,
                                                       client_validation_trust_config="empty"))
    _, violations = refused(api, create(empty), grpc.StatusCode.INVALID_ARGUMENT)
    assert violations[0][0] == "mtlsPolicy.clientValidationTrustConfig"
    assert "has no trust anchor and no allowlisted certificate" in violations[0][1]

    # Emptying a TrustConfig that a REJECT_INVALID policy uses is refused too.
    _, violations = refused(api, lambda: api.trust_configs.UpdateTrustConfig(api_pb2.UpdateTrustConfigRequest(
        trust_config=R.TrustConfig(name="trustConfigs/base"))), grpc.StatusCode.FAILED_PRECONDITION)
    assert violations[0][0] == "trustStores" and "serverTlsPolicies/strict" in violations[0][1]

    bad_regex = R.ServerTlsPolicy(mtls_policy=R.MTLSPolicy(
        client_validation_mode=ALLOW, match_subject_alt_names=[R.SubjectAltNameMatcher(uri="spiffe://(unclosed")]))
    _, violations = refused(api, create(bad_regex), grpc.StatusCode.INVALID_ARGUMENT)
    assert violations[0][0] == "mtlsPolicy.matchSubjectAltNames[0].uri"
    assert "invalid RE2 pattern" in violations[0][1]

    deep = R.ServerTlsPolicy(mtls_policy=R.MTLSPolicy(client_validation_mode=ALLOW, max_verify_depth=11))
    _, violations = refused(api, create(deep), grpc.StatusCode.INVALID_ARGUMENT)
    assert violations[0][0] == "mtlsPolicy.maxVerifyDepth"

    unspecified = R.ServerTlsPolicy(mtls_policy=R.MTLSPolicy())
    _, violations = refused(api, create(unspecified), grpc.StatusCode.INVALID_ARGUMENT)
    assert violations[0][0] == "mtlsPolicy.clientValidationMode"


def test_listener_rules(api: Api, base: DemoPki) -> None:
    def create(listener: R.Listener) -> Callable[[], object]:
        return lambda: api.listeners.CreateListener(
            api_pb2.CreateListenerRequest(listener_id="bad", listener=listener), timeout=10)

    ok = dict(port=8443, certificate="certificates/edge", backend="127.0.0.1:9000")
    _, violations = refused(api, create(R.Listener(port=0, backend="nohost", custom_request_headers=["X:{x}"] * 17)),
                            grpc.StatusCode.INVALID_ARGUMENT)
    assert [v[0] for v in violations] == ["port", "certificate", "backend", "customRequestHeaders"]
    assert violations[3][1] == "too many entries (17, limit 16)"

    _, violations = refused(api, create(R.Listener(**ok, custom_request_headers=["X-Who:{client_cert_nope}"])),
                            grpc.StatusCode.INVALID_ARGUMENT)
    assert violations[0][0] == "customRequestHeaders[0]" and "unknown variable {client_cert_nope}" in violations[0][1]

    _, violations = refused(api, create(R.Listener(**{**ok, "certificate": "certificates/nope"},
                                                   server_tls_policy="projects/p/locations/global/"
                                                   "serverTlsPolicies/missing")),
                            grpc.StatusCode.FAILED_PRECONDITION)
    assert violations == [("certificate", "certificates/nope does not exist"),
                          ("serverTlsPolicy", "serverTlsPolicies/missing does not exist")]

    _, violations = refused(api, create(R.Listener(**ok, ssl_policy=R.SslPolicy(min_tls_version=7, profile=9))),
                            grpc.StatusCode.INVALID_ARGUMENT)
    assert [v[0] for v in violations] == ["sslPolicy.minTlsVersion", "sslPolicy.profile"]
    assert "one of MODERN, RESTRICTED, COMPATIBLE" in violations[1][1]

    created = api.listeners.CreateListener(api_pb2.CreateListenerRequest(listener_id="good", listener=R.Listener(
        **ok, server_tls_policy="strict", custom_request_headers=["X-Who:{client_cert_spiffe_id}"],
        ssl_policy=R.SslPolicy(min_tls_version=R.SslPolicy.TLS_1_3, profile=R.SslPolicy.RESTRICTED),
        allow_underscores_in_headers=True)))
    assert created.server_tls_policy == "serverTlsPolicies/strict"
    assert created.ssl_policy.profile == R.SslPolicy.RESTRICTED and created.allow_underscores_in_headers


def test_route_and_sni_rules(api: Api, base: DemoPki) -> None:
    """SPEC §15: routes compile with the proxy's own route table; REQUIRED needs an mTLS listener; every
    SNI certificate must exist."""
    B = backends_pb2

    def create(listener: R.Listener) -> Callable[[], object]:
        return lambda: api.listeners.CreateListener(
            api_pb2.CreateListenerRequest(listener_id="routed", listener=listener), timeout=10)

    routes = [B.Route(hosts=["A.example.com"], backend="127.0.0.1:9000"),
              B.Route(hosts=["a.example.com"], path_prefix="/a/../b", backend="127.0.0.1:9000"),
              B.Route(hosts=["*.x.*"], backend="127.0.0.1:9000"),
              B.Route(path="/x"),
              B.Route(backend="127.0.0.1:9000", custom_request_headers=["X-A:{client_cert_nope}"])]
    _, violations = refused(api, create(R.Listener(port=8450, certificate="certificates/edge", routes=routes)),
                            grpc.StatusCode.INVALID_ARGUMENT)
    fields = [v[0] for v in violations]
    assert fields == ["routes[3]", "routes[4].customRequestHeaders[0]", "routes[0].hosts[0]"], violations
    assert "must be lowercase" in violations[2][1]
    for bad, field in ((B.Route(hosts=["a.example.com"], path_prefix="/a/../b", backend="127.0.0.1:1"),
                        "routes[0].pathPrefix"),
                       (B.Route(hosts=["*.x.*"], backend="127.0.0.1:1"), "routes[0].hosts[0]")):
        _, violations = refused(api, create(R.Listener(port=8450, certificate="certificates/edge", routes=[bad])),
                                grpc.StatusCode.INVALID_ARGUMENT)
        assert [v[0] for v in violations] == [field]

    required = B.Route(hosts=["a.example.com"], path_prefix="/admin/", backend="127.0.0.1:9000",
                       client_certificate=B.Route.REQUIRED)
    _, violations = refused(api, create(R.Listener(port=8450, certificate="certificates/edge", routes=[required])),
                            grpc.StatusCode.INVALID_ARGUMENT)
    assert violations[0][0] == "routes[0].clientCertificate" and "mtlsPolicy" in violations[0][1]

    _, violations = refused(api, create(R.Listener(port=8450, certificate="certificates/edge",
                                                   certificates=["certificates/edge", "nope"], routes=[required],
                                                   server_tls_policy="strict")),
                            grpc.StatusCode.FAILED_PRECONDITION)
    assert violations == [("certificates[1]", "certificates/nope does not exist")]

    created = api.listeners.CreateListener(api_pb2.CreateListenerRequest(listener_id="routed", listener=R.Listener(
        port=8450, certificates=["edge"], routes=[required], server_tls_policy="strict")))
    assert list(created.certificates) == ["certificates/edge"] and not created.backend
    api.listeners.DeleteListener(api_pb2.DeleteResourceRequest(name="listeners/routed"))


def test_referenced_resources_cannot_be_deleted(api: Api, base: DemoPki) -> None:
    _, violations = refused(api, lambda: api.certificates.DeleteCertificate(
        api_pb2.DeleteResourceRequest(name="certificates/edge")), grpc.StatusCode.FAILED_PRECONDITION)
    assert "still referenced by listeners/" in violations[0][1]
    _, violations = refused(api, lambda: api.trust_configs.DeleteTrustConfig(
        api_pb2.DeleteResourceRequest(name="trustConfigs/base", validate_only=True)),
        grpc.StatusCode.FAILED_PRECONDITION)
    assert "serverTlsPolicies/strict" in violations[0][1]
    refused(api, lambda: api.listeners.DeleteListener(api_pb2.DeleteResourceRequest(name="listeners/ghost")),
            grpc.StatusCode.NOT_FOUND)
    assert api.certificates.GetCertificate(api_pb2.GetResourceRequest(name="edge")).name == "certificates/edge"


def test_validate_only_writes_nothing(api: Api, base: DemoPki) -> None:
    before = api.revision()
    echoed = api.trust_configs.CreateTrustConfig(api_pb2.CreateTrustConfigRequest(
        trust_config_id="dry", trust_config=trust_config(base), validate_only=True))
    assert echoed.name == "trustConfigs/dry"
    assert api.revision() == before
    refused(api, lambda: api.trust_configs.GetTrustConfig(api_pb2.GetResourceRequest(name="dry")),
            grpc.StatusCode.NOT_FOUND)


def test_apply_with_one_bad_document_writes_nothing(tmp_path: Path, logs_dir: Path, base: DemoPki) -> None:
    from tests.control_plane.conftest import ControlPlane

    proc, address = start_control_plane(tmp_path, logs_dir)
    try:
        cp = ControlPlane(proc, address, tmp_path / "control-plane.db")
        manifest = tmp_path / "m.yaml"
        good = (Path(__file__).resolve().parents[2] / "examples" / "mtlsgate.yaml").read_text()
        manifest.write_text(good + "---\nkind: Listener\nname: broken\nport: 70000\ncertificate: edge\n"
                            "backend: 127.0.0.1:9000\n")
        result = cp.cli("apply", "-f", str(manifest))
        assert result.returncode == 2
        assert result.stderr.strip() == (f"mtlsgate apply: {manifest} (document 7) listener/broken: port: "
                                         "required, between 1 and 65535")
        assert cp.cli("get", "trust-configs", check=True).stdout.strip() == "No trust-configs found."
        unknown = tmp_path / "u.yaml"
        unknown.write_text("kind: TrustConfig\nname: x\ntrustStore: []\n")
        result = cp.cli("apply", "-f", str(unknown))
        assert (result.returncode, result.stderr) == (2, f"mtlsgate apply: {unknown} (document 1) trustconfig/x: "
                                                      "trustStore: unknown field; did you mean trustStores?\n")
    finally:
        proc.stop()

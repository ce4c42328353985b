"""Upstream TLS/mTLS end to end (SPEC §15, issue 16 part 4): a real control plane, a real proxy node and real
TLS backends on loopback. BackendServices name BackendAuthenticationConfigs (a TrustConfig with a CRL, and a
client Certificate or none): a backend that requires a client certificate accepts ours and refuses a service
that has none; a backend whose certificate the CRL revokes, or whose SAN is wrong, is refused with a 502 and
a logged reason, and no request reaches it."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mtlsgate import resource_types as rt
from mtlsgate.v1 import api_pb2, api_pb2_grpc, backends_pb2, resources_pb2

from control_plane.pki import DemoPki, crl_pem, issue, make_crl
from tests.support import free_port, port_open, wait_until
from tests.upstream.tls_backends import TlsBackend, server_cert
from tests.xds.conftest import Api, Node


@pytest.fixture
def tls_backends() -> Iterator[list[TlsBackend]]:
    made: list[TlsBackend] = []
    yield made
    for backend in made:
        backend.stop()


def _get(port: int, pki: DemoPki, path: str) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(pki.path("ca_cert")))
    ctx.check_hostname = False
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def _events(node: Node, event: str) -> list[dict[str, object]]:
    assert node.proc is not None
    out = []
    for line in node.proc.log().splitlines():
        if line.startswith("{") and f'"event": "{event}"' in line:
            out.append(json.loads(line))
    return out


def test_backend_mtls_client_certificate_crl_and_san(api: Api, start_node: Callable[..., Node], demo_pki: DemoPki,
                                                     tls_backends: list[TlsBackend], tmp_path: Path) -> None:
    root = issue("Backends Root", ca=True)
    client_root = issue("Proxies Root", ca=True)
    ours = issue("proxy to backends", issuer=client_root)  # clientAuth EKU (the default)
    good = server_cert(root)
    revoked = server_cert(root)
    wrong_san = server_cert(root, dns=("payments.internal",), ips=())
    crl = make_crl(root, [revoked.cert.serial_number])
    requires_ours = TlsBackend(tmp_path / "a", good, client_ca=client_root)
    revoked_backend = TlsBackend(tmp_path / "b", revoked, client_ca=client_root)
    wrong_san_backend = TlsBackend(tmp_path / "c", wrong_san, client_ca=client_root)
    tls_backends += [requires_ours, revoked_backend, wrong_san_backend]

    tc = resources_pb2.TrustConfig(name="trustConfigs/backends")
    store = tc.trust_stores.add()
    store.trust_anchors.add(pem_certificate=root.cert_pem)
    store.crls.add(pem_crl=crl_pem(crl))
    api.put(tc)
    api.put(resources_pb2.Certificate(name="certificates/to-backends", pem_certificate=ours.cert_pem,
                                      pem_private_key=ours.key_pem))
    api.put(resources_pb2.Certificate(name="certificates/edge", pem_certificate=demo_pki.path("server_cert").read_text(),
                                      pem_private_key=demo_pki.path("server_key").read_text()))
    auths = api_pb2_grpc.BackendAuthenticationConfigServiceStub(api.channel)
    for name, cert in (("mtls", "certificates/to-backends"), ("no-cert", "")):
        auths.UpdateBackendAuthenticationConfig(api_pb2.UpdateBackendAuthenticationConfigRequest(
            backend_authentication_config=backends_pb2.BackendAuthenticationConfig(
                name=f"backendAuthenticationConfigs/{name}", client_certificate=cert,
                trust_config="trustConfigs/backends"), allow_missing=True), timeout=10)
    services = api_pb2_grpc.BackendServiceServiceStub(api.channel)
    routes = []
    for name, backend, auth in (("good", requires_ours, "mtls"), ("no-cert", requires_ours, "no-cert"),
                                ("revoked", revoked_backend, "mtls"), ("wrong-san", wrong_san_backend, "mtls")):
        bs = backends_pb2.BackendService(name=f"backendServices/{name}",
                                         backend_authentication=f"backendAuthenticationConfigs/{auth}")
        bs.endpoints.add(address=backend.address)
        bs.timeouts.connect.FromMilliseconds(2000)
        services.UpdateBackendService(api_pb2.UpdateBackendServiceRequest(backend_service=bs, allow_missing=True),
                                      timeout=10)
        routes.append(backends_pb2.Route(path_prefix=f"/{name}/", backend_service=f"backendServices/{name}"))
    port = free_port()
    api.put(resources_pb2.Listener(name="listeners/edge", port=port, certificate="certificates/edge", routes=routes))

    node = start_node("tls-node", "edge", {})
    wait_until(lambda: port_open("127.0.0.1", port) and rt.BACKEND_SERVICE in node.dump().get("versions", {}),
               timeout=30, message="the node serves the listener with its backend services")

    # ---- mutual TLS: the backend asked for a certificate and got ours
    status, body = _get(port, demo_pki, "/good/x")
    assert status == 200, body
    assert requires_ours.peers == [ours.der]
    assert json.loads(body)["path"] == "/good/x"

    # ---- the same backend, from a service with no client certificate: the backend refuses the handshake
    status, body = _get(port, demo_pki, "/no-cert/x")
    print("without a client certificate:", body.strip())
    assert status == 502 and "TLS with backend failed" in body, body
    assert len(requires_ours.peers) == 1 and requires_ours.handshake_errors

    # ---- revoked by the TrustConfig's CRL, and a wrong SAN: refused by us, nothing reaches them
    for path, error in (("/revoked/x", "backend_cert_revoked"), ("/wrong-san/x", "backend_cert_san_mismatch")):
        status, body = _get(port, demo_pki, path)
        assert status == 502 and error in body, (path, status, body)
    assert revoked_backend.peers == [] and wrong_san_backend.peers == []
    logged = wait_until(lambda: [e for e in _events(node, "backend_error")
                                 if "backend_cert_revoked" in str(e["message"])], timeout=5,
                        message="the refusal's reason in the node's log")
    assert logged[0]["status"] == 502
    assert "backendServices/revoked endpoint" in str(logged[0]["message"])

    # ---- /config_dump says what each service verifies against
    dump = node.dump()
    worker_services = dump["workers"][0]["backend_services"]
    assert worker_services["backendServices/good"]["tls"] == {
        "sni": "", "subject_alt_names": [], "client_certificate": True, "trust": ["trustConfigs/backends"]}
    assert worker_services["backendServices/no-cert"]["tls"]["client_certificate"] is False

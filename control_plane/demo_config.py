"""The `mtlsgate demo` configuration: where each component listens (`DemoLayout`), the `apply` manifests
generated from a demo PKI directory (the whole configuration, and a CRL rotation to try), `endpoints.json`
(SPEC §3) and the instructions the demo prints. Used by `mtlsgate demo` and, through
`mtlsgate demo --prepare-only`, by the compose stack's pki-init job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

# ---------------------------------------------------------------- what the demo stack is (pure)


@dataclass(frozen=True)
class DemoNode:
    node_id: str
    listen_address: str  # where this node's listeners bind
    admin: str  # HOST:PORT of its admin HTTP server


@dataclass(frozen=True)
class DemoLayout:
    """Addresses and ports of one demo stack."""

    control_plane: str
    backend: str  # where the echo backend listens
    backend_target: str  # what listeners forward to (differs from `backend` only in compose)
    strict_port: int
    permissive_port: int
    nodes: tuple[DemoNode, ...]
    control_plane_metrics: str = ""  # HOST:PORT of the control plane's Prometheus /metrics ("" = off)
    # Where `mtlsgate pki publish` serves the demo CA's CRL; the TrustConfig fetches it from there
    # (crlSources). None: no publisher (compose), the CRL is only written into the TrustConfig.
    crl_publisher: str | None = None
    # A second echo backend: with it the permissive listener routes (SPEC §15) over BackendService `echo`
    # (both backends, health-checked) and sends /b/ on host localhost to this one alone.
    backend_b: str = ""
    backend_b_target: str = ""

    @property
    def crl_url(self) -> str | None:
        return f"http://{self.crl_publisher}/crl" if self.crl_publisher else None

    def listener_urls(self, port: int) -> list[str]:
        return [f"https://{_url_host(node.listen_address)}:{port}/" for node in self.nodes]


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _block(pem: str) -> str:
    return pem.strip() + "\n"


def demo_manifest(pki_dir: Path, layout: DemoLayout, crl_file: str = "crl.pem") -> list[dict]:
    """The `apply`-able documents: TrustConfig `demo` (root anchor, intermediate, CRL), policies `strict`
    (REJECT_INVALID) and `permissive` (ALLOW_INVALID_OR_MISSING_CLIENT_CERT), the server Certificate and
    the two Listeners. Dependencies come before the resources that reference them."""

    def read(name: str) -> str:
        return (pki_dir / name).read_text()

    trust_config = demo_trust_config(pki_dir, crl_file, layout.crl_url)
    policies = [
        {
            "kind": "ServerTlsPolicy",
            "name": name,
            "description": description,
            "mtlsPolicy": {"clientValidationMode": mode, "clientValidationTrustConfig": "trustConfigs/demo",
                           # strict also closes open connections of a client that becomes revoked (SPEC §6)
                           **({"revalidateOnUpdate": True} if mode == "REJECT_INVALID" else {})},
        }
        for name, mode, description in (
            ("strict", "REJECT_INVALID", "reject connections without a valid client certificate"),
            (
                "permissive",
                "ALLOW_INVALID_OR_MISSING_CLIENT_CERT",
                "forward everyone; headers tell the backend",
            ),
        )
    ]
    certificate = {
        "kind": "Certificate",
        "name": "edge",
        "description": f"the demo server certificate (localhost, {', '.join(server_ips(layout))})",
        "pemCertificate": _block(read("server.pem")),
        "pemPrivateKey": _block(read("server-key.pem")),
    }
    listeners = [
        {
            "kind": "Listener",
            "name": name,
            "description": f"{name} mTLS in front of the echo backend",
            "port": port,
            "certificate": "certificates/edge",
            "serverTlsPolicy": f"serverTlsPolicies/{name}",
            "backend": layout.backend_target,
        }
        for name, port in (("strict", layout.strict_port), ("permissive", layout.permissive_port))
    ]
    services = []
    if layout.backend_b_target:
        services.append({
            "kind": "BackendService",
            "name": "echo",
            "description": "both echo backends, weighted round robin, health-checked from every node",
            "endpoints": [{"address": layout.backend_target}, {"address": layout.backend_b_target}],
            "loadBalancing": "ROUND_ROBIN",
            "healthCheck": {"path": "/healthz", "interval": "2s", "timeout": "1s"},
        })
        permissive = listeners[1]
        del permissive["backend"]
        permissive["description"] = "permissive mTLS; routes: /admin/ needs a verified certificate, /b/ on localhost"
        permissive["routes"] = [
            {"pathPrefix": "/admin/", "backendService": "backendServices/echo", "clientCertificate": "REQUIRED"},
            {"hosts": ["localhost"], "pathPrefix": "/b/", "backend": layout.backend_b_target},
        ]
        permissive["defaultBackendService"] = "backendServices/echo"
    return [trust_config, *policies, certificate, *services, *listeners]


# Short, so that `mtlsgate pki revoke` shows on every node within seconds; each re-fetch is a conditional GET.
DEMO_CRL_REFRESH = "2s"


def demo_trust_config(pki_dir: Path, crl_file: str, crl_url: str | None = None) -> dict:
    store: dict = {
        "trustAnchors": [{"pemCertificate": _block((pki_dir / "ca.pem").read_text())}],
        "intermediateCas": [{"pemCertificate": _block((pki_dir / "intermediate.pem").read_text())}],
        "crls": [{"pemCrl": _block((pki_dir / crl_file).read_text())}],
    }
    description = f"demo root CA and intermediate; CRL from {crl_file}"
    if crl_url:
        # The demo CA's publisher: `mtlsgate pki revoke` re-signs the CRL it serves (SPEC §13).
        store["crlSources"] = [{"uri": crl_url, "refreshInterval": DEMO_CRL_REFRESH}]
        description += f", and fetched from {crl_url}"
    return {"kind": "TrustConfig", "name": "demo", "description": description, "trustStores": [store]}


def dump_manifest(documents: Sequence[dict]) -> str:
    class Literal(str):
        pass

    class Dumper(yaml.SafeDumper):
        pass

    # PEM blocks as YAML literal blocks, so the manifest reads like the SPEC's example.
    Dumper.add_representer(Literal, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|"))

    def literal_pems(value: object) -> object:
        if isinstance(value, dict):
            return {k: literal_pems(v) for k, v in value.items()}
        if isinstance(value, list):
            return [literal_pems(v) for v in value]
        if isinstance(value, str) and value.startswith("-----BEGIN"):
            return Literal(value)
        return value

    return yaml.dump_all([literal_pems(d) for d in documents], Dumper=Dumper, sort_keys=False)


def endpoints_document(layout: DemoLayout, pki_dir: Path) -> dict:
    """`DIR/endpoints.json`, exactly the keys SPEC §3 names; paths absolute."""
    pki = pki_dir.resolve()
    return {
        "control_plane": layout.control_plane,
        "listeners": {
            "strict": layout.listener_urls(layout.strict_port),
            "permissive": layout.listener_urls(layout.permissive_port),
        },
        "ca_cert": str(pki / "ca.pem"),
        "client_cert": str(pki / "client.pem"),
        "client_key": str(pki / "client-key.pem"),
        "revoked_cert": str(pki / "revoked.pem"),
        "revoked_key": str(pki / "revoked-key.pem"),
    }


def instructions(layout: DemoLayout, directory: Path, cli: str, connect: Sequence[str] = ()) -> str:
    """What to try, as commands to paste. `connect`: the connection flags the CLI commands need besides
    `--server` (the admin credentials, when no CLI context was registered for them)."""
    d = display_path(directory)
    strict = layout.listener_urls(layout.strict_port)
    permissive = layout.listener_urls(layout.permissive_port)
    ca = f"--cacert {d}/ca.pem"
    valid = f"{ca} --cert {d}/client.pem --key {d}/client-key.pem"
    revoked = f"{ca} --cert {d}/revoked.pem --key {d}/revoked-key.pem"
    server = " ".join(["--server", layout.control_plane, *connect])
    nodes = "\n".join(
        f"  proxy node {n.node_id:7} listeners on {n.listen_address}, admin http://{n.admin}/config_dump"
        for n in layout.nodes
    )
    metrics = f", metrics http://{layout.control_plane_metrics}/metrics" if layout.control_plane_metrics else ""
    return f"""
mtlsgate demo is running. Ctrl-C stops everything.

  control plane        {layout.control_plane} (store {d}/mtlsgate.db){metrics}
{nodes}
  echo backend         http://{layout.backend}/{_backend_b_line(layout)}
  logs                 {d}/logs/
  listeners            strict = REJECT_INVALID on port {layout.strict_port}, \
permissive = ALLOW_INVALID_OR_MISSING_CLIENT_CERT on port {layout.permissive_port}

Try it:
  # valid client certificate: 200, the backend echoes the X-Client-Cert-* headers it received
  curl {valid} {strict[0]}
  # revoked certificate: the strict listener refuses the handshake (alert: certificate revoked) ...
  curl {revoked} {strict[-1]}
  # ... the permissive one forwards it with X-Client-Cert-Error: client_cert_revoked
  curl {revoked} {permissive[0]}
  # no certificate: refused by strict, forwarded with X-Client-Cert-Present: false by permissive
  curl {ca} {strict[0]}
  curl {ca} {permissive[-1]}
{_route_instructions(layout, d, cli, ca, valid, revoked, server)}
Rotate the CRL (the new one revokes client-valid too); both nodes enforce it without a restart
(--wait returns once both have acked it):
  {cli} apply --wait -f {d}/trust-config-rotated.yaml {server}
  {cli} status {server}
  curl {valid} {strict[-1]}     # now refused
Put the original CRL back:
  {cli} apply --wait -f {d}/mtlsgate.yaml {server}
{_revoke_instructions(layout, d, cli, valid, strict, server)}See what a node runs:  curl http://{layout.nodes[0].admin}/config_dump
Dry-run a certificate: {cli} check --cert {d}/revoked.pem --policy serverTlsPolicies/strict {server}
"""


def _backend_b_line(layout: DemoLayout) -> str:
    if not layout.backend_b:
        return ""
    return (f"\n  second echo backend  http://{layout.backend_b}/ (the permissive listener balances over both: "
            "BackendService echo)")


def _route_instructions(layout: DemoLayout, d: str, cli: str, ca: str, valid: str, revoked: str,
                        server: str) -> str:
    if not layout.backend_b:
        return ""
    host = _url_host(layout.nodes[0].listen_address)
    port = layout.permissive_port
    admin = f"https://{host}:{port}/admin/"
    return f"""
Routes on the permissive listener (SPEC §15): /admin/ needs a verified certificate, /b/ on host localhost goes
to the second backend, the rest is balanced over both ("backend": "a" or "b" in the answer):
  curl {valid} {admin}    # 200
  curl {revoked} {admin}  # 403: this route requires a verified client certificate
  curl {ca} --connect-to localhost:{port}:{host}:{port} https://localhost:{port}/b/   # "backend": "b"
  {cli} status --backends {server}   # each node's health checks of both endpoints
"""


def _revoke_instructions(layout: DemoLayout, d: str, cli: str, valid: str, strict: list[str], server: str) -> str:
    if not layout.crl_url:
        return ""
    return f"""Revoke at the CA instead (the control plane fetches the CA's CRL from {layout.crl_url} every \
{DEMO_CRL_REFRESH}; nobody edits the TrustConfig):
  {cli} pki revoke {d}/client.pem --dir {d}
  curl {valid} {strict[0]}     # refused by both nodes within ~{DEMO_CRL_REFRESH} + 1s
  {cli} get trust-configs demo -o yaml {server}    # crlSourceStatus: crlNumber, lastSuccessTime, ...
  tail {d}/logs/crl-publisher.log                  # the fetcher's conditional GETs (304 when unchanged)
  (a revocation is for good: start from a fresh --dir to get client-valid back)
"""


def display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path.resolve())


# ---------------------------------------------------------------- preparing files


def server_ips(layout: DemoLayout) -> list[str]:
    """The IP addresses the demo server certificate must name: loopback (published ports, as in compose)
    and every node's listen address — a client connecting to a node checks its address against them."""
    import ipaddress

    out = []
    for text in ("127.0.0.1", "::1", *(node.listen_address for node in layout.nodes)):
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue  # a host name: covered by DNS SANs or not at all
        if not address.is_unspecified and str(address) not in out:
            out.append(str(address))
    return out


def missing_server_ips(certificate: object, ips: Sequence[str]) -> list[str]:
    from cryptography import x509

    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value  # type: ignore[attr-defined]
        named = {str(a) for a in sans.get_values_for_type(x509.IPAddress)}
    except x509.ExtensionNotFound:
        named = set()
    return [ip for ip in ips if ip not in named]


def prepare(directory: Path, layout: DemoLayout, extra_node_ids: Sequence[str] = ()) -> None:
    """PKI (kept if DIR already has one, so a re-run keeps trusting the same CA), the demo manifest and
    the CRL-rotation manifest."""
    from control_plane.pki import DEMO_SERVER_NAMES, Issued, crl_pem, demo_server, init_demo_pki, make_crl

    directory.mkdir(parents=True, exist_ok=True)
    ips = server_ips(layout)
    if not (directory / "pki.json").exists():
        init_demo_pki(directory, server_ips=ips)

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    def load_cert(name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((directory / name).read_bytes())

    intermediate = Issued(
        load_cert("intermediate.pem"),
        load_pem_private_key((directory / "intermediate-key.pem").read_bytes(), password=None),  # type: ignore[arg-type]
    )
    if missing_server_ips(load_cert("server.pem"), ips):
        # A PKI kept from a run with other node addresses: same CA (clients keep trusting it), a server
        # certificate for these addresses.
        server = demo_server(intermediate, DEMO_SERVER_NAMES, ips)
        (directory / "server.pem").write_text(server.cert_pem + intermediate.cert_pem)
        key_file = directory / "server-key.pem"
        key_file.write_text(server.key_pem)
        key_file.chmod(0o600)
    prepare_credentials(directory, intermediate, layout, extra_node_ids)
    documents = demo_manifest(directory, layout)
    node_ids = [n.node_id for n in layout.nodes] + [i for i in extra_node_ids if i not in
                                                     {n.node_id for n in layout.nodes}]
    documents += [node_document(node_id) for node_id in node_ids]
    (directory / "mtlsgate.yaml").write_text(dump_manifest(documents))
    # The Nodes alone: registered before the proxies start (compose), so that they are admitted at once.
    (directory / "nodes.yaml").write_text(dump_manifest([d for d in documents if d["kind"] == "Node"]))
    serials = [load_cert("revoked.pem").serial_number, load_cert("client.pem").serial_number]
    (directory / "crl-rotated.pem").write_text(crl_pem(make_crl(intermediate, serials)))
    (directory / "trust-config-rotated.yaml").write_text(
        "# The demo TrustConfig with a rotated CRL that also revokes client-valid (client.pem).\n"
        + dump_manifest([demo_trust_config(directory, "crl-rotated.pem", layout.crl_url)])
    )


# ---------------------------------------------------------------- the secure setup (SPEC §8)

NODE_IDENTITY = "spiffe://demo.mtlsgate/node/{}"
ADMIN_IDENTITY = "spiffe://demo.mtlsgate/admin"
ADMIN_TOKEN_IDENTITY = "demo-admin"
# Where the control plane is reached: on the host (demo) and inside the compose network.
CONTROL_PLANE_NAMES = ("localhost", "control-plane", "control-plane-b")  # -b: compose.ha.yaml


@dataclass(frozen=True)
class DemoCredentials:
    """The files of the demo's secure setup, relative to the demo directory."""

    directory: Path

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def admin_token(self) -> str:
        return self.path("admin-token").read_text().strip()

    def control_plane_args(self) -> list[str]:
        d = self.directory
        return ["--tls-cert", str(d / "control-plane.pem"), "--tls-key", str(d / "control-plane-key.pem"),
                "--client-ca", str(d / "client-ca.pem"), "--token-file", str(d / "tokens"),
                "--authz", str(d / "authz.yaml")]

    def client_args(self) -> list[str]:
        d = self.directory
        return ["--ca-cert", str(d / "ca.pem"), "--cert", str(d / "admin.pem"), "--key", str(d / "admin-key.pem")]

    def node_args(self, node_id: str) -> list[str]:
        d = self.directory
        return ["--xds-ca", str(d / "ca.pem"), "--xds-cert", str(d / f"node-{node_id}.pem"),
                "--xds-key", str(d / f"node-{node_id}-key.pem")]

    def context(self, server: str) -> dict[str, str]:
        d = self.directory.resolve()
        return {"server": server, "caCert": str(d / "ca.pem"), "clientCert": str(d / "admin.pem"),
                "clientKey": str(d / "admin-key.pem"), "tokenFile": str(d / "admin-token")}


def node_document(node_id: str) -> dict:
    return {"kind": "Node", "name": node_id, "description": f"demo proxy node {node_id}",
            "identity": NODE_IDENTITY.format(node_id), "cluster": "demo", "labels": {"node": node_id}}


def prepare_credentials(directory: Path, intermediate: object, layout: DemoLayout,
                        extra_node_ids: Sequence[str] = ()) -> None:
    """Control-plane server certificate, one client certificate per node (SPIFFE
    spiffe://demo.mtlsgate/node/<id>), an admin certificate and token, the client CA bundle and the role
    bindings; each made once and kept on re-runs."""
    import secrets

    from cryptography.x509.oid import ExtendedKeyUsageOID

    from control_plane.pki import Issued, issue

    assert isinstance(intermediate, Issued)

    def write(name: str, text: str, private: bool = False) -> None:
        target = directory / name
        target.write_text(text)
        if private:
            target.chmod(0o600)

    def leaf(stem: str, make: object) -> None:
        if (directory / f"{stem}.pem").exists() and (directory / f"{stem}-key.pem").exists():
            return
        issued = make()  # type: ignore[operator]
        write(f"{stem}.pem", issued.cert_pem + intermediate.cert_pem)
        write(f"{stem}-key.pem", issued.key_pem, private=True)

    host = layout.control_plane.rpartition(":")[0].strip("[]") or "127.0.0.1"
    ips = sorted({"127.0.0.1", host} - {"localhost", "0.0.0.0"}) if _is_ip(host) else ["127.0.0.1"]
    leaf("control-plane", lambda: issue("mtlsgate demo control plane", issuer=intermediate,
                                        eku=(ExtendedKeyUsageOID.SERVER_AUTH,), dns=CONTROL_PLANE_NAMES, ips=ips))
    leaf("admin", lambda: issue("demo-admin", issuer=intermediate, uris=(ADMIN_IDENTITY,)))
    for node_id in [n.node_id for n in layout.nodes] + list(extra_node_ids):
        leaf(f"node-{node_id}", lambda node_id=node_id: issue(node_id, issuer=intermediate,
                                                              uris=(NODE_IDENTITY.format(node_id),)))
    write("client-ca.pem", (directory / "ca.pem").read_text() + intermediate.cert_pem)
    if not (directory / "admin-token").exists():
        write("admin-token", secrets.token_urlsafe(24) + "\n", private=True)
    token = (directory / "admin-token").read_text().strip()
    write("tokens", f"{token} {ADMIN_TOKEN_IDENTITY}\n", private=True)
    # Only the admin credentials are admins: the demo's client certificates (client.pem …) come from the
    # same CA but are for the listeners, not for the control plane.
    write("authz.yaml", "bindings:\n"
          f"  - {{identity: \"{ADMIN_IDENTITY}\", role: admin}}\n"
          f"  - {{identity: {ADMIN_TOKEN_IDENTITY}, role: admin}}\n")


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True

"""A control plane run the secure way (SPEC §8) for security tests: a test CA, the control plane's
server certificate, client certificates issued on demand for any identity (operators, nodes, strangers),
bearer tokens and role bindings; real processes, real TLS.

    pki = CaPki(tmp_path)                       # or the `test_pki` fixture
    cp = SecureControlPlane.start(pki, tmp_path, logs_dir, tokens={TOKEN: "ci"}, authz=BINDINGS)
    creds = pki.credentials("spiffe://corp/ops/alice")    # grpc channel credentials for that identity
    cp.cli("get", "listeners", identity="spiffe://corp/ops/alice")
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from control_plane.pki import Issued, issue
from tests.control_plane.harness import start_control_plane
from tests.support import MTLSGATE, Proc


def _safe(identity: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in identity).strip("-")[:80]


@dataclass
class CaPki:
    """One CA that issues the server certificate and every client certificate of a test."""

    directory: Path
    ca: Issued = field(init=False)
    server: Issued = field(init=False)
    _issued: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from cryptography.x509.oid import ExtendedKeyUsageOID

        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca = issue("mtlsgate test CA", ca=True)
        self.server = issue("control plane", issuer=self.ca, eku=(ExtendedKeyUsageOID.SERVER_AUTH,),
                            dns=("localhost",), ips=("127.0.0.1",))
        self.ca_path.write_text(self.ca.cert_pem)
        self.server_cert_path.write_text(self.server.cert_pem)
        self.server_key_path.write_text(self.server.key_pem)

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def server_cert_path(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key_path(self) -> Path:
        return self.directory / "server-key.pem"

    def client(self, identity: str, *, issuer: Issued | None = None) -> tuple[Path, Path]:
        """(cert, key) files for `identity`: a `spiffe://` URI SAN, or a CN for `cn:NAME`."""
        if identity not in self._issued or issuer is not None:
            if identity.startswith("cn:"):
                leaf = issue(identity[3:], issuer=issuer or self.ca)
            else:
                leaf = issue(_safe(identity), issuer=issuer or self.ca, uris=(identity,))
            stem = ("rogue-" if issuer is not None else "") + _safe(identity)
            cert, key = self.directory / f"{stem}.pem", self.directory / f"{stem}-key.pem"
            cert.write_text(leaf.cert_pem)
            key.write_text(leaf.key_pem)
            if issuer is not None:
                return cert, key
            self._issued[identity] = (cert, key)
        return self._issued[identity]

    def credentials(self, identity: str | None) -> grpc.ChannelCredentials:
        """TLS channel credentials presenting `identity`'s certificate (None: no client certificate)."""
        if identity is None:
            return grpc.ssl_channel_credentials(root_certificates=self.ca_path.read_bytes())
        cert, key = self.client(identity)
        return grpc.ssl_channel_credentials(root_certificates=self.ca_path.read_bytes(),
                                            private_key=key.read_bytes(), certificate_chain=cert.read_bytes())

    def server_args(self) -> list[str]:
        return ["--tls-cert", str(self.server_cert_path), "--tls-key", str(self.server_key_path),
                "--client-ca", str(self.ca_path)]


ADMIN = "spiffe://test.mtlsgate/ops/admin"  # the identity the harness waits for health with


@dataclass
class SecureControlPlane:
    proc: Proc
    address: str
    pki: CaPki
    tokens: Mapping[str, str]

    @classmethod
    def start(cls, pki: CaPki, tmp_path: Path, logs_dir: Path, *, tokens: Mapping[str, str] | None = None,
              authz: str | None = None, extra_args: Sequence[str] = (),
              env: dict[str, str] | None = None) -> SecureControlPlane:
        """Started without `--insecure`: TLS, client certificates from `pki`'s CA, optional tokens and
        `--authz` bindings (YAML text)."""
        args = [*pki.server_args(), *extra_args]
        if tokens:
            token_file = tmp_path / "tokens"
            token_file.write_text("".join(f"{t} {i}\n" for t, i in tokens.items()))
            args += ["--token-file", str(token_file)]
        if authz is not None:
            authz_file = tmp_path / "authz.yaml"
            authz_file.write_text(authz)
            args += ["--authz", str(authz_file)]
        proc, address = start_control_plane(tmp_path, logs_dir, args, insecure=False,
                                            credentials=pki.credentials(ADMIN), env=env)
        return cls(proc, address, pki, dict(tokens or {}))

    @property
    def authz_path(self) -> Path:
        return Path(self.proc.args[self.proc.args.index("--authz") + 1])

    def channel(self, identity: str | None) -> grpc.Channel:
        return grpc.secure_channel(self.address, self.pki.credentials(identity))

    def cli_args(self, identity: str | None) -> list[str]:
        args = ["--server", self.address, "--ca-cert", str(self.pki.ca_path)]
        if identity is not None:
            cert, key = self.pki.client(identity)
            args += ["--cert", str(cert), "--key", str(key)]
        return args

    def cli(self, *args: str, identity: str | None = ADMIN, token: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`mtlsgate ARGS` as `identity` (certificate) and/or with `token`."""
        extra = ["--token", token] if token else []
        full_env = {**os.environ, **(env or {})}
        full_env.pop("MTLSGATE_TOKEN", None)
        return subprocess.run([*MTLSGATE, *args, *self.cli_args(identity), *extra], capture_output=True,
                              text=True, timeout=60, env=full_env)

    def stop(self) -> None:
        self.proc.stop()

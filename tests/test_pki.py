"""`mtlsgate pki init` writes a PKI whose pieces chain and verify as the demo expects."""

from __future__ import annotations

import subprocess

from cryptography import x509

from control_plane.pki import DemoPki
from tests.support import MTLSGATE


def test_demo_pki_chains_and_revokes(demo_pki: DemoPki) -> None:
    root = x509.load_pem_x509_certificate(demo_pki.path("ca_cert").read_bytes())
    inter = x509.load_pem_x509_certificate(demo_pki.path("intermediate_cert").read_bytes())
    client = x509.load_pem_x509_certificates(demo_pki.path("client_cert").read_bytes())[0]
    revoked = x509.load_pem_x509_certificates(demo_pki.path("revoked_cert").read_bytes())[0]
    crl = x509.load_pem_x509_crl(demo_pki.path("crl").read_bytes())
    inter.verify_directly_issued_by(root)
    client.verify_directly_issued_by(inter)
    assert crl.is_signature_valid(inter.public_key())
    assert crl.get_revoked_certificate_by_serial_number(revoked.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(client.serial_number) is None
    assert oct(demo_pki.path("client_key").stat().st_mode & 0o777) == "0o600"


def test_pki_init_cli(tmp_path) -> None:
    out = subprocess.run([*MTLSGATE, "pki", "init", str(tmp_path / "pki")], capture_output=True, text=True,
                         check=True)
    assert "trust-config.yaml" in out.stdout
    assert (tmp_path / "pki" / "server-tls-policy.yaml").read_text().count("REJECT_INVALID") == 1

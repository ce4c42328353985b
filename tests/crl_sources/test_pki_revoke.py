"""`mtlsgate pki revoke` and `mtlsgate pki publish`: the demo CA revokes a client certificate by re-signing
its CRL, and serves it like a distribution point (conditional GETs answered 304, one log line each)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from control_plane.pki import init_demo_pki
from tests.support import MTLSGATE, Proc, free_port, wait_until


def mtlsgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MTLSGATE, *args], capture_output=True, text=True, timeout=60)


def test_revoke_re_signs_the_crl_with_a_higher_number(tmp_path: Path) -> None:
    pki = init_demo_pki(tmp_path / "pki")
    before = x509.load_pem_x509_crl(pki.path("crl").read_bytes())
    client = x509.load_pem_x509_certificates(pki.path("client_cert").read_bytes())[0]
    result = mtlsgate("pki", "revoke", str(pki.path("client_cert")), "--dir", str(pki.directory))
    assert result.returncode == 0, result.stderr
    after = x509.load_pem_x509_crl(pki.path("crl").read_bytes())
    inter = x509.load_pem_x509_certificate(pki.path("intermediate_cert").read_bytes())
    assert after.is_signature_valid(inter.public_key())  # type: ignore[arg-type]
    number = lambda crl: crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number  # noqa: E731
    assert number(after) > number(before)
    assert {e.serial_number for e in after} == {e.serial_number for e in before} | {client.serial_number}
    # By hex serial, as X-Client-Cert-Serial-Number shows it.
    expired = x509.load_pem_x509_certificates(pki.path("expired_cert").read_bytes())[0]
    assert mtlsgate("pki", "revoke", f"{expired.serial_number:x}", "--dir", str(pki.directory)).returncode == 0
    assert x509.load_pem_x509_crl(pki.path("crl").read_bytes()).get_revoked_certificate_by_serial_number(
        expired.serial_number) is not None


@pytest.mark.parametrize(("target", "words"), [
    ("client", "already revoked"),
    ("untrusted", "not issued by the demo intermediate"),
    ("nonsense", "neither a hex serial"),
])
def test_revoke_refuses_with_one_line_and_changes_nothing(tmp_path: Path, target: str, words: str) -> None:
    pki = init_demo_pki(tmp_path / "pki")
    if target == "client":
        assert mtlsgate("pki", "revoke", str(pki.path("client_cert")), "--dir", str(pki.directory)).returncode == 0
    crl = pki.path("crl").read_bytes()
    arg = "nonsense" if target == "nonsense" else str(pki.path(f"{target}_cert"))
    result = mtlsgate("pki", "revoke", arg, "--dir", str(pki.directory))
    assert result.returncode == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert pki.path("crl").read_bytes() == crl


def test_publish_serves_the_crl_and_answers_conditional_gets(tmp_path: Path, logs_dir: Path) -> None:
    pki = init_demo_pki(tmp_path / "pki")
    address = f"127.0.0.1:{free_port()}"
    proc = Proc(["pki", "publish", "--dir", str(pki.directory), "--listen", address], logs_dir / "publish.log")
    try:
        url = f"http://{address}/crl"
        first = wait_until(lambda: httpx.get(url, timeout=2), timeout=20, message="the publisher to answer")
        assert first.status_code == 200 and first.content == pki.path("crl").read_bytes()
        again = httpx.get(url, headers={"If-None-Match": first.headers["etag"]}, timeout=2)
        assert again.status_code == 304 and again.content == b""
        mtlsgate("pki", "revoke", str(pki.path("client_cert")), "--dir", str(pki.directory))
        changed = httpx.get(url, headers={"If-None-Match": first.headers["etag"]}, timeout=2)
        assert changed.status_code == 200 and changed.headers["etag"] != first.headers["etag"]
        wait_until(lambda: f"304 if-none-match={first.headers['etag']}" in proc.log(), timeout=5,
                   message="the conditional GET in the publisher's log")
    finally:
        proc.stop()

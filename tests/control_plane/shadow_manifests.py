"""Manifests for shadow tests, from the demo PKI: the active TrustConfig (demo root + intermediate), a
candidate anchored on a different root (the demo's "untrusted CA"), and one that only adds that anchor."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from control_plane.pki import DemoPki


def _block(pem: str, indent: int = 4) -> str:
    pad = " " * indent
    return "|\n" + "".join(pad + line + "\n" for line in pem.strip().splitlines())


def other_root_pem(pki: DemoPki) -> str:
    certs = x509.load_pem_x509_certificates(pki.path("untrusted_cert").read_bytes())
    from cryptography.hazmat.primitives.serialization import Encoding

    return certs[1].public_bytes(Encoding.PEM).decode()


def trust_config(pki: DemoPki, name: str = "demo", *, anchors: str = "demo", description: str = "") -> str:
    """`anchors`: "demo" (the demo root), "other" (only the untrusted CA), "both"."""
    roots = {"demo": [pki.path("ca_cert").read_text()], "other": [other_root_pem(pki)],
             "both": [pki.path("ca_cert").read_text(), other_root_pem(pki)]}[anchors]
    text = f"kind: TrustConfig\nname: {name}\n" + (f"description: {description}\n" if description else "")
    text += "trustStores:\n- trustAnchors:\n"
    for pem in roots:
        text += f"  - pemCertificate: {_block(pem, 6)}"
    text += f"  intermediateCas:\n  - pemCertificate: {_block(pki.path('intermediate_cert').read_text(), 6)}"
    return text


def policy(name: str = "strict", trust: str = "demo", mode: str = "REJECT_INVALID") -> str:
    return (f"kind: ServerTlsPolicy\nname: {name}\nmtlsPolicy:\n  clientValidationMode: {mode}\n"
            f"  clientValidationTrustConfig: trustConfigs/{trust}\n")


def write(path: Path, *documents: str) -> str:
    path.write_text("---\n".join(documents))
    return str(path)

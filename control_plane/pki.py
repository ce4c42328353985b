"""Certificate authority toolkit for demos and tests: keys, certificates and CRLs made with `cryptography`.

`mtlsgate pki init DIR` uses `init_demo_pki`; test suites use `issue` / `make_crl` to build any PKI shape.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

_CURVES: dict[str, ec.EllipticCurve] = {
    "p256": ec.SECP256R1(), "p384": ec.SECP384R1(), "p521": ec.SECP521R1(), "k256": ec.SECP256K1(),
}
_YEAR = dt.timedelta(days=365)


def make_key(kind: str = "ec-p256") -> PrivateKey:
    """`ec-p256`, `ec-p384`, `ec-p521`, `ec-k256`, `rsa-1024` … `rsa-4096`, `ed25519`."""
    family, _, size = kind.partition("-")
    if family == "ec":
        return ec.generate_private_key(_CURVES[size])
    if family == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=int(size))
    if family == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key kind {kind!r}")


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: PrivateKey

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def key_pem(self) -> str:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


@dataclass
class Names:
    dns: Sequence[str] = ()
    uris: Sequence[str] = ()
    ips: Sequence[str] = ()
    emails: Sequence[str] = ()

    def general_names(self) -> list[x509.GeneralName]:
        out: list[x509.GeneralName] = [x509.DNSName(d) for d in self.dns]
        out += [x509.UniformResourceIdentifier(u) for u in self.uris]
        out += [x509.IPAddress(ipaddress.ip_address(i)) for i in self.ips]
        out += [x509.RFC822Name(e) for e in self.emails]
        return out


def issue(
    common_name: str,
    *,
    issuer: Issued | None = None,
    key: PrivateKey | str = "ec-p256",
    ca: bool = False,
    path_length: int | None = None,
    eku: Iterable[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    serial: int | None = None,
    dns: Sequence[str] = (),
    uris: Sequence[str] = (),
    ips: Sequence[str] = (),
    emails: Sequence[str] = (),
    organization: str | None = "mtlsgate demo",
    hash_algorithm: hashes.HashAlgorithm | None = None,
    extra_extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    key_usage: x509.KeyUsage | None = None,
) -> Issued:
    """Issue a certificate. No `issuer` = self-signed. CAs get no EKU unless one is passed explicitly
    via `eku` (pass `eku=None` for none on a leaf)."""
    private_key = make_key(key) if isinstance(key, str) else key
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    subject = x509.Name(attrs)
    signer_key = issuer.key if issuer else private_key
    issuer_name = issuer.cert.subject if issuer else subject
    start = not_before or now() - dt.timedelta(hours=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(private_key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(not_after or start + (10 * _YEAR if ca else _YEAR))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private_key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    if key_usage is None:
        key_usage = _default_key_usage(ca, private_key)
    builder = builder.add_extension(key_usage, critical=True)
    if eku is not None and (not ca or eku != (ExtendedKeyUsageOID.CLIENT_AUTH,)):
        eku_list = list(eku)
        if eku_list:
            builder = builder.add_extension(x509.ExtendedKeyUsage(eku_list), critical=False)
    sans = Names(dns, uris, ips, emails).general_names()
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for ext, critical in extra_extensions:
        builder = builder.add_extension(ext, critical=critical)
    algorithm = None if isinstance(signer_key, ed25519.Ed25519PrivateKey) else (hash_algorithm or hashes.SHA256())
    return Issued(builder.sign(signer_key, algorithm), private_key)  # type: ignore[arg-type]


def _default_key_usage(ca: bool, key: PrivateKey) -> x509.KeyUsage:
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=is_rsa and not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def make_crl(
    issuer: Issued,
    revoked_serials: Iterable[int] = (),
    *,
    this_update: dt.datetime | None = None,
    next_update: dt.datetime | None = None,
    signer: Issued | None = None,
) -> x509.CertificateRevocationList:
    """A CRL naming `issuer`, signed by `signer` (default: the issuer itself)."""
    start = this_update or now() - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(start)
        .next_update(next_update or start + dt.timedelta(days=7))
        # RFC 5280 §5.2.3: cRLNumber is mandatory (validation refuses CRLs without it); increasing with time.
        .add_extension(x509.CRLNumber(int(start.timestamp() * 1000)), critical=False)
    )
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(start).build()
        )
    return builder.sign((signer or issuer).key, hashes.SHA256())  # type: ignore[arg-type]


def crl_pem(crl: x509.CertificateRevocationList) -> str:
    return crl.public_bytes(serialization.Encoding.PEM).decode()


# ---------------------------------------------------------------- the demo PKI (`mtlsgate pki init`)


@dataclass
class DemoPki:
    """What `pki init` writes; file paths relative to `directory`."""

    directory: Path
    files: dict[str, str] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.directory / self.files[name]


DEMO_SERVER_NAMES = ("localhost",)


def demo_server(inter: Issued, server_names: Sequence[str], server_ips: Sequence[str]) -> Issued:
    """The demo listeners' server certificate: valid for these names and IP addresses."""
    return issue("mtlsgate demo server", issuer=inter, eku=(ExtendedKeyUsageOID.SERVER_AUTH,),
                 dns=server_names, ips=server_ips)


def init_demo_pki(directory: str | Path, *, server_names: Sequence[str] = DEMO_SERVER_NAMES,
                  server_ips: Sequence[str] = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "::1")) -> DemoPki:
    """Root CA → intermediate CA → server and client certificates, a CRL revoking one client, and the
    GCP-format `trust-config.yaml` / `server-tls-policy.yaml` that `mtlsgate import` takes. (The demo's
    `apply`-able manifests are written by `control_plane/demo_config.py`.)"""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    root = issue("mtlsgate demo root CA", ca=True)
    inter = issue("mtlsgate demo intermediate CA", issuer=root, ca=True, path_length=0)
    server = demo_server(inter, server_names, server_ips)
    client = issue("client-valid", issuer=inter, uris=("spiffe://demo.mtlsgate/client/valid",),
                   dns=("client-valid.demo.mtlsgate",))
    revoked = issue("client-revoked", issuer=inter, uris=("spiffe://demo.mtlsgate/client/revoked",))
    expired = issue("client-expired", issuer=inter, not_before=now() - 2 * _YEAR, not_after=now() - _YEAR)
    wrong_eku = issue("client-wrong-eku", issuer=inter, eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    rogue_ca = issue("untrusted CA", ca=True, organization="somebody else")
    untrusted = issue("client-untrusted", issuer=rogue_ca)
    crl = make_crl(inter, [revoked.cert.serial_number])
    empty_crl = make_crl(inter, [])

    pki = DemoPki(out)

    def write(name: str, filename: str, text: str, private: bool = False) -> None:
        target = out / filename
        target.write_text(text)
        if private:
            target.chmod(0o600)
        pki.files[name] = filename

    write("ca_cert", "ca.pem", root.cert_pem)
    write("ca_key", "ca-key.pem", root.key_pem, private=True)
    write("intermediate_cert", "intermediate.pem", inter.cert_pem)
    write("intermediate_key", "intermediate-key.pem", inter.key_pem, private=True)
    write("server_cert", "server.pem", server.cert_pem + inter.cert_pem)
    write("server_key", "server-key.pem", server.key_pem, private=True)
    for label, leaf, key_holder in (
        ("client", client, client), ("revoked", revoked, revoked), ("expired", expired, expired),
        ("wrong_eku", wrong_eku, wrong_eku), ("untrusted", untrusted, untrusted),
    ):
        issuer_pem = rogue_ca.cert_pem if leaf is untrusted else inter.cert_pem
        write(f"{label}_cert", f"{label.replace('_', '-')}.pem", leaf.cert_pem + issuer_pem)
        write(f"{label}_key", f"{label.replace('_', '-')}-key.pem", key_holder.key_pem, private=True)
    write("crl", "crl.pem", crl_pem(crl))
    write("empty_crl", "crl-empty.pem", crl_pem(empty_crl))

    def block(pem: str, indent: int) -> str:
        pad = " " * indent
        return "|\n" + "".join(pad + line + "\n" for line in pem.strip().splitlines())

    write("trust_config", "trust-config.yaml", (
        "# GCP format: gcloud certificate-manager trust-configs import demo --source=trust-config.yaml\n"
        "description: mtlsgate demo trust config\n"
        "trustStores:\n"
        "- trustAnchors:\n"
        f"  - pemCertificate: {block(root.cert_pem, 6)}"
        "  intermediateCas:\n"
        f"  - pemCertificate: {block(inter.cert_pem, 6)}"
        "  crls:  # mtlsgate extension\n"
        f"  - pemCrl: {block(crl_pem(crl), 6)}"
    ))
    write("server_tls_policy", "server-tls-policy.yaml", (
        "# GCP format: gcloud network-security server-tls-policies import strict --source=server-tls-policy.yaml\n"
        "description: mtlsgate demo policy\n"
        "mtlsPolicy:\n"
        "  clientValidationMode: REJECT_INVALID\n"
        "  clientValidationTrustConfig: projects/demo/locations/global/trustConfigs/demo\n"
    ))
    (out / "pki.json").write_text(json.dumps(pki.files, indent=2) + "\n")
    return pki


# ---------------------------------------------------------------- the demo CA revokes (`mtlsgate pki revoke`)


class RevokeError(ValueError):
    """A revocation the demo CA cannot make; one line for the user."""


@dataclass(frozen=True)
class Revocation:
    serial: int
    crl_number: int
    revoked_count: int
    crl_path: Path


def parse_serial(text: str, directory: Path) -> int:
    """A serial as `X-Client-Cert-Serial-Number` shows it (hex, `0x`/colons tolerated), or the path of a
    PEM certificate issued by the demo intermediate."""
    path = Path(text)
    if path.is_file() or text.endswith(".pem"):
        from data_plane.validation.pem import PemProblem, load_certificates

        try:
            cert = load_certificates(path.read_text())[0]
        except OSError as exc:
            raise RevokeError(f"{text}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise RevokeError(f"{text}: not a PEM file (binary data)") from None
        except PemProblem as exc:
            raise RevokeError(f"{text}: {exc}") from None
        issuer = x509.load_pem_x509_certificate((directory / "intermediate.pem").read_bytes())
        if cert.issuer != issuer.subject:
            raise RevokeError(f"{text} was not issued by the demo intermediate CA ({issuer.subject.rfc4514_string()}); "
                              "its CRL cannot revoke it")
        return cert.serial_number
    digits = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        serial = int(digits, 16)
    except ValueError:
        raise RevokeError(f"{text!r} is neither a hex serial number nor a certificate file") from None
    if not 0 < serial < 1 << 160:
        raise RevokeError(f"{text!r}: a serial number is a positive integer of at most 20 bytes")
    return serial


def revoke(directory: str | Path, serial: int) -> Revocation:
    """Re-sign the demo intermediate CA's CRL (`DIR/crl.pem`) with `serial` added and a higher cRLNumber,
    replacing the file atomically, so that whatever publishes it (the demo's CRL publisher) serves the new
    CRL on its next request."""
    out = Path(directory)
    try:
        inter_cert = x509.load_pem_x509_certificate((out / "intermediate.pem").read_bytes())
        inter_key = serialization.load_pem_private_key((out / "intermediate-key.pem").read_bytes(), password=None)
        current = x509.load_pem_x509_crl((out / "crl.pem").read_bytes())
    except OSError as exc:
        raise RevokeError(f"{out}: no demo PKI there ({exc.filename}: {exc.strerror}); run mtlsgate pki init "
                          f"{out} or mtlsgate demo --dir {out} first") from None
    except ValueError as exc:
        raise RevokeError(f"{out}: the demo PKI files do not parse ({exc})") from None
    if current.issuer != inter_cert.subject or not current.is_signature_valid(inter_key.public_key()):  # type: ignore[arg-type]
        raise RevokeError(f"{out / 'crl.pem'} is not the demo intermediate CA's CRL")
    if current.get_revoked_certificate_by_serial_number(serial) is not None:
        raise RevokeError(f"serial {serial:x} is already revoked in {out / 'crl.pem'}")
    number = current.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    start = now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(inter_cert.subject)
        .last_update(start)
        .next_update(start + dt.timedelta(days=7))
        # Never lower than make_crl's time-based numbers, always above the CRL it replaces.
        .add_extension(x509.CRLNumber(max(number + 1, int(start.timestamp() * 1000))), critical=False)
    )
    for entry in current:
        builder = builder.add_revoked_certificate(entry)
    builder = builder.add_revoked_certificate(
        x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(start).build())
    crl = builder.sign(inter_key, hashes.SHA256())  # type: ignore[arg-type]
    tmp = out / "crl.pem.tmp"
    tmp.write_text(crl_pem(crl))
    tmp.replace(out / "crl.pem")  # the publisher never serves half a file
    new_number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    return Revocation(serial, new_number, len(list(crl)), out / "crl.pem")

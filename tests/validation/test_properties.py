"""Property: whatever an attacker sends — names copied from the real CAs, the real CA certificates
themselves, any order, any validity — a chain whose leaf is not signed via a configured anchor and is
not allowlisted is never `chain_verified`."""

from __future__ import annotations

import datetime as dt
import warnings

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_plane.validation.engine import validate
from tests.validation.conftest import NOW, ca, leaf, policy
from tests.validation.conftest import bundle as make_bundle

ROOT = ca("Property Root")
INTER = ca("Property Intermediate", ROOT)
ALLOWED = leaf("Property Allowlisted", ca("Property Device CA"))
BUNDLE = make_bundle(anchors=[ROOT], intermediates=[INTER], allowlist=[ALLOWED])
POLICY = policy("ALLOW_INVALID_OR_MISSING_CLIENT_CERT", revocation_check="OFF")
ATTACKER_KEYS = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
NAMES = [
    ROOT.cert.subject,
    INTER.cert.subject,
    x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Evil CA")]),
]


def forge(
    subject: x509.Name, issuer: x509.Name, signer: int, is_ca: bool, key_index: int, days: int
) -> x509.Certificate:
    """A certificate an attacker can make: any names, any flags, signed by an attacker key."""
    key = ATTACKER_KEYS[key_index].public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=3))
        .not_valid_after(NOW + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ATTACKER_KEYS[signer].public_key()),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    return builder.sign(ATTACKER_KEYS[signer], hashes.SHA256())


forged_cert = st.builds(
    forge,
    subject=st.sampled_from(NAMES),
    issuer=st.sampled_from(NAMES),
    signer=st.integers(0, 2),
    is_ca=st.booleans(),
    key_index=st.integers(0, 2),
    days=st.integers(-2, 400),
)
real_cert = st.sampled_from([ROOT.cert, INTER.cert])
extra = st.lists(st.one_of(forged_cert, real_cert), max_size=4)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(leaf_cert=forged_cert, rest=extra, when=st.integers(-400, 4000))
def test_forged_chains_are_never_verified(
    leaf_cert: x509.Certificate, rest: list[x509.Certificate], when: int
) -> None:
    chain = [c.public_bytes(Encoding.DER) for c in [leaf_cert, *rest]]
    verdict = validate(chain, BUNDLE, POLICY, NOW + dt.timedelta(days=when))
    assert not verdict.chain_verified, (verdict.error, verdict.reason)


def test_property_setting_is_not_vacuous() -> None:
    """The same bundle and policy do verify a real client and the allowlisted certificate."""
    real = leaf("Property Client", INTER)
    assert validate([real.der], BUNDLE, POLICY, NOW).chain_verified
    assert validate([ALLOWED.der], BUNDLE, POLICY, NOW).chain_verified


REAL = leaf("Property Mutated", INTER)


@settings(max_examples=150, deadline=None)
@given(position=st.integers(0, len(REAL.der) - 1), xor=st.integers(1, 255))
def test_any_one_byte_change_to_a_valid_leaf_is_never_verified(position: int, xor: int) -> None:
    mutated = bytearray(REAL.der)
    mutated[position] ^= xor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a mutated serial may be non-positive: cryptography warns
        verdict = validate([bytes(mutated), INTER.der], BUNDLE, POLICY, NOW)
    assert not verdict.chain_verified, (position, xor)


def test_a_signature_with_unused_bits_is_refused_although_openssl_would_verify_it() -> None:
    """Found by the property above (position 414, xor 1): the signatureValue BIT STRING's unused-bits byte
    set to 1 or 2 left a leaf that OpenSSL still verified, a second encoding (another fingerprint) of the
    same certificate. Every signature we accept is octet-aligned: anything else is malformed."""
    signature = x509.load_der_x509_certificate(REAL.der).signature
    at = len(REAL.der) - len(signature) - 1  # the unused-bits byte comes right before the signature bytes
    assert REAL.der[at] == 0
    for unused in (1, 2, 7):
        mutated = bytearray(REAL.der)
        mutated[at] = unused
        # twice: a worker sees the same certificate again, after any warning about it was already shown
        for attempt in (1, 2):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                verdict = validate([bytes(mutated), INTER.der], BUNDLE, POLICY, NOW)
            assert not verdict.chain_verified and verdict.reason == "malformed_certificate", (unused, attempt)


def test_an_outer_signature_algorithm_other_than_the_signed_one_is_refused() -> None:
    """RFC 5280 §4.1.1.2: signatureAlgorithm must equal tbsCertificate.signature. The last byte of the
    outer ecdsa-with-SHA256 OID (…4.3.2) turned into …4.3.3 (SHA-384) is refused as malformed."""
    oid = bytes.fromhex("06082a8648ce3d040302")  # ecdsa-with-SHA256
    outer = REAL.der.rindex(oid)
    assert REAL.der.index(oid) < outer  # the tbsCertificate's copy comes first
    mutated = bytearray(REAL.der)
    mutated[outer + len(oid) - 1] = 0x03
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verdict = validate([bytes(mutated), INTER.der], BUNDLE, POLICY, NOW)
    assert not verdict.chain_verified and verdict.reason == "malformed_certificate", verdict.reason

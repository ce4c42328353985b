"""The generated-PKI matrix for `validate()`: one case per error string of SPEC §4 and per extension
option, each asserting error, reason and (where it matters) what reaches the backend."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID
from mtlsgate.v1 import resources_pb2

from control_plane.pki import Issued, make_crl
from data_plane.validation import engine as E
from data_plane.validation.bundle import InvalidBundle, compile_bundle, trust_bundle_from_trust_config
from data_plane.validation.engine import TlsAlert, http_status, tls_alert, validate
from data_plane.validation.headers import DEFAULT_HEADERS, variables
from data_plane.validation.policy import UPN_OID, ClientPolicy, compile_policy
from tests.validation.conftest import NOW, Pki, bundle, ca, leaf, policy, sha1_signed, trust_config

STRICT = policy("REJECT_INVALID")
ALLOW = policy("ALLOW_INVALID_OR_MISSING_CLIENT_CERT")


def chain(*certs: Issued | bytes) -> list[bytes]:
    return [c if isinstance(c, bytes) else c.der for c in certs]


def check(verdict: E.Verdict, error: str, reason: str) -> None:
    """The verdict, and what the backend would be told about it (default header set)."""
    assert (verdict.error, verdict.reason) == (error, reason), verdict.detail
    assert verdict.chain_verified is (error == "")
    sent = dict(DEFAULT_HEADERS.render(verdict))
    assert sent["X-Client-Cert-Present"] == ("true" if verdict.present else "false")
    assert sent["X-Client-Cert-Chain-Verified"] == ("true" if error == "" else "false")
    assert sent["X-Client-Cert-Error"].split(",")[0] == error
    assert (sent["X-Client-Cert-Leaf"] != "") is (error == "" and verdict.present)


# ---------------------------------------------------------------- steps 1, 4, 5 and the happy path


def test_valid_chain_sent_by_client(pki: Pki) -> None:
    v = validate(chain(pki.client, pki.inter), bundle(anchors=[pki.root]), STRICT, NOW)
    check(v, "", "")
    assert v.present and v.accepted and v.valid
    assert v.chain == (pki.inter.der,)


def test_intermediate_only_in_intermediate_cas(pki: Pki) -> None:
    b = bundle(anchors=[pki.root], intermediates=[pki.inter])
    v = validate(chain(pki.client), b, STRICT, NOW)
    check(v, "", "")
    assert v.chain == (pki.inter.der,)
    check(
        validate(chain(pki.client), bundle(anchors=[pki.root]), STRICT, NOW),
        E.VALIDATION_FAILED,
        "unknown_issuer",
    )


@pytest.mark.parametrize(
    "mode, accepted", [("REJECT_INVALID", False), ("ALLOW_INVALID_OR_MISSING_CLIENT_CERT", True)]
)
def test_no_certificate(pki: Pki, mode: str, accepted: bool) -> None:
    v = validate([], bundle(anchors=[pki.root]), policy(mode), NOW)
    assert (v.present, v.chain_verified, v.error, v.reason, v.accepted) == (
        False,
        False,
        E.NOT_PROVIDED,
        "no_certificate",
        accepted,
    )
    assert http_status(v) == 496
    assert tls_alert(v) is TlsAlert.CERTIFICATE_REQUIRED
    assert tls_alert(v, tls13=False) is TlsAlert.HANDSHAKE_FAILURE


def test_allow_mode_accepts_invalid_but_reports_it(pki: Pki) -> None:
    stranger = leaf("stranger", ca("Other CA"))
    v = validate(chain(stranger), bundle(anchors=[pki.root]), ALLOW, NOW)
    check(v, E.VALIDATION_FAILED, "unknown_issuer")
    assert v.accepted and v.present
    strict = validate(chain(stranger), bundle(anchors=[pki.root]), STRICT, NOW)
    assert not strict.accepted
    assert tls_alert(strict) is TlsAlert.UNKNOWN_CA and http_status(strict) == 495


def test_no_trust_config(pki: Pki) -> None:
    v = validate(chain(pki.client, pki.inter), None, ALLOW, NOW)
    check(v, E.VALIDATION_NOT_PERFORMED, "no_trust_config")


def test_allowlisted_expired_self_signed_leaf(pki: Pki) -> None:
    old = leaf(
        "allowlisted",
        None,
        not_before=NOW - dt.timedelta(days=30),  # type: ignore[arg-type]
        not_after=NOW - dt.timedelta(days=1),
        dns=("ok.example.com",),
    )
    b = bundle(anchors=[pki.root], allowlist=[old])
    v = validate(chain(old), b, STRICT, NOW)
    check(v, "", "allowlisted")
    assert v.accepted and v.chain == ()
    # Not allowlisted: the same certificate is just an expired stranger.
    check(validate(chain(old), bundle(anchors=[pki.root]), STRICT, NOW), E.VALIDATION_FAILED, "expired")
    # SAN constraints still apply to allowlisted certificates.
    mismatch = validate(
        chain(old), b, policy(match_subject_alt_names=[resources_pb2.SubjectAltNameMatcher(dns="x")]), NOW
    )
    check(mismatch, E.SAN_MISMATCH, "san_mismatch")


# ---------------------------------------------------------------- step 3: limits and key rules


@pytest.mark.parametrize(
    "key, error, reason",
    [
        ("rsa-1024", E.INVALID_RSA_KEY_SIZE, "rsa_key_size"),
        ("rsa-2048", "", ""),
        ("rsa-4096", "", ""),
        ("ec-p256", "", ""),
        ("ec-p384", "", ""),
        ("ec-p521", E.UNSUPPORTED_ELLIPTIC_CURVE_KEY, "unsupported_curve"),
        ("ec-k256", E.UNSUPPORTED_ELLIPTIC_CURVE_KEY, "unsupported_curve"),
        ("ed25519", E.UNSUPPORTED_KEY_ALGORITHM, "unsupported_key_algorithm"),
    ],
)
def test_leaf_key_rules(pki: Pki, key: str, error: str, reason: str) -> None:
    cert = leaf(f"key-{key}", pki.inter, key=key)
    v = validate(chain(cert, pki.inter), bundle(anchors=[pki.root]), STRICT, NOW)
    check(v, error, reason)
    if error:
        assert tls_alert(v) is TlsAlert.UNSUPPORTED_CERTIFICATE


def test_intermediate_key_rules(pki: Pki) -> None:
    weak = ca("Weak Intermediate", pki.root, key="rsa-1024")
    v = validate(chain(leaf("c", weak), weak), bundle(anchors=[pki.root]), STRICT, NOW)
    check(v, E.INVALID_RSA_KEY_SIZE, "rsa_key_size")
    assert "chain[1]" in v.detail


def _ladder(top: Issued, count: int) -> list[Issued]:
    """`count` intermediates under `top`, nearest-to-leaf first."""
    out: list[Issued] = []
    cur = top
    for i in range(count):
        cur = ca(f"Ladder {i}", cur)
        out.insert(0, cur)
    return out


def test_more_than_ten_intermediates_sent(pki: Pki) -> None:
    ladder = _ladder(pki.root, 11)
    v = validate(chain(leaf("deep", ladder[0]), *ladder), bundle(anchors=[pki.root]), STRICT, NOW)
    check(v, E.CHAIN_EXCEEDED_LIMIT, "too_many_intermediates")


def test_gcp_depth_limit_of_ten(pki: Pki) -> None:
    ladder = _ladder(pki.root, 10)  # leaf + 10 intermediates = depth 11 > 10
    v = validate(chain(leaf("deep", ladder[0]), *ladder), bundle(anchors=[pki.root]), STRICT, NOW)
    check(v, E.SEARCH_LIMIT_EXCEEDED, "max_depth")
    ladder9 = _ladder(pki.root, 9)  # depth 10 is fine
    check(validate(chain(leaf("ok", ladder9[0]), *ladder9), bundle(anchors=[pki.root]), STRICT, NOW), "", "")


@pytest.mark.parametrize("max_depth, error", [(3, E.SEARCH_LIMIT_EXCEEDED), (4, ""), (0, "")])
def test_max_verify_depth(pki: Pki, max_depth: int, error: str) -> None:
    ladder = _ladder(pki.root, 3)  # leaf + 3 intermediates = depth 4
    v = validate(
        chain(leaf("d4", ladder[0]), *ladder),
        bundle(anchors=[pki.root]),
        policy(max_verify_depth=max_depth),
        NOW,
    )
    check(v, error, "max_depth" if error else "")


def test_same_subject_and_key_more_than_ten_times(pki: Pki) -> None:
    first = ca("Crowded Intermediate", pki.root)
    clones = [first] + [
        ca("Crowded Intermediate", pki.root, key=first.key, serial=1000 + i) for i in range(10)
    ]
    v = validate(chain(leaf("c", first)), bundle(anchors=[pki.root], intermediates=clones), STRICT, NOW)
    check(v, E.PKI_TOO_LARGE, "same_subject_and_key")
    check(
        validate(chain(leaf("c", first)), bundle(anchors=[pki.root], intermediates=clones[:10]), STRICT, NOW),
        "",
        "",
    )


def test_more_than_a_hundred_candidates(pki: Pki) -> None:
    decoys = [ca("Popular Intermediate", pki.root) for _ in range(101)]
    v = validate(chain(leaf("c", decoys[-1])), bundle(anchors=[pki.root], intermediates=decoys), STRICT, NOW)
    check(v, E.SEARCH_LIMIT_EXCEEDED, "too_many_candidates")


def test_more_than_ten_name_constraints(pki: Pki) -> None:
    subtrees = [x509.DNSName(f"d{i}.example.com") for i in range(11)]
    constrained = ca("Constrained", pki.root, extra_extensions=[(x509.NameConstraints(subtrees, None), True)])
    cert = leaf("c", constrained, dns=("d1.example.com",))
    v = validate(chain(cert, constrained), bundle(anchors=[pki.root]), STRICT, NOW)
    check(v, E.MAX_NAME_CONSTRAINTS_EXCEEDED, "name_constraints")
    ten = ca("Ten", pki.root, extra_extensions=[(x509.NameConstraints(subtrees[:10], None), True)])
    check(
        validate(
            chain(leaf("c", ten, dns=("d1.example.com",)), ten), bundle(anchors=[pki.root]), STRICT, NOW
        ),
        "",
        "",
    )


# ---------------------------------------------------------------- step 6: path validation


def test_expired_and_not_yet_valid(pki: Pki) -> None:
    b = bundle(anchors=[pki.root])
    expired = leaf(
        "old", pki.inter, not_before=NOW - dt.timedelta(days=10), not_after=NOW - dt.timedelta(seconds=1)
    )
    v = validate(chain(expired, pki.inter), b, STRICT, NOW)
    check(v, E.VALIDATION_FAILED, "expired")
    assert tls_alert(v) is TlsAlert.CERTIFICATE_EXPIRED
    future = leaf("new", pki.inter, not_before=NOW + dt.timedelta(days=1))
    check(validate(chain(future, pki.inter), b, STRICT, NOW), E.VALIDATION_FAILED, "not_yet_valid")
    old_inter = ca("Old Intermediate", pki.root, not_after=NOW - dt.timedelta(days=1))
    check(validate(chain(leaf("c", old_inter), old_inter), b, STRICT, NOW), E.VALIDATION_FAILED, "expired")


def test_bad_signature(pki: Pki) -> None:
    impostor = ca("Test Intermediate")  # same name as the real intermediate, another key
    forged = leaf("forged", impostor)
    v = validate(chain(forged), bundle(anchors=[pki.root], intermediates=[pki.inter]), STRICT, NOW)
    check(v, E.VALIDATION_FAILED, "bad_signature")
    assert tls_alert(v) is TlsAlert.BAD_CERTIFICATE


def test_sha1_signature_is_weak(pki: Pki) -> None:
    rsa_inter = ca("RSA Intermediate", pki.root, key="rsa-2048")
    good = leaf("sha1-client", rsa_inter)
    check(validate(chain(good, rsa_inter), bundle(anchors=[pki.root]), STRICT, NOW), "", "")
    sha1 = sha1_signed(good.cert, rsa_inter.key)  # type: ignore[arg-type]
    assert isinstance(x509.load_der_x509_certificate(sha1).signature_hash_algorithm, hashes.SHA1)
    check(
        validate([sha1, rsa_inter.der], bundle(anchors=[pki.root]), STRICT, NOW),
        E.VALIDATION_FAILED,
        "weak_hash",
    )


def test_leaf_must_not_be_a_ca(pki: Pki) -> None:
    ca_leaf = ca("CA as client", pki.inter, eku=(ExtendedKeyUsageOID.CLIENT_AUTH,))
    check(
        validate(chain(ca_leaf, pki.inter), bundle(anchors=[pki.root]), STRICT, NOW),
        E.VALIDATION_FAILED,
        "leaf_is_ca",
    )


@pytest.mark.parametrize(
    "leaf_eku, inter_eku, reason",
    [
        ((ExtendedKeyUsageOID.SERVER_AUTH,), None, "leaf_eku"),
        (None, None, "leaf_eku"),
        ((ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,), None, "leaf_eku"),
        ((ExtendedKeyUsageOID.CLIENT_AUTH,), (ExtendedKeyUsageOID.SERVER_AUTH,), "issuer_eku"),
        ((ExtendedKeyUsageOID.CLIENT_AUTH,), (ExtendedKeyUsageOID.CLIENT_AUTH,), ""),
        ((ExtendedKeyUsageOID.CLIENT_AUTH,), (ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,), ""),
    ],
)
def test_eku_rules(pki: Pki, leaf_eku: tuple | None, inter_eku: tuple | None, reason: str) -> None:
    inter = ca("EKU Intermediate", pki.root, eku=inter_eku) if inter_eku else pki.inter
    cert = leaf("eku", inter, eku=leaf_eku)
    v = validate(chain(cert, inter), bundle(anchors=[pki.root]), STRICT, NOW)
    check(v, E.CHAIN_INVALID_EKU if reason else "", reason)


def test_time_budget(pki: Pki) -> None:
    v = validate(chain(pki.client, pki.inter), bundle(anchors=[pki.root]), STRICT, NOW, time_budget=0.0)
    check(v, E.VALIDATION_TIMED_OUT, "time_budget")


def test_garbage_certificate(pki: Pki) -> None:
    check(
        validate([b"\x30\x03\x02\x01\x00"], bundle(anchors=[pki.root]), STRICT, NOW),
        E.VALIDATION_FAILED,
        "malformed_certificate",
    )


# ---------------------------------------------------------------- step 7: revocation


def test_revoked_leaf_and_revocation_modes(pki: Pki) -> None:
    revoked = leaf("revoked", pki.inter)
    crl = make_crl(pki.inter, [123, revoked.cert.serial_number], this_update=NOW - dt.timedelta(hours=1))
    b = bundle(anchors=[pki.root], intermediates=[pki.inter], crls=[crl])
    v = validate(chain(revoked, pki.inter), b, STRICT, NOW)
    check(v, E.REVOKED, "revoked")
    assert tls_alert(v) is TlsAlert.CERTIFICATE_REVOKED
    check(validate(chain(revoked, pki.inter), b, policy(revocation_check="CHAIN"), NOW), E.REVOKED, "revoked")
    check(validate(chain(revoked, pki.inter), b, policy(revocation_check="OFF"), NOW), "", "")
    check(validate(chain(pki.client, pki.inter), b, STRICT, NOW), "", "")


def test_revoked_intermediate_only_with_chain_checking(pki: Pki) -> None:
    root_crl = make_crl(pki.root, [pki.inter.cert.serial_number], this_update=NOW - dt.timedelta(hours=1))
    b = bundle(anchors=[pki.root], crls=[root_crl])
    check(validate(chain(pki.client, pki.inter), b, policy(revocation_check="LEAF"), NOW), "", "")
    check(
        validate(chain(pki.client, pki.inter), b, policy(revocation_check="CHAIN"), NOW),
        E.REVOKED,
        "issuer_revoked",
    )


def test_stale_crl(pki: Pki) -> None:
    stale = make_crl(
        pki.inter, [], this_update=NOW - dt.timedelta(days=8), next_update=NOW - dt.timedelta(days=1)
    )
    b = bundle(anchors=[pki.root], intermediates=[pki.inter], crls=[stale])
    check(
        validate(chain(pki.client, pki.inter), b, policy(require_fresh_crl=True), NOW),
        E.CRL_STALE,
        "crl_stale",
    )
    check(validate(chain(pki.client, pki.inter), b, policy(), NOW), "", "")
    # The cached success for a fresh time must not answer after nextUpdate.
    fresh = make_crl(
        pki.inter, [], this_update=NOW - dt.timedelta(hours=1), next_update=NOW + dt.timedelta(hours=1)
    )
    fb = bundle(anchors=[pki.root], intermediates=[pki.inter], crls=[fresh])
    p = policy(require_fresh_crl=True)
    check(validate(chain(pki.client, pki.inter), fb, p, NOW), "", "")
    check(
        validate(chain(pki.client, pki.inter), fb, p, NOW + dt.timedelta(hours=2)), E.CRL_STALE, "crl_stale"
    )


def test_cached_success_does_not_outlive_the_certificate(pki: Pki) -> None:
    short = leaf(
        "short", pki.inter, not_before=NOW - dt.timedelta(hours=1), not_after=NOW + dt.timedelta(minutes=1)
    )
    b = bundle(anchors=[pki.root])
    check(validate(chain(short, pki.inter), b, STRICT, NOW), "", "")
    check(validate(chain(short, pki.inter), b, STRICT, NOW), "", "")  # served from the cache
    check(
        validate(chain(short, pki.inter), b, STRICT, NOW + dt.timedelta(minutes=2)),
        E.VALIDATION_FAILED,
        "expired",
    )


def test_crl_lookup_after_revocation_serial_count(pki: Pki) -> None:
    big = make_crl(pki.inter, range(1, 5001), this_update=NOW - dt.timedelta(hours=1))
    b = bundle(anchors=[pki.root], intermediates=[pki.inter], crls=[big])
    victim = leaf("victim", pki.inter, serial=4321)
    check(validate(chain(victim, pki.inter), b, STRICT, NOW), E.REVOKED, "revoked")


# ---------------------------------------------------------------- step 8: SAN matchers


def _upn(value: str) -> x509.OtherName:
    raw = value.encode()
    return x509.OtherName(UPN_OID, b"\x0c" + bytes([len(raw)]) + raw)


@pytest.fixture(scope="module")
def many_names(pki: Pki) -> Issued:
    sans = x509.SubjectAlternativeName(
        [
            x509.DNSName("api.example.com"),
            x509.RFC822Name("alice@example.com"),
            x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
            x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
            x509.UniformResourceIdentifier("spiffe://example.org/ns/prod/sa/api"),
            _upn("alice@corp.example"),
        ]
    )
    return leaf("names", pki.inter, extra_extensions=[(sans, False)])


@pytest.mark.parametrize(
    "kind, pattern, ok",
    [
        ("dns", r"api\.example\.com", True),
        ("dns", r"api", False),  # full match, not search
        ("dns", r".*\.example\.com", True),
        ("email", r"alice@example\.com", True),
        ("email", r"bob@.*", False),
        ("ip_address", r"10\.1\.2\.3", True),
        ("ip_address", r"2001:db8::1", True),
        ("ip_address", r"10\.1\.2\.30", False),
        ("uri", r"spiffe://example\.org/ns/prod/.*", True),
        ("uri", r"spiffe://example\.org/ns/dev/.*", False),
        ("user_principal_name", r"alice@corp\.example", True),
        ("user_principal_name", r"alice@example\.com", False),  # an email SAN is not a UPN
    ],
)
def test_san_matchers(pki: Pki, many_names: Issued, kind: str, pattern: str, ok: bool) -> None:
    p = policy(match_subject_alt_names=[resources_pb2.SubjectAltNameMatcher(**{kind: pattern})])
    v = validate(chain(many_names, pki.inter), bundle(anchors=[pki.root]), p, NOW)
    check(v, "" if ok else E.SAN_MISMATCH, "" if ok else "san_mismatch")
    if not ok:
        assert tls_alert(v) is TlsAlert.ACCESS_DENIED


def test_san_matchers_are_any_of(pki: Pki, many_names: Issued) -> None:
    p = policy(
        match_subject_alt_names=[
            resources_pb2.SubjectAltNameMatcher(dns="nope"),
            resources_pb2.SubjectAltNameMatcher(email="alice@.*"),
        ]
    )
    check(validate(chain(many_names, pki.inter), bundle(anchors=[pki.root]), p, NOW), "", "")


def test_hostile_pattern_is_linear() -> None:
    # A catastrophic-backtracking pattern for backtracking engines; RE2 answers at once.
    p = policy(match_subject_alt_names=[resources_pb2.SubjectAltNameMatcher(dns="(a+)+$")])
    matcher = p.san_matchers[0]
    assert not matcher.matches("a" * 50_000 + "!")


# ---------------------------------------------------------------- compiling policies and bundles


@pytest.mark.parametrize(
    "mtls, message",
    [
        (
            {"match_subject_alt_names": [resources_pb2.SubjectAltNameMatcher(dns="(a")]},
            "mtlsPolicy.matchSubjectAltNames[0].dns: invalid RE2 pattern '(a': missing )",
        ),
        (
            {"match_subject_alt_names": [resources_pb2.SubjectAltNameMatcher()]},
            "mtlsPolicy.matchSubjectAltNames[0]: set one of",
        ),
        ({"max_verify_depth": 11}, "mtlsPolicy.maxVerifyDepth: 11 is outside 0..10"),
    ],
)
def test_compile_policy_errors(mtls: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        policy(**mtls)
    assert str(info.value).startswith(message)


def test_compile_policy_plain_tls_and_defaults() -> None:
    assert compile_policy(None) == ClientPolicy()
    assert not compile_policy(resources_pb2.ServerTlsPolicy(name="serverTlsPolicies/p")).mtls
    p = policy()
    assert (p.mtls, p.max_depth, p.revocation.value, p.reject_at.value) == (True, 10, "LEAF", "TLS")
    with pytest.raises(ValueError, match="clientValidationMode: required"):
        compile_policy(resources_pb2.ServerTlsPolicy(mtls_policy=resources_pb2.MTLSPolicy()))


def test_compile_bundle_errors(pki: Pki) -> None:
    tc = trust_config(anchors=[pki.root])
    tc.trust_stores[0].trust_anchors.add(
        pem_certificate="-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"
    )
    with pytest.raises(
        InvalidBundle, match=r"^trustStores\[0\]\.trustAnchors\[1\]\.pemCertificate: garbage DER \(not a certificate\)$"
    ):
        trust_bundle_from_trust_config(tc)
    with pytest.raises(InvalidBundle, match=r"^trustStores\[0\]\.trustAnchors\[0\]: not a CA certificate"):
        bundle(anchors=[pki.client])
    rogue = ca("Test Intermediate")  # same name as the intermediate, another key
    forged_crl = make_crl(pki.inter, [1], signer=rogue)
    with pytest.raises(InvalidBundle, match=r"^trustStores\[0\]\.crls\[0\]: signature does not verify"):
        bundle(anchors=[pki.root], intermediates=[pki.inter], crls=[forged_crl])
    with pytest.raises(InvalidBundle, match=r"is not a CA of this trust config"):
        bundle(anchors=[pki.root], crls=[make_crl(pki.inter, [1])])


def test_bundle_digest_is_content_identity(pki: Pki) -> None:
    tb = trust_bundle_from_trust_config(trust_config(anchors=[pki.root], intermediates=[pki.inter]))
    assert compile_bundle(tb).digest == compile_bundle(tb).digest
    other = trust_bundle_from_trust_config(trust_config(anchors=[pki.root]))
    assert compile_bundle(other).digest != compile_bundle(tb).digest


def test_demo_pki_trust_config_compiles(demo_pki) -> None:  # type: ignore[no-untyped-def]
    import yaml
    from google.protobuf import json_format

    tc = json_format.ParseDict(
        yaml.safe_load(demo_pki.path("trust_config").read_text()), resources_pb2.TrustConfig()
    )
    b = compile_bundle(trust_bundle_from_trust_config(tc))
    assert len(b.crls) == 1 and b.store is not None


def test_verdict_headers_follow_the_verdict(pki: Pki) -> None:
    v = validate(chain(pki.client, pki.inter), bundle(anchors=[pki.root]), STRICT, NOW)
    values = variables(v)
    assert values["client_cert_chain_verified"] == "true" and values["client_cert_leaf"]
    assert dict(DEFAULT_HEADERS.render(v))["X-Client-Cert-Present"] == "true"


def test_expired_trust_anchor(pki: Pki) -> None:
    old_root = ca("Old Root", not_before=NOW - dt.timedelta(days=100), not_after=NOW - dt.timedelta(days=1))
    cert = leaf("c", old_root, not_before=NOW - dt.timedelta(days=10))
    check(validate(chain(cert), bundle(anchors=[old_root]), STRICT, NOW), E.VALIDATION_FAILED, "expired")


def test_several_trust_stores_are_a_union(pki: Pki) -> None:
    other_root = ca("Second Root")
    other_client = leaf("c2", other_root)
    tc = trust_config(anchors=[pki.root])
    tc.trust_stores.add().trust_anchors.add(pem_certificate=other_root.cert_pem)
    b = compile_bundle(trust_bundle_from_trust_config(tc))
    for cert in (chain(pki.client, pki.inter), chain(other_client)):
        v = validate(cert, b, STRICT, NOW)
        check(v, "", "")
        assert tls_alert(v) is None and http_status(v) == 200


def test_verdict_cache_is_per_policy(pki: Pki) -> None:
    b = bundle(anchors=[pki.root])
    sent = chain(pki.client, pki.inter)
    check(validate(sent, b, STRICT, NOW), "", "")  # cached now
    picky = policy(match_subject_alt_names=[resources_pb2.SubjectAltNameMatcher(dns="other\\.example\\.com")])
    check(validate(sent, b, picky, NOW), E.SAN_MISMATCH, "san_mismatch")
    shallow = policy(max_verify_depth=1)
    check(validate(sent, b, shallow, NOW), E.SEARCH_LIMIT_EXCEEDED, "max_depth")
    assert validate(sent, b, ALLOW, NOW).accepted and validate(sent, b, STRICT, NOW).accepted


def test_client_sending_the_root_too(pki: Pki) -> None:
    """Many clients send their whole chain, root included; the configured anchor still ends the path."""
    v = validate(
        chain(pki.client, pki.inter, pki.root), bundle(anchors=[pki.root]), policy(max_verify_depth=2), NOW
    )
    check(v, "", "")
    assert v.chain == (pki.inter.der,)

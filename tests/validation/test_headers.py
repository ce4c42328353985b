"""SPEC §5 byte for byte: the default X-Client-Cert-* set, templates, size limits and XFCC."""

from __future__ import annotations

import base64
import hashlib
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_plane.validation import engine as E
from data_plane.validation.engine import validate
from data_plane.validation.headers import (
    DEFAULT_HEADERS,
    MAX_CUSTOM_HEADERS,
    VARIABLES,
    compile_headers,
    forwards_incoming_xfcc,
    render_xfcc,
)
from tests.validation.conftest import NOW, Pki, bundle, ca, leaf, policy

INTER_DN = "MDQxFjAUBgNVBAoMDW10bHNnYXRlIHRlc3QxGjAYBgNVBAMMEVRlc3QgSW50ZXJtZWRpYXRl"
CLIENT_DN = "MCkxFjAUBgNVBAoMDW10bHNnYXRlIHRlc3QxDzANBgNVBAMMBmNsaWVudA=="
SPIFFE = "spiffe://example.org/ns/default/sa/client"
URI_SANS = "c3BpZmZlOi8vZXhhbXBsZS5vcmcvbnMvZGVmYXVsdC9zYS9jbGllbnQ="
DNS_SANS = "Y2xpZW50LmV4YW1wbGUuY29t,YWx0LmV4YW1wbGUuY29t"


@pytest.fixture(scope="module")
def pki_for_property(pki: Pki) -> Pki:
    return pki  # hypothesis wants fixtures that are not reset between examples


def _verdict(pki: Pki, *certs: bytes) -> E.Verdict:
    return validate(list(certs), bundle(anchors=[pki.root]), policy(), NOW)


def test_default_headers_for_a_verified_client(pki: Pki) -> None:
    der, inter = pki.client.der, pki.inter.der
    fingerprint = base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    assert DEFAULT_HEADERS.render(_verdict(pki, der, inter)) == [
        ("X-Client-Cert-Present", "true"),
        ("X-Client-Cert-Chain-Verified", "true"),
        ("X-Client-Cert-Error", ""),
        ("X-Client-Cert-Hash", fingerprint),
        ("X-Client-Cert-Serial-Number", "123abcdef"),
        ("X-Client-Cert-SPIFFE", SPIFFE),
        ("X-Client-Cert-URI-SANs", URI_SANS),
        ("X-Client-Cert-DNSName-SANs", DNS_SANS),
        ("X-Client-Cert-Valid-Not-Before", "2026-01-02T03:04:05+00:00"),
        ("X-Client-Cert-Valid-Not-After", "2036-01-02T03:04:05+00:00"),
        ("X-Client-Cert-Issuer-Dn", INTER_DN),
        ("X-Client-Cert-Subject-Dn", CLIENT_DN),
        ("X-Client-Cert-Leaf", ":" + base64.b64encode(der).decode() + ":"),
        ("X-Client-Cert-Chain", ":" + base64.b64encode(inter).decode() + ":"),
    ]
    assert "=" not in fingerprint and len(fingerprint) == 43


def test_default_headers_without_a_certificate(pki: Pki) -> None:
    rendered = DEFAULT_HEADERS.render(_verdict(pki))
    assert rendered[:3] == [
        ("X-Client-Cert-Present", "false"),
        ("X-Client-Cert-Chain-Verified", "false"),
        ("X-Client-Cert-Error", "client_cert_not_provided"),
    ]
    assert all(value == "" for _, value in rendered[3:])
    assert len(rendered) == 14


def test_unverified_certificate_fills_fields_but_not_leaf_or_chain(pki: Pki) -> None:
    values = dict(DEFAULT_HEADERS.render(_verdict(pki, pki.client.der)))  # intermediate missing
    assert values["X-Client-Cert-Chain-Verified"] == "false"
    assert values["X-Client-Cert-Error"] == "client_cert_validation_failed"
    assert values["X-Client-Cert-Serial-Number"] == "123abcdef"
    assert values["X-Client-Cert-Subject-Dn"] == CLIENT_DN
    assert values["X-Client-Cert-Leaf"] == "" and values["X-Client-Cert-Chain"] == ""


def test_size_limits_empty_the_field_and_append_an_error(pki: Pki) -> None:
    names = tuple(f"host-{i:03d}-{'x' * 40}.example.com" for i in range(300))  # DNS SANs ≫ 512 B, DER ≫ 12 KB
    big = leaf("big", pki.inter, dns=names)
    values = dict(DEFAULT_HEADERS.render(_verdict(pki, big.der, pki.inter.der)))
    assert values["X-Client-Cert-Chain-Verified"] == "true"
    assert values["X-Client-Cert-DNSName-SANs"] == "" and values["X-Client-Cert-Leaf"] == ""
    assert values["X-Client-Cert-Error"] == (
        "client_cert_dnsname_sans_exceeded_size_limit,client_cert_leaf_exceeded_size_limit"
    )
    assert values["X-Client-Cert-Chain"] != ""


@pytest.mark.parametrize(
    "uris, expected, error",
    [
        (("spiffe://example.org/a/b",), "spiffe://example.org/a/b", ""),
        (("spiffe://example.org/a", "spiffe://example.org/b"), "", ""),  # more than one SPIFFE ID
        (("spiffe://Example.org/a",), "", ""),  # trust domain must be lowercase
        (("spiffe://example.org/a//b",), "", ""),  # empty path segment
        (("spiffe://example.org/a/../b",), "", ""),  # relative path segment
        # > 2048 bytes: no SPIFFE ID (silently, as GCP), and the URI SAN list is over its limit too
        (("spiffe://example.org/" + "a" * 2100,), "", "client_cert_uri_sans_exceeded_size_limit"),
        (("https://example.org/a",), "", ""),
    ],
)
def test_spiffe_id(pki: Pki, uris: tuple[str, ...], expected: str, error: str) -> None:
    cert = leaf("spiffe", pki.inter, uris=uris)
    values = dict(DEFAULT_HEADERS.render(_verdict(pki, cert.der, pki.inter.der)))
    assert values["X-Client-Cert-SPIFFE"] == expected
    assert values["X-Client-Cert-Error"] == error


def test_custom_templates_and_escapes(pki: Pki) -> None:
    headers = compile_headers(
        [
            "X-Verified:{client_cert_chain_verified}",
            "X-Mixed: present={client_cert_present} {{literal}} serial={client_cert_serial_number}",
        ]
    )
    assert headers.names == frozenset({"x-verified", "x-mixed"})
    assert headers.render(_verdict(pki, pki.client.der, pki.inter.der)) == [
        ("X-Verified", "true"),
        ("X-Mixed", "present=true {literal} serial=123abcdef"),
    ]
    assert compile_headers([]) is DEFAULT_HEADERS
    assert "x-client-cert-hash" in DEFAULT_HEADERS.names


@pytest.mark.parametrize(
    "entries, message",
    [
        (["X-A"], "customRequestHeaders[0]: expected Name:{variable}"),
        (["X-A:{client_cert_nope}"], "customRequestHeaders[0]: unknown variable {client_cert_nope}"),
        (["X-A:{client_cert_present"], "customRequestHeaders[0]: unbalanced '{'"),
        (["X-A:x}"], "customRequestHeaders[0]: unbalanced '}'"),
        (["Bad Name:x"], "customRequestHeaders[0]: 'Bad Name' is not a valid HTTP header name"),
        (
            ["Content-Length:{client_cert_present}"],
            "customRequestHeaders[0]: the proxy sets 'Content-Length'",
        ),
        (
            ["X-A:1", "x-a:2"],
            "customRequestHeaders[1]: header 'x-a' is already set by customRequestHeaders[0]",
        ),
        (["X-A:a\rb"], "customRequestHeaders[0]: control characters"),
        ([f"X-{i}:v" for i in range(MAX_CUSTOM_HEADERS + 1)], "customRequestHeaders: 17 entries"),
    ],
)
def test_template_errors(entries: list[str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        compile_headers(entries)
    assert str(info.value).startswith(message)


def test_xfcc_modes(pki: Pki) -> None:
    verified = _verdict(pki, pki.client.der, pki.inter.der)
    element = render_xfcc(verified, "SANITIZE_SET", by="spiffe://example.org/proxy")
    assert element is not None
    expected_hash = hashlib.sha256(pki.client.der).hexdigest()
    assert element.startswith(f'By=spiffe://example.org/proxy;Hash={expected_hash};Cert="')
    assert f'Cert="{urllib.parse.quote(pki.client.cert_pem, safe="")}"' in element
    assert f'Chain="{urllib.parse.quote(pki.client.cert_pem + pki.inter.cert_pem, safe="")}"' in element
    assert element.endswith(
        f'Subject="CN=client,O=mtlsgate test";URI={SPIFFE};DNS=client.example.com;DNS=alt.example.com'
    )
    assert render_xfcc(verified, "SANITIZE", incoming="Hash=abc") is None
    assert render_xfcc(verified, 0, incoming="Hash=abc") is None  # unspecified = SANITIZE
    assert render_xfcc(verified, "SANITIZE_SET", incoming="Hash=abc") == render_xfcc(verified, 2)
    assert render_xfcc(verified, "APPEND_FORWARD", incoming="Hash=abc") == "Hash=abc," + render_xfcc(
        verified, 2
    )
    unverified = _verdict(pki, pki.client.der)
    assert render_xfcc(unverified, "SANITIZE_SET") is None
    assert render_xfcc(unverified, "APPEND_FORWARD", incoming="Hash=abc") == "Hash=abc"
    assert forwards_incoming_xfcc("APPEND_FORWARD") and not forwards_incoming_xfcc("SANITIZE_SET")
    with pytest.raises(ValueError, match="forwardClientCertDetails"):
        render_xfcc(verified, "BOGUS")


def test_xfcc_values_from_a_hostile_certificate_stay_printable_ascii(pki: Pki) -> None:
    """CR/LF in a subject or SAN must not split the header (injection), and non-Latin-1 text must not
    reach the wire raw: RFC 4514 hex escapes in Subject, percent-encoding in URI/DNS."""
    hostile = leaf('evil\r\nX-Client-Cert-Chain-Verified: true 日本', pki.inter,
                   uris=("https://h/x\r\nX-Injected: 1",), dns=("a\nb.example",))
    verdict = _verdict(pki, hostile.der, pki.inter.der)
    assert verdict.chain_verified, verdict.detail
    element = render_xfcc(verdict, "SANITIZE_SET")
    assert element is not None
    assert all(" " <= ch <= "~" for ch in element), "a control or non-ASCII character reached XFCC"
    assert 'Subject="CN=evil\\\\0D\\\\0AX-Client-Cert-Chain-Verified: true \\\\E6\\\\97\\\\A5' in element
    assert ";URI=https://h/x%0D%0AX-Injected:%201;DNS=a%0Ab.example" in element


def test_allowlisted_leaf_is_verified_with_an_empty_chain(pki: Pki) -> None:
    self_signed = ca("Allowlisted Device")
    device = leaf("device", self_signed)
    verdict = validate([device.der], bundle(anchors=[pki.root], allowlist=[device]), policy(), NOW)
    values = dict(DEFAULT_HEADERS.render(verdict))
    assert values["X-Client-Cert-Chain-Verified"] == "true"
    assert values["X-Client-Cert-Leaf"] == ":" + base64.b64encode(device.der).decode() + ":"
    assert values["X-Client-Cert-Chain"] == ""


@settings(max_examples=200, deadline=None)
@given(literal=st.text(max_size=40), variable=st.sampled_from(VARIABLES))
def test_any_accepted_template_renders_a_safe_value(
    pki_for_property: Pki, literal: str, variable: str
) -> None:
    entry = f"X-T:{literal}{{{variable}}}"
    try:
        headers = compile_headers([entry])
    except ValueError:
        return  # refused with a message: fine
    for verdict in (
        _verdict(pki_for_property, pki_for_property.client.der, pki_for_property.inter.der),
        _verdict(pki_for_property),
    ):
        [(name, value)] = headers.render(verdict)
        assert name == "X-T"
        assert not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value)

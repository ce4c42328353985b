"""The SPEC §4 dry run shared by `mtlsgate check` (offline) and the control plane's CheckService (live):
PEM chain + TrustConfig + ServerTlsPolicy (+ header templates) + time → verdict and backend headers,
through exactly the code the proxy runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.serialization import Encoding
from mtlsgate.v1 import resources_pb2

from data_plane.validation.bundle import compile_bundle, trust_bundle_from_trust_config
from data_plane.validation.engine import MAX_CERTIFICATE_BYTES, MAX_INTERMEDIATES, Verdict, validate
from data_plane.validation.headers import compile_headers
from data_plane.validation.pem import PemProblem, load_certificates
from data_plane.validation.policy import compile_policy

# A chain larger than this could never be accepted anyway (11 certificates of at most 64 KiB).
MAX_CHAIN_PEM_BYTES = (MAX_INTERMEDIATES + 1) * MAX_CERTIFICATE_BYTES * 4 // 3 + 4096


class DryRunError(ValueError):
    """Input the dry run cannot use (unparseable chain, invalid policy or trust config); says which."""


@dataclass(frozen=True)
class DryRunResult:
    verdict: Verdict
    headers: list[tuple[str, str]]


def parse_pem_chain(text: str) -> list[bytes]:
    """DER certificates of a PEM chain, in file order (leaf first). Empty text = no certificate."""
    if len(text) > MAX_CHAIN_PEM_BYTES:
        raise DryRunError(
            f"certificate chain: {len(text)} bytes, more than the {MAX_CHAIN_PEM_BYTES}-byte limit"
        )
    if not text.strip():
        return []
    try:
        certs = load_certificates(text, expected="a certificate chain")
    except PemProblem as exc:
        raise DryRunError(f"certificate chain: {exc}") from None
    return [c.public_bytes(Encoding.DER) for c in certs]


def dry_run(
    chain: Sequence[bytes],
    trust_config: resources_pb2.TrustConfig | None,
    policy: resources_pb2.ServerTlsPolicy,
    when: datetime,
    header_entries: Sequence[str] = (),
) -> DryRunResult:
    """Validate `chain` as a listener with this policy would, and render the headers it would send."""
    try:
        client_policy = compile_policy(policy)
    except ValueError as exc:
        raise DryRunError(f"policy: {exc}") from None
    if not client_policy.mtls:
        raise DryRunError("policy: no mtlsPolicy, so listeners using it request no client certificate")
    try:
        bundle = (
            compile_bundle(trust_bundle_from_trust_config(trust_config)) if trust_config is not None else None
        )
    except ValueError as exc:
        raise DryRunError(f"trust config: {exc}") from None
    try:
        headers = compile_headers(header_entries)
    except ValueError as exc:
        raise DryRunError(f"listener: {exc}") from None
    verdict = validate(chain, bundle, client_policy, when)
    return DryRunResult(verdict, headers.render(verdict))

"""Shadow judging in real worker processes (SPEC §12): each new handshake on a listener with candidates is
judged under them too, the active verdict alone is enforced, disagreements reach the pool's tally with the
client's fingerprint and both error strings; a listener without candidates tallies nothing; a candidate
whose bundle is missing is shown as not judged and the active configuration still applies."""

from __future__ import annotations

import hashlib
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from mtlsgate.v1 import resources_pb2

from data_plane.validation.bundle import trust_bundle_from_trust_config
from data_plane.workers.shadow_tally import NO_DISAGREEMENT, WOULD_NEWLY_ACCEPT, WOULD_NEWLY_REJECT
from tests.control_plane.shadow_manifests import other_root_pem
from tests.support import free_port, wait_until
from tests.workers.conftest import client_context, https_get, listener, node_config, policy

CANDIDATE = "shadowTrustConfigs/demo"


def _fingerprint(pki, who: str) -> str:
    cert = x509.load_pem_x509_certificate(pki.path(f"{who}_cert").read_bytes())
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def _config(pki, port: int, backend: str, *, shadow: bool = True, bundle: bool = True):
    lst = listener("shadowed", port, backend, policy())
    if shadow:
        candidate_policy = policy()
        candidate_policy.mtls_policy.client_validation_trust_config = CANDIDATE
        lst.shadow_policies.add(candidate="trustConfigs/demo", candidate_version="etag-1",
                                server_tls_policy=candidate_policy)
    config = node_config(pki, [lst])
    if shadow and bundle:
        other = resources_pb2.TrustConfig(name=CANDIDATE)
        other.trust_stores.add().trust_anchors.add(pem_certificate=other_root_pem(pki))
        bundles = dict(config.bundles)
        bundles[CANDIDATE] = trust_bundle_from_trust_config(other)
        bundles[CANDIDATE].name = CANDIDATE
        config = type(config)(versions=config.versions, listeners=config.listeners, bundles=bundles,
                              certificates=config.certificates)
    return config


def _rows(harness, wanted: int, timeout: float = 10.0) -> list:
    rows: list = []

    def enough() -> bool:
        rows.extend(harness.in_loop(harness.pool.shadow.take))
        return sum(r[7] for r in rows if r[3] == NO_DISAGREEMENT) >= wanted

    wait_until(enough, timeout=timeout, message=f"{wanted} shadow judgements in the pool's tally")
    merged: dict[tuple, int] = {}  # rows arrive per worker: sum them by key
    for row in rows:
        merged[row[:7]] = merged.get(row[:7], 0) + row[7]
    return [(*key, n) for key, n in merged.items()]


def test_the_candidate_is_judged_and_the_active_verdict_enforced(harness, backend, demo_pki):
    port = free_port()
    harness.in_loop(harness.pool.shadow.take)
    harness.apply(_config(demo_pki, port, backend.address))
    for _ in range(3):
        status, _, _ = https_get(port, client_context(demo_pki, "client"))
        assert status == 200  # the active trust config still decides
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        https_get(port, client_context(demo_pki, "untrusted"))  # active: rejected at TLS
    rows = _rows(harness, 4)
    assert sum(r[7] for r in rows if r[3] == NO_DISAGREEMENT) == 4
    rejects = [r for r in rows if r[3] == WOULD_NEWLY_REJECT]
    assert [(r[0], r[1], r[2], r[4], r[5], r[7]) for r in rejects] == [
        ("listeners/shadowed", "trustConfigs/demo", "etag-1", _fingerprint(demo_pki, "client"), "", 3)]
    assert rejects[0][6]  # the candidate's error string
    accepts = [r for r in rows if r[3] == WOULD_NEWLY_ACCEPT]
    assert [(r[4], r[6], r[7]) for r in accepts] == [(_fingerprint(demo_pki, "untrusted"), "", 1)]
    assert accepts[0][5]  # the active error string
    summary = harness.pool.worker_status()[0]["listeners"]["listeners/shadowed"]["shadow"]
    assert summary == [{"candidate": "trustConfigs/demo", "candidate_version": "etag-1", "trust_bundle": CANDIDATE,
                        "judged": True, "problem": ""}]


def test_without_a_candidate_nothing_is_tallied(harness, backend, demo_pki):
    port = free_port()
    harness.apply(_config(demo_pki, port, backend.address, shadow=False))
    harness.in_loop(harness.pool.shadow.take)
    for _ in range(2):
        assert https_get(port, client_context(demo_pki, "client"))[0] == 200
    # the client tally is shipped with the same stats message: once it has arrived, so would shadow rows
    wait_until(lambda: len(harness.pool.clients) > 0, timeout=10, message="the client rows arrived")
    assert harness.in_loop(harness.pool.shadow.take) == []


def test_a_candidate_without_its_bundle_is_not_judged_and_the_active_config_applies(harness, backend, demo_pki):
    port = free_port()
    harness.apply(_config(demo_pki, port, backend.address, bundle=False))
    assert https_get(port, client_context(demo_pki, "client"))[0] == 200
    summary = harness.pool.worker_status()[0]["listeners"]["listeners/shadowed"]["shadow"]
    assert summary[0]["judged"] is False and "was not received" in summary[0]["problem"]


def test_a_candidate_verdict_is_remembered_per_chain_for_a_while(demo_pki, monkeypatch):
    """Rejections are not memoised by the engine; the shadow keeps any verdict SHADOW_MEMO_SECONDS."""
    import datetime as dt

    from data_plane.validation import engine
    from data_plane.workers import listeners as listeners_mod

    config = _config(demo_pki, 1, "127.0.0.1:9")
    wire = listeners_mod.WireConfig.from_node_config(config)
    runtime, problem = listeners_mod.compile_shadow(config.listeners["listeners/shadowed"].shadow_policies[0], wire)
    assert runtime is not None and problem == ""
    cert = x509.load_pem_x509_certificate(demo_pki.path("client_cert").read_bytes())
    chain = [cert.public_bytes(Encoding.DER)]
    calls = []
    real = engine.validate
    monkeypatch.setattr(engine, "validate", lambda *a, **k: calls.append(1) or real(*a, **k))
    clock = [1000.0]
    monkeypatch.setattr(listeners_mod.time, "monotonic", lambda: clock[0])
    now = dt.datetime.now(dt.UTC)
    first = runtime.validate(chain, now)
    assert not first.accepted and runtime.validate(chain, now) is first and len(calls) == 1
    clock[0] += listeners_mod.SHADOW_MEMO_SECONDS + 0.1
    assert not runtime.validate(chain, now).accepted and len(calls) == 2

"""The pure CRL source rules: when to fetch, what an answer means, what write validation refuses."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from mtlsgate.v1 import resources_pb2

from control_plane.crl_sources import schedule
from control_plane.crl_sources.schedule import Failed, Source
from control_plane.pki import issue
from data_plane.validation.resources import validate_trust_config
from tests.crl_sources.crls import signed_crl

SOURCE = Source("trustConfigs/t", 0, "http://ca.example/crl", 600.0)


def test_success_delay_is_the_earlier_of_refresh_and_half_the_time_to_next_update() -> None:
    assert schedule.success_delay(600, 1000, None) == 600
    assert schedule.success_delay(600, 1000, 1000 + 400) == 200
    assert schedule.success_delay(600, 1000, 1000 + 4000) == 600
    assert schedule.success_delay(600, 1000, 1000 + 0.5) == schedule.MIN_DELAY_SECONDS  # never a hot loop
    assert schedule.success_delay(600, 1000, 900) == schedule.STALE_POLL_SECONDS  # past nextUpdate
    assert schedule.success_delay(5, 1000, 900) == 5


def test_failure_backoff_grows_is_capped_and_jittered() -> None:
    delays = [schedule.failure_delay(3600, n, 0.999) for n in range(1, 15)]
    assert delays == sorted(delays)
    assert delays[-1] <= schedule.BACKOFF_CAP_SECONDS
    assert schedule.failure_delay(10, 20, 0.999) <= 10  # never longer than the refresh interval
    low, high = schedule.failure_delay(3600, 6, 0.0), schedule.failure_delay(3600, 6, 0.999)
    assert low == pytest.approx(16) and 31 < high <= 32
    runtime = schedule.first_runtime(0.0)
    for n in range(3):
        runtime = schedule.after_failure(runtime, SOURCE, 100.0 + n, "timeout", "slow", 0.5)
    assert (runtime.failures, runtime.failing_since, runtime.last_error_reason) == (3, 100.0, "timeout")
    runtime = schedule.after_success(runtime, SOURCE, 200.0, None, http_etag='"x"')
    assert (runtime.failures, runtime.failing_since, runtime.last_error, runtime.next_attempt) == (0, 0.0, "", 800.0)


def test_redirects_are_bounded_and_checked() -> None:
    assert schedule.redirect_target("http://a/crl", "/other", 0) == "http://a/other"
    assert schedule.redirect_target("http://a/crl", "https://b/crl", 2) == "https://b/crl"
    assert isinstance(schedule.redirect_target("http://a/crl", "/x", 3), Failed)
    for location in ("file:///etc/passwd", "http://user:pw@b/crl", "ldap://b/crl", ""):
        outcome = schedule.redirect_target("http://a/crl", location, 0)
        assert isinstance(outcome, Failed) and outcome.reason == "bad_redirect", location


def test_bodies_pem_der_and_junk() -> None:
    ca = issue("body CA", ca=True)
    der = signed_crl(ca, 1)
    assert schedule.crl_der(der) == der
    assert schedule.crl_der(signed_crl(ca, 1, pem=True)).startswith(b"\x30")  # type: ignore[union-attr]
    two = signed_crl(ca, 1, pem=True) + signed_crl(ca, 2, pem=True)
    for body in (b"", b"hello", two, b"-----BEGIN X509 CRL-----\n!!!\n-----END X509 CRL-----\n"):
        assert isinstance(schedule.crl_der(body), Failed)


def _tc(ca_pem: str) -> resources_pb2.TrustConfig:
    return resources_pb2.TrustConfig(name="trustConfigs/t", trust_stores=[resources_pb2.TrustStore(
        trust_anchors=[resources_pb2.TrustAnchor(pem_certificate=ca_pem)],
        crl_sources=[resources_pb2.CrlSource(uri=SOURCE.uri)])])


def test_evaluate_is_the_written_crl_check_plus_rollback() -> None:
    ca = issue("eval CA", ca=True)
    tc = _tc(ca.cert_pem)
    first = schedule.evaluate(SOURCE, signed_crl(ca, 5, [7]), tc, None, 0.0)
    assert isinstance(first, schedule.Accepted) and first.status.crl_number == "5"
    held = first.status
    assert isinstance(schedule.evaluate(SOURCE, held.der_crl, tc, held, 0.0), schedule.Unchanged)
    assert isinstance(schedule.evaluate(SOURCE, signed_crl(ca, 6), tc, held, 0.0), schedule.Accepted)
    cases = {
        "crl_number_rollback": signed_crl(ca, 4),
        "crl_number_reused": signed_crl(ca, 5, [8]),
        "wrong_signature": signed_crl(ca, 6, signer=issue("eval CA", ca=True)),
        "unknown_issuer": signed_crl(issue("stranger", ca=True), 6),
        "delta_crl": signed_crl(ca, 6, delta_of=5),
        "not_a_crl": b"\x30\x03\x02\x01\x00",
    }
    for reason, der in cases.items():
        outcome = schedule.evaluate(SOURCE, der, tc, held, 0.0)
        assert isinstance(outcome, Failed) and outcome.reason == reason, (reason, outcome)


def test_problem_when_failing_longer_than_the_crl_is_valid() -> None:
    ca = issue("problem CA", ca=True)
    start = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    held = schedule.evaluate(SOURCE, signed_crl(ca, 1, this_update=start, next_update=start + dt.timedelta(hours=1)),
                             _tc(ca.cert_pem), None, 0.0)
    assert isinstance(held, schedule.Accepted)
    t0 = start.timestamp()
    ok = schedule.first_runtime(t0)
    failing = schedule.after_failure(ok, SOURCE, t0 + 60, "http_status", "HTTP 500", 0.5)
    assert schedule.problem(held.status, ok, t0 + 120) == ""
    assert schedule.problem(held.status, failing, t0 + 120) == ""  # failing, but the CRL is still good
    assert "expired" in schedule.problem(held.status, failing, t0 + 3601)
    assert "no CRL fetched yet" in schedule.problem(None, failing, t0 + 61)
    assert schedule.problem(None, ok, t0 + 61) == ""  # not fetched yet, not failing: just new
    stale = schedule.problem(held.status, ok, t0 + 3601)  # fetches succeed, but the CA stopped publishing
    assert "expired" in stale and "stopped publishing" in stale


def test_distribution_points_of_the_trust_configs_cas() -> None:
    cdp = x509.CRLDistributionPoints([x509.DistributionPoint(
        [x509.UniformResourceIdentifier("http://pki.example/root.crl"),
         x509.UniformResourceIdentifier("ldap://pki.example/cn=root")], None, None, None)])
    ca = issue("cdp CA", ca=True, extra_extensions=[(cdp, False)])
    tc = _tc(ca.cert_pem)
    tc.trust_stores[0].fetch_distribution_points = True
    found = schedule.sources_of(tc)
    assert [(s.uri, s.distribution_point) for s in found] == [(SOURCE.uri, False),
                                                               ("http://pki.example/root.crl", True)]


@pytest.mark.parametrize(("uri", "problem"), [
    ("", "required"),
    ("ftp://ca/crl", "not allowed"),
    ("ldap://ca/crl", "not allowed"),
    ("http://user:secret@ca/crl", "credentials"),
    ("https://token@ca/crl", "credentials"),
    ("http:///crl", "needs a host"),
    ("http://ca/crl#x", "fragment"),
    ("http://ca/c rl", "spaces"),
    ("http://ca:99999/crl", "not a valid URL"),
    ("file://otherhost/crl", "local file"),
    ("file:relative", "absolute"),
    ("http://ca/" + "a" * 3000, "too long"),
])
def test_write_validation_refuses_bad_sources(uri: str, problem: str) -> None:
    tc = _tc(issue("v CA", ca=True).cert_pem)
    tc.trust_stores[0].crl_sources[0].uri = uri
    violations = validate_trust_config(tc)
    assert [v.field for v in violations] == ["trustStores[0].crlSources[0].uri"]
    assert problem in violations[0].description


@pytest.mark.parametrize("seconds", [0, -1, 7 * 24 * 3600 + 1])
def test_write_validation_bounds_the_refresh_interval(seconds: int) -> None:
    tc = _tc(issue("v CA", ca=True).cert_pem)
    tc.trust_stores[0].crl_sources[0].refresh_interval.seconds = seconds
    assert [v.field for v in validate_trust_config(tc)] == ["trustStores[0].crlSources[0].refreshInterval"]


def test_write_validation_accepts_good_sources_and_refuses_duplicates() -> None:
    tc = _tc(issue("v CA", ca=True).cert_pem)
    store = tc.trust_stores[0]
    store.crl_sources.add(uri="https://vault.internal:8200/v1/pki/crl", refresh_interval={"seconds": 300})
    store.crl_sources.add(uri="file:///var/lib/ca/crl.der")
    assert validate_trust_config(tc) == []
    store.crl_sources.add(uri=SOURCE.uri)
    assert [v.field for v in validate_trust_config(tc)] == ["trustStores[0].crlSources[3].uri"]


def test_shown_uri_hides_the_query() -> None:
    assert schedule.shown_uri("https://storage.example/b/crl?X-Sig=secret") == "https://storage.example/b/crl?…"


@pytest.mark.parametrize(("value", "ok"), [("300s", True), ("1.5s", True), ("5m", False), (300, False)])
def test_manifest_refresh_interval_is_protobufs_duration_text(value: object, ok: bool) -> None:
    import yaml

    from control_plane.manifests import ManifestError, parse_manifest

    ca = issue("m CA", ca=True)
    doc = {"kind": "TrustConfig", "name": "m", "trustStores": [{
        "trustAnchors": [{"pemCertificate": ca.cert_pem}],
        "crlSources": [{"uri": "http://ca.example/crl", "refreshInterval": value}]}]}
    text = yaml.safe_dump(doc)
    if ok:
        [parsed] = parse_manifest(text, "m.yaml")
        assert parsed.resource.trust_stores[0].crl_sources[0].HasField("refresh_interval")  # type: ignore[attr-defined]
    else:
        with pytest.raises(ManifestError, match=r"trustStores\[0\]\.crlSources\[0\]\.refreshInterval: expected a duration"):
            parse_manifest(text, "m.yaml")

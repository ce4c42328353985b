"""The workers' pure pieces: alert → OpenSSL error mapping, configuration versions, metric summing."""

from __future__ import annotations

import pytest

from control_plane.pki import DemoPki
from data_plane.validation.engine import TlsAlert
from data_plane.workers.listeners import WireConfig, parse_backend
from data_plane.workers.observability import PoolMetrics
from data_plane.workers.tls import x509_error_for_alert
from tests.workers.conftest import listener, node_config, policy


@pytest.mark.parametrize(("alert", "code"), [
    (TlsAlert.CERTIFICATE_EXPIRED, 10), (TlsAlert.CERTIFICATE_REVOKED, 23), (TlsAlert.UNKNOWN_CA, 20),
    (TlsAlert.UNSUPPORTED_CERTIFICATE, 26), (TlsAlert.BAD_CERTIFICATE, 28), (TlsAlert.ACCESS_DENIED, 50),
    ("unknown_ca", 20), (999, 28),
])
def test_alert_maps_to_the_x509_error_openssl_turns_into_it(alert: object, code: int) -> None:
    assert x509_error_for_alert(alert) == code


def test_wire_version_names_the_content(demo_pki: DemoPki) -> None:
    a = node_config(demo_pki, [listener("a", 1001, "127.0.0.1:1", policy())])
    same = node_config(demo_pki, [listener("a", 1001, "127.0.0.1:1", policy())])
    other = node_config(demo_pki, [listener("a", 1002, "127.0.0.1:1", policy())])
    assert WireConfig.from_node_config(a).version == WireConfig.from_node_config(same).version
    assert WireConfig.from_node_config(a).version != WireConfig.from_node_config(other).version


def test_backend_address_parsing() -> None:
    assert parse_backend("127.0.0.1:9000") == ("127.0.0.1", 9000)
    assert parse_backend("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError, match="not HOST:PORT"):
        parse_backend("nohost")


def test_pool_metrics_sum_workers_and_keep_dead_workers_counts() -> None:
    metrics = PoolMetrics()
    key = ("mtlsgate_requests_total", ("listeners/a", "200"))
    metrics.update(0, [(key[0], key[1], 5)], {"connections": 2})
    metrics.update(1, [(key[0], key[1], 3)], {"connections": 1})
    assert metrics.totals()[key] == 8
    metrics.retire(0)
    metrics.update(0, [(key[0], key[1], 1)], {"connections": 0})  # the restarted worker counts from zero
    assert metrics.totals()[key] == 9
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in metrics.collect() for s in family.samples}
    assert samples[("mtlsgate_requests_total", (("code", "200"), ("listener", "listeners/a")))] == 9

"""CRL sources through a real control-plane process and the CLI: manifests with crlSources, the fetcher
rolling a publisher's new CRL out as a `system:crl-fetcher` revision, `get -o yaml` status, the YAML
round trip, and `status` naming a source that failed past its CRL's validity."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from control_plane.crl_sources.publisher import CrlPublisher
from control_plane.pki import Issued, issue, now
from tests.control_plane.conftest import ControlPlane
from tests.control_plane.harness import start_control_plane
from tests.crl_sources.crls import signed_crl
from tests.support import wait_until


@pytest.fixture
def control_plane(tmp_path: Path, logs_dir: Path) -> Iterator[ControlPlane]:
    db = tmp_path / "control-plane.db"
    proc, address = start_control_plane(tmp_path, logs_dir, ["--crl-fetch-timeout", "2"], db=db)
    try:
        yield ControlPlane(proc, address, db)
    finally:
        proc.stop()


def manifest(ca: Issued, uri: str, refresh: str = "1s") -> str:
    pem = "".join(f"      {line}\n" for line in ca.cert_pem.strip().splitlines())
    return ("kind: TrustConfig\nname: fetched\ntrustStores:\n- trustAnchors:\n  - pemCertificate: |\n" + pem
            + f"  crlSources:\n  - uri: {uri}\n    refreshInterval: {refresh}\n")


def held(cp: ControlPlane) -> dict:
    out = cp.cli("get", "trust-configs", "fetched", "-o", "yaml", check=True).stdout
    return yaml.safe_load(out).get("crlSourceStatus", [{}])[0]


def test_fetched_crl_rolls_out_and_round_trips(control_plane: ControlPlane, tmp_path: Path) -> None:
    ca = issue("cp test CA", ca=True)
    crl_file = tmp_path / "crl.der"
    crl_file.write_bytes(signed_crl(ca, 1))
    publisher = CrlPublisher(crl_file).start()
    try:
        source = tmp_path / "tc.yaml"
        source.write_text(manifest(ca, publisher.url))
        control_plane.cli("apply", "-f", str(source), check=True)
        wait_until(lambda: held(control_plane).get("crlNumber") == "1", timeout=15, message="first CRL fetched")
        status = held(control_plane)
        assert status["uri"] == publisher.url and status["lastSuccessTime"] and status["nextAttemptTime"]
        assert "derCrl" not in status

        crl_file.write_bytes(signed_crl(ca, 2, [0xABC]))
        wait_until(lambda: held(control_plane).get("crlNumber") == "2", timeout=15, message="new CRL fetched")
        audit = json.loads(control_plane.cli("audit", "trustConfigs/fetched", "-o", "json", check=True).stdout)
        actors = [e["actor"] for e in (audit if isinstance(audit, list) else audit["entries"])]
        assert actors.count("system:crl-fetcher") == 2

        # get -o yaml → apply: the output-only status is ignored and the fetched CRL kept.
        exported = tmp_path / "exported.yaml"
        exported.write_text(control_plane.cli("get", "trust-configs", "fetched", "-o", "yaml", check=True).stdout)
        applied = control_plane.cli("apply", "-f", str(exported), check=True).stdout
        assert "unchanged" in applied
        # The publisher saw conditional requests once it had answered.
        wait_until(lambda: any(inm for _, inm, _, status in publisher.requests if status == 304), timeout=10,
                   message="a conditional GET answered 304")
    finally:
        publisher.stop()


def test_status_names_a_source_failing_past_its_crls_validity(control_plane: ControlPlane, tmp_path: Path) -> None:
    ca = issue("cp problem CA", ca=True)
    crl_file = tmp_path / "crl.der"
    start = now() - dt.timedelta(seconds=1)
    crl_file.write_bytes(signed_crl(ca, 1, this_update=start, next_update=start + dt.timedelta(seconds=5)))
    publisher = CrlPublisher(crl_file).start()
    source = tmp_path / "tc.yaml"
    source.write_text(manifest(ca, publisher.url))
    control_plane.cli("apply", "-f", str(source), check=True)
    wait_until(lambda: held(control_plane).get("crlNumber") == "1", timeout=15, message="first CRL fetched")
    publisher.stop()  # the CA goes away; its CRL runs out
    result = wait_until(lambda: (r := control_plane.cli("status")).returncode == 1 and r, timeout=20,
                        message="status to report the CRL source problem")
    assert "PROBLEM trustConfigs/fetched CRL source" in result.stdout and "expired" in result.stdout
    body = json.loads(control_plane.cli("status", "-o", "json").stdout)
    assert body["crlSourceProblems"][0]["trustConfig"] == "trustConfigs/fetched"
    assert held(control_plane)["lastErrorReason"] == "connect_error"


@pytest.mark.parametrize(("uri", "words"), [
    ("http://admin:hunter2@ca.example/crl", "credentials"),
    ("ldap://ca.example/cn=crl", "not allowed"),
])
def test_bad_sources_are_refused_on_write(control_plane: ControlPlane, tmp_path: Path, uri: str,
                                          words: str) -> None:
    source = tmp_path / "tc.yaml"
    source.write_text(manifest(issue("refused CA", ca=True), uri))
    result = control_plane.cli("apply", "-f", str(source))
    assert result.returncode != 0
    assert "trustStores[0].crlSources[0].uri" in result.stderr and words in result.stderr
    assert "hunter2" not in control_plane.proc.log()

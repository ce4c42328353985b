"""The CRL fetcher against real HTTP servers on loopback serving real CRLs signed by the test CA, writing
into a real SQLite store through the API's write path. Each attempt is driven directly (`refresh`), so
no test waits for a timer."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mtlsgate.v1 import api_pb2, resources_pb2
from prometheus_client import REGISTRY

from control_plane.api.resource_service import CRL_FETCHER_ACTOR, ResourceApi
from control_plane.crl_sources import schedule
from control_plane.crl_sources.fetcher import CrlFetcher, FetchOptions
from control_plane.pki import Issued, issue
from control_plane.resource_names import TRUST_CONFIG
from control_plane.store.sqlite import SqliteStore
from tests.crl_sources.crls import HostilePublisher, signed_crl
from tests.support import free_port

NAME = "trustConfigs/edge"


@dataclass
class World:
    ca: Issued
    store: SqliteStore
    api: ResourceApi
    publisher: HostilePublisher
    fetcher: CrlFetcher
    clock: Iterator[float]

    def source(self) -> schedule.Source:
        return next(s for s in self.fetcher.sources() if s.trust_config == NAME)

    def refresh(self) -> str:
        return asyncio.run(self._refresh())

    async def _refresh(self) -> str:
        try:
            return await self.fetcher.refresh(self.source())
        finally:
            await self.fetcher.close()  # one client per event loop

    def read(self) -> resources_pb2.TrustConfig:
        return self.api.get(api_pb2.GetResourceRequest(name=NAME))  # type: ignore[return-value]

    def held(self) -> resources_pb2.CrlSourceStatus:
        held = schedule.held_for(self.store.state().trust_configs[NAME], self.publisher.url)
        assert held is not None
        return held


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("mtlsgate_crl_fetch_failures_total", {"reason": reason}) or 0.0


@pytest.fixture(scope="module")
def ca() -> Issued:
    return issue("crl test CA", ca=True)


@pytest.fixture
def world(ca: Issued) -> Iterator[World]:
    store = SqliteStore(":memory:")
    api = ResourceApi(TRUST_CONFIG, store, None)
    publisher = HostilePublisher()
    tc = resources_pb2.TrustConfig(name=NAME, trust_stores=[resources_pb2.TrustStore(
        trust_anchors=[resources_pb2.TrustAnchor(pem_certificate=ca.cert_pem)],
        crl_sources=[resources_pb2.CrlSource(uri=publisher.url)])])
    api.create(api_pb2.CreateTrustConfigRequest(trust_config=tc), "alice")
    clock = itertools.count(1_800_000_000.0, 1.0)
    fetcher = CrlFetcher(store, api.write_fetched, FetchOptions(deadline_seconds=1.5, read_timeout_seconds=0.5,
                                                                 connect_timeout_seconds=0.5),
                         clock=lambda: next(clock), rand=lambda: 0.5)
    api.live = fetcher.live_status
    try:
        yield World(ca, store, api, publisher, fetcher, clock)
    finally:
        publisher.stop()
        store.close()


def serve(world: World, der: bytes, etag: str = "") -> None:
    world.publisher.mode, world.publisher.body, world.publisher.etag = "crl", der, etag


def test_new_crl_becomes_a_revision_by_the_fetcher_with_an_audit_entry(world: World) -> None:
    serve(world, signed_crl(world.ca, 5, [0x1234]))
    before = world.store.revision()
    assert world.refresh() == "new"
    assert world.store.revision() == before + 1
    record = world.store.audit(NAME)[-1]
    assert (record.actor, record.method) == (CRL_FETCHER_ACTOR, "UPDATE")
    status = world.read().crl_source_status[0]
    assert (status.crl_number, status.revoked_count, status.last_error) == ("5", 1, "")
    assert status.HasField("last_success_time") and status.HasField("next_attempt_time")
    assert not status.der_crl  # the API shows a digest, not the CRL
    # The node's bundle carries it: the compiled bundle revokes the serial.
    from data_plane.validation.bundle import compile_bundle, trust_bundle_from_trust_config

    bundle = compile_bundle(trust_bundle_from_trust_config(world.store.state().trust_configs[NAME]))
    assert 0x1234 in next(iter(bundle.crls.values()))[0].revoked


def test_pem_body_is_accepted_too(world: World) -> None:
    serve(world, signed_crl(world.ca, 7, pem=True))
    assert world.refresh() == "new"
    assert world.held().crl_number == "7"


@pytest.mark.parametrize(("case", "reason"), [
    ("wrong_key", "wrong_signature"),
    ("lower_number", "crl_number_rollback"),
    ("delta", "delta_crl"),
    ("garbage", "too_large"),
    ("stall", "timeout"),
    ("trickle", "timeout"),
    ("redirect_loop", "too_many_redirects"),
    ("http_500", "http_status"),
    ("refused", "connect_error"),
    ("not_a_crl", "not_a_crl"),
])
def test_bad_answers_are_refused_by_name_and_the_last_good_crl_stays(world: World, case: str, reason: str) -> None:
    good = signed_crl(world.ca, 10, [0xBAD])
    serve(world, good)
    assert world.refresh() == "new"
    revision = world.store.revision()
    counted = failures(reason)
    p = world.publisher
    if case == "wrong_key":
        serve(world, signed_crl(world.ca, 11, signer=issue("impostor", ca=True)))
    elif case == "lower_number":
        serve(world, signed_crl(world.ca, 9))
    elif case == "delta":
        serve(world, signed_crl(world.ca, 11, delta_of=10))
    elif case == "garbage":
        p.mode = "garbage"
    elif case in ("stall", "trickle"):
        p.mode = case
    elif case == "redirect_loop":
        p.mode = "redirect_loop"
    elif case == "http_500":
        p.mode, p.status = "status", 500
    elif case == "not_a_crl":
        serve(world, b"<html>maintenance</html>")
    else:
        tc = world.store.get(NAME)
        assert isinstance(tc, resources_pb2.TrustConfig)
        tc.trust_stores[0].crl_sources[0].uri = f"http://127.0.0.1:{free_port()}/crl"
        world.api.update(api_pb2.UpdateTrustConfigRequest(trust_config=tc), "alice")
        revision = world.store.revision()
    result = world.refresh()
    assert result == reason
    assert world.store.revision() == revision  # nothing written, so nothing pushed
    assert failures(reason) == counted + 1
    status = world.read().crl_source_status[0]
    assert (status.last_error_reason, status.consecutive_failures) == (reason, 1)
    assert status.last_error and status.HasField("failing_since")
    if case != "refused":  # the refused source is a new URI: it never held a CRL
        assert world.held().der_crl == good
    if case == "redirect_loop":
        assert len(p.log) == 1 + 4  # the good fetch, then the first request and 3 redirects followed


def test_unchanged_crl_refetched_100_times_writes_nothing_and_asks_conditionally(world: World) -> None:
    serve(world, signed_crl(world.ca, 3), etag='"v3"')
    assert world.refresh() == "new"
    revision = world.store.revision()
    results = asyncio.run(_refresh_many(world, 100))
    assert results == ["unchanged"] * 100
    assert world.store.revision() == revision
    conditional = [entry for entry in world.publisher.log[1:] if entry == ("/crl", '"v3"', 304)]
    assert len(conditional) == 100
    # A publisher that ignores validators and re-sends the same bytes is also "unchanged".
    world.publisher.etag = ""
    assert world.refresh() == "unchanged"
    assert world.store.revision() == revision


async def _refresh_many(world: World, count: int) -> list[str]:
    try:
        return [await world.fetcher.refresh(world.source()) for _ in range(count)]
    finally:
        await world.fetcher.close()


def test_a_concurrent_edit_is_never_lost(world: World) -> None:
    """A person's edit that lands between the fetcher's read and its write wins; the fetcher decides again
    on the edited TrustConfig and writes on top of it."""
    serve(world, signed_crl(world.ca, 20))
    original = world.fetcher.writer
    edited = []

    def edit_first(tc: resources_pb2.TrustConfig, etag: str) -> object:
        if not edited:
            mine = world.store.get(NAME)
            assert isinstance(mine, resources_pb2.TrustConfig)
            mine.description = "edited by alice meanwhile"
            world.api.update(api_pb2.UpdateTrustConfigRequest(trust_config=mine), "alice")
            edited.append(True)
        return original(tc, etag)

    world.fetcher.writer = edit_first
    assert world.refresh() == "new"
    stored = world.store.state().trust_configs[NAME]
    assert stored.description == "edited by alice meanwhile"
    assert schedule.held_for(stored, world.publisher.url).crl_number == "20"  # type: ignore[union-attr]


def test_a_person_reapplying_the_manifest_keeps_the_fetched_crl(world: World) -> None:
    serve(world, signed_crl(world.ca, 30))
    assert world.refresh() == "new"
    revision = world.store.revision()
    manifest = resources_pb2.TrustConfig()
    manifest.CopyFrom(world.read())  # as `get -o yaml` → apply would: output fields come back and are ignored
    manifest.crl_source_status[0].crl_number = "999"
    world.api.update(api_pb2.UpdateTrustConfigRequest(trust_config=manifest, allow_missing=True), "alice")
    assert world.store.revision() == revision  # unchanged
    assert world.held().crl_number == "30"


def test_file_source_and_its_conditional_read(world: World, tmp_path: Path) -> None:
    crl_file = tmp_path / "ca.crl"
    crl_file.write_bytes(signed_crl(world.ca, 40))
    tc = world.store.get(NAME)
    assert isinstance(tc, resources_pb2.TrustConfig)
    tc.trust_stores[0].crl_sources[0].uri = crl_file.as_uri()
    world.api.update(api_pb2.UpdateTrustConfigRequest(trust_config=tc), "alice")
    assert world.refresh() == "new"
    revision = world.store.revision()
    assert world.refresh() == "unchanged"
    assert world.store.revision() == revision
    fifo = tmp_path / "fifo"
    import os

    os.mkfifo(fifo)
    tc = world.store.get(NAME)
    tc.trust_stores[0].crl_sources[0].uri = fifo.as_uri()  # type: ignore[union-attr]
    world.api.update(api_pb2.UpdateTrustConfigRequest(trust_config=tc), "alice")  # type: ignore[arg-type]
    assert world.refresh() == "file_error"  # a FIFO never blocks the fetcher

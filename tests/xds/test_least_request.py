"""LEAST_REQUEST end to end (SPEC §15): a real control plane, a real proxy node (one worker) and two real
backends on loopback, one answering in 200 ms and one at once. With 8 clients in parallel, the slow one
holds requests in flight, so least request sends it far fewer than round robin's half."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from mtlsgate import resource_types as rt
from mtlsgate.v1 import backends_pb2

from control_plane.pki import DemoPki
from tests.support import free_port, port_open, wait_until
from tests.xds.conftest import Api, Node
from tests.xds.test_backend_services import Backend, Client, _setup

SLOW_SECONDS = 0.2


class SlowBackend(Backend):
    def start(self) -> None:
        super().start()
        assert self.server is not None
        handler = self.server.RequestHandlerClass
        answer = handler.do_GET

        def slow(h: object) -> None:
            time.sleep(SLOW_SECONDS)
            answer(h)

        handler.do_GET = slow  # type: ignore[attr-defined]


@pytest.fixture
def two_backends() -> Iterator[tuple[Backend, Backend]]:
    fast, slow = Backend(), SlowBackend()
    yield fast, slow
    fast.stop()
    slow.stop()


def _shares(port: int, pki: DemoPki, fast: Backend, slow: Backend, seconds: float = 3.0) -> tuple[int, int, int]:
    fast.count = slow.count = 0
    failed = 0
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def loop() -> None:
        nonlocal failed
        client = Client(port, pki)
        while time.monotonic() < stop:
            if client.get() != 200:
                with lock:
                    failed += 1

    threads = [threading.Thread(target=loop) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return fast.count, slow.count, failed


def test_least_request_avoids_the_endpoint_that_holds_requests(
        api: Api, start_node: Callable[..., Node], demo_pki: DemoPki,
        two_backends: tuple[Backend, Backend]) -> None:
    fast, slow = two_backends
    service = backends_pb2.BackendService(name="backendServices/app",
                                          load_balancing=backends_pb2.BackendService.LEAST_REQUEST)
    service.endpoints.add(address=fast.address)
    service.endpoints.add(address=slow.address)
    port = free_port()
    _setup(api, demo_pki, service, port)
    node = start_node("lr-node", "edge", {})
    wait_until(lambda: port_open("127.0.0.1", port) and rt.BACKEND_SERVICE in node.dump().get("versions", {}),
               timeout=30, message="the node serves the listener")
    n_fast, n_slow, failed = _shares(port, demo_pki, fast, slow)
    print(f"LEAST_REQUEST, 8 clients for 3 s: fast {n_fast}, slow ({SLOW_SECONDS}s) {n_slow}, failed {failed}")
    assert failed == 0
    assert n_slow >= 1  # it is not starved: an idle slow endpoint still gets a request
    # Round robin would give each half; the slow endpoint holds each request 200 ms, so with 8 clients
    # least request keeps it to a small share.
    assert n_slow / (n_fast + n_slow) < 0.2, (n_fast, n_slow)

"""HTTP/1.1 forwarding through a worker (SPEC §5): keep-alive, pipelining, bodies in both framings,
hop-by-hop and X-Forwarded-* headers, XFCC modes, bounds, and 502 when the backend is down."""

from __future__ import annotations

import json
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h11
import pytest
from mtlsgate.v1 import resources_pb2

from control_plane.pki import DemoPki
from tests.support import free_port, port_open, wait_until
from tests.workers.conftest import (
    PoolHarness,
    RecordingBackend,
    client_context,
    echoed_headers,
    http_roundtrip,
    https_get,
    listener,
    node_config,
    policy,
)

XFCC = resources_pb2.Listener.ForwardClientCertDetails
SLOW_STARTED = threading.Event()
SLOW_RELEASE = threading.Event()  # the test decides when the in-flight /slow request may finish


class _H11Handler(socketserver.BaseRequestHandler):
    """A backend that reads any request framing (h11) and answers with a *chunked* JSON body."""

    def handle(self) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = self.request.recv(65536)
                conn.receive_data(data)
                if not data:
                    return
                continue
            if isinstance(event, h11.Request):
                request, body = event, b""
                if request.target == b"/slow":
                    SLOW_STARTED.set()
                    SLOW_RELEASE.wait(10)
                while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                    if event is h11.NEED_DATA:
                        conn.receive_data(self.request.recv(65536))
                    elif isinstance(event, h11.Data):
                        body += event.data
                doc = json.dumps({"method": request.method.decode(), "body": body.decode(),
                                  "headers": {k.decode(): v.decode() for k, v in request.headers}}).encode()
                status, reason = (418, b"Custom Teapot") if request.target == b"/teapot" else (200, b"OK")
                out = conn.send(h11.Response(status_code=status, reason=reason,
                                             headers=[("Transfer-Encoding", "chunked")]))
                out += conn.send(h11.Data(data=doc[:10])) + conn.send(h11.Data(data=doc[10:]))
                out += conn.send(h11.EndOfMessage())
                self.request.sendall(out)
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return


@pytest.fixture(scope="module")
def h11_backend() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _H11Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def ports(harness: PoolHarness, backend: RecordingBackend, h11_backend: str, demo_pki: DemoPki) -> dict[str, int]:
    ports = {n: free_port() for n in ("echo", "chunky", "set", "append", "down")}
    allow = policy("ALLOW_INVALID_OR_MISSING_CLIENT_CERT")
    harness.apply(node_config(demo_pki, [
        listener("echo", ports["echo"], backend.address, allow),
        listener("chunky", ports["chunky"], h11_backend, allow),
        listener("set", ports["set"], backend.address, allow, forward_client_cert_details=XFCC.SANITIZE_SET),
        listener("append", ports["append"], backend.address, allow, forward_client_cert_details=XFCC.APPEND_FORWARD),
        listener("down", ports["down"], f"127.0.0.1:{free_port()}", allow),
    ]))
    return ports


def _connect(port: int, pki: DemoPki) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return client_context(pki, "client").wrap_socket(raw, server_hostname="localhost")


def _read_response(sock: ssl.SSLSocket, conn: h11.Connection) -> tuple[int, dict[str, str], bytes]:
    status, headers, body = 0, {}, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
        elif isinstance(event, h11.Response):
            status, headers = event.status_code, {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            conn.start_next_cycle()
            return status, headers, body
        else:
            raise AssertionError(f"unexpected {event!r}")


def test_keep_alive_and_pipelining_on_one_connection(ports: dict[str, int], demo_pki: DemoPki) -> None:
    with _connect(ports["echo"], demo_pki) as sock:
        for i in range(3):
            assert http_roundtrip(sock, f"/ka/{i}")[0] == 200
        sock.sendall(b"GET /p/1 HTTP/1.1\r\nHost: a\r\n\r\nGET /p/2 HTTP/1.1\r\nHost: a\r\n\r\n")
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/p/1", headers=[("Host", "a")]))
        client.send(h11.EndOfMessage())
        first = json.loads(_read_response(sock, client)[2])
        client.send(h11.Request(method="GET", target="/p/2", headers=[("Host", "a")]))
        client.send(h11.EndOfMessage())
        second = json.loads(_read_response(sock, client)[2])
    assert (first["path"], second["path"]) == ("/p/1", "/p/2")


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_request_bodies_and_chunked_responses_are_streamed(ports: dict[str, int], demo_pki: DemoPki,
                                                           framing: str) -> None:
    body = b"x" * 100_000
    headers = [("Host", "a")] + ([("Content-Length", str(len(body)))] if framing == "content-length"
                                 else [("Transfer-Encoding", "chunked")])
    client = h11.Connection(h11.CLIENT)
    with _connect(ports["chunky"], demo_pki) as sock:
        sock.sendall(client.send(h11.Request(method="POST", target="/upload", headers=headers)))
        for offset in range(0, len(body), 30_000):
            sock.sendall(client.send(h11.Data(data=body[offset:offset + 30_000])))
        sock.sendall(client.send(h11.EndOfMessage()))
        status, resp_headers, payload = _read_response(sock, client)
        assert status == 200 and resp_headers.get("transfer-encoding") == "chunked"
        seen = json.loads(payload)
        assert seen["method"] == "POST" and len(seen["body"]) == len(body)
        assert seen["headers"]["x-client-cert-chain-verified"] == "true"
        # the connection is still usable afterwards
        sock.sendall(client.send(h11.Request(method="GET", target="/again", headers=[("Host", "a")])))
        sock.sendall(client.send(h11.EndOfMessage()))
        assert _read_response(sock, client)[0] == 200


def test_head_request_has_no_body_and_keeps_the_connection(ports: dict[str, int], demo_pki: DemoPki) -> None:
    client = h11.Connection(h11.CLIENT)
    with _connect(ports["echo"], demo_pki) as sock:
        sock.sendall(client.send(h11.Request(method="HEAD", target="/", headers=[("Host", "a")])))
        sock.sendall(client.send(h11.EndOfMessage()))
        status, headers, body = _read_response(sock, client)
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0
        assert http_roundtrip(sock, "/after-head")[0] == 200


def test_hop_by_hop_and_forwarded_headers(ports: dict[str, int], demo_pki: DemoPki) -> None:
    _, _, body = https_get(ports["echo"], client_context(demo_pki, "client"), headers={
        "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "timeout=5",
        "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "http", "X-Custom": "kept"})
    seen = echoed_headers(body)
    assert "x-secret-hop" not in seen and "keep-alive" not in seen
    assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-custom"] == "kept" and seen["host"] == "localhost"


def test_xfcc_modes(ports: dict[str, int], demo_pki: DemoPki) -> None:
    spoof = {"X-Forwarded-Client-Cert": "By=upstream;Hash=abc"}
    _, _, body = https_get(ports["set"], client_context(demo_pki, "client"), headers=spoof)
    xfcc = echoed_headers(body)["x-forwarded-client-cert"]
    assert xfcc.startswith("Hash=") and "upstream" not in xfcc
    _, _, body = https_get(ports["append"], client_context(demo_pki, "client"), headers=spoof)
    xfcc = echoed_headers(body)["x-forwarded-client-cert"]
    assert xfcc.startswith("By=upstream;Hash=abc,Hash=")
    _, _, body = https_get(ports["echo"], client_context(demo_pki, "client"), headers=spoof)
    assert "x-forwarded-client-cert" not in echoed_headers(body)  # SANITIZE (default)


def test_forwarded_lines_of_one_request_never_reach_the_next(ports: dict[str, int], demo_pki: DemoPki) -> None:
    """Our X-Forwarded-* and XFCC lines are made once per connection: a request that brings its own
    X-Forwarded-For or XFCC gets them made for it, and neither leaks into the requests around it."""
    spoof = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Client-Cert": "By=upstream;Hash=abc"}
    with _connect(ports["append"], demo_pki) as sock:
        seen = [echoed_headers(http_roundtrip(sock, f"/{i}", spoof if i == 1 else None)[2]) for i in range(3)]
    assert [s["x-forwarded-for"] for s in seen] == ["127.0.0.1", "203.0.113.9, 127.0.0.1", "127.0.0.1"]
    ours = seen[0]["x-forwarded-client-cert"]
    assert ours.startswith("Hash=") and seen[2]["x-forwarded-client-cert"] == ours
    assert seen[1]["x-forwarded-client-cert"] == "By=upstream;Hash=abc," + ours


def test_backend_down_is_502_with_a_reason(ports: dict[str, int], demo_pki: DemoPki) -> None:
    status, _, body = https_get(ports["down"], client_context(demo_pki, "client"))
    assert status == 502 and b"cannot connect to backend" in body


def test_oversized_headers_get_431(ports: dict[str, int], demo_pki: DemoPki) -> None:
    status, _, _ = https_get(ports["echo"], client_context(demo_pki, "client"), headers={"X-Big": "a" * 70_000})
    assert status == 431
    assert https_get(ports["echo"], client_context(demo_pki, "client"))[0] == 200


def test_close_drains_in_flight_requests_then_stops(h11_backend: str, demo_pki: DemoPki) -> None:
    harness = PoolHarness(workers=1)
    port = free_port()
    harness.apply(node_config(demo_pki, [listener("drain", port, h11_backend, None)]))
    results: list[int] = []
    client = threading.Thread(target=lambda: results.append(
        https_get(port, client_context(demo_pki, None), "/slow", timeout=10)[0]))
    SLOW_STARTED.clear()
    SLOW_RELEASE.clear()
    client.start()
    assert SLOW_STARTED.wait(10)
    closer = threading.Thread(target=harness.close)  # SIGTERM path: stop accepting, drain, exit
    closer.start()
    wait_until(lambda: not port_open("127.0.0.1", port), timeout=10, message="the listener to stop accepting")
    assert client.is_alive() and closer.is_alive(), "the pool must wait for the in-flight request"
    SLOW_RELEASE.set()
    closer.join(15)
    client.join(10)
    assert results == [200]
    assert harness.pool.pids() == []


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_expect_100_continue_is_relayed(ports: dict[str, int], demo_pki: DemoPki, tmp_path: Path) -> None:
    """curl holds an upload back until 100 Continue (here up to 20 s): the backend's 100 must reach it."""
    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"u" * 300_000)
    started = time.monotonic()
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "--expect100-timeout", "20", "-T", str(upload),
         "-H", "Expect: 100-continue", "--cacert", str(demo_pki.path("ca_cert")),
         "--cert", str(demo_pki.path("client_cert")), "--key", str(demo_pki.path("client_key")),
         "--resolve", f"localhost:{ports['echo']}:127.0.0.1", f"https://localhost:{ports['echo']}/up"],
        capture_output=True, text=True, timeout=40)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["body_bytes"] == 300_000
    assert time.monotonic() - started < 10


def test_status_and_reason_are_relayed(ports: dict[str, int], demo_pki: DemoPki) -> None:
    with _connect(ports["chunky"], demo_pki) as sock:
        sock.sendall(b"GET /teapot HTTP/1.1\r\nHost: a\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 418 Custom Teapot\r\n")

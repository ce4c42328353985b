"""The pure head rewriting of forwarding.py (SPEC §5): hop-by-hop removal, anti-spoofing in any case,
X-Forwarded-*, XFCC hook, framing decisions."""

from __future__ import annotations

from data_plane.workers.forwarding import request_head, response_head


def _head_lines(data: bytes) -> list[bytes]:
    assert data.endswith(b"\r\n\r\n")
    return data[:-4].split(b"\r\n")


def test_request_head_strips_spoofed_hop_by_hop_and_sets_forwarding_headers() -> None:
    incoming = [(b"Host", b"app"), (b"X-CLIENT-CERT-PRESENT", b"true"), (b"Connection", b"keep-alive, X-Hop"),
                (b"X-Hop", b"1"), (b"Keep-Alive", b"5"), (b"X-Forwarded-For", b"10.0.0.1"),
                (b"X-Forwarded-Proto", b"http"), (b"x-forwarded-client-cert", b"Hash=evil"), (b"Accept", b"*/*")]
    data = request_head(b"GET", b"/a?b=c", incoming, peer=b"127.0.0.9",
                        spoofable=frozenset({b"x-client-cert-present"}),
                        certificate_headers=b"X-Client-Cert-Present: false\r\n", xfcc=None,
                        chunked=False, content_length=None)
    assert _head_lines(data) == [
        b"GET /a?b=c HTTP/1.1", b"Host: app", b"Accept: */*", b"X-Forwarded-For: 10.0.0.1, 127.0.0.9",
        b"X-Forwarded-Proto: https", b"X-Client-Cert-Present: false"]


def test_request_head_xfcc_hook_sees_incoming_values_and_body_keeps_its_framing() -> None:
    seen: list[list[bytes]] = []

    def xfcc(incoming: list[bytes]) -> bytes:
        seen.append(incoming)
        return b",".join([*incoming, b"Hash=ours"])

    data = request_head(b"POST", b"/", [(b"X-Forwarded-Client-Cert", b"Hash=up")], peer=b"::1",
                        spoofable=frozenset(), certificate_headers=b"", xfcc=xfcc, chunked=True,
                        content_length=None)
    assert seen == [[b"Hash=up"]]
    assert b"X-Forwarded-Client-Cert: Hash=up,Hash=ours\r\n" in data
    assert data.endswith(b"Transfer-Encoding: chunked\r\n\r\n")
    data = request_head(b"POST", b"/", [], peer=b"::1", spoofable=frozenset(), certificate_headers=b"",
                        xfcc=None, chunked=False, content_length=b"12")
    assert data.endswith(b"Content-Length: 12\r\n\r\n")


def test_response_head_framing() -> None:
    kept = response_head(200, b"OK", [(b"Content-Length", b"3"), (b"Connection", b"keep-alive")],
                         request_method=b"GET", request_http_version="1.1", keep_alive=True)
    assert kept.data == b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n" and not kept.chunked and kept.keep_alive
    rechunked = response_head(200, b"", [(b"Transfer-Encoding", b"chunked")], request_method=b"GET",
                              request_http_version="1.1", keep_alive=True)
    assert rechunked.chunked and rechunked.data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert rechunked.data.count(b"chunked") == 1
    http10 = response_head(200, b"OK", [], request_method=b"GET", request_http_version="1.0", keep_alive=True)
    assert not http10.chunked and not http10.keep_alive and b"Connection: close\r\n" in http10.data
    head = response_head(200, b"OK", [], request_method=b"HEAD", request_http_version="1.1", keep_alive=True)
    assert not head.chunked and head.keep_alive
    assert response_head(495, b"", [], request_method=b"GET", request_http_version="1.1",
                         keep_alive=False).data.startswith(b"HTTP/1.1 495 SSL Certificate Error\r\n")

"""The pure response-head rewriting (data_plane/http/response.py): hop-by-hop out, framing decided."""

from __future__ import annotations

from data_plane.http.response import response_head


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


def test_headers_a_connection_header_names_are_dropped_wherever_they_are() -> None:
    """`Connection: keep-alive` takes the one-pass path; any other token makes the named headers hop-by-hop
    too (RFC 9110 §7.6.1), before or after the Connection header, in any case — `close` included."""
    headers = [(b"X-Before", b"1"), (b"Content-Length", b"0"), (b"connection", b"Keep-Alive, X-BEFORE, x-after"),
               (b"X-After", b"2"), (b"X-Kept", b"3"), (b"Keep-Alive", b"timeout=5")]
    out = response_head(200, b"OK", headers, request_method=b"GET", request_http_version="1.1",
                        keep_alive=True).data
    assert out == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Kept: 3\r\n\r\n"
    for value, kept in ((b"keep-alive", b"Close: x\r\n"), (b"Keep-Alive", b"Close: x\r\n"), (b"close", b""),
                        (b"Close", b"")):
        out = response_head(200, b"OK", [(b"Connection", value), (b"Content-Length", b"0"), (b"Close", b"x")],
                            request_method=b"GET", request_http_version="1.1", keep_alive=True).data
        assert out == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + kept + b"\r\n", value

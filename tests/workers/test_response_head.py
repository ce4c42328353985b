"""The pure response-head rewriting (data_plane/http/response.py): hop-by-hop out, framing decided."""

from __future__ import annotations

from data_plane.http.response import forward_head, response_head


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


def _parsed(raw: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """The head as httptools reads it field by field (the callbacks forward_head does without)."""
    import httptools

    class Fields:
        def __init__(self) -> None:
            self.reason, self.headers = b"", []

        def on_status(self, reason: bytes) -> None:
            self.reason += reason

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

    fields = Fields()
    parser = httptools.HttpResponseParser(fields)
    parser.feed_data(raw)
    return parser.get_status_code(), fields.reason, fields.headers


HEADS = [
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n",  # the usual one
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 3\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nClose: x\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: x-secret\r\nX-Secret: 1\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Connection: kept\r\nConnection-Id: kept\r\nX-Te: kept\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nUpgrade: h2c\r\nTE: trailers\r\nTrailer: x\r\nProxy-Authenticate: y\r\n\r\n",
    b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\nProxy-Connection: keep-alive\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
    b"HTTP/1.1 495 \r\nContent-Type: text/plain\r\n\r\n",
]


def test_forward_head_says_what_the_field_by_field_path_says() -> None:
    """The backend's head as it arrived, forwarded without a callback per field, comes out byte for byte as
    `response_head` makes it from httptools' fields — for the usual head and for every hop-by-hop case, for
    GET and HEAD, HTTP/1.1 and 1.0 clients, kept alive or not."""
    for raw in HEADS:
        status, reason, headers = _parsed(raw)
        for method, version, keep_alive in ((b"GET", "1.1", True), (b"HEAD", "1.1", True), (b"GET", "1.0", True),
                                            (b"GET", "1.1", False)):
            fast = forward_head(status, raw, request_method=method, request_http_version=version,
                                keep_alive=keep_alive)
            slow = response_head(status, reason, headers, request_method=method, request_http_version=version,
                                 keep_alive=keep_alive)
            assert (fast.data, fast.chunked, fast.keep_alive) == (slow.data, slow.chunked, slow.keep_alive), raw


def test_forward_head_cuts_only_whole_hop_by_hop_lines() -> None:
    """Names that merely contain a hop-by-hop name stay; whitespace around the one Connection value does not
    keep that line; the usual head is copied with just its Connection line cut out."""
    usual = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 03 Dec 2026 14:40:00 GMT\r\n"
             b"Content-Length: 3\r\nConnection:  keep-alive \t\r\nX-Connection: close\r\nETag:\"a\"\r\n\r\n")
    out = forward_head(200, usual, request_method=b"GET", request_http_version="1.1", keep_alive=True)
    assert out.data == (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 03 Dec 2026 14:40:00 GMT\r\n"
                        b"Content-Length: 3\r\nX-Connection: close\r\nETag:\"a\"\r\n\r\n")
    assert not out.chunked and out.keep_alive
    # a Transfer-Encoding after the Connection line: never forwarded, the body re-framed by us
    chunked = b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    out = forward_head(200, chunked, request_method=b"GET", request_http_version="1.1", keep_alive=True)
    assert out.data == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" and out.chunked

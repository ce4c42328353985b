"""The response head a backend's answer becomes for the client (hop-by-hop headers out, framing
decided), as a pure function; `http_proxy.py` calls it on every response."""

from __future__ import annotations

import http
from collections.abc import Sequence
from dataclasses import dataclass

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authenticate", b"proxy-authorization",
})
# A Connection value that names no header beyond HOP_BY_HOP (the usual one), so nothing more to drop. Not
# `close`: a `Close` header field would be named by it (RFC 9110 §7.6.1), so it takes the general path.
CONNECTION_OPTIONS = frozenset({b"keep-alive"})
REASONS = {status.value: status.phrase for status in http.HTTPStatus} | {
    495: "SSL Certificate Error", 496: "SSL Certificate Required"}  # nginx's codes

Headers = Sequence[tuple[bytes, bytes]]


def connection_tokens(value: bytes, listed: set[bytes] | None) -> set[bytes]:
    """Header names a Connection header lists (they are hop-by-hop too)."""
    tokens = {token.strip().lower() for token in value.split(b",")}
    return tokens if listed is None else listed | tokens


@dataclass(slots=True)
class ResponseHead:
    data: bytes
    chunked: bool  # the body must be re-framed as chunked for the client
    keep_alive: bool  # the client connection stays open after this response


def response_head(status: int, reason: bytes, headers: Headers, *, request_method: bytes,
                  request_http_version: str, keep_alive: bool) -> ResponseHead:
    """The response head for the client. A body without Content-Length (chunked or close-delimited at
    the backend) is sent chunked to HTTP/1.1 clients and close-delimited to HTTP/1.0 ones. Runs on every
    response: one pass, no per-header objects beyond the line itself (B2)."""
    has_length = False
    listed: set[bytes] | None = None
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason or REASONS.get(status, "Unknown").encode())]
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            # `Connection: keep-alive` (the usual value) names no other header
            if lname == b"connection" and value.lower() not in CONNECTION_OPTIONS:
                listed = connection_tokens(value, listed)
            continue
        if lname == b"content-length":
            has_length = True
        lines.append(name + b": " + value + b"\r\n")
    if listed is not None:  # rare: a Connection header named other headers, which are hop-by-hop too
        lines[1:] = [name + b": " + value + b"\r\n" for name, value in headers
                     if (lname := name.lower()) not in HOP_BY_HOP and lname not in listed]
    chunked = False
    if not has_length and request_method != b"HEAD" and status != 204 and status != 304:
        if request_http_version == "1.1":
            chunked = True
            lines.append(b"Transfer-Encoding: chunked\r\n")
        else:
            keep_alive = False
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    return ResponseHead(b"".join(lines), chunked, keep_alive)


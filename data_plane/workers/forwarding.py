"""How the reverse proxy rewrites HTTP/1.1 heads (SPEC §5), as pure functions: the request head sent to
the backend (hop-by-hop headers out, anti-spoofing, X-Forwarded-*, the certificate headers and XFCC in)
and the response head sent to the client (hop-by-hop out, framing decided). No I/O; `http_proxy.py`
calls these on every request.
"""

from __future__ import annotations

import http
from collections.abc import Callable, Sequence
from dataclasses import dataclass

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authenticate", b"proxy-authorization",
})
XFCC_HEADER = b"x-forwarded-client-cert"
REASONS = {status.value: status.phrase for status in http.HTTPStatus} | {
    495: "SSL Certificate Error", 496: "SSL Certificate Required"}  # nginx's codes

Headers = Sequence[tuple[bytes, bytes]]


def _connection_tokens(value: bytes, listed: set[bytes] | None) -> set[bytes]:
    """Header names a Connection header lists (they are hop-by-hop too)."""
    tokens = {token.strip().lower() for token in value.split(b",")}
    return tokens if listed is None else listed | tokens


def request_head(method: bytes, target: bytes, headers: Headers, *, peer: bytes, spoofable: frozenset[bytes],
                 certificate_headers: bytes, xfcc: Callable[[list[bytes]], bytes] | None,
                 chunked: bool, content_length: bytes | None) -> bytes:
    """The request head for the backend.

    `spoofable`: lowercase names of the headers we set (dropped from the client's request whatever
    their case). `certificate_headers`: our rendered `Name: value\\r\\n` lines. `xfcc(incoming values)`
    returns the x-forwarded-client-cert value to send (b"" for none); None = SANITIZE, so the client's
    is just dropped. The body keeps the framing it arrived with."""
    listed: set[bytes] | None = None
    incoming_xfcc: list[bytes] = []
    forwarded_for = b""
    kept = []
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection":
                listed = _connection_tokens(value, listed)
        elif lname == XFCC_HEADER:
            incoming_xfcc.append(value)
        elif lname == b"x-forwarded-for":
            forwarded_for = forwarded_for + b", " + value if forwarded_for else value
        elif lname != b"x-forwarded-proto" and lname not in spoofable:
            kept.append((lname, name + b": " + value + b"\r\n"))
    lines = [method + b" " + target + b" HTTP/1.1\r\n"]
    lines += [line for lname, line in kept if listed is None or lname not in listed]
    lines.append(b"X-Forwarded-For: " + (forwarded_for + b", " + peer if forwarded_for else peer) + b"\r\n")
    lines.append(b"X-Forwarded-Proto: https\r\n")
    lines.append(certificate_headers)
    if xfcc is not None:
        value = xfcc(incoming_xfcc)
        if value:
            lines.append(b"X-Forwarded-Client-Cert: " + value + b"\r\n")
    if chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    elif content_length is not None:
        lines.append(b"Content-Length: " + content_length + b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


@dataclass(frozen=True)
class ResponseHead:
    data: bytes
    chunked: bool  # the body must be re-framed as chunked for the client
    keep_alive: bool  # the client connection stays open after this response


def response_head(status: int, reason: bytes, headers: Headers, *, request_method: bytes,
                  request_http_version: str, keep_alive: bool) -> ResponseHead:
    """The response head for the client. A body without Content-Length (chunked or close-delimited at
    the backend) is sent chunked to HTTP/1.1 clients and close-delimited to HTTP/1.0 ones."""
    has_length = False
    listed: set[bytes] | None = None
    kept = []
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection":
                listed = _connection_tokens(value, listed)
            continue
        if lname == b"content-length":
            has_length = True
        kept.append((lname, name + b": " + value + b"\r\n"))
    no_body = request_method == b"HEAD" or status in (204, 304)
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason or REASONS.get(status, "Unknown").encode())]
    lines += [line for lname, line in kept if listed is None or lname not in listed]
    chunked = False
    if not has_length and not no_body:
        if request_http_version == "1.1":
            chunked = True
            lines.append(b"Transfer-Encoding: chunked\r\n")
        else:
            keep_alive = False
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    return ResponseHead(b"".join(lines), chunked, keep_alive)

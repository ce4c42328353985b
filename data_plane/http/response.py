"""The response head a backend's answer becomes for the client (hop-by-hop headers out, framing
decided), as pure functions; `data_plane/workers/backend.py` calls `forward_head` on every response."""

from __future__ import annotations

import http
import re
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

# In a lowercased header block whose every line starts with CRLF: a hop-by-hop field line, and its value.
_HOP_BY_HOP_LINE = re.compile(rb"\r\n(" + b"|".join(sorted(HOP_BY_HOP)) + rb"):[ \t]*([^\r]*)")
_CONTENT_LENGTH_LINE = b"\r\ncontent-length:"


def connection_tokens(value: bytes, listed: set[bytes] | None) -> set[bytes]:
    """Header names a Connection header lists (they are hop-by-hop too)."""
    tokens = {token.strip().lower() for token in value.split(b",")}
    return tokens if listed is None else listed | tokens


@dataclass(slots=True)
class ResponseHead:
    data: bytes
    chunked: bool  # the body must be re-framed as chunked for the client
    keep_alive: bool  # the client connection stays open after this response


def forward_head(status: int, raw: bytes, *, request_method: bytes, request_http_version: str,
                 keep_alive: bool) -> ResponseHead:
    """The response head for the client, from the backend's head as it arrived: `raw` runs from the status
    line through the empty line and has been parsed by httptools, which admits only CRLF line ends, no
    obs-fold, no whitespace before a colon and no CR, LF or NUL in a value. The usual head — nothing
    hop-by-hop but one `Connection: keep-alive` — is copied with that line cut out: no work per header
    (B2). Any other goes through `response_head`, line by line."""
    eol = raw.index(b"\r\n")
    status_line = raw[:eol]
    block = raw[eol:-2]  # "\r\nName: value" for each field line, then "\r\n"
    lowered = block.lower()
    hop = _HOP_BY_HOP_LINE.search(lowered)
    if hop is not None:
        if hop.group(1) != b"connection" or hop.group(2).rstrip(b" \t") not in CONNECTION_OPTIONS \
                or _HOP_BY_HOP_LINE.search(lowered, hop.end()) is not None:
            headers = [(name, value.strip(b" \t")) for name, _, value in
                       (line.partition(b":") for line in block[2:-2].split(b"\r\n") if line)]
            return response_head(status, status_line[13:], headers, request_method=request_method,
                                 request_http_version=request_http_version, keep_alive=keep_alive)
        block = block[:hop.start()] + block[hop.end():]
    if status_line[:9] != b"HTTP/1.1 " or len(status_line) <= 13:  # HTTP/1.0, or no reason phrase
        status_line = _status_line(status, status_line[13:])
    has_length = lowered.find(_CONTENT_LENGTH_LINE) != -1  # (`in` would try an int first, and raise inside)
    if has_length and keep_alive:  # the usual response: _framing's answer, without its call
        return ResponseHead(status_line + block + b"\r\n", False, True)
    framing, chunked, keep_alive = _framing(status, has_length, request_method, request_http_version, keep_alive)
    return ResponseHead(status_line + block + framing, chunked, keep_alive)


def response_head(status: int, reason: bytes, headers: Headers, *, request_method: bytes,
                  request_http_version: str, keep_alive: bool) -> ResponseHead:
    """The response head for the client from parsed header fields. A body without Content-Length
    (chunked or close-delimited at the backend) is sent chunked to HTTP/1.1 clients and close-delimited
    to HTTP/1.0 ones."""
    has_length = False
    listed: set[bytes] | None = None
    lines = [_status_line(status, reason) + b"\r\n"]
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
    if listed is not None:  # a Connection header named other headers, which are hop-by-hop too
        lines[1:] = [name + b": " + value + b"\r\n" for name, value in headers
                     if (lname := name.lower()) not in HOP_BY_HOP and lname not in listed]
    framing, chunked, keep_alive = _framing(status, has_length, request_method, request_http_version, keep_alive)
    lines.append(framing)
    return ResponseHead(b"".join(lines), chunked, keep_alive)


def _status_line(status: int, reason: bytes) -> bytes:
    return b"HTTP/1.1 %d %s" % (status, reason or REASONS.get(status, "Unknown").encode())


def _framing(status: int, has_length: bool, request_method: bytes, request_http_version: str,
             keep_alive: bool) -> tuple[bytes, bool, bool]:
    """The head's last lines (ours), whether the body is re-framed as chunked, and whether the client
    connection stays open."""
    lines = b""
    chunked = False
    if not has_length and request_method != b"HEAD" and status != 204 and status != 304:
        if request_http_version == "1.1":
            chunked = True
            lines = b"Transfer-Encoding: chunked\r\n"
        else:
            keep_alive = False
    if not keep_alive:
        lines += b"Connection: close\r\n"
    return lines + b"\r\n", chunked, keep_alive

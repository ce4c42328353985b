"""What a client's request head becomes before anything of it reaches a backend (SPEC §5, §11).

`read_head` validates the whole head (framing, Host, version, header bytes) and decides what is
forwarded: hop-by-hop headers and the names `Connection` lists out, anti-spoofing with `_` read as `-`,
underscore names dropped unless the listener allows them, absolute-form turned into origin-form.
`upstream_head` (`our_headers`, `render_head`) renders the decision with exactly one framing header,
ours. `may_resend` is the single allowed retry of §11. Pure functions: no sockets, no clocks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from data_plane.http.response import CONNECTION_OPTIONS as _CONNECTION_OPTIONS
from data_plane.http.response import HOP_BY_HOP, connection_tokens

# RFC 9110 §9.2.2
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
XFCC_HEADER = b"x-forwarded-client-cert"
# Characters an authority (RFC 3986 host[:port]) may hold; a comma or space means merged or forged Hosts.
_AUTHORITY_BYTES = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+;=:[]%"

# CR, LF and NUL in a value (httptools refuses them while parsing; checked here too, so that the rule
# holds whatever parsed the head). One regex search is cheaper than three `in` tests.
_FORBIDDEN_IN_VALUE = re.compile(rb"[\r\n\x00]").search

Headers = Sequence[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Refusal:
    """The request is answered `status` by us and never forwarded; the connection is closed after."""

    status: int
    reason: str


@dataclass(slots=True)
class RequestHead:
    """A validated request head, as it will be forwarded."""

    method: bytes
    target: bytes  # origin-form (or `*` for OPTIONS)
    http_version: str
    host: bytes  # empty for an HTTP/1.0 request without Host (RFC 9112 §3.2: then sent empty)
    headers: list[bytes]  # end-to-end `Name: value\r\n` lines that go to the backend, client order
    chunked: bool
    content_length: int | None
    keep_alive: bool
    expect_continue: bool = False
    forwarded_for: bytes = b""  # the client's X-Forwarded-For values, joined
    incoming_xfcc: list[bytes] | None = None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        self.refusal = Refusal(status, reason)


def read_head(method: bytes, target: bytes, http_version: str, headers: Headers, *, keep_alive: bool,
              spoofable: frozenset[bytes], allow_underscores: bool = False) -> RequestHead | Refusal:
    """Validate a parsed head and decide what of it is forwarded.

    `spoofable`: lowercase names of the headers the listener sets, `_` already read as `-` (dropped from
    the client's request whatever their case and spelling). `keep_alive`: the parser's reading of
    Connection and the version. Runs on every request: one pass over the headers, no exceptions on the
    common path (B7 allows the hardening 5 % CPU per request)."""
    if http_version != "1.1" and http_version != "1.0":
        return Refusal(505, f"HTTP/{http_version} is not supported (only HTTP/1.0 and HTTP/1.1)")
    if method == b"CONNECT":
        return Refusal(405, "CONNECT is not supported")
    hosts: list[bytes] = []
    content_lengths: list[bytes] | None = None  # the rare lists are made when first needed
    codings: list[bytes] | None = None
    listed: set[bytes] | None = None
    expect_continue = False
    forwarded_for = b""
    incoming_xfcc: list[bytes] | None = None
    lines: list[bytes] = []
    special = _SPECIAL.get
    forbidden = _FORBIDDEN_IN_VALUE
    for name, value in headers:
        if forbidden(value):
            return Refusal(400, f"invalid character in the value of {name.decode('latin-1')}")
        lname = name.lower()
        kind = special(lname)
        if kind is None:
            if lname.find(b"_") != -1:  # (not `in`: bytes.__contains__ tries an int first, and raises inside)
                # CGI/WSGI backends fold `_` and `-` together: X_Client_Cert_SPIFFE would pass as ours.
                if not allow_underscores:
                    continue
                folded = lname.replace(b"_", b"-")
                if folded in spoofable or folded in _SPECIAL:
                    continue
            elif lname in spoofable:
                continue
            lines.append(name + b": " + value + b"\r\n")
        elif kind == _HOST:
            hosts.append(value.strip())
        elif kind == _LENGTH:
            content_lengths = [*(content_lengths or ()), value.strip()]
        elif kind == _CODING:
            codings = [*(codings or ()), *(c.strip().lower() for c in value.split(b","))]
        elif kind == _CONNECTION:
            if value.lower() not in _CONNECTION_OPTIONS:  # `keep-alive` names no other header
                listed = connection_tokens(value, listed)
        elif kind == _XFF:
            forwarded_for = forwarded_for + b", " + value if forwarded_for else value
        elif kind == _XFCC:
            incoming_xfcc = [*(incoming_xfcc or ()), value]
        elif kind == _EXPECT:
            expect_continue = value.strip().lower() == b"100-continue"
            lines.append(name + b": " + value + b"\r\n")
        # else: hop-by-hop or one we set: dropped

    chunked = False
    content_length = None
    if codings or content_lengths:
        framing = _framing(codings or [], content_lengths or [], http_version)
        if isinstance(framing, Refusal):
            return framing
        chunked, content_length = framing
    if len(hosts) == 1 and target[:1] == b"/":
        host = hosts[0]  # the common case
        if host.lstrip(_AUTHORITY_BYTES):  # a byte outside the set is left over (cheaper than translate)
            return Refusal(400, "Host is not a valid authority")
    else:
        try:
            host = _host(target, hosts, http_version)
            if target[:1] != b"/":
                target = _origin_form(method, target)
        except _Refused as refused:
            return refused.refusal
    if listed is not None:
        # rare: Connection named other headers, which are hop-by-hop too (a line's name is up to its colon)
        lines = [line for line in lines if line[:line.index(b":")].lower() not in listed]
    return RequestHead(method, target, http_version, host, lines, chunked, content_length, keep_alive,
                       expect_continue, forwarded_for, incoming_xfcc)


def _framing(codings: list[bytes], content_lengths: list[bytes], http_version: str) -> tuple[bool, int | None] | Refusal:
    if codings:
        if content_lengths:
            return Refusal(400, "Content-Length together with Transfer-Encoding")
        if http_version == "1.0":
            return Refusal(400, "Transfer-Encoding in an HTTP/1.0 request")
        if any(c != b"chunked" for c in codings):
            return Refusal(501, "Transfer-Encoding other than chunked is not supported")
        if len(codings) > 1:
            return Refusal(400, "Transfer-Encoding: chunked applied more than once")
        return True, None
    if len(content_lengths) > 1:
        return Refusal(400, "more than one Content-Length")
    if not content_lengths[0].isdigit() or len(content_lengths[0]) > 18:
        return Refusal(400, "Content-Length is not a decimal number")
    return False, int(content_lengths[0])


_HOST, _LENGTH, _CODING, _CONNECTION, _XFF, _XFCC, _EXPECT, _DROP = range(8)
_SPECIAL: dict[bytes, int] = {name: _DROP for name in HOP_BY_HOP} | {
    b"host": _HOST, b"content-length": _LENGTH, b"transfer-encoding": _CODING, b"connection": _CONNECTION,
    b"x-forwarded-for": _XFF, XFCC_HEADER: _XFCC, b"expect": _EXPECT, b"x-forwarded-proto": _DROP,
}


def _host(target: bytes, hosts: list[bytes], http_version: str) -> bytes:
    if len(hosts) > 1:
        raise _Refused(400, "more than one Host")
    if not hosts and http_version == "1.1":
        raise _Refused(400, "HTTP/1.1 request without Host")
    host = hosts[0] if hosts else b""
    if target[:1] != b"/" and target != b"*":
        # absolute-form: the target's authority wins over any Host (RFC 9112 §3.2.2)
        host = _authority(target)
    if host.lstrip(_AUTHORITY_BYTES):
        raise _Refused(400, "Host is not a valid authority")
    return host


def _split_absolute(target: bytes) -> tuple[bytes, bytes]:
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise _Refused(400, "request target is neither origin-form nor an http(s) absolute URI")
    end = len(rest)
    for delimiter in (b"/", b"?", b"#"):
        index = rest.find(delimiter)
        if index != -1:
            end = min(end, index)
    authority, path = rest[:end], rest[end:]
    if b"@" in authority or not authority:
        raise _Refused(400, "request target has no authority or carries user information")
    return authority, path


def _authority(target: bytes) -> bytes:
    return _split_absolute(target)[0]


def _origin_form(method: bytes, target: bytes) -> bytes:
    if target == b"*":
        if method != b"OPTIONS":
            raise _Refused(400, "asterisk-form target is only allowed with OPTIONS")
        return target
    path = _split_absolute(target)[1].partition(b"#")[0]
    if not path or path[:1] == b"?":
        path = b"/" + path
    return path


def upstream_head(head: RequestHead, *, peer: bytes, certificate_headers: bytes,
                  xfcc: Callable[[list[bytes]], bytes] | None) -> bytes:
    """The request head for the backend: Host first, the client's end-to-end headers, then ours
    (X-Forwarded-*, certificate headers, XFCC) and exactly one framing header. `certificate_headers`:
    rendered `Name: value\\r\\n` lines. `xfcc(incoming values)` returns the x-forwarded-client-cert value
    (b"" for none); None = SANITIZE, the client's is just dropped."""
    value = xfcc(head.incoming_xfcc or []) if xfcc is not None else b""
    return render_head(head, our_headers(head.forwarded_for, peer=peer, certificate_headers=certificate_headers,
                                         xfcc=value))


def our_headers(forwarded_for: bytes, *, peer: bytes, certificate_headers: bytes, xfcc: bytes) -> bytes:
    """The lines we add after the client's: X-Forwarded-For (the client's values, then `peer`),
    X-Forwarded-Proto, the certificate headers and the XFCC value (b"": none). The same for every request
    of a connection that brings no X-Forwarded-For or XFCC of its own: then made once (B2)."""
    return b"".join((b"X-Forwarded-For: ", forwarded_for + b", " + peer if forwarded_for else peer,
                     b"\r\nX-Forwarded-Proto: https\r\n", certificate_headers,
                     b"X-Forwarded-Client-Cert: " + xfcc + b"\r\n" if xfcc else b""))


def render_head(head: RequestHead, ours: bytes) -> bytes:
    """`head` as the backend gets it, with `ours` (from `our_headers`) after the client's lines and then
    exactly one framing header, ours."""
    if head.chunked:
        framing = b"Transfer-Encoding: chunked\r\n\r\n"
    elif head.content_length is not None:
        framing = b"Content-Length: %d\r\n\r\n" % head.content_length
    else:
        framing = b"\r\n"
    return b"".join((head.method, b" ", head.target, b" HTTP/1.1\r\nHost: ", head.host, b"\r\n", *head.headers,
                     ours, framing))


def may_resend(method: bytes, *, attempt: int, reused_connection: bool, response_started: bool,
               has_body: bool, client_gone: bool) -> bool:
    """SPEC §11 at most once: the one case a request may go to a backend a second time — the first
    attempt went to a reused idle keep-alive connection that failed or closed before any response
    byte, the method is idempotent, and nothing else has happened. A streamed body cannot be replayed,
    and a client that is gone (disconnected, or the connection is closing because a later pipelined
    request was malformed) cancels instead."""
    return (attempt == 0 and reused_connection and not response_started and not has_body and not client_gone
            and method in IDEMPOTENT_METHODS)

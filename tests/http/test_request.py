"""SPEC §5/§11 request rules of data_plane/http/request.py, without sockets: every rule one case."""

from __future__ import annotations

import pytest

from data_plane.http.request import Refusal, RequestHead, may_resend, read_head, upstream_head

OURS = frozenset({b"x-client-cert-spiffe", b"x-client-cert-present"})


def head(headers: list[tuple[bytes, bytes]], *, method: bytes = b"GET", target: bytes = b"/",
         version: str = "1.1", underscores: bool = False) -> RequestHead | Refusal:
    return read_head(method, target, version, headers, keep_alive=True, spoofable=OURS,
                     allow_underscores=underscores)


def forwarded(headers: list[tuple[bytes, bytes]], **kwargs: object) -> list[bytes]:
    result = head(headers, **kwargs)  # type: ignore[arg-type]
    assert isinstance(result, RequestHead), result
    data = upstream_head(result, peer=b"10.0.0.9", certificate_headers=b"X-Client-Cert-Present: false\r\n",
                         xfcc=None)
    assert data.endswith(b"\r\n\r\n")
    return data[:-4].split(b"\r\n")


def refused(headers: list[tuple[bytes, bytes]], **kwargs: object) -> Refusal:
    result = head(headers, **kwargs)  # type: ignore[arg-type]
    assert isinstance(result, Refusal), result
    return result


H = (b"Host", b"app")


def test_one_framing_header_ours() -> None:
    lines = forwarded([H, (b"Content-Length", b"5")], method=b"POST")
    assert [line for line in lines if line.lower().startswith(b"content-length")] == [b"Content-Length: 5"]
    lines = forwarded([H, (b"Transfer-Encoding", b"Chunked")], method=b"POST")
    assert [line for line in lines if b"chunked" in line.lower() or b"length" in line.lower()] == \
        [b"Transfer-Encoding: chunked"]
    assert not any(b"length" in line.lower() for line in forwarded([H]))


@pytest.mark.parametrize(("headers", "status"), [
    ([H, (b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked")], 400),
    ([H, (b"Content-Length", b"3"), (b"Content-Length", b"3")], 400),
    ([H, (b"Content-Length", b"3, 3")], 400),
    ([H, (b"Content-Length", b"-1")], 400),
    ([H, (b"Transfer-Encoding", b"gzip, chunked")], 501),
    ([H, (b"Transfer-Encoding", b"chunked, identity")], 501),
    ([H, (b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")], 400),
    ([H, (b"X-A", b"a\x00b")], 400),
    ([H, (b"X-A", b"a\rb")], 400),
    ([H, (b"X-A", b"a\nb")], 400),
    ([], 400),  # HTTP/1.1 without Host
    ([H, (b"Host", b"evil")], 400),
    ([(b"Host", b"good, evil")], 400),
    ([(b"Host", b"a b")], 400),
])
def test_malformed_heads_are_refused(headers: list[tuple[bytes, bytes]], status: int) -> None:
    assert refused(headers, method=b"POST").status == status


def test_transfer_encoding_in_http10_is_refused() -> None:
    assert refused([(b"Transfer-Encoding", b"chunked")], version="1.0").status == 400


@pytest.mark.parametrize("version", ["0.9", "2.0", "3.0", "1.2"])
def test_only_http_10_and_11(version: str) -> None:
    assert refused([H], version=version).status == 505


def test_http10_without_host_gets_an_empty_host() -> None:
    assert forwarded([], version="1.0")[:2] == [b"GET / HTTP/1.1", b"Host: "]


def test_connect_is_refused() -> None:
    assert refused([(b"Host", b"a:443")], method=b"CONNECT", target=b"a:443").status == 405


def test_absolute_form_becomes_origin_form_with_host_from_the_authority() -> None:
    lines = forwarded([(b"Host", b"ignored")], target=b"http://api.example:8443/p/q?x=1#frag")
    assert lines[:2] == [b"GET /p/q?x=1 HTTP/1.1", b"Host: api.example:8443"]
    assert sum(line.lower().startswith(b"host:") for line in lines) == 1
    assert forwarded([H], target=b"https://api.example?x")[:2] == [b"GET /?x HTTP/1.1", b"Host: api.example"]
    assert refused([H], target=b"ftp://x/").status == 400
    assert refused([H], target=b"http://user@x/").status == 400
    assert refused([H], target=b"*").status == 400
    assert forwarded([H], method=b"OPTIONS", target=b"*")[0] == b"OPTIONS * HTTP/1.1"


def test_hop_by_hop_and_connection_named_headers_are_removed_but_never_host_or_ours() -> None:
    lines = forwarded([H, (b"Connection", b"keep-alive, X-Hop, Host, X-Forwarded-For, X-Client-Cert-Present"),
                       (b"X-Hop", b"1"), (b"Keep-Alive", b"5"), (b"TE", b"trailers"), (b"Trailer", b"X"),
                       (b"Upgrade", b"h2c"), (b"Proxy-Connection", b"x"), (b"Accept", b"*/*")])
    assert lines == [b"GET / HTTP/1.1", b"Host: app", b"Accept: */*", b"X-Forwarded-For: 10.0.0.9",
                     b"X-Forwarded-Proto: https", b"X-Client-Cert-Present: false"]


def test_anti_spoofing_reads_underscore_as_dash_and_drops_underscore_names_by_default() -> None:
    incoming = [H, (b"X_Client_Cert_SPIFFE", b"spiffe://evil/admin"), (b"x-client-cert-SPIFFE", b"evil"),
                (b"X_Forwarded_Proto", b"http"), (b"X_Forwarded_For", b"1.2.3.4"), (b"Content_Length", b"9"),
                (b"My_Header", b"v"), (b"X-Forwarded-Proto", b"http")]
    lines = forwarded(incoming)
    assert not any(b"_" in line.partition(b":")[0] for line in lines)
    assert not any(b"evil" in line for line in lines)
    assert b"X-Forwarded-Proto: https" in lines and b"X-Forwarded-For: 10.0.0.9" in lines
    allowed = forwarded(incoming, underscores=True)
    assert b"My_Header: v" in allowed  # the listener allows them: only ours and their look-alikes go
    assert not any(b"evil" in line or b"Content_Length" in line or b"X_Forwarded" in line for line in allowed)


def test_forwarded_for_is_appended_and_xfcc_hook_sees_incoming() -> None:
    result = head([H, (b"X-Forwarded-For", b"1.1.1.1"), (b"x-forwarded-client-cert", b"Hash=up")])
    assert isinstance(result, RequestHead)
    seen: list[list[bytes]] = []

    def xfcc(values: list[bytes]) -> bytes:
        seen.append(values)
        return b"Hash=ours"

    data = upstream_head(result, peer=b"::1", certificate_headers=b"", xfcc=xfcc)
    assert b"X-Forwarded-For: 1.1.1.1, ::1\r\n" in data and b"X-Forwarded-Client-Cert: Hash=ours\r\n" in data
    assert seen == [[b"Hash=up"]]
    assert b"Hash=up" not in upstream_head(result, peer=b"::1", certificate_headers=b"", xfcc=None)


def test_expect_continue_is_noticed_and_forwarded() -> None:
    result = head([H, (b"Expect", b"100-Continue"), (b"Content-Length", b"1")], method=b"PUT")
    assert isinstance(result, RequestHead) and result.expect_continue and result.has_body


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"])
def test_the_single_retry_is_for_idempotent_requests_on_a_reused_connection_that_sent_nothing(method: bytes) -> None:
    assert may_resend(method, attempt=0, reused_connection=True, response_started=False, has_body=False,
                      client_gone=False)


@pytest.mark.parametrize("change", [
    {"method": b"POST"}, {"method": b"PATCH"}, {"attempt": 1}, {"reused_connection": False},
    {"response_started": True}, {"has_body": True}, {"client_gone": True},
])
def test_never_resent_otherwise(change: dict[str, object]) -> None:
    args: dict[str, object] = {"method": b"GET", "attempt": 0, "reused_connection": True, "response_started": False,
                               "has_body": False, "client_gone": False} | change
    method = args.pop("method")
    assert not may_resend(method, **args)  # type: ignore[arg-type]


def test_connection_close_names_a_close_header_and_keep_alive_takes_the_plain_path() -> None:
    """`Connection: keep-alive` names only a hop-by-hop header (the one-pass path); `close` is a
    connection option like any other, so a `Close` field goes too (RFC 9110 §7.6.1), in any case."""
    for value, kept in ((b"keep-alive", [b"Close: x"]), (b"Close", []), (b"close", [])):
        lines = forwarded([H, (b"Connection", value), (b"Close", b"x"), (b"Accept", b"*/*")])
        assert lines[2:-3] == [*kept, b"Accept: */*"], value

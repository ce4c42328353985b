"""The route table (SPEC §15), pure: host and path matching, first match wins, normalisation, bounds."""

from __future__ import annotations

import pytest

from data_plane.http.routes import (
    MAX_MEMO_HOSTS,
    InvalidRoute,
    Route,
    RouteSpec,
    RouteTable,
    normalise_host,
    normalise_path,
)

DEFAULT = Route(-1, "default:80")


def spec(i: int, hosts: tuple[str, ...] = (), prefix: str | None = None, path: str | None = None,
         required: bool = False) -> RouteSpec:
    return RouteSpec(hosts, prefix, path, Route(i, f"b{i}:80", required))


@pytest.fixture
def table() -> RouteTable:
    return RouteTable([
        spec(0, ("a.example.com",), prefix="/admin/", required=True),
        spec(1, ("a.example.com",), prefix="/"),
        spec(2, ("*.example.com",), path="/exact"),
        spec(3, ("*.example.com",)),
        spec(4, (), prefix="/static/"),
    ], DEFAULT)


def idx(table: RouteTable, host: bytes, path: bytes) -> int | None:
    route = table.match(host, path)
    return None if route is None else route.index


def test_first_match_wins_by_host_then_path(table: RouteTable) -> None:
    assert idx(table, b"a.example.com", b"/admin/users") == 0
    assert idx(table, b"a.example.com", b"/admin") == 1  # the prefix is a string prefix: "/admin/" ≠ "/admin"
    assert idx(table, b"a.example.com", b"/exact") == 1  # route 1 comes first and matches any path
    assert idx(table, b"b.example.com", b"/exact") == 2
    assert idx(table, b"b.example.com", b"/exactly") == 3
    assert idx(table, b"other.org", b"/static/x.css") == 4
    assert idx(table, b"other.org", b"/") == -1


def test_host_case_port_and_trailing_dot_are_ignored(table: RouteTable) -> None:
    assert idx(table, b"A.Example.COM:8443", b"/admin/") == 0
    assert idx(table, b"a.example.com.", b"/admin/") == 0
    assert idx(table, b"[::1]:443", b"/") == -1


def test_host_tricks_do_not_match_a_route(table: RouteTable) -> None:
    # suffix attacks: these are other names, not a.example.com or a subdomain of example.com
    assert idx(table, b"a.example.com.evil", b"/admin/") == -1
    assert idx(table, b"evil-a.example.com.evil.org", b"/") == -1
    assert idx(table, b"example.com", b"/") == -1  # *.example.com needs one more label
    assert idx(table, b"notexample.com", b"/") == -1
    # a wildcard covers deeper names (Envoy's and GCP's suffix semantics), exact beats nothing of it
    assert idx(table, b"x.y.example.com", b"/") == 3


def test_no_default_means_no_match() -> None:
    table = RouteTable([spec(0, ("a.example.com",))], None)
    assert table.match(b"b.example.com", b"/") is None


def test_memo_is_bounded(table: RouteTable) -> None:
    for i in range(MAX_MEMO_HOSTS * 2):
        table.match(b"h%d.example.com" % i, b"/")
    assert len(table._memo) <= MAX_MEMO_HOSTS
    assert idx(table, b"a.example.com", b"/admin/") == 0


@pytest.mark.parametrize(("raw", "normal"), [
    (b"/", b"/"),
    (b"/a/b", b"/a/b"),
    (b"/admin/../admin/x", b"/admin/x"),
    (b"/public/../admin/", b"/admin/"),
    (b"/%2e%2e/admin/", b"/admin/"),
    (b"/x/%2E%2e/admin/", b"/admin/"),
    (b"/a/./b/.", b"/a/b/"),
    (b"//admin//x", b"/admin/x"),
    (b"/../../", b"/"),
    (b"/%61dmin/", b"/admin/"),  # encoded unreserved letters are the same path
    (b"/a%20b", b"/a%20b"),
    (b"/a%3fb", b"/a%3Fb"),
    (b"/a/..", b"/"),
])
def test_path_normalisation(raw: bytes, normal: bytes) -> None:
    assert normalise_path(raw) == normal


@pytest.mark.parametrize("raw", [b"/admin%2fx", b"/admin%2Fx", b"/a%5cb", b"/a\\b", b"/a%zz", b"/a%2", b"/a%00",
                                 b"noslash", b""])
def test_paths_that_cannot_be_routed_safely(raw: bytes) -> None:
    assert normalise_path(raw) is None


def test_normalise_host() -> None:
    assert normalise_host(b"A.B.c:80") == b"a.b.c"
    assert normalise_host(b"[::1]:8443") == b"[::1]"
    assert normalise_host(b"x.") == b"x"


@pytest.mark.parametrize(("hosts", "prefix", "message"), [
    (("A.example.com",), None, "lowercase"),
    (("a.*.com",), None, "first label"),
    (("a.example.com:443",), None, "no port"),
    (("",), None, "empty"),
    ((), "admin", "must start with /"),
    ((), "/a/../b", "normalised"),
    ((), "//a", "normalised"),
])
def test_invalid_routes_name_the_field(hosts: tuple[str, ...], prefix: str | None, message: str) -> None:
    with pytest.raises(InvalidRoute, match=r"routes\[0\]\.(hosts\[0\]|pathPrefix).*" + message):
        RouteTable([spec(0, hosts, prefix=prefix)], None)

"""A listener's route table (SPEC §15): compiled once per configuration version, then
`table.match(host, path) → Route | None` per request. Pure: no sockets, no clocks, no regex per request.

Hosts are matched case-insensitively with the port and one trailing dot removed; `*.suffix` matches any
name that ends in `.suffix` (at least one more label). Paths are matched on their normalised form
(`normalise_path`): percent-encoded unreserved characters decoded, dot segments resolved, repeated slashes
merged. An encoded `/` or `\\` is refused outright, because a backend that decodes it would see a path the
route table never saw. What is forwarded is that same normalised path, so the backend and the route table
agree on what was asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Hosts whose candidate routes are memoised; beyond this the memo is dropped (a client sending random
# Host headers costs a recomputation, never memory).
MAX_MEMO_HOSTS = 4096
MAX_ROUTES = 100
MAX_HOSTS_PER_ROUTE = 50
MAX_PATH_BYTES = 8192

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = b"0123456789abcdefABCDEF"


@dataclass(frozen=True, slots=True)
class Route:
    """What a matched request goes to. `index` is the position in the listener's routes (-1: the default)."""

    index: int
    backend: str  # backendServices/ID or HOST:PORT
    require_client_certificate: bool = False
    custom_request_headers: tuple[str, ...] = ()  # empty = the listener's set


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One route as configured (hosts lowercase, `*.suffix` or exact; empty = any host)."""

    hosts: tuple[str, ...]
    path_prefix: str | None
    path: str | None
    route: Route


class InvalidRoute(ValueError):
    """A route that cannot be compiled; the message names `routes[i].field`."""


def host_problem(host: str) -> str | None:
    """Why `host` cannot be a route host, or None."""
    if not host:
        return "is empty"
    if host != host.lower():
        return "must be lowercase"
    name = host[2:] if host.startswith("*.") else host
    if "*" in name:
        return "may only hold `*` as its first label (`*.example.com`)"
    if not name or name.endswith(".") or ".." in name or name.startswith("."):
        return "is not a host name"
    allowed = "abcdefghijklmnopqrstuvwxyz0123456789-."
    if name.startswith("[") and name.endswith("]"):
        name, allowed = name[1:-1], "0123456789abcdef:."  # an IPv6 literal, as Host carries it
    if any(c not in allowed for c in name):
        return "is not a host name (no port, no scheme, no path)"
    return None


def path_problem(path: str) -> str | None:
    if not path.startswith("/"):
        return "must start with /"
    if len(path) > MAX_PATH_BYTES:
        return f"is longer than {MAX_PATH_BYTES} bytes"
    normal = normalise_path(path.encode())
    if normal is None or normal.decode("latin-1") != path:
        return "is not in normalised form (no dot segments, no repeated slashes, no %-encoded unreserved characters)"
    return None


class RouteTable:
    """Routes in order plus the default. `match` looks at each route at most once; the routes that can
    apply to a host are worked out once per host and memoised."""

    def __init__(self, specs: Sequence[RouteSpec], default: Route | None) -> None:
        if len(specs) > MAX_ROUTES:
            raise InvalidRoute(f"routes: {len(specs)} routes; at most {MAX_ROUTES}")
        self.default = default
        self._paths: list[tuple[bytes | None, bytes | None, Route]] = []
        self._exact: dict[bytes, list[int]] = {}
        self._wildcard: dict[bytes, list[int]] = {}  # suffix with its leading dot, e.g. b".example.com"
        self._any_host: list[int] = []
        for i, spec in enumerate(specs):
            if len(spec.hosts) > MAX_HOSTS_PER_ROUTE:
                raise InvalidRoute(f"routes[{i}].hosts: {len(spec.hosts)} hosts; at most {MAX_HOSTS_PER_ROUTE}")
            for j, host in enumerate(spec.hosts):
                problem = host_problem(host)
                if problem:
                    raise InvalidRoute(f"routes[{i}].hosts[{j}]: {host[:100]!r} {problem}")
                if host.startswith("*."):
                    self._wildcard.setdefault(host[1:].encode(), []).append(i)
                else:
                    self._exact.setdefault(host.encode(), []).append(i)
            if not spec.hosts:
                self._any_host.append(i)
            for field, value in (("pathPrefix", spec.path_prefix), ("path", spec.path)):
                if value is not None:
                    problem = path_problem(value)
                    if problem:
                        raise InvalidRoute(f"routes[{i}].{field}: {value[:100]!r} {problem}")
            self._paths.append((None if spec.path_prefix is None else spec.path_prefix.encode(),
                                None if spec.path is None else spec.path.encode(), spec.route))
        self._memo: dict[bytes, tuple[int, ...]] = {}

    def match(self, host: bytes, path: bytes) -> Route | None:
        """The route for a request: `host` as received (Host header or absolute-form authority), `path`
        already normalised (`normalise_path`), without the query."""
        key = normalise_host(host)
        candidates = self._memo.get(key)
        if candidates is None:
            candidates = self._candidates(key)
            if len(self._memo) >= MAX_MEMO_HOSTS:
                self._memo.clear()
            self._memo[key] = candidates
        paths = self._paths
        for i in candidates:
            prefix, exact, route = paths[i]
            if exact is not None:
                if path == exact:
                    return route
            elif prefix is None or path.startswith(prefix):
                return route
        return self.default

    def _candidates(self, host: bytes) -> tuple[int, ...]:
        found = set(self._any_host)
        found.update(self._exact.get(host, ()))
        if self._wildcard:
            # every proper suffix that starts at a dot: a.b.example.com → .b.example.com, .example.com, .com
            dot = host.find(b".", 1)
            while dot != -1:
                found.update(self._wildcard.get(host[dot:], ()))
                dot = host.find(b".", dot + 1)
        return tuple(sorted(found))


def normalise_host(host: bytes) -> bytes:
    """`A.Example.COM.:8443` → `a.example.com`; `[::1]:443` → `[::1]`."""
    if host[:1] == b"[":
        end = host.find(b"]")
        host = host[:end + 1] if end != -1 else host
    else:
        colon = host.rfind(b":")
        if colon != -1:
            host = host[:colon]
        if host[-1:] == b".":
            host = host[:-1]
    return host.lower()


def normalise_path(path: bytes) -> bytes | None:
    """RFC 3986 §6.2.2 normalisation of an origin-form path (query already split off): unreserved
    `%XX` decoded, other escapes upper-cased, dot segments removed (§5.2.4), `//` merged. None when the
    path cannot be routed safely: a malformed escape, an encoded `/` or `\\`, a raw `\\`, or no leading `/`."""
    if path[:1] != b"/" or len(path) > MAX_PATH_BYTES or b"\\" in path:
        return None
    if b"%" in path:
        out = bytearray()
        i, n = 0, len(path)
        while i < n:
            c = path[i]
            if c == 0x25:  # %
                pair = path[i + 1:i + 3]
                if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                    return None
                value = int(pair, 16)
                if value in (0x2F, 0x5C, 0):  # / \ NUL
                    return None
                if value in _UNRESERVED:
                    out.append(value)
                else:
                    out += b"%" + pair.upper()
                i += 3
            else:
                out.append(c)
                i += 1
        path = bytes(out)
    if b"/." not in path and b"//" not in path:
        return path  # the common case: nothing to resolve
    segments: list[bytes] = []
    parts = path.split(b"/")
    for part in parts[1:]:
        if part == b"..":
            if segments:
                segments.pop()
        elif part and part != b".":
            segments.append(part)
    trailing = parts[-1] in (b"", b".", b"..") and bool(segments)
    return b"/" + b"/".join(segments) + (b"/" if trailing else b"")


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """origin-form target → (path, `?query` or b"")."""
    q = target.find(b"?")
    return (target, b"") if q == -1 else (target[:q], target[q:])

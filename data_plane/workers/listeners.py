"""What a worker runs per listener: a node configuration (listeners, trust bundles, server certificates as
protobufs) compiled once per version into TLS contexts, validation closures and header sets.

The wire form between the pool and its workers is `WireConfig` (serialized protobufs, so it pickles
cheaply and identically everywhere); `compile_listeners` turns it into `ListenerRuntime`s.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mtlsgate.v1 import backends_pb2, resources_pb2, xds_pb2

from data_plane.http import routes as routes_mod
from data_plane.http.routes import RouteTable
from data_plane.upstream import balancer as balancer_mod
from data_plane.upstream import outlier as outlier_mod
from data_plane.upstream.balancer import EndpointState
from data_plane.upstream.outlier import OutlierPolicy
from data_plane.validation import bundle as bundle_mod
from data_plane.validation import engine, headers, policy
from data_plane.validation.resources import listener_certificates, seconds
from data_plane.workers import shadow_tally
from data_plane.workers.tls import ClientAuth, ServerTls, TlsProfile
from data_plane.workers.upstream_tls import UpstreamTls, upstream_tls_for

MTLS = resources_pb2.MTLSPolicy
XFCC = resources_pb2.Listener.ForwardClientCertDetails

class ListenerConfigError(ValueError):
    """A listener cannot be compiled; the message names the listener and the problem."""


@dataclass(frozen=True)
class WireConfig:
    """A NodeConfig as serialized protobufs: what the pool sends each worker."""

    version: str
    versions: Mapping[str, str]
    listeners: Mapping[str, bytes]
    bundles: Mapping[str, bytes]
    certificates: Mapping[str, bytes]
    backend_services: Mapping[str, bytes] = field(default_factory=dict)

    @classmethod
    def from_node_config(cls, config: Any) -> WireConfig:
        listeners = {k: v.SerializeToString(deterministic=True) for k, v in config.listeners.items()}
        bundles = {k: v.SerializeToString(deterministic=True) for k, v in config.bundles.items()}
        certificates = {k: v.SerializeToString(deterministic=True) for k, v in config.certificates.items()}
        services = {k: v.SerializeToString(deterministic=True)
                    for k, v in getattr(config, "backend_services", {}).items()}
        # The version names the content, so a re-sent identical configuration is recognisably the same.
        digest = hashlib.sha256()
        for part in (listeners, bundles, certificates, services):
            for name, raw in sorted(part.items()):
                digest.update(name.encode() + b"\0" + len(raw).to_bytes(8, "big") + raw)
        return cls(version=digest.hexdigest()[:16], versions=dict(config.versions), listeners=listeners,
                   bundles=bundles, certificates=certificates, backend_services=services)


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a routed request goes and what it carries: a backend address and the certificate header set
    rendered for it (the listener's, or the route's own `customRequestHeaders`)."""

    address: tuple[str, int]
    header_set: Any
    require_client_certificate: bool = False
    service: ServiceRuntime | None = None  # a BackendService: the endpoint is chosen per request

    @property
    def label(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"


class ServiceRuntime:
    """One BackendService as a worker runs it for one configuration version: its balancer over endpoints
    whose state (health, ejection, requests in flight) outlives the version."""

    def __init__(self, name: str, service: backends_pb2.BackendService,
                 states: Callable[[str, str], EndpointState], tls: UpstreamTls | None = None) -> None:
        self.name = name
        self.tls = tls  # None: plain HTTP to the endpoints
        self.policy = backends_pb2.BackendService.LoadBalancing.Name(service.load_balancing)
        if self.policy == "LOAD_BALANCING_UNSPECIFIED":
            self.policy = balancer_mod.ROUND_ROBIN
        self.outlier = OutlierPolicy(
            service.outlier_detection.consecutive_errors or outlier_mod.DEFAULT_CONSECUTIVE_ERRORS,
            seconds(service.outlier_detection.base_ejection_time)
            if service.outlier_detection.HasField("base_ejection_time") else outlier_mod.DEFAULT_BASE_EJECTION_SECONDS)
        self.connect_timeout = seconds(service.timeouts.connect) if service.timeouts.HasField("connect") else None
        self.response_timeout = seconds(service.timeouts.response) if service.timeouts.HasField("response") else None
        self.endpoints = [balancer_mod.Endpoint(e.address, self._key(e.address), e.weight or 1,
                                                states(name, e.address)) for e in service.endpoints]
        self.balancer = balancer_mod.Balancer(self.policy, self.endpoints)

    def _key(self, address: str) -> tuple[Any, ...]:
        host, port = parse_backend(address)
        # A TLS connection belongs to the settings it was verified under: its own pool per service and settings.
        return (host, port) if self.tls is None else (host, port, self.name, self.tls.digest)

    def pick(self, now: float, exclude: balancer_mod.Endpoint | None = None) -> balancer_mod.Endpoint | None:
        endpoint = self.balancer.pick(now, exclude)
        if endpoint is not None:
            endpoint.state.in_flight += 1
            endpoint.state.requests += 1
        return endpoint

    def summary(self, now: float) -> dict[str, Any]:
        return {"load_balancing": self.policy, "tls": self.tls.summary() if self.tls is not None else None,
                "endpoints": [{
            "address": e.address, "weight": e.weight, "healthy": e.state.healthy,
            "ejected": e.state.outlier.ejected(now), "ejections": e.state.outlier.ejections_total,
            "in_flight": e.state.in_flight, "requests": e.state.requests, "failures": e.state.failures,
        } for e in self.endpoints]}


SHADOW_MEMO_SECONDS = 10.0
SHADOW_MEMO_ENTRIES = 4_096


@dataclass(frozen=True)
class ShadowRuntime:
    """One shadow candidate of a listener (SPEC §12), compiled once per configuration version: judged on
    every new handshake beside the active policy, never enforced.

    The engine memoises only successful verdicts, so a candidate that rejects a client would run the whole
    path search on each of its handshakes (~0.6 ms, a third of a handshake's CPU). A candidate's verdict is
    never enforced, so here every verdict is remembered per presented chain for SHADOW_MEMO_SECONDS: at
    worst a report is that much late about a certificate whose validity changed meanwhile."""

    candidate: str  # trustConfigs/ID or serverTlsPolicies/ID
    version: str  # the candidate's etag
    compiled_bundle: Any
    client_policy: Any
    memo: dict[tuple[bytes, ...], tuple[Any, float]] = field(default_factory=dict, compare=False, repr=False)

    def validate(self, chain: Sequence[bytes], now: dt.datetime) -> Any:
        key = tuple(chain)
        at = time.monotonic()
        hit = self.memo.get(key)
        if hit is not None and at < hit[1]:
            return hit[0]
        verdict = engine.validate(chain, self.compiled_bundle, self.client_policy, now)
        if len(self.memo) >= SHADOW_MEMO_ENTRIES:
            self.memo.clear()  # bounded; the working set is normally far smaller
        self.memo[key] = (verdict, at + SHADOW_MEMO_SECONDS)
        return verdict


def compile_shadow(shadow: resources_pb2.ShadowPolicy, wire: WireConfig) -> tuple[ShadowRuntime | None, str]:
    """(the runtime, "") or (None, why it is not judged). Never raises: a candidate that cannot be judged
    must not stop the active configuration (data_plane.node.config.shadow_bundle_names)."""
    tls = shadow.server_tls_policy
    mtls = tls.mtls_policy if tls.HasField("mtls_policy") else None
    compiled = None
    try:
        if mtls is not None and mtls.client_validation_trust_config:
            bundle_name = _short_name(mtls.client_validation_trust_config)
            raw = wire.bundles.get(bundle_name)
            if raw is None:
                return None, f"trust bundle {bundle_name} was not received"
            compiled = bundle_mod.compile_bundle(xds_pb2.TrustBundle.FromString(raw))
        client_policy = policy.compile_policy(tls if mtls is not None else None)
    except Exception as exc:
        return None, str(exc)[:300] or type(exc).__name__
    return ShadowRuntime(shadow.candidate, shadow.candidate_version, compiled, client_policy), ""


@dataclass
class ListenerRuntime:
    """One listener as a worker runs it for one configuration version."""

    name: str
    port: int
    # The default upstream (`backend` / `defaultBackendService`); None = a request no route matches gets 404.
    upstream: Upstream | None
    tls: ServerTls
    header_set: Any
    xfcc_mode: int
    mtls: bool
    reject_at_http: bool
    revalidate_on_update: bool
    compiled_bundle: Any
    client_policy: Any
    summary: dict[str, Any] = field(default_factory=dict)

    allow_underscores: bool = False  # allowUnderscoresInHeaders (SPEC §5)
    # None when the listener has no routes: then every request goes to `upstream` and pays nothing for routing.
    routes: RouteTable | None = None
    upstreams: tuple[Upstream, ...] = ()  # per route index
    # lowercase names of the headers we set on any route, `_` read as `-` (SPEC §5)
    spoofable_names: frozenset[bytes] = frozenset()
    # Shadow candidates to judge each new handshake under as well (SPEC §12); empty = no cost at all.
    shadows: tuple[ShadowRuntime, ...] = ()

    def __post_init__(self) -> None:
        names = set(self.header_set.names)
        for upstream in self.upstreams:
            names.update(upstream.header_set.names)
        self.spoofable_names = frozenset(n.lower().replace("_", "-").encode() for n in names)

    def validate(self, chain: Sequence[bytes]) -> Any:
        """The engine's verdict now (it memoises successful verdicts per bundle, inside their validity)."""
        return engine.validate(chain, self.compiled_bundle, self.client_policy, dt.datetime.now(dt.UTC))

    def judge_shadows(self, chain: Sequence[bytes], verdict: Any, tally: Any) -> None:
        """Judge one handshake the active policy judged as `verdict` under every candidate, into `tally`
        (a ShadowTally). Only called when `shadows` is non-empty."""
        now = dt.datetime.now(dt.UTC)
        leaf = bytes(chain[0]) if chain else b""
        for shadow in self.shadows:
            tally.judged(self.name, shadow.candidate, shadow.version)
            candidate = shadow.validate(chain, now)
            way = shadow_tally.direction(verdict, candidate)
            if way:
                tally.disagreed(self.name, shadow.candidate, shadow.version, way,
                                hashlib.sha256(leaf).hexdigest() if leaf else "", verdict.error or "",
                                candidate.error or "")

    def http_status(self, verdict: Any) -> int:
        return int(engine.http_status(verdict))


def parse_backend(backend: str) -> tuple[str, int]:
    host, sep, port = backend.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ListenerConfigError(f"backend {backend!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _fresh_state(service: str, address: str) -> EndpointState:
    return EndpointState()


def compile_services(wire: WireConfig, states: Callable[[str, str], EndpointState] = _fresh_state
                     ) -> dict[str, ServiceRuntime]:
    """Every BackendService of `wire`; `states(service, address)` gives each endpoint's lasting state."""
    out = {}
    compiled: dict[str, Any] = {}
    for name, raw in sorted(wire.backend_services.items()):
        try:
            service = backends_pb2.BackendService.FromString(raw)
            out[name] = ServiceRuntime(name, service, states, _service_tls(name, service, wire, compiled))
        except Exception as exc:
            raise ListenerConfigError(f"{name}: {exc}") from exc
    return out


def _service_tls(name: str, service: backends_pb2.BackendService, wire: WireConfig,
                 compiled: dict[str, Any]) -> UpstreamTls | None:
    auth = service.resolved_backend_authentication
    certificates = {}
    if auth.client_certificate:
        raw = wire.certificates.get(auth.client_certificate)
        if raw is None:
            raise ListenerConfigError(f"{name}: certificate {auth.client_certificate!r} was not received")
        certificates[auth.client_certificate] = xds_pb2.ServerCertificate.FromString(raw)
    if auth.trust_config and auth.trust_config not in compiled:
        raw = wire.bundles.get(auth.trust_config)
        if raw is None:
            raise ListenerConfigError(f"{name}: trust bundle {auth.trust_config!r} was not received")
        compiled[auth.trust_config] = bundle_mod.compile_bundle(xds_pb2.TrustBundle.FromString(raw))
    return upstream_tls_for(name, service, certificates, compiled)


def compile_listeners(wire: WireConfig, services: Mapping[str, ServiceRuntime] | None = None
                      ) -> dict[str, ListenerRuntime]:
    """Compile every listener of `wire`; raises ListenerConfigError naming the first bad one."""
    out: dict[str, ListenerRuntime] = {}
    services = compile_services(wire) if services is None else services
    for name, raw in sorted(wire.listeners.items()):
        listener = resources_pb2.Listener.FromString(raw)
        try:
            out[name] = _compile_listener(listener, wire, services)
        except ListenerConfigError:
            raise
        except Exception as exc:
            raise ListenerConfigError(f"{name}: {exc}") from exc
    return out


def _service_upstream(listener: resources_pb2.Listener, service_name: str, header_set: Any, required: bool,
                      services: Mapping[str, ServiceRuntime]) -> Upstream:
    service = services.get(_short_name(service_name))
    if service is None:
        raise ListenerConfigError(f"{listener.name}: backend service {service_name!r} was not received")
    return Upstream(service.endpoints[0].key, header_set, required, service)  # type: ignore[arg-type]


def _compile_listener(listener: resources_pb2.Listener, wire: WireConfig,
                      services: Mapping[str, ServiceRuntime]) -> ListenerRuntime:
    name = listener.name
    identities = []
    for cert_name in listener_certificates(listener):
        cert_raw = wire.certificates.get(cert_name)
        if cert_raw is None:
            raise ListenerConfigError(f"{name}: certificate {cert_name!r} was not received")
        certificate = xds_pb2.ServerCertificate.FromString(cert_raw)
        identities.append((certificate.pem_certificate_chain, certificate.pem_private_key))
    tls_policy = listener.resolved_server_tls_policy if listener.HasField("resolved_server_tls_policy") else None
    mtls_policy = tls_policy.mtls_policy if tls_policy is not None and tls_policy.HasField("mtls_policy") else None

    compiled_bundle = None
    bundle_name = ""
    if mtls_policy is not None and mtls_policy.client_validation_trust_config:
        bundle_name = _short_name(mtls_policy.client_validation_trust_config)
        bundle_raw = wire.bundles.get(bundle_name)
        if bundle_raw is None:
            raise ListenerConfigError(f"{name}: trust bundle {bundle_name!r} was not received")
        compiled_bundle = bundle_mod.compile_bundle(xds_pb2.TrustBundle.FromString(bundle_raw))
    client_policy = policy.compile_policy(tls_policy if mtls_policy is not None else None)
    header_set = headers.compile_headers(list(listener.custom_request_headers))

    reject = mtls_policy is not None and mtls_policy.client_validation_mode == MTLS.REJECT_INVALID
    reject_at_http = reject and mtls_policy is not None and mtls_policy.reject_at == MTLS.HTTP
    runtime_box: list[ListenerRuntime] = []
    client_auth = None
    if mtls_policy is not None:
        client_auth = ClientAuth(
            validate=lambda chain: runtime_box[0].validate(chain),
            tls_alert=engine.tls_alert,
            reject_at_tls=reject and not reject_at_http,
        )
    profile = _tls_profile(listener)
    tls = ServerTls(identities, client_auth, profile)
    shadows, shadow_summary = [], []
    for shadow in listener.shadow_policies:
        compiled_shadow, problem = compile_shadow(shadow, wire)
        if mtls_policy is None:  # no client certificate is asked for, so there is nothing to judge
            compiled_shadow, problem = None, "the active policy asks for no client certificate"
        if compiled_shadow is not None:
            shadows.append(compiled_shadow)
        shadow_summary.append({"candidate": shadow.candidate, "candidate_version": shadow.candidate_version,
                               "trust_bundle": shadow.server_tls_policy.mtls_policy.client_validation_trust_config,
                               "judged": compiled_shadow is not None, "problem": problem})
    default = Upstream(parse_backend(listener.backend), header_set) if listener.backend else None
    if listener.default_backend_service:
        default = _service_upstream(listener, listener.default_backend_service, header_set, False, services)
    table, upstreams = _compile_routes(listener, header_set, default, services)
    runtime = ListenerRuntime(
        name=name,
        port=int(listener.port),
        upstream=default,
        routes=table,
        upstreams=upstreams,
        tls=tls,
        header_set=header_set,
        xfcc_mode=int(listener.forward_client_cert_details) or XFCC.SANITIZE,
        mtls=mtls_policy is not None,
        reject_at_http=reject_at_http,
        revalidate_on_update=bool(mtls_policy is not None and mtls_policy.revalidate_on_update),
        compiled_bundle=compiled_bundle,
        client_policy=client_policy,
        allow_underscores=listener.allow_underscores_in_headers,
        shadows=tuple(shadows),
        summary={
            "port": int(listener.port),
            "backend": listener.backend or listener.default_backend_service,
            "certificate": listener.certificate,
            "certificates": listener_certificates(listener),
            "sni_names": tls.sni_names(),
            "routes": [_route_summary(route) for route in listener.routes],
            "server_tls_policy": listener.server_tls_policy,
            "trust_bundle": bundle_name,
            "mode": MTLS.ClientValidationMode.Name(mtls_policy.client_validation_mode) if mtls_policy else "PLAIN_TLS",
            "reject_at": "HTTP" if reject_at_http else ("TLS" if reject else ""),
            "revalidate_on_update": bool(mtls_policy is not None and mtls_policy.revalidate_on_update),
            "allow_underscores_in_headers": listener.allow_underscores_in_headers,
            "ssl_policy": {"min_tls_version": profile.min_version, "profile": profile.profile,
                           "ciphers": tls.effective_ciphers()},
            "bundle_sha256": hashlib.sha256(wire.bundles.get(bundle_name, b"")).hexdigest()[:16] if bundle_name else "",
            "shadow": shadow_summary,
        },
    )
    runtime_box.append(runtime)
    return runtime


def _compile_routes(listener: resources_pb2.Listener, header_set: Any, default: Upstream | None,
                    services: Mapping[str, ServiceRuntime]) -> tuple[RouteTable | None, tuple[Upstream, ...]]:
    if not listener.routes:
        return None, ()
    specs, upstreams = [], []
    for i, route in enumerate(listener.routes):
        required = route.client_certificate == backends_pb2.Route.REQUIRED
        route_headers = (headers.compile_headers(list(route.custom_request_headers))
                         if route.custom_request_headers else header_set)
        if route.backend_service:
            upstreams.append(_service_upstream(listener, route.backend_service, route_headers, required, services))
        elif route.backend:
            upstreams.append(Upstream(parse_backend(route.backend), route_headers, required))
        else:
            raise ListenerConfigError(f"{listener.name}: routes[{i}] has no backend")
        match = route.WhichOneof("path_match")
        specs.append(routes_mod.RouteSpec(
            tuple(route.hosts), route.path_prefix if match == "path_prefix" else None,
            route.path if match == "path" else None,
            routes_mod.Route(i, route.backend or route.backend_service, required)))
    try:
        table = RouteTable(specs, routes_mod.Route(-1, listener.backend or listener.default_backend_service)
                           if default is not None else None)
    except routes_mod.InvalidRoute as exc:
        raise ListenerConfigError(f"{listener.name}: {exc}") from None
    return table, tuple(upstreams)


def _route_summary(route: backends_pb2.Route) -> dict[str, Any]:
    match = route.WhichOneof("path_match")
    return {"hosts": list(route.hosts), match or "path_prefix": getattr(route, match) if match else "",
            "backend": route.backend or route.backend_service,
            "client_certificate": backends_pb2.Route.ClientCertificate.Name(route.client_certificate)}


def _tls_profile(listener: resources_pb2.Listener) -> TlsProfile:
    policy = listener.ssl_policy
    version = resources_pb2.SslPolicy.TlsVersion.Name(policy.min_tls_version)
    profile = resources_pb2.SslPolicy.Profile.Name(policy.profile)
    return TlsProfile(min_version="TLS_1_2" if version == "TLS_VERSION_UNSPECIFIED" else version,
                      profile="MODERN" if profile == "PROFILE_UNSPECIFIED" else profile)


def _short_name(name: str) -> str:
    """`projects/P/locations/L/trustConfigs/ID` → `trustConfigs/ID` (the control plane normalises names;
    this keeps a worker tolerant of either form)."""
    parts = name.split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else name

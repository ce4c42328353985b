"""Snapshot building (pure): from one store revision to the xDS resources each node group receives.

A node's group is decided by which listeners its labels select (`nodeSelector`), because that set alone
determines every resource the node gets (the listeners, the certificates they name, the trust bundles their
policies name, the backend services their routes name and the certificates and trust bundles of those
services' BackendAuthenticationConfigs). Nodes of the same `node.cluster` normally share labels and therefore one snapshot; nodes
whose labels select the same listeners share a snapshot even across clusters, which is harmless since the
resources are identical. Versions are content hashes, so the same state gives the same version across
restarts and replicas. Every resource is encoded (packed into an `Any`) once per build and shared.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any as TypingAny

from google.protobuf import any_pb2
from google.protobuf.message import Message
from mtlsgate import resource_types as rt
from mtlsgate.v1 import backends_pb2, resources_pb2, xds_pb2

from control_plane.resource_names import active_name, shadow_name
from data_plane.validation.resources import listener_certificates

log = logging.getLogger("mtlsgate.xds")

# A group key: the sorted names of the listeners a node's labels select.
GroupKey = tuple[str, ...]
# name → (listener, encoded, certificate names, trust bundle name, backend service names, shadow candidates'
# trust bundle names)
ListenerEntry = tuple[resources_pb2.Listener, any_pb2.Any, tuple[str, ...], str | None, tuple[str, ...],
                      tuple[str, ...]]


@dataclass(frozen=True)
class TypeSnapshot:
    """All resources of one type for one group, with the content-hash version of the whole set."""

    type_url: str
    version: str
    resources: Mapping[str, any_pb2.Any]

    def select(self, names: Iterable[str] | None) -> list[any_pb2.Any]:
        """The resources to send for a subscription: all of them for a wildcard (`names` None), else the
        requested names this group has (names of other groups are never answered)."""
        if names is None:
            return [self.resources[n] for n in sorted(self.resources)]
        return [self.resources[n] for n in sorted(set(names)) if n in self.resources]


@dataclass(frozen=True)
class GroupSnapshot:
    key: GroupKey
    revision: int
    written_at: float
    types: Mapping[str, TypeSnapshot]

    def versions(self) -> dict[str, str]:
        return {t: s.version for t, s in self.types.items()}


def short_name(name: str) -> str:
    """`projects/P/locations/global/trustConfigs/ID` → `trustConfigs/ID` (already-short names unchanged)."""
    parts = name.strip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else name


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """A listener's nodeSelector matches when every key=value is among the node's labels (empty: all)."""
    return all(labels.get(k) == v for k, v in selector.items())


def _active(candidate_name: str) -> str:
    """A stored candidate's name (`…/shadowTrustConfigs/ID`) → its active resource's (`trustConfigs/ID`)."""
    return active_name(short_name(candidate_name))


def content_version(resources: Mapping[str, any_pb2.Any]) -> str:
    """Hash of the (name, encoded bytes) set: identical content ⇒ identical version, anywhere."""
    digest = hashlib.sha256()
    for name in sorted(resources):
        value = resources[name].value
        digest.update(f"{name}\0{len(value)}\0".encode())
        digest.update(value)
    return digest.hexdigest()[:16]


def _pack(message: Message, type_url: str) -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url, value=message.SerializeToString(deterministic=True))


def default_bundle_converter(tc: resources_pb2.TrustConfig) -> xds_pb2.TrustBundle:
    # E3's conversion (PEM → DER, the same parsing the node validates with).
    from data_plane.validation.bundle import trust_bundle_from_trust_config

    return trust_bundle_from_trust_config(tc)


def server_certificate(cert: resources_pb2.Certificate, name: str) -> xds_pb2.ServerCertificate:
    return xds_pb2.ServerCertificate(
        name=name, pem_certificate_chain=cert.pem_certificate, pem_private_key=cert.pem_private_key
    )


def _resolved(policy: resources_pb2.ServerTlsPolicy, trust_name: str) -> resources_pb2.ServerTlsPolicy:
    """A policy as a node judges with it: short name, no write metadata, its trust config `trust_name`."""
    out = resources_pb2.ServerTlsPolicy()
    out.CopyFrom(policy)
    for meta in ("create_time", "update_time", "etag"):
        out.ClearField(meta)
    out.name = short_name(out.name) if out.name else ""
    if out.HasField("mtls_policy") and trust_name:
        out.mtls_policy.client_validation_trust_config = trust_name
    return out


def shadow_policies(policy: resources_pb2.ServerTlsPolicy | None, policy_name: str, trust_name: str | None,
                    candidate_policies: Mapping[str, resources_pb2.ServerTlsPolicy],
                    candidate_trusts: Mapping[str, resources_pb2.TrustConfig],
                    ) -> list[tuple[resources_pb2.ShadowPolicy, Message, str]]:
    """A listener's shadow candidates (SPEC §12), as (the ShadowPolicy nodes judge with, the stored
    candidate it comes from, the trust bundle it needs or ""). A candidate ServerTlsPolicy is judged with
    the (active) trust config it names; a candidate TrustConfig with the listener's active policy pointed
    at the candidate's bundle, `shadowTrustConfigs/ID`. Candidates are keyed by their active name."""
    out: list[tuple[resources_pb2.ShadowPolicy, Message, str]] = []
    if policy is None:
        return out
    candidate = candidate_policies.get(policy_name)
    if candidate is not None:
        trust = ""
        if candidate.HasField("mtls_policy") and candidate.mtls_policy.client_validation_trust_config:
            trust = short_name(candidate.mtls_policy.client_validation_trust_config)
        out.append((resources_pb2.ShadowPolicy(candidate=policy_name, candidate_version=candidate.etag,
                                               server_tls_policy=_resolved(candidate, trust)), candidate, trust))
    candidate_tc = candidate_trusts.get(trust_name) if trust_name else None
    if candidate_tc is not None and trust_name:
        bundle = shadow_name(trust_name)
        out.append((resources_pb2.ShadowPolicy(candidate=trust_name, candidate_version=candidate_tc.etag,
                                               server_tls_policy=_resolved(policy, bundle)), candidate_tc, bundle))
    return out


@dataclass
class SnapshotBuilder:
    """Builds group snapshots from store states. Pure apart from a memo of encoded resources, which lets
    unchanged resources keep their encoding from one revision to the next."""

    bundle_converter: Callable[[resources_pb2.TrustConfig], xds_pb2.TrustBundle] = default_bundle_converter
    _encoded: dict[tuple[str, str, bytes], any_pb2.Any] = field(default_factory=dict)

    def build(self, state: TypingAny) -> StateSnapshots:
        """`state`: a `control_plane.store.base.StoreState` (revision, written_at, the four kinds)."""
        encoded_now: dict[tuple[str, str, bytes], any_pb2.Any] = {}

        def encode(type_url: str, name: str, source: Iterable[Message], make: Callable[[], Message]) -> any_pb2.Any:
            digest = hashlib.sha256()
            for part in source:
                # The store's etag is a content hash: it spares re-serialising a multi-MB TrustConfig on
                # every build. Without one (tests, other stores), hash the content itself.
                etag = getattr(part, "etag", "")
                digest.update(etag.encode() if etag else part.SerializeToString(deterministic=True))
                digest.update(b"\0")
            key = (type_url, name, digest.digest())
            packed = encoded_now.get(key) or self._encoded.get(key)
            if packed is None:
                packed = _pack(make(), type_url)
            encoded_now[key] = packed
            return packed

        policies = {short_name(n): p for n, p in state.server_tls_policies.items()}
        trust_configs = {short_name(n): t for n, t in state.trust_configs.items()}
        certificates = {short_name(n): c for n, c in state.certificates.items()}
        # Shadow candidates (SPEC §12) by their active resource's name (`trustConfigs/ID`).
        candidate_policies = {_active(n): p for n, p in getattr(state, "shadow_server_tls_policies", {}).items()}
        candidate_trusts = {_active(n): t for n, t in getattr(state, "shadow_trust_configs", {}).items()}

        listeners: dict[str, ListenerEntry] = {}
        for raw_name, listener in state.listeners.items():
            name = short_name(raw_name)
            policy_name = short_name(listener.server_tls_policy) if listener.server_tls_policy else ""
            policy = policies.get(policy_name)
            trust_name: str | None = None
            if policy is not None and policy.HasField("mtls_policy") and policy.mtls_policy.client_validation_trust_config:
                trust_name = short_name(policy.mtls_policy.client_validation_trust_config)
            shadows = shadow_policies(policy, policy_name, trust_name, candidate_policies, candidate_trusts)

            def make_listener(listener: resources_pb2.Listener = listener,
                              policy: resources_pb2.ServerTlsPolicy | None = policy,
                              name: str = name, policy_name: str = policy_name,
                              trust_name: str | None = trust_name,
                              shadows: list[tuple[resources_pb2.ShadowPolicy, Message, str]] = shadows) -> Message:
                out = resources_pb2.Listener()
                out.CopyFrom(listener)
                out.name = name
                if listener.certificate:
                    out.certificate = short_name(listener.certificate)
                out.certificates[:] = [short_name(c) for c in listener.certificates]
                for route in out.routes:
                    if route.backend_service:
                        route.backend_service = short_name(route.backend_service)
                if listener.default_backend_service:
                    out.default_backend_service = short_name(listener.default_backend_service)
                if policy is not None:
                    out.server_tls_policy = policy_name
                    out.resolved_server_tls_policy.CopyFrom(policy)
                    if trust_name:
                        out.resolved_server_tls_policy.mtls_policy.client_validation_trust_config = trust_name
                # Write metadata (times, etags) would make identical content hash differently.
                for message in (out, out.resolved_server_tls_policy):
                    for meta in ("create_time", "update_time", "etag"):
                        message.ClearField(meta)
                out.shadow_policies.extend(shadow for shadow, _, _ in shadows)
                return out

            sources: list[Message] = [listener] + ([policy] if policy is not None else [])
            sources += [source for _, source, _ in shadows]
            packed = encode(rt.LISTENER, name, sources, make_listener)
            cert_names = tuple(short_name(c) for c in listener_certificates(listener))
            service_names = tuple(sorted({short_name(r.backend_service) for r in listener.routes if r.backend_service}
                                         | ({short_name(listener.default_backend_service)}
                                            if listener.default_backend_service else set())))
            shadow_bundles = tuple(bundle for _, _, bundle in shadows if bundle)
            listeners[name] = (listener, packed, cert_names, trust_name, service_names, shadow_bundles)

        authentications = {short_name(n): a for n, a in state.backend_authentication_configs.items()}
        services: dict[str, tuple[any_pb2.Any, tuple[str, ...], str | None]] = {}
        for raw_name, service in state.backend_services.items():
            name = short_name(raw_name)
            auth_name = short_name(service.backend_authentication) if service.backend_authentication else ""
            auth = authentications.get(auth_name)

            def make_service(service: backends_pb2.BackendService = service, name: str = name,
                             auth_name: str = auth_name,
                             auth: backends_pb2.BackendAuthenticationConfig | None = auth) -> Message:
                out = backends_pb2.BackendService()
                out.CopyFrom(service)
                out.name = name
                if auth is not None:
                    out.backend_authentication = auth_name
                    resolved = out.resolved_backend_authentication
                    resolved.CopyFrom(auth)
                    resolved.name = auth_name
                    if auth.client_certificate:
                        resolved.client_certificate = short_name(auth.client_certificate)
                    if auth.trust_config:
                        resolved.trust_config = short_name(auth.trust_config)
                for message in (out, out.resolved_backend_authentication) if auth is not None else (out,):
                    for meta in ("create_time", "update_time", "etag"):
                        message.ClearField(meta)
                return out

            service_sources: list[Message] = [service] + ([auth] if auth is not None else [])
            packed = encode(rt.BACKEND_SERVICE, name, service_sources, make_service)
            client_cert = short_name(auth.client_certificate) if auth is not None and auth.client_certificate else ""
            trust = short_name(auth.trust_config) if auth is not None and auth.trust_config else None
            services[name] = (packed, (client_cert,) if client_cert else (), trust)

        bundles: dict[str, any_pb2.Any] = {}
        for name, tc in trust_configs.items():
            def make_bundle(tc: resources_pb2.TrustConfig = tc, name: str = name) -> Message:
                bundle = self.bundle_converter(tc)
                bundle.name = name
                return bundle

            try:
                bundles[name] = encode(rt.TRUST_BUNDLE, name, [tc], make_bundle)
            except ValueError as exc:
                # Writes are validated, so this means a damaged store; one bad bundle must not stop every
                # group's updates. Nodes needing it NACK ("… was not delivered") and keep their config.
                log.error("%s cannot be distributed: %s", name, exc)
        for active, tc in candidate_trusts.items():
            candidate_name = shadow_name(active)

            def make_candidate_bundle(tc: resources_pb2.TrustConfig = tc, name: str = candidate_name) -> Message:
                bundle = self.bundle_converter(tc)
                bundle.name = name
                return bundle

            try:
                bundles[candidate_name] = encode(rt.TRUST_BUNDLE, candidate_name, [tc], make_candidate_bundle)
            except ValueError as exc:
                # Nodes judge nothing under it (they never wait for a candidate bundle).
                log.error("%s cannot be distributed: %s", candidate_name, exc)
        certs: dict[str, any_pb2.Any] = {}
        for name, cert in certificates.items():
            def make_cert(cert: resources_pb2.Certificate = cert, name: str = name) -> Message:
                return server_certificate(cert, name)

            certs[name] = encode(rt.SERVER_CERTIFICATE, name, [cert], make_cert)

        self._encoded = encoded_now
        return StateSnapshots(state.revision, state.written_at, listeners, bundles, certs, services)


@dataclass
class StateSnapshots:
    """The encoded resources of one store revision, and the group snapshots cut from them (memoised: one
    `GroupSnapshot` object per group, shared by all of its nodes' streams)."""

    revision: int
    written_at: float
    listeners: Mapping[str, ListenerEntry]
    bundles: Mapping[str, any_pb2.Any]
    certificates: Mapping[str, any_pb2.Any]
    # name → (encoded, client certificate names, trust bundle name) of every BackendService
    backend_services: Mapping[str, tuple[any_pb2.Any, tuple[str, ...], str | None]] = field(default_factory=dict)
    _groups: dict[GroupKey, GroupSnapshot] = field(default_factory=dict)
    # label set → group key, and the listeners' selectors as plain tuples: a push to 10,000 streams asks
    # for the key of every stream, most with the same labels (protobuf maps are slow to iterate)
    _keys: dict[frozenset[tuple[str, str]], GroupKey] = field(default_factory=dict)
    _selectors: tuple[tuple[str, dict[str, str]], ...] | None = None

    def group_key(self, labels: Mapping[str, str]) -> GroupKey:
        memo = frozenset(labels.items())
        key = self._keys.get(memo)
        if key is None:
            if self._selectors is None:
                self._selectors = tuple((n, dict(lst.node_selector)) for n, (lst, *_) in sorted(self.listeners.items()))
            key = tuple(n for n, selector in self._selectors if selects(selector, labels))
            self._keys[memo] = key
        return key

    def for_labels(self, labels: Mapping[str, str]) -> GroupSnapshot:
        return self.for_group(self.group_key(labels))

    def for_group(self, key: GroupKey) -> GroupSnapshot:
        snap = self._groups.get(key)
        if snap is not None:
            return snap
        listeners = {n: self.listeners[n][1] for n in key}
        cert_names = {c for n in key for c in self.listeners[n][2]}
        trust_names = {t for n in key if (t := self.listeners[n][3])}
        service_names = {s for n in key for s in self.listeners[n][4] if s in self.backend_services}
        services = {s: self.backend_services[s][0] for s in service_names}
        cert_names |= {c for s in service_names for c in self.backend_services[s][1]}
        trust_names |= {t for s in service_names if (t := self.backend_services[s][2])}
        trust_names |= {b for n in key for b in self.listeners[n][5]}  # shadow candidates' bundles
        # A reference to a missing resource cannot happen through the API (references are checked on
        # write); skipping it keeps a broken store from producing a half-encoded resource.
        bundles = {n: self.bundles[n] for n in trust_names if n in self.bundles}
        certs = {n: self.certificates[n] for n in cert_names if n in self.certificates}
        by_type: tuple[tuple[str, dict[str, any_pb2.Any]], ...] = (
            (rt.LISTENER, listeners), (rt.TRUST_BUNDLE, bundles), (rt.SERVER_CERTIFICATE, certs),
            (rt.BACKEND_SERVICE, services))
        types = {t: TypeSnapshot(t, content_version(res), res) for t, res in by_type}
        snap = GroupSnapshot(key, self.revision, self.written_at, types)
        self._groups[key] = snap
        return snap

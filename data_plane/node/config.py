"""The node's configuration as received over xDS (`NodeConfig`, plain protobufs so it can be handed to worker
processes) and its validation before anything is applied: every resource is decoded, compiled with the
same code the workers use, and cross-checked; the first problem becomes the NACK's message."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from mtlsgate import resource_types as rt
from mtlsgate.v1 import backends_pb2, resources_pb2, xds_pb2


class ConfigRejected(Exception):
    """The node cannot use this configuration; the message (sent as the NACK's error_detail) says why."""


# Bounds on what the control plane (or a forged cache file) can make the node hold.
MAX_RESOURCES_PER_TYPE = 1000
MAX_RESOURCE_BYTES = 40 * 1024 * 1024  # a TrustBundle with a 100,000-entry CRL is a few MB
# Shadow candidates per listener (SPEC §12): the control plane sends at most two (a candidate policy and a
# candidate trust config); each one is judged on every new handshake, so a forged config cannot ask for more.
MAX_SHADOW_POLICIES = 4

_MESSAGES: dict[str, type[Message]] = {
    rt.LISTENER: resources_pb2.Listener,
    rt.TRUST_BUNDLE: xds_pb2.TrustBundle,
    rt.SERVER_CERTIFICATE: xds_pb2.ServerCertificate,
    rt.BACKEND_SERVICE: backends_pb2.BackendService,
}


@dataclass(frozen=True)
class NodeConfig:
    versions: Mapping[str, str] = field(default_factory=dict)  # type URL → version
    listeners: Mapping[str, resources_pb2.Listener] = field(default_factory=dict)
    bundles: Mapping[str, xds_pb2.TrustBundle] = field(default_factory=dict)
    certificates: Mapping[str, xds_pb2.ServerCertificate] = field(default_factory=dict)
    backend_services: Mapping[str, backends_pb2.BackendService] = field(default_factory=dict)

    def required_names(self) -> dict[str, frozenset[str]]:
        """The by-name resources its listeners need: certificates, policies' trust bundles, backend services
        and what those services' BackendAuthenticationConfigs name."""
        return required_names(self.listeners, self.backend_services)

    def subscribed_names(self) -> dict[str, frozenset[str]]:
        """What the node asks for: the required names plus its shadow candidates' trust bundles."""
        return subscribed_names(self.listeners, self.required_names())

    # ---- the cache file format (JSON with base64 protobufs; it holds private keys: written 0600)

    def to_json(self) -> str:
        def enc(m: Mapping[str, Message]) -> dict[str, str]:
            return {n: base64.b64encode(v.SerializeToString(deterministic=True)).decode() for n, v in m.items()}

        return json.dumps({"versions": dict(self.versions), "listeners": enc(self.listeners),
                           "bundles": enc(self.bundles), "certificates": enc(self.certificates),
                           "backendServices": enc(self.backend_services)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> NodeConfig:
        try:
            data = json.loads(text)

            def dec(key: str, message: type[Message]) -> dict[str, Message]:
                return {n: message.FromString(base64.b64decode(v)) for n, v in data[key].items()}

            services = dec("backendServices", backends_pb2.BackendService) if "backendServices" in data else {}

            return cls(versions={str(k): str(v) for k, v in data["versions"].items()},
                       listeners=dec("listeners", resources_pb2.Listener),  # type: ignore[arg-type]
                       bundles=dec("bundles", xds_pb2.TrustBundle),  # type: ignore[arg-type]
                       certificates=dec("certificates", xds_pb2.ServerCertificate),  # type: ignore[arg-type]
                       backend_services=services)  # type: ignore[arg-type]
        except (ValueError, KeyError, TypeError, AttributeError, DecodeError) as exc:
            raise ConfigRejected(f"cached configuration is unreadable: {exc}") from exc


def listener_backend_services(listener: resources_pb2.Listener) -> set[str]:
    names = {route.backend_service for route in listener.routes if route.backend_service}
    return names | ({listener.default_backend_service} if listener.default_backend_service else set())


def required_names(listeners: Mapping[str, resources_pb2.Listener],
                   backend_services: Mapping[str, backends_pb2.BackendService] | None = None
                   ) -> dict[str, frozenset[str]]:
    """By type: the names `listeners` need, including, for the services among `backend_services` that they
    name, the client certificates and trust bundles of their BackendAuthenticationConfigs (a second level:
    known once those services have arrived)."""
    from data_plane.validation.resources import listener_certificates

    certs = {name for lst in listeners.values() for name in listener_certificates(lst)}
    bundles = {lst.resolved_server_tls_policy.mtls_policy.client_validation_trust_config
               for lst in listeners.values()
               if lst.resolved_server_tls_policy.mtls_policy.client_validation_trust_config}
    services = {name for lst in listeners.values() for name in listener_backend_services(lst)}
    for name in services:
        service = (backend_services or {}).get(name)
        if service is None:
            continue
        auth = service.resolved_backend_authentication
        if auth.client_certificate:
            certs.add(auth.client_certificate)
        if auth.trust_config:
            bundles.add(auth.trust_config)
    return {rt.SERVER_CERTIFICATE: frozenset(certs), rt.TRUST_BUNDLE: frozenset(bundles),
            rt.BACKEND_SERVICE: frozenset(services)}


def shadow_bundle_names(listeners: Mapping[str, resources_pb2.Listener]) -> frozenset[str]:
    """The trust bundles the listeners' shadow candidates judge with (SPEC §12). The node asks for them but
    never waits for them: a candidate whose bundle is missing (or does not compile) is not judged, and the
    active configuration applies and is ACKed as if there were no candidate."""
    return frozenset(name for lst in listeners.values() for shadow in lst.shadow_policies
                     if (name := shadow.server_tls_policy.mtls_policy.client_validation_trust_config))


def subscribed_names(listeners: Mapping[str, resources_pb2.Listener],
                     required: Mapping[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    out = dict(required)
    out[rt.TRUST_BUNDLE] = out.get(rt.TRUST_BUNDLE, frozenset()) | shadow_bundle_names(listeners)
    return out


def decode_resources(type_url: str, resources: list[any_pb2.Any]) -> dict[str, Message]:
    """DiscoveryResponse resources → {name: message}; ConfigRejected names the bad one."""
    if len(resources) > MAX_RESOURCES_PER_TYPE:
        raise ConfigRejected(f"{len(resources)} {rt.short_type(type_url)} resources; at most "
                             f"{MAX_RESOURCES_PER_TYPE} accepted")
    message_type = _MESSAGES.get(type_url)
    if message_type is None:
        raise ConfigRejected(f"type {type_url} is not understood by this node")
    out: dict[str, Message] = {}
    for index, packed in enumerate(resources):
        where = f"{rt.short_type(type_url)} resource #{index}"
        if packed.type_url != type_url:
            raise ConfigRejected(f"{where}: has type {packed.type_url}, expected {type_url}")
        if len(packed.value) > MAX_RESOURCE_BYTES:
            raise ConfigRejected(f"{where}: {len(packed.value)} bytes, more than {MAX_RESOURCE_BYTES}")
        try:
            message = message_type.FromString(packed.value)
        except DecodeError as exc:
            raise ConfigRejected(f"{where}: cannot be decoded: {exc}") from exc
        name = message.name  # type: ignore[attr-defined]
        if not name:
            raise ConfigRejected(f"{where}: has no name")
        if name in out:
            raise ConfigRejected(f"{name}: sent twice in one response")
        out[name] = message
    return out


def _check_certificate(name: str, cert: xds_pb2.ServerCertificate) -> None:
    try:
        chain = x509.load_pem_x509_certificates(cert.pem_certificate_chain.encode())
    except ValueError as exc:
        raise ConfigRejected(f"{name}: certificate chain is not valid PEM: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(cert.pem_private_key.encode(), password=None)
    except (ValueError, TypeError) as exc:
        # Never echo key material: say only that it does not load.
        raise ConfigRejected(f"{name}: private key cannot be loaded ({type(exc).__name__})") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise ConfigRejected(f"{name}: private key does not match the leaf certificate")


def _check_backend(name: str, backend: str) -> None:
    host, sep, port = backend.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigRejected(f"{name}: backend {backend[:100]!r} is not HOST:PORT")


def validate_node_config(config: NodeConfig) -> None:
    """Compile everything the workers will compile and cross-check references; raise ConfigRejected with
    the first problem (`listeners/a: certificate certificates/x was not received`)."""
    from data_plane.validation.bundle import InvalidBundle, compile_bundle
    from data_plane.validation.headers import compile_headers
    from data_plane.validation.policy import compile_policy
    from data_plane.validation.resources import (
        listener_certificates,
        route_problems,
        validate_backend_authentication_config,
        validate_backend_service,
    )

    for name, service in sorted(config.backend_services.items()):
        problems = validate_backend_service(service)
        if service.HasField("resolved_backend_authentication"):
            problems += validate_backend_authentication_config(service.resolved_backend_authentication)
            auth = service.resolved_backend_authentication
            for kind, wanted, held in (("certificate", auth.client_certificate, config.certificates),
                                       ("trust bundle", auth.trust_config, config.bundles)):
                if wanted and wanted not in held:
                    raise ConfigRejected(f"{name}: {kind} {wanted} was not received")
        elif service.backend_authentication:
            raise ConfigRejected(f"{name}: backendAuthentication {service.backend_authentication} was not resolved")
        if problems:
            raise ConfigRejected(f"{name}: {problems[0]}")
    # A bundle only shadow candidates use is compiled by the workers, and a failure only stops that
    # candidate being judged (shadow_bundle_names): it must never block the active configuration.
    candidate_only = shadow_bundle_names(config.listeners) - config.required_names()[rt.TRUST_BUNDLE]
    for name, bundle in sorted(config.bundles.items()):
        if name in candidate_only:
            continue
        try:
            compile_bundle(bundle)
        except InvalidBundle as exc:
            raise ConfigRejected(f"{name}: {exc}") from exc
    for name, cert in sorted(config.certificates.items()):
        _check_certificate(name, cert)
    ports: dict[int, str] = {}
    for name, lst in sorted(config.listeners.items()):
        if not 0 < lst.port < 65536:
            raise ConfigRejected(f"{name}: port {lst.port} is outside 1-65535")
        if lst.port in ports:
            raise ConfigRejected(f"{name}: port {lst.port} is also used by {ports[lst.port]}")
        ports[lst.port] = name
        certificates = listener_certificates(lst)
        if not certificates:
            raise ConfigRejected(f"{name}: names no certificate")
        for cert_name in certificates:
            if cert_name not in config.certificates:
                raise ConfigRejected(f"{name}: certificate {cert_name} was not received")
        if lst.backend or not (lst.routes or lst.default_backend_service):
            _check_backend(name, lst.backend)
        for service_name in sorted(listener_backend_services(lst)):
            if service_name not in config.backend_services:
                raise ConfigRejected(f"{name}: backend service {service_name} was not received")
        problems = route_problems(lst)
        if problems:
            raise ConfigRejected(f"{name}: {problems[0]}")
        policy = lst.resolved_server_tls_policy if lst.HasField("resolved_server_tls_policy") else None
        trust = policy.mtls_policy.client_validation_trust_config if policy is not None else ""
        if trust and trust not in config.bundles:
            raise ConfigRejected(f"{name}: trust bundle {trust} was not received")
        if len(lst.shadow_policies) > MAX_SHADOW_POLICIES:
            raise ConfigRejected(f"{name}: {len(lst.shadow_policies)} shadow candidates; at most "
                                 f"{MAX_SHADOW_POLICIES} accepted")
        try:
            compile_policy(policy)
            compile_headers(list(lst.custom_request_headers))
        except ValueError as exc:
            raise ConfigRejected(f"{name}: {exc}") from exc

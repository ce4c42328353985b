"""Resource commands against a running control plane: `apply -f`, `import`, `get`, `delete`, `audit`."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from mtlsgate.v1 import api_pb2, api_pb2_grpc, rollouts_pb2, rollouts_pb2_grpc

from control_plane.cli.client import add_client_arguments, open_channel, rpc_error
from control_plane.cli.common import CliError, UsageError
from control_plane.convergence import Progress, acked_versions, apply_outcome, settled, targeted
from control_plane.manifests import (
    ManifestError,
    ManifestResource,
    dump_yaml,
    label,
    order_for_apply,
    parse_gcp_import,
    parse_manifest,
    to_document,
)
from control_plane.resource_names import (
    BACKEND_AUTHENTICATION_CONFIG,
    BACKEND_SERVICE,
    CERTIFICATE,
    NODE,
    ROLLOUT_POLICY,
    SERVER_TLS_POLICY,
    TRUST_CONFIG,
    InvalidName,
    Kind,
    normalise_name,
    normalise_references,
    parse_kind,
    references,
)

TIMEOUT = 30.0
DEFAULT_WAIT = 60.0


def _duration(text: str) -> float:
    from control_plane.convergence import parse_duration

    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30, 30s or 2m") from None
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def register(subparsers: argparse._SubParsersAction) -> None:
    apply = subparsers.add_parser(
        "apply", help="create or update resources from YAML manifests",
        description="Each document has kind: (TrustConfig, Certificate, ServerTlsPolicy, BackendService, "
        "BackendAuthenticationConfig, Listener, Node, RolloutPolicy) and name:, "
        "plus the resource's fields. Everything is validated before the first write; writes go in reference "
        "order. Prints KIND/NAME created|configured|unchanged per resource.")
    apply.add_argument("-f", "--filename", action="append", required=True, metavar="FILE|DIR",
                       help="manifest file, directory of *.yaml/*.yml/*.json, or - for stdin (repeatable)")
    apply.add_argument("--dry-run", action="store_true", help="validate on the server, write nothing")
    apply.add_argument("--wait", nargs="?", const=DEFAULT_WAIT, type=_duration, metavar="TIMEOUT",
                       help="return once every connected node the change targets has ACKed it (default "
                       f"timeout {DEFAULT_WAIT:g}s; e.g. --wait=30s); prints each node's convergence; exit 1 "
                       "naming the nodes that NACKed (with the reason) or did not ACK in time")
    apply.add_argument("--rollout", metavar="ROLLOUT_POLICY",
                       help="send the change out wave by wave with this RolloutPolicy (SPEC §12): nodes not yet "
                       "reached keep what they serve; `mtlsgate rollout status` follows it")
    apply.add_argument("--shadow", action="store_true",
                       help="store each TrustConfig / ServerTlsPolicy as a shadow candidate beside the active one "
                       "of the same name: nodes judge every new handshake under both, enforce only the active "
                       "one and report where they differ (`mtlsgate shadow status|promote|discard NAME`)")
    add_client_arguments(apply)
    apply.set_defaults(func=run_apply)

    imp = subparsers.add_parser(
        "import", help="create or replace a resource from a gcloud import file",
        description="Takes the YAML that `gcloud certificate-manager trust-configs import` / `gcloud "
        "network-security server-tls-policies import` / `gcloud network-security backend-authentication-configs "
        "import` take, unchanged (output fields such as createTime, "
        "etag, name are ignored; full GCP names in references are accepted).")
    imp.add_argument("kind", choices=["trust-config", "server-tls-policy", "backend-authentication-config"])
    imp.add_argument("name", help="resource ID (or full name)")
    imp.add_argument("--source", required=True, metavar="FILE", help="YAML file (- for stdin)")
    add_client_arguments(imp)
    imp.set_defaults(func=run_import)

    get = subparsers.add_parser("get", help="show resources",
                                description="KIND: trust-configs, server-tls-policies, certificates, listeners, "
                                "backend-services, backend-authentication-configs, nodes (singular forms accepted; `get nodes` adds each node's connection state). Private keys are never shown: privateKeySha256 is.")
    get.add_argument("kind")
    get.add_argument("name", nargs="?")
    get.add_argument("-o", "--output", choices=["table", "yaml", "json"], default="table")
    add_client_arguments(get)
    get.set_defaults(func=run_get)

    delete = subparsers.add_parser("delete", help="delete a resource (refused while others reference it)")
    delete.add_argument("kind")
    delete.add_argument("name")
    delete.add_argument("--etag", default="", help="only delete if the resource still has this etag")
    add_client_arguments(delete)
    delete.set_defaults(func=run_delete)

    audit = subparsers.add_parser("audit", help="list the audit log (who changed what, when)")
    audit.add_argument("resource", nargs="?", help="only this resource (e.g. trustConfigs/demo)")
    audit.add_argument("-o", "--output", choices=["table", "json"], default="table")
    add_client_arguments(audit)
    audit.set_defaults(func=run_audit)


# ---------------------------------------------------------------- stubs and calls


def _stub(kind: Kind, channel: grpc.Channel) -> Any:
    name = f"{kind.method_suffix}ServiceStub"
    module = api_pb2_grpc if hasattr(api_pb2_grpc, name) else rollouts_pb2_grpc
    return getattr(module, name)(channel)


def _get(kind: Kind, stub: Any, name: str) -> Message | None:
    try:
        return getattr(stub, f"Get{kind.method_suffix}")(api_pb2.GetResourceRequest(name=name), timeout=TIMEOUT)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def _list(kind: Kind, stub: Any) -> list[Message]:
    items: list[Message] = []
    token = ""
    while True:
        response = getattr(stub, f"List{kind.plural_suffix}")(
            api_pb2.ListResourcesRequest(page_size=500, page_token=token), timeout=TIMEOUT)
        items.extend(getattr(response, kind.list_field))
        token = response.next_page_token
        if not token:
            return items


def _upsert(kind: Kind, stub: Any, resource: Message, *, dry_run: bool = False) -> str:
    """Update with allow_missing; returns created | configured | unchanged."""
    existing = _get(kind, stub, resource.name)  # type: ignore[attr-defined]
    request_name = f"Update{kind.method_suffix}Request"
    request = getattr(api_pb2 if hasattr(api_pb2, request_name) else rollouts_pb2, request_name)(
        **{kind.field: resource}, allow_missing=True, validate_only=dry_run)
    stored = getattr(stub, f"Update{kind.method_suffix}")(request, timeout=TIMEOUT)
    if existing is None:
        return "created"
    if stored.etag == existing.etag:  # type: ignore[attr-defined]
        return "unchanged"
    return "configured"


# ---------------------------------------------------------------- apply / import


def _read_source(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None


def _manifest_files(targets: list[str]) -> list[str]:
    files: list[str] = []
    for target in targets:
        path = Path(target)
        if target != "-" and path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.suffix in MANIFEST_SUFFIXES and p.is_file())
            if not found:
                raise UsageError(f"{target}: no *.yaml, *.yml or *.json files")
            files.extend(found)
        else:
            files.append(target)
    return files


def _local_problems(item: ManifestResource) -> list[str]:
    """The same pure validation the server runs, so a bad document stops the apply before any write."""
    from control_plane.authz.admission import validate_node
    from control_plane.rollouts.policy import validate_rollout_policy
    from data_plane.validation import resources as validation

    validators = {"TrustConfig": validation.validate_trust_config, "Certificate": validation.validate_certificate,
                  "ServerTlsPolicy": validation.validate_server_tls_policy, "Listener": validation.validate_listener,
                  "Node": validate_node, "RolloutPolicy": validate_rollout_policy,
                  "BackendService": validation.validate_backend_service,
                  "BackendAuthenticationConfig": validation.validate_backend_authentication_config}
    problems = [f"{field}: {text}" for field, text in normalise_references(item.resource)]
    violations = validators[item.kind.kind](item.resource)  # type: ignore[arg-type]
    if item.kind is CERTIFICATE:
        # Keys are write-only: a manifest from `get -o yaml` has none, and the server keeps the stored one
        # (it still refuses a new Certificate without a key).
        violations = [v for v in violations if (v.field, v.description) != ("pemPrivateKey", "required")]
    return problems + [str(v) for v in violations]


def run_apply(args: argparse.Namespace) -> int:
    items: list[ManifestResource] = []
    try:
        for path in _manifest_files(args.filename):
            items.extend(parse_manifest(_read_source(path), "<stdin>" if path == "-" else path))
    except ManifestError as exc:
        raise UsageError(str(exc)) from None
    if not items:
        raise UsageError("no resources in the given files")
    if args.shadow:
        from control_plane.cli.shadow_cmd import check_shadow_kinds

        check_shadow_kinds(args, items)
    seen: dict[str, str] = {}
    for item in items:
        name = item.resource.name  # type: ignore[attr-defined]
        if name in seen:
            raise UsageError(f"{item.source}: {name} is also defined in {seen[name]}")
        seen[name] = item.source
        problems = _local_problems(item)
        if problems:
            raise UsageError(f"{item.source}: {'; '.join(problems)}")
    if args.shadow:
        from control_plane.cli.shadow_cmd import apply_shadow

        return apply_shadow(args, items)
    begun: list[Any] = []  # the roll-out this apply opened, aborted if a write fails
    try:
        with open_channel(args) as channel:
            _check_references(items, channel)
            fleet = api_pb2_grpc.FleetServiceStub(channel)
            # What every node had acked before the writes: the nodes whose snapshot then differs are the
            # ones this change targets.
            before = acked_versions(fleet.ListNodes(api_pb2.ListNodesRequest(), timeout=TIMEOUT)) \
                if args.wait and not args.dry_run else {}
            not_yet_stored: set[str] = set()  # dry run: created by this apply, so the server cannot see them
            run = None
            if args.rollout and not args.dry_run:
                run = rollouts_pb2_grpc.RolloutServiceStub(channel).BeginRollout(
                    rollouts_pb2.BeginRolloutRequest(policy=args.rollout, description="mtlsgate apply --rollout"),
                    timeout=TIMEOUT)
                begun.append((channel, run))
            for item in order_for_apply(items):
                stub = _stub(item.kind, channel)
                name = item.resource.name  # type: ignore[attr-defined]
                suffix = " (dry run)" if args.dry_run else ""
                if args.dry_run and any(r.target in not_yet_stored for r in references(item.resource)):
                    outcome = "created" if _get(item.kind, stub, name) is None else "configured"
                    suffix = " (dry run, validated locally)"
                else:
                    outcome = _upsert(item.kind, stub, item.resource, dry_run=args.dry_run)
                if args.dry_run and outcome == "created":
                    not_yet_stored.add(name)
                print(f"{label(item.kind, item.resource.name)} {outcome}{suffix}", flush=True)  # type: ignore[attr-defined]
            if run is not None:
                from control_plane.cli.rollout_cmd import print_started

                run = rollouts_pb2_grpc.RolloutServiceStub(channel).CommitRollout(
                    rollouts_pb2.RolloutRequest(name=run.name), timeout=TIMEOUT)
                begun.clear()
                print_started(run)
                if args.wait:
                    print("(--wait with --rollout: follow the waves with `mtlsgate rollout status`)")
                return 0
            if args.wait and not args.dry_run:
                return _wait_for_fleet(fleet, before, args.wait)
    except grpc.RpcError as exc:
        for _channel, run in begun:
            with open_channel(args) as again:
                try:
                    rollouts_pb2_grpc.RolloutServiceStub(again).AbortRollout(rollouts_pb2.RolloutRequest(
                        name=run.name, reason="the apply that opened it failed"), timeout=TIMEOUT)
                    print(f"{run.name} aborted: the resources written so far are back as they were",
                          file=sys.stderr)
                except grpc.RpcError:
                    pass
        raise rpc_error(exc, args) from None
    return 0


def _wait_for_fleet(fleet: Any, before: dict[str, dict[str, str]], timeout: float) -> int:
    """Follow WatchNodes until every targeted node has ACKed (or NACKed) its new snapshot; print each node
    once when it is done. Exit 1 names the nodes that NACKed, with the reason, or did not ACK in time."""
    started = time.monotonic()
    targets: list[str] | None = None
    outcome = None
    reported: set[str] = set()
    try:
        for report in fleet.WatchNodes(api_pb2.ListNodesRequest(), timeout=timeout):
            if not settled(report):
                continue  # the write is still in the debounce: these states predate it
            if targets is None:
                targets = [n.id for n in targeted(report, before)]
                if not targets:
                    print("no connected node is affected by this change")
                    return 0
            outcome = apply_outcome(report, targets)
            for node in outcome.nodes:
                if node.node_id in reported or node.progress is Progress.PENDING:
                    continue
                reported.add(node.node_id)
                elapsed = time.monotonic() - started
                if node.progress is Progress.CONVERGED:
                    print(f"node {node.node_id} acked after {elapsed:.2f}s", flush=True)
                else:
                    print(f"node {node.node_id} REJECTED: {node.detail}", flush=True)
            if outcome.done:
                break
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    if outcome is None or not outcome.done:
        pending = [n for n in (outcome.nodes if outcome else ()) if n.progress is Progress.PENDING]
        names = ", ".join(f"{n.node_id} ({n.detail})" if n.detail else n.node_id for n in pending)
        names = names or "the control plane has not built snapshots with this change"
        raise CliError(f"--wait: not acked after {timeout:g}s: {names}")
    rejected = [n for n in outcome.nodes if n.progress is Progress.REJECTED]
    if rejected:
        raise CliError("--wait: rejected by " + "; ".join(f"{n.node_id} ({n.detail})" for n in rejected))
    print(f"{len(outcome.nodes)} node(s) acked this change")
    return 0


def _check_references(items: list[ManifestResource], channel: grpc.Channel) -> None:
    """Every reference must name a resource of this apply or one already stored."""
    defined = {i.resource.name for i in items}  # type: ignore[attr-defined]
    stored: dict[str, set[str]] = {}
    for item in items:
        for ref in references(item.resource):
            if ref.target in defined:
                continue
            if ref.kind.collection not in stored:
                stored[ref.kind.collection] = {m.name for m in _list(ref.kind, _stub(ref.kind, channel))}  # type: ignore[attr-defined]
            if ref.target not in stored[ref.kind.collection]:
                raise CliError(f"{item.source}: {ref.field}: {ref.target} does not exist and is not in the "
                               "applied files")


def run_import(args: argparse.Namespace) -> int:
    kind = {"trust-config": TRUST_CONFIG, "server-tls-policy": SERVER_TLS_POLICY,
            "backend-authentication-config": BACKEND_AUTHENTICATION_CONFIG}[args.kind]
    try:
        resource = parse_gcp_import(_read_source(args.source), kind, args.name,
                                    "<stdin>" if args.source == "-" else args.source)
    except ManifestError as exc:
        raise UsageError(str(exc)) from None
    source = f"{'<stdin>' if args.source == '-' else args.source} {label(kind, resource.name)}"  # type: ignore[attr-defined]
    problems = _local_problems(ManifestResource(kind, resource, source))
    if problems:
        raise UsageError(f"{source}: {'; '.join(problems)}")
    try:
        with open_channel(args) as channel:
            outcome = _upsert(kind, _stub(kind, channel), resource)
    except grpc.RpcError as exc:
        raise rpc_error(exc, args) from None
    print(f"{label(kind, resource.name)} {outcome}")  # type: ignore[attr-defined]
    return 0


# ---------------------------------------------------------------- get / delete


def _kind(text: str) -> Kind:
    try:
        return parse_kind(text)
    except InvalidName as exc:
        raise UsageError(str(exc)) from None


def run_get(args: argparse.Namespace) -> int:
    kind = _kind(args.kind)
    try:
        name = normalise_name(args.name, kind) if args.name else None
    except InvalidName as exc:
        raise UsageError(str(exc)) from None
    try:
        with open_channel(args) as channel:
            stub = _stub(kind, channel)
            if name:
                found = _get(kind, stub, name)
                if found is None:
                    raise CliError(f"NOT_FOUND: {name} not found")
                items = [found]
            else:
                items = _list(kind, stub)
            fleet = _fleet(channel) if kind is NODE and args.output == "table" else {}
    except grpc.RpcError as exc:
        raise rpc_error(exc, args) from None
    documents = [to_document(m) for m in items]
    if args.output == "yaml":
        if documents:
            sys.stdout.write(dump_yaml(documents))
    elif args.output == "json":
        print(json.dumps(documents[0] if name else documents, indent=2))
    else:
        print(render_table(kind, items, fleet))
    return 0


def _fleet(channel: grpc.Channel) -> dict[str, Any]:
    """Connection state by node ID (FleetService), for `get nodes`."""
    reply = api_pb2_grpc.FleetServiceStub(channel).ListNodes(api_pb2.ListNodesRequest(), timeout=TIMEOUT)
    return {status.id: status for status in reply.nodes}


def run_delete(args: argparse.Namespace) -> int:
    kind = _kind(args.kind)
    try:
        name = normalise_name(args.name, kind)
    except InvalidName as exc:
        raise UsageError(str(exc)) from None
    try:
        with open_channel(args) as channel:
            getattr(_stub(kind, channel), f"Delete{kind.method_suffix}")(
                api_pb2.DeleteResourceRequest(name=name, etag=args.etag), timeout=TIMEOUT)
    except grpc.RpcError as exc:
        raise rpc_error(exc, args) from None
    print(f"{label(kind, name)} deleted")
    return 0


# ---------------------------------------------------------------- tables


def _age(message: Any) -> str:
    if not message.HasField("update_time"):
        return "-"
    seconds = max(0, int(dt.datetime.now(dt.UTC).timestamp() - message.update_time.seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _short(name: str) -> str:
    return name.partition("/")[2] or "-"


def _certificate_summary(pem: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        leaf = x509.load_pem_x509_certificates(pem.encode())[0]
    except (ValueError, IndexError):
        return "?", "?"
    cn = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return (str(cn[0].value) if cn else leaf.subject.rfc4514_string()), leaf.not_valid_after_utc.date().isoformat()


def _node_row(m: Any, status: Any) -> list[str]:
    labels = ",".join(f"{k}={v}" for k, v in sorted(m.labels.items())) or "-"
    if status is None or not status.connected:
        connected, state = "no", "-"
    else:
        connected = f"yes ({status.streams} streams)" if status.streams > 1 else "yes"
        state = api_pb2.SyncState.Name(status.state)
    mismatch = "declares other labels" if status is not None and status.metadata_mismatch else ""
    return [_short(m.name), m.identity, m.cluster or "-", labels, connected, state, mismatch or "-", _age(m)]


def _row(kind: Kind, m: Any) -> list[str]:
    if kind is TRUST_CONFIG:
        return [_short(m.name), str(sum(len(s.trust_anchors) for s in m.trust_stores)),
                str(sum(len(s.intermediate_cas) for s in m.trust_stores)),
                str(sum(len(s.crls) for s in m.trust_stores)), str(len(m.allowlisted_certificates)), _age(m)]
    if kind is SERVER_TLS_POLICY:
        if not m.HasField("mtls_policy"):
            return [_short(m.name), "plain TLS", "-", _age(m)]
        mode = m.mtls_policy.ClientValidationMode.Name(m.mtls_policy.client_validation_mode)
        return [_short(m.name), mode, _short(m.mtls_policy.client_validation_trust_config), _age(m)]
    if kind is CERTIFICATE:
        subject, expires = _certificate_summary(m.pem_certificate)
        return [_short(m.name), subject, expires, m.private_key_sha256[:16], _age(m)]
    if kind is ROLLOUT_POLICY:
        from control_plane.cli.rollout_cmd import describe_gates, describe_waves

        return [_short(m.name), describe_waves(m), describe_gates(m), _age(m)]
    if kind is BACKEND_SERVICE:
        endpoints = ",".join(f"{e.address}*{e.weight or 1}" for e in m.endpoints)
        policy = m.LoadBalancing.Name(m.load_balancing).replace("LOAD_BALANCING_UNSPECIFIED", "ROUND_ROBIN")
        return [_short(m.name), endpoints, policy, _short(m.backend_authentication) or "-", _age(m)]
    if kind is BACKEND_AUTHENTICATION_CONFIG:
        roots = m.WellKnownRoots.Name(m.well_known_roots).replace("WELL_KNOWN_ROOTS_UNSPECIFIED", "-")
        return [_short(m.name), _short(m.client_certificate) or "-", _short(m.trust_config) or "-", roots, _age(m)]
    selector = ",".join(f"{k}={v}" for k, v in sorted(m.node_selector.items())) or "*"
    return [_short(m.name), str(m.port), _short(m.certificate), _short(m.server_tls_policy),
            m.backend or _short(m.default_backend_service) or ("routes" if m.routes else "-"), selector,
            _age(m)]


_HEADERS = {
    "TrustConfig": ["NAME", "ANCHORS", "INTERMEDIATES", "CRLS", "ALLOWLISTED", "AGE"],
    "ServerTlsPolicy": ["NAME", "MODE", "TRUST CONFIG", "AGE"],
    "Certificate": ["NAME", "SUBJECT", "NOT AFTER", "KEY SHA256", "AGE"],
    "Listener": ["NAME", "PORT", "CERTIFICATE", "POLICY", "BACKEND", "NODES", "AGE"],
    "Node": ["NAME", "IDENTITY", "CLUSTER", "LABELS", "CONNECTED", "STATE", "METADATA", "AGE"],
    "RolloutPolicy": ["NAME", "WAVES", "GATES", "AGE"],
    "BackendService": ["NAME", "ENDPOINTS", "LOAD BALANCING", "AUTHENTICATION", "AGE"],
    "BackendAuthenticationConfig": ["NAME", "CLIENT CERTIFICATE", "TRUST CONFIG", "WELL-KNOWN ROOTS", "AGE"],
}


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [headers, *rows])


def render_table(kind: Kind, items: list[Message], fleet: dict[str, Any] | None = None) -> str:
    if not items:
        return f"No {kind.cli_plural} found."
    if kind is NODE:
        return _table(_HEADERS[kind.kind], [_node_row(m, (fleet or {}).get(_short(m.name))) for m in items])
    return _table(_HEADERS[kind.kind], [_row(kind, m) for m in items])


# ---------------------------------------------------------------- audit


def run_audit(args: argparse.Namespace) -> int:
    resource = ""
    if args.resource:
        try:
            resource = normalise_name(args.resource)
        except InvalidName as exc:
            raise UsageError(str(exc)) from None
    entries = []
    try:
        with open_channel(args) as channel:
            stub = api_pb2_grpc.AuditServiceStub(channel)
            token = ""
            while True:
                response = stub.ListAuditEntries(api_pb2.ListAuditEntriesRequest(
                    resource_name=resource, page_size=1000, page_token=token), timeout=TIMEOUT)
                entries.extend(response.entries)
                token = response.next_page_token
                if not token:
                    break
    except grpc.RpcError as exc:
        raise rpc_error(exc, args) from None
    if args.output == "json":
        print(json.dumps([{"revision": e.revision, "time": e.time.ToJsonString(), "actor": e.actor,
                           "role": e.role, "method": e.method, "resourceName": e.resource_name, "etagBefore": e.etag_before,
                           "etagAfter": e.etag_after, "detail": e.detail} for e in entries], indent=2))
        return 0
    if not entries:
        print("No audit entries.")
        return 0
    rows = [[str(e.revision), e.time.ToDatetime(tzinfo=dt.UTC).isoformat(timespec="seconds"), e.actor,
             e.role or "-", e.method, e.resource_name, f"{e.etag_before or '-'} -> {e.etag_after or '-'}",
             e.detail or ""]
            for e in entries]
    print(_table(["REVISION", "TIME", "ACTOR", "ROLE", "METHOD", "RESOURCE", "ETAG", "DETAIL"], rows))
    return 0


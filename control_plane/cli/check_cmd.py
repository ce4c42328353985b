"""`mtlsgate check`: would this client certificate be accepted? (SPEC §4 dry run)

Offline on the YAML files `import` takes (`--trust-config FILE --policy FILE`), or live against a
control plane (`--policy NAME --server HOST:PORT`, via CheckService). Either way the verdict comes from
the code the proxy runs. Exit 0 = accepted by the policy, 1 = not accepted, 2 = usage or input error.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from control_plane.cli.client import add_client_arguments
from control_plane.cli.common import UsageError

MAX_INPUT_BYTES = 64 * 1024 * 1024  # a trust config with a large CRL is a few MB


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check",
        help="dry-run client-certificate validation (the proxy's exact code)",
        description="Validate a client certificate chain as a listener would and print the verdict and the "
        "headers the backend would receive. Offline: --trust-config FILE --policy FILE (GCP import YAML; the "
        "policy's trust-config reference is then ignored). Live: --policy NAME against --server. "
        "Exit 0 when the policy would accept the client, 1 when not, 2 on a usage or input error.",
    )
    p.add_argument(
        "--chain",
        metavar="CHAIN.pem",
        help="PEM chain: the client's leaf first, then the intermediates it would send. "
        "--cert CHAIN.pem without --key means the same (the SPEC §4 spelling)",
    )
    p.add_argument(
        "--policy",
        required=True,
        metavar="FILE|NAME",
        help="ServerTlsPolicy YAML file (offline) or name such as serverTlsPolicies/strict (live)",
    )
    p.add_argument("--trust-config", metavar="FILE", help="TrustConfig YAML file: selects offline mode")
    p.add_argument(
        "--listener",
        metavar="FILE|NAME",
        help="use this listener's customRequestHeaders (YAML file offline, name live); "
        "default: the X-Client-Cert-* set",
    )
    p.add_argument(
        "--at", metavar="RFC3339", help="validation time, e.g. 2030-01-01T00:00:00Z (default: now)"
    )
    p.add_argument("-o", "--output", choices=["text", "json"], default="text", help="output format")
    # The same connection flags as every other command (--cert/--key: this CLI's mTLS identity towards the
    # control plane); --client-cert/--client-key are the names older releases used here.
    add_client_arguments(p)
    p.add_argument("--client-cert", dest="cert", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--client-key", dest="key", metavar="FILE", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


# ---------------------------------------------------------------- input


def _read_text(path: str, what: str) -> str:
    try:
        file = Path(path)
        if file.stat().st_size > MAX_INPUT_BYTES:
            raise UsageError(f"{what} {path}: larger than {MAX_INPUT_BYTES} bytes")
        return file.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path}: not UTF-8 text") from None


def parse_time(text: str | None) -> datetime:
    if not text:
        return datetime.now(UTC)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--at {text!r}: not an RFC 3339 time such as 2030-01-01T00:00:00Z") from None
    if when.tzinfo is None:
        raise UsageError(f"--at {text!r}: give a UTC offset (Z or +HH:MM)")
    return when.astimezone(UTC)


def load_yaml_resource(path: str, kind: Any, what: str) -> Any:
    """A resource from a gcloud-import style YAML file (camelCase fields); an `apply` manifest document
    (with `kind:`) is accepted too. Offline mode takes files only: a resource name gets told so."""
    from control_plane.manifests import ManifestError, parse_resource_file
    from control_plane.resource_names import InvalidName, normalise_name

    if not Path(path).exists() and "/" in path and not path.endswith((".yaml", ".yml", ".json")):
        try:
            normalise_name(path, kind)
        except InvalidName:
            pass
        else:
            raise UsageError(
                f"--{what} {path}: a resource name, but offline mode (--trust-config FILE) takes a "
                f"{kind.kind} YAML file; to check against the {path} stored in the control plane, "
                "drop --trust-config"
            )
    try:
        return parse_resource_file(_read_text(path, f"--{what}"), kind, path)
    except ManifestError as exc:
        raise UsageError(str(exc)) from None


def chain_problem(text: str, path: str) -> str | None:
    """A --chain file must be a client's chain: PEM certificates only, the client's leaf first. Says what
    the file is instead (a YAML manifest, a key, a CA)."""
    from cryptography import x509

    from data_plane.validation.pem import PemProblem, blocks, load_certificates

    found = blocks(text)
    if not found:
        return None  # parse_pem_chain words it
    if any(b.indented for b in found):
        return (f"{path}: its PEM blocks are indented inside other text (from line {found[0].line}): a YAML "
                "manifest? --chain takes a PEM file: the client's certificate, then its intermediates")
    for index, block in enumerate(found, 1):
        if block.what != "a certificate":
            return (f"{path}: PEM block {index} (line {block.line}) is {block.what} where a certificate was "
                    "expected; --chain takes certificates only, the client's first (its key is not needed)")
    try:
        leaf = load_certificates(text)[0]
    except PemProblem:
        return None
    try:
        is_ca = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, ValueError):
        is_ca = False
    if is_ca:
        return (f"{path}: the first certificate ({leaf.subject.rfc4514_string()}) is a CA, not a client "
                "certificate; put the client's own certificate first, then its intermediates")
    return None


# ---------------------------------------------------------------- the two modes


def _offline(args: argparse.Namespace, chain_pem: str, when: datetime) -> dict[str, Any]:
    from control_plane.resource_names import LISTENER, SERVER_TLS_POLICY, TRUST_CONFIG
    from data_plane.validation.dry_run import DryRunError, dry_run, parse_pem_chain

    trust_config = load_yaml_resource(args.trust_config, TRUST_CONFIG, "trust-config")
    policy = load_yaml_resource(args.policy, SERVER_TLS_POLICY, "policy")
    headers: list[str] = []
    if args.listener:
        headers = list(load_yaml_resource(args.listener, LISTENER, "listener").custom_request_headers)
    try:
        result = dry_run(parse_pem_chain(chain_pem), trust_config, policy, when, headers)
    except DryRunError as exc:
        raise UsageError(str(exc)) from None
    v = result.verdict
    return {
        "present": v.present,
        "chain_verified": v.chain_verified,
        "error": v.error,
        "reason": v.reason,
        "headers": dict(result.headers),
        "_accepted": v.accepted,
        "_detail": v.detail,
    }


def _live(args: argparse.Namespace, chain_pem: str, when: datetime) -> dict[str, Any]:
    import grpc
    from mtlsgate.v1 import api_pb2, api_pb2_grpc

    from control_plane.cli.client import open_channel, rpc_error

    connection = args
    request = api_pb2.CheckRequest(policy=args.policy, pem_chain=chain_pem, listener=args.listener or "")
    request.time.FromDatetime(when)
    try:
        with open_channel(connection) as channel:
            response = api_pb2_grpc.CheckServiceStub(channel).Check(request, timeout=30)
    except grpc.RpcError as exc:
        # Exit 1 means "not accepted": every failure to get a verdict is exit 2.
        raise UsageError(str(rpc_error(exc, connection))) from None
    return {
        "present": response.present,
        "chain_verified": response.chain_verified,
        "error": response.error,
        "reason": response.reason,
        "headers": {h.name: h.value for h in response.headers},
        "_accepted": response.accepted,
        "_detail": response.detail,
    }


def render_text(result: dict[str, Any]) -> str:
    lines = [
        f"accepted:       {'yes' if result['_accepted'] else 'no'}",
        f"present:        {str(result['present']).lower()}",
        f"chain_verified: {str(result['chain_verified']).lower()}",
        f"error:          {result['error'] or '-'}",
        f"reason:         {result['reason'] or '-'}",
    ]
    if result["_detail"]:
        lines.append(f"detail:         {result['_detail']}")
    lines.append("headers:")
    lines += [f"  {name}: {value}" for name, value in result["headers"].items()]
    return "\n".join(lines)


def _chain_path(args: argparse.Namespace) -> str:
    if args.chain:
        return str(args.chain)
    if args.cert and not args.key:  # `check --cert CHAIN.pem`: the chain, as SPEC §4 and older releases
        chain, args.cert = args.cert, None
        return str(chain)
    raise UsageError("--chain CHAIN.pem is required (the client's certificate chain to check)")


def run(args: argparse.Namespace) -> int:
    chain_path = _chain_path(args)
    chain_pem = _read_text(chain_path, "certificate chain")
    problem = chain_problem(chain_pem, chain_path)
    if problem:
        raise UsageError(problem)
    when = parse_time(args.at)
    if not args.trust_config and Path(args.policy).is_file():
        raise UsageError(
            f"--policy {args.policy} is a file: offline mode also needs --trust-config FILE "
            "(for a policy stored in the control plane, give its name, e.g. serverTlsPolicies/strict)"
        )
    result = _offline(args, chain_pem, when) if args.trust_config else _live(args, chain_pem, when)
    if args.output == "json":
        print(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, indent=2))
    else:
        print(render_text(result))
    return 0 if result["_accepted"] else 1

"""`mtlsgate check`: would this client certificate be accepted? (SPEC §4 dry run)

Offline on the YAML files `import` takes (`--trust-config FILE --policy FILE`), or live against a
control plane (`--policy NAME --server HOST:PORT`, via CheckService). Either way the verdict comes from
the code the proxy runs. Exit 0 = accepted by the policy, 1 = not accepted, 2 = usage or input error.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from control_plane.cli.common import UsageError, add_server_argument

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
        "--cert",
        required=True,
        metavar="CHAIN.pem",
        help="PEM chain: the client's leaf first, then the intermediates it would send",
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
    add_server_argument(p)
    # The shared connection flags, except that --cert here is the chain being checked (SPEC §4), so the
    # mTLS identity towards the control plane is --client-cert / --client-key.
    group = p.add_argument_group("control plane connection (live mode)")
    group.add_argument(
        "--token",
        default=os.environ.get("MTLSGATE_TOKEN"),
        help="bearer token for the management API (env MTLSGATE_TOKEN)",
    )
    group.add_argument("--ca-cert", metavar="FILE", help="connect with TLS, trusting this CA")
    group.add_argument(
        "--client-cert", metavar="FILE", help="client certificate for mTLS to the control plane"
    )
    group.add_argument("--client-key", metavar="FILE", help="private key for --client-cert")
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


def load_yaml_resource(path: str, message_type: Any, what: str) -> Any:
    """A resource from a gcloud-import style YAML file (camelCase fields); an `apply` manifest document
    (with `kind:`) is accepted too."""
    import yaml
    from google.protobuf import json_format

    text = _read_text(path, what)
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{what} {path}: not YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(document, dict):
        raise UsageError(f"{what} {path}: expected a YAML mapping of {message_type.DESCRIPTOR.name} fields")
    document.pop("kind", None)
    try:
        return json_format.ParseDict(document, message_type())
    except json_format.ParseError as exc:
        raise UsageError(f"{what} {path}: {exc}") from None


# ---------------------------------------------------------------- the two modes


def _offline(args: argparse.Namespace, chain_pem: str, when: datetime) -> dict[str, Any]:
    from mtlsgate.v1 import resources_pb2

    from data_plane.validation.dry_run import DryRunError, dry_run, parse_pem_chain

    trust_config = load_yaml_resource(args.trust_config, resources_pb2.TrustConfig, "trust config")
    policy = load_yaml_resource(args.policy, resources_pb2.ServerTlsPolicy, "policy")
    headers: list[str] = []
    if args.listener:
        headers = list(
            load_yaml_resource(args.listener, resources_pb2.Listener, "listener").custom_request_headers
        )
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

    connection = argparse.Namespace(
        server=args.server, token=args.token, ca_cert=args.ca_cert, cert=args.client_cert, key=args.client_key
    )
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
        "_detail": "",
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


def run(args: argparse.Namespace) -> int:
    chain_pem = _read_text(args.cert, "certificate chain")
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

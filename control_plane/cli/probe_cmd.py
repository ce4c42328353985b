"""`mtlsgate probe grpc|http TARGET`: exit 0 when a component answers healthy, for container healthchecks
and scripts (the control plane through gRPC health checking, proxies' admin `/ready`, the echo backend)."""

from __future__ import annotations

import argparse
import urllib.error
import urllib.request

from control_plane.cli.common import CliError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="check that a component is healthy (exit 0) or not (exit 1)",
        description="Healthcheck for containers and scripts. 'grpc HOST:PORT' asks the gRPC health service "
        "(the control plane); 'http URL' expects a 2xx answer (a proxy's admin /ready, the echo backend).",
    )
    parser.add_argument("kind", choices=["grpc", "http"], help="protocol to probe with")
    parser.add_argument("target", help="HOST:PORT for grpc, URL for http")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (default %(default)s)")
    parser.add_argument("--service", default="", help="gRPC health service name (default: the server)")
    parser.add_argument("--ca-cert", metavar="FILE", help="grpc over TLS, trusting this CA")
    parser.add_argument("--cert", metavar="FILE", help="client certificate (a control plane with --client-ca)")
    parser.add_argument("--key", metavar="FILE", help="private key for --cert")
    parser.set_defaults(func=run)


def grpc_serving(target: str, *, timeout: float = 2.0, service: str = "", ca_cert: str | None = None,
                 cert: str | None = None, key: str | None = None) -> str | None:
    """None when the gRPC health service reports SERVING, else why not. With `ca_cert`: over TLS,
    presenting `cert`/`key` when given (health needs no role, but the handshake needs a certificate)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if ca_cert:
        from pathlib import Path

        credentials = grpc.ssl_channel_credentials(
            Path(ca_cert).read_bytes(), Path(key).read_bytes() if key else None,
            Path(cert).read_bytes() if cert else None)
        channel = grpc.secure_channel(target, credentials)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return f"{target}: {exc.code().name}: {exc.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def http_ok(url: str, *, timeout: float = 2.0) -> str | None:
    """None when `url` answers 2xx, else why not."""
    # Probes target local components: never route them through an HTTP proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as reply:
            if 200 <= reply.status < 300:
                return None
            return f"{url}: HTTP {reply.status}"
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{url}: {reason}"


def run(args: argparse.Namespace) -> int:
    problem = (
        grpc_serving(args.target, timeout=args.timeout, service=args.service, ca_cert=args.ca_cert,
                     cert=args.cert, key=args.key)
        if args.kind == "grpc"
        else http_ok(args.target, timeout=args.timeout)
    )
    if problem:
        raise CliError(f"not healthy: {problem}")
    print("healthy")
    return 0

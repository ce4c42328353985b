"""`mtlsgate pki init DIR`: a demo PKI with GCP-format trust config and policy files."""

from __future__ import annotations

import argparse

from control_plane.cli.common import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    pki = subparsers.add_parser("pki", help="demo PKI tools")
    sub = pki.add_subparsers(dest="pki_command", metavar="SUBCOMMAND", required=True)
    init = sub.add_parser(
        "init",
        help="create a demo CA, intermediate, server and client certificates, a CRL and example YAML",
        description="Writes ca.pem, intermediate.pem, server.pem, client/revoked/expired/wrong-eku/untrusted "
        "certificates and keys, crl.pem, and the GCP-format trust-config.yaml and server-tls-policy.yaml.",
    )
    init.add_argument("dir", help="output directory (created if missing)")
    init.set_defaults(func=run_init)


def run_init(args: argparse.Namespace) -> int:
    from control_plane.pki import init_demo_pki

    try:
        pki = init_demo_pki(args.dir)
    except OSError as exc:
        raise UsageError(f"cannot write the demo PKI to {args.dir}: {exc.strerror or exc}") from None
    for name in sorted(pki.files):
        print(f"{name:20} {pki.path(name)}")
    return 0

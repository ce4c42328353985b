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

    revoke = sub.add_parser(
        "revoke", help="revoke a client certificate at the demo CA: re-sign and republish its CRL",
        description="Adds SERIAL to the demo intermediate CA's CRL (DIR/crl.pem), re-signed with a higher "
        "cRLNumber. The demo's CRL publisher serves that file and the control plane fetches it (crlSources), "
        "so every node refuses the certificate within the refresh interval; no TrustConfig is edited.")
    revoke.add_argument("serial", metavar="SERIAL|CERT.pem",
                        help="hex serial (as X-Client-Cert-Serial-Number shows it) or a certificate file")
    revoke.add_argument("--dir", default="demo", help="the demo PKI directory (default %(default)s)")
    revoke.set_defaults(func=run_revoke)

    publish = sub.add_parser(
        "publish", help="serve the demo CA's CRL over HTTP (a tiny CRL distribution point)",
        description="Serves DIR/crl.pem at every path of http://HOST:PORT/ with ETag/Last-Modified and 304 "
        "answers to conditional GETs, one log line per request. Runs until SIGTERM/Ctrl-C.")
    publish.add_argument("--dir", default="demo", help="the demo PKI directory (default %(default)s)")
    publish.add_argument("--listen", default="127.0.0.1:9080", metavar="HOST:PORT",
                         help="listen address (default %(default)s)")
    publish.set_defaults(func=run_publish)


def run_init(args: argparse.Namespace) -> int:
    from control_plane.pki import init_demo_pki

    try:
        pki = init_demo_pki(args.dir)
    except OSError as exc:
        raise UsageError(f"cannot write the demo PKI to {args.dir}: {exc.strerror or exc}") from None
    for name in sorted(pki.files):
        print(f"{name:20} {pki.path(name)}")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from pathlib import Path

    from control_plane.pki import RevokeError, parse_serial, revoke

    try:
        done = revoke(args.dir, parse_serial(args.serial, Path(args.dir)))
    except RevokeError as exc:
        raise UsageError(str(exc)) from None
    print(f"revoked serial {done.serial:x}: {done.crl_path} re-signed (cRLNumber {done.crl_number}, "
          f"{done.revoked_count} revoked); its publisher serves it now and the control plane fetches it within "
          "the source's refreshInterval")
    return 0


def run_publish(args: argparse.Namespace) -> int:
    import signal
    import threading
    from pathlib import Path

    from control_plane.crl_sources.publisher import CrlPublisher

    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--listen {args.listen!r}: expected HOST:PORT")
    crl = Path(args.dir) / "crl.pem"
    if not crl.is_file():
        raise UsageError(f"{crl}: no such file (run mtlsgate pki init {args.dir} first)")
    try:
        publisher = CrlPublisher(crl, host.strip("[]"), int(port), on_request=lambda line: print(line, flush=True))
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.listen}: {exc.strerror}") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    publisher.start()
    print(f"mtlsgate pki publish: serving {crl} at {publisher.url}", flush=True)
    stop.wait()
    publisher.stop()
    return 0

"""`mtlsgate control-plane`: run the control plane (store + management API + xDS) in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging

from control_plane.cli.common import CliError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "control-plane",
        help="run the control plane (management API, xDS, durable store)",
        description="Serves the management API, health, reflection and xDS on one gRPC port, backed by a "
        "SQLite file, or by PostgreSQL shared with other replicas (--db postgresql://…). Secure by default: "
        "refuses to start unless it can authenticate nodes and API callers "
        "(--tls-cert, --tls-key, --client-ca; optionally --token-file), or --insecure on loopback. "
        "Stops gracefully on SIGTERM/SIGINT.",
    )
    parser.add_argument("--listen", default="127.0.0.1:18000", metavar="HOST:PORT",
                        help="gRPC listen address (default %(default)s)")
    parser.add_argument("--db", default="mtlsgate.db", metavar="PATH|URL",
                        help="SQLite database file, created if missing; ':memory:' for a throwaway store; or "
                        "postgresql://USER:PASSWORD@HOST:PORT/DB for replicas sharing one PostgreSQL database "
                        "(an empty database is initialised) (default %(default)s)")
    parser.add_argument("--migrate", action="store_true",
                        help="apply pending PostgreSQL schema migrations to --db and exit (run once before "
                        "starting upgraded replicas)")
    parser.add_argument("--token-file", metavar="FILE",
                        help="require a bearer token on the management API: one token per line, optionally "
                        "followed by the identity the audit log records (`TOKEN alice`)")
    parser.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", metavar="FILE", help="private key for --tls-cert (PEM)")
    parser.add_argument("--client-ca", metavar="FILE",
                        help="require client certificates issued by this CA (mTLS; needs --tls-cert/--tls-key)")
    parser.add_argument("--authz", metavar="FILE",
                        help="role bindings: `bindings: [{identity: ID or PREFIX*, role: admin|editor|viewer|node}]`; "
                        "reloaded on SIGHUP (a bad file keeps the old bindings). Default: every authenticated "
                        "identity except registered nodes is admin")
    parser.add_argument("--insecure", action="store_true",
                        help="run WITHOUT authentication (no --client-ca needed): refused unless --listen is a "
                        "loopback address, warns at start. For local trials and tests only")
    parser.add_argument("--replica-name", default="", metavar="NAME",
                        help="how `mtlsgate status` names this replica among the control planes sharing a "
                        "PostgreSQL database (default: the --listen address, with the host name when it "
                        "listens on every address)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus /metrics (xDS metrics) here")
    parser.add_argument("--crl-fetch-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="overall deadline of one CRL source fetch, redirects included (default %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from control_plane.api.auth import TokenFileError
    from control_plane.authz.bindings import BindingsError
    from control_plane.server import ConfigError, ServerOptions, serve
    from control_plane.store.base import StoreError

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.migrate:
        return _migrate(args.db)
    if len(args.replica_name) > 128 or any(not c.isprintable() for c in args.replica_name):
        raise CliError("--replica-name: at most 128 printable characters")
    if not 0 < args.crl_fetch_timeout <= 600:
        raise CliError(f"--crl-fetch-timeout: {args.crl_fetch_timeout:g} is not between 0 and 600 seconds")
    options = ServerOptions(listen=args.listen, db=args.db, token_file=args.token_file, tls_cert=args.tls_cert,
                            tls_key=args.tls_key, client_ca=args.client_ca, insecure=args.insecure,
                            crl_fetch_deadline=args.crl_fetch_timeout, authz=args.authz,
                            replica_name=args.replica_name)
    try:
        if args.metrics:
            from control_plane.xds.metrics import serve_metrics

            try:
                serve_metrics(args.metrics)
            except (OSError, ValueError) as exc:
                raise CliError(f"cannot serve metrics on {args.metrics}: {exc}") from None
        asyncio.run(serve(options))
    except (ConfigError, TokenFileError, BindingsError, StoreError) as exc:
        raise CliError(str(exc)) from None
    return 0


def _migrate(db: str) -> int:
    from control_plane.store import is_postgres_url
    from control_plane.store.base import StoreError

    if not is_postgres_url(db):
        print(f"mtlsgate control-plane: {db} is a SQLite file; its schema is created at start-up, "
              "there is nothing to migrate")
        return 0
    from control_plane.store.postgres import migrate, redact

    try:
        before, after = migrate(db)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    if before == after:
        print(f"mtlsgate control-plane: {redact(db)} is at schema version {after}; nothing to migrate")
    else:
        print(f"mtlsgate control-plane: migrated {redact(db)} from schema version {before} to {after}")
    return 0

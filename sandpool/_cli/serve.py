"""``sandpool serve``: share this machine's sandboxes over gRPC (see ``sandpool._service``)."""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the sandpool gRPC service",
                       description="Serve this machine's sandboxes over gRPC until SIGTERM or Ctrl-C, which stop "
                                   "every sandbox. Binds loopback unless told otherwise; any other address needs "
                                   "--token-file.")
    p.add_argument("--listen", default="127.0.0.1:50051",
                   help="HOST:PORT (port 0 picks a free one) or unix:/PATH (default: 127.0.0.1:50051)")
    p.add_argument("--token-file", help="require this file's token from every client")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve TLS only (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--orphan-grace-seconds", type=float, default=60.0,
                   help="how long a vanished client's sandboxes stay adoptable before they are stopped (default 60)")
    p.add_argument("--record-file", help="the on-disk record of sandboxes, kept across restarts "
                                         "(default: ~/.local/state/sandpool/serve-<listen>.jsonl)")
    p.add_argument("--max-streams", type=int, default=512,
                   help="concurrent calls and attached sandboxes before new ones are refused (default 512)")
    p.add_argument("--cwsandbox", metavar="HOST:PORT", dest="cwsandbox_listen",
                   help="also serve cwsandbox's own gRPC API here, over the same sandboxes, for the unmodified "
                        "cwsandbox client (CWSANDBOX_BASE_URL=http://HOST:PORT)")
    p.set_defaults(run=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before gRPC loads: its info logs are noise here
    from .._service import auth
    from .._service.server import ServeConfig, serve

    token = auth.read_token(args.token_file) if args.token_file else None
    config = ServeConfig(listen=args.listen, token=token, tls_cert=args.tls_cert, tls_key=args.tls_key,
                         orphan_grace_seconds=args.orphan_grace_seconds, record_file=args.record_file,
                         max_streams=args.max_streams, cwsandbox_listen=args.cwsandbox_listen)
    return serve(config)

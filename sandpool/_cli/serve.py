"""``sandpool serve``: share this machine's sandboxes over gRPC (see ``sandpool._service``)."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from .._service.server import AlsoServe
    from . import Subcommands


def register(sub: Subcommands) -> None:
    p = sub.add_parser("serve", help="run the sandpool gRPC service",
                       description="Serve this machine's sandboxes over gRPC until SIGTERM or Ctrl-C, which stop "
                                   "every sandbox. Listens on a unix socket only this user (and root) may use, "
                                   "unless told otherwise; TCP always needs a token (one is made if none is given), "
                                   "and any address but loopback needs --token-file.")
    p.add_argument("--listen", help="unix:/PATH or HOST:PORT (port 0 picks a free one); default: the unix socket "
                                    "serve.sock in this user's run directory (/run/sandpool for root)")
    p.add_argument("--token-file", help="require this file's token from every client (without it, a TCP listener "
                                        "makes a token and writes it 0600 beside its listener record)")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve TLS only (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--min-isolation", choices=("process", "namespaces", "oci"),
                   help="the weakest isolation a client's sandbox may get; weaker requests are refused "
                        "(default: namespaces when serving as root, process otherwise)")
    p.add_argument("--allow-host-network", action=argparse.BooleanOptionalAction, default=None,
                   help="let clients' sandboxes use the host's network (default: only when the floor is process)")
    p.add_argument("--allow-uid", type=int, action="append", default=[], dest="allow_uids", metavar="UID",
                   help="also let this user connect to the unix socket (repeatable; the socket becomes 0666 and its "
                        "directory 0711, the uid check at accept still refuses everyone else)")
    p.add_argument("--orphan-grace-seconds", type=float, default=60.0,
                   help="how long a vanished client's sandboxes stay adoptable before they are stopped (default 60)")
    p.add_argument("--record-file", help="the on-disk record of sandboxes, kept across restarts "
                                         "(default: ~/.local/state/sandpool/serve-<listen>.jsonl; none for port 0)")
    p.add_argument("--max-streams", type=int, default=512,
                   help="concurrent calls and attached sandboxes before new ones are refused (default 512)")
    p.add_argument("--cwsandbox", metavar="HOST:PORT", dest="cwsandbox_listen",
                   help="also serve cwsandbox's own gRPC API here, over the same sandboxes and policy, for the "
                        "unmodified cwsandbox client (CWSANDBOX_BASE_URL=http://HOST:PORT; its API key is "
                        "--token-file's token, or one made and written 0600, as printed)")
    p.set_defaults(run=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before gRPC loads: its info logs are noise here
    from .._service import auth
    from .._service.server import ServeConfig, serve

    token = auth.read_token(args.token_file) if args.token_file else None
    config = ServeConfig(listen=args.listen, token=token, tls_cert=args.tls_cert, tls_key=args.tls_key,
                         orphan_grace_seconds=args.orphan_grace_seconds, record_file=args.record_file,
                         max_streams=args.max_streams, min_isolation=args.min_isolation,
                         allow_host_network=args.allow_host_network, allow_uids=tuple(args.allow_uids))
    also = _cwsandbox_listener(args.cwsandbox_listen, token) if args.cwsandbox_listen else None
    return serve(config, also=also)


def _cwsandbox_listener(listen: str, api_key: str | None) -> AlsoServe:
    """``--cwsandbox``: cwsandbox's API on its own listener, backed by a session of the very server
    it runs beside, so sandboxes made through either API are the same fleet (``sandpool ls`` shows
    both), and that server's policy applies to both. Its API key is ``api_key`` (``--token-file``'s),
    or one it makes. Its StreamLogs reads the fleet's own main logs (``open_log``)."""

    @contextlib.asynccontextmanager
    async def serve_too(address: str, token: str | None,
                        open_log: Callable[[str], BinaryIO | None]) -> AsyncIterator[None]:
        from .._cwsandbox._server import open_published_server
        from .._session.session import Session

        async with Session(address=address, token=token) as session, \
                open_published_server(session, listen, token=api_key, open_log=open_log) as (bound, export):
            print(f"sandpool serve: cwsandbox API on {bound}; {export}", flush=True)
            yield

    return serve_too

"""The standalone server: ``python -m sandpool._cwsandbox --listen 127.0.0.1:PORT [--token-file F]``.

One trio loop holds a sandpool Session (its sandboxes) and the backend; a sync ``grpc.server`` serves
cwsandbox's SandboxService from it in worker threads. SIGTERM or Ctrl-C stops the server (in-flight
calls get ``STOP_GRACE_SECONDS``), then every sandbox, then exits.

Every listener has an API key, loopback included (any local process, a sandbox on the host's
network too, can reach loopback). Without ``--token-file`` the server makes one and writes it,
mode 0600, to its listener record's token file (``sandpool._grpc.endpoint``), whose path it
prints in the ``export`` line; the token itself is never printed.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import secrets
import signal
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import trio

from .._config import ISOLATION_LEVELS, SandboxDefaults
from .._session.session import Session
from ._backend import OpenLog, open_backend
from ._servicer import add_cwsandbox_servicer

DEFAULT_LISTEN = "127.0.0.1:50051"
#: Each open exec or log stream holds a worker thread for its duration; unary calls are short.
DEFAULT_MAX_WORKERS = 256
STOP_GRACE_SECONDS = 2.0
MAX_MESSAGE_BYTES = 100 * 1024 * 1024  # the client's own limit
SERVER_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def is_loopback(listen: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost, unix sockets)."""
    if listen.startswith("unix:"):
        return True
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path) as f:
        token = f.read().strip()
    if not token:
        raise SystemExit(f"the token file {path} is empty; put the API key clients must send in it")
    return token


@contextlib.asynccontextmanager
async def open_cwsandbox_server(session: Session, listen: str, *, token: str | None = None,
                                max_workers: int = DEFAULT_MAX_WORKERS,
                                open_log: OpenLog | None = None) -> AsyncIterator[str]:
    """Serve cwsandbox's API for ``session``'s sandboxes on ``listen`` while the block runs; yields the
    bound address. Clients must send ``token`` as their API key. In-flight calls get
    ``STOP_GRACE_SECONDS`` when it ends. Call it in the trio loop that holds ``session``; ValueError
    without a token, SystemExit if the address is unusable. ``open_log(sandbox_id)`` (a file or None):
    where main logs come from when the session's runtime keeps none (``sandpool serve --cwsandbox``)."""
    if not token:
        raise ValueError("cwsandbox's API needs a token on every listener, loopback included (any local process "
                         "can reach loopback); pass token=, or use open_published_server, which makes one")
    async with open_backend(session, open_log) as backend:
        server = grpc.server(ThreadPoolExecutor(max_workers, thread_name_prefix="cwsandbox-rpc"),
                             options=SERVER_OPTIONS)
        add_cwsandbox_servicer(server, backend, token=token)
        port = server.add_insecure_port(listen)
        if not port:
            raise SystemExit(f"cannot listen on {listen}")
        server.start()
        try:
            yield listen if listen.startswith("unix:") else f"{listen.rsplit(':', 1)[0]}:{port}"
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(lambda: server.stop(STOP_GRACE_SECONDS).wait())


@contextlib.asynccontextmanager
async def open_published_server(session: Session, listen: str, *, token: str | None = None,
                                max_workers: int = DEFAULT_MAX_WORKERS,
                                open_log: OpenLog | None = None) -> AsyncIterator[tuple[str, str]]:
    """:func:`open_cwsandbox_server` with a listener record: yields the bound address and the shell line
    that points a client at it. Without ``token`` (from ``--token-file``), one is made and written 0600 to
    the record's token file. SystemExit off loopback without a token, or if the address is held."""
    if token is None and not is_loopback(listen):
        raise SystemExit(f"{listen} is reachable from other machines: give a token with --token-file F "
                         f"(clients send it as CWSANDBOX_API_KEY), or listen on 127.0.0.1")
    from .._grpc.endpoint import ListenerRecord

    key = token or secrets.token_urlsafe(32)
    async with open_cwsandbox_server(session, listen, token=key, max_workers=max_workers,
                                     open_log=open_log) as address:
        try:
            record = ListenerRecord(address).acquire()
        except OSError as exc:
            raise SystemExit(str(exc)) from None
        try:
            record.write(token=key)
            where = "<your token>" if token else f"$(cat {record.token_path})"
            yield address, f"export CWSANDBOX_BASE_URL=http://{address} CWSANDBOX_API_KEY={where}"
        finally:
            record.release()


async def serve(listen: str, token: str | None, *, isolation: str | None = None,
                sandpool_address: str | None = None, sandpool_token: str | None = None,
                max_workers: int = DEFAULT_MAX_WORKERS, ready: Callable[[str, str], None] = print) -> None:
    """Serve until SIGTERM or SIGINT, then stop every sandbox; ``ready(address, export)`` once the port is
    bound (``export``: the shell line for the client's environment).

    The sandboxes are this machine's (a LocalRuntime of the server's own), or with ``sandpool_address``
    those of that ``sandpool serve`` server, where sandpool's clients see them too.
    """
    defaults = SandboxDefaults(isolation=isolation) if isolation else None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with Session(defaults, address=sandpool_address, token=sandpool_token) as session, \
                open_published_server(session, listen, token=token, max_workers=max_workers) as (address, export):
            ready(address, export)
            async for _ in signals:
                break


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sandpool._cwsandbox",
        description="Serve cwsandbox's own gRPC API from local sandpool sandboxes, so unmodified cwsandbox "
                    "programs run here: export CWSANDBOX_BASE_URL=http://ADDRESS CWSANDBOX_API_KEY=TOKEN.")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help=f"host:port to serve on (default "
                        f"{DEFAULT_LISTEN}; port 0 picks a free one)")
    parser.add_argument("--token-file", help="a file holding the API key clients must send (required off "
                        "loopback; without it, the server makes one and writes it 0600, as printed)")
    parser.add_argument("--isolation", choices=ISOLATION_LEVELS, help="isolation level of the sandboxes "
                        "(default: auto, the strongest this machine supports)")
    parser.add_argument("--sandpool-address", help="keep the sandboxes on this 'sandpool serve' server (HOST:PORT), "
                        "so sandpool's own clients and 'sandpool ls' see them too (default: this machine's)")
    parser.add_argument("--sandpool-token-file", help="the token of --sandpool-address, if it has one")
    parser.add_argument("--max-workers", type=int, default=DEFAULT_MAX_WORKERS,
                        help="server threads: the most exec and log streams open at once")
    args = parser.parse_args(argv)

    def ready(address: str, export: str) -> None:
        print(f"sandpool serves the cwsandbox API on {address}; in the client's environment:\n  {export}", flush=True)

    trio.run(lambda: serve(args.listen, read_token(args.token_file), isolation=args.isolation,
                           sandpool_address=args.sandpool_address,
                           sandpool_token=read_token(args.sandpool_token_file),
                           max_workers=args.max_workers, ready=ready))


if __name__ == "__main__":
    main()

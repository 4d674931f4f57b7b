"""A server's listening side: its gRPC server on a unix socket (behind the peer gate) or on TCP
(always with a token), and the locked listener record its clients find it by.

``reserve()`` takes the record's lock before anything is started (so a second server on the same
address fails at once, without touching the first one's socket); ``start()`` binds and serves;
``close()`` (after the gRPC server stopped) removes the socket, the gate and the record.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import tempfile
from concurrent import futures
from typing import TYPE_CHECKING, Protocol

import grpc

from . import auth
from .._grpc import endpoint
from .._grpc import messages as m
from .peergate import PeerGate

if TYPE_CHECKING:
    from .server import ServeConfig


class Served(Protocol):
    """What a listener serves (``server.Service``): its gRPC handler, and each method's kind."""

    def handler(self) -> grpc.GenericRpcHandler: ...
    def kinds(self) -> dict[str, str]: ...

_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", m.MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", m.MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),  # notice vanished client hosts (no RST) within ~15 s
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),
]


class Listening:
    """The listener of one ``sandpool serve`` (see the module docstring). Without ``publish`` (a
    Slurm job's server, whose client learns its address from the job's directory) no listener record
    is written."""

    def __init__(self, config: ServeConfig, *, publish: bool = True) -> None:
        self.service: Served | None = None
        self.publish = publish
        self.config = config
        self.listen = config.listen_on
        host, port = auth.split_listen(self.listen)
        self.unix_path = port if host == "unix" else None
        self.token: str | None = config.token
        self.generated_token = False
        self.server: grpc.Server | None = None
        self.address: str | None = None
        self.record: endpoint.ListenerRecord | None = None
        self._deny: grpc.Server | None = None
        self._gate: PeerGate | None = None
        self._tmp: str | None = None
        self._fixed = self.unix_path is not None or port != "0"

    def __repr__(self) -> str:
        return f"<Listening {self.address or self.listen} token={'yes' if self.token else 'no'}>"

    def reserve(self) -> None:
        """Take the listener's record (OSError naming the server that holds it)."""
        if self._fixed and self.publish:
            self.record = endpoint.ListenerRecord(self.listen).acquire()

    def start(self, service: Served) -> str:
        """Bind ``service`` and serve it; the address clients use."""
        self.service = service
        if self.unix_path is None and self.token is None:
            self.token, self.generated_token = secrets.token_urlsafe(32), True
        if self.unix_path is not None:
            address = self._start_unix(service, self.unix_path)
        else:
            self.server, address = build_server(service, dataclasses.replace(self.config, token=self.token))
            self.server.start()
        self.address = address
        if not self.publish:
            return address
        if self.record is None:
            self.record = endpoint.ListenerRecord(address).acquire()
        self.record.write(token=self.token if self.generated_token else None)  # --token-file's: the operator hands it out
        return address

    def _start_unix(self, service: Served, path: str) -> str:
        others = frozenset(self.config.allow_uids) - {0, os.geteuid()}
        if os.path.dirname(path) == endpoint.run_dir():  # the default place: made private here
            endpoint.private_dir(os.path.dirname(path), 0o711 if others else 0o700)
        _sweep_private_dirs()
        self._tmp = tempfile.mkdtemp(prefix=f"{_PRIVATE_PREFIX}{os.getpid()}-")  # 0700: gRPC's sockets, for the gate
        inner, deny = os.path.join(self._tmp, "grpc.sock"), os.path.join(self._tmp, "deny.sock")
        self.server, _ = build_server(service, dataclasses.replace(self.config, listen=f"unix:{inner}",
                                                                        token=self.token))
        allowed = frozenset({0, os.geteuid(), *self.config.allow_uids})
        self._deny = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="sandpool-deny"),
                                 handlers=[auth.DenyAll(
                                     f"this sandpool server serves only uid(s) {', '.join(map(str, sorted(allowed)))}"
                                     f"; its operator can allow yours with --allow-uid", service.kinds())],
                                 maximum_concurrent_rpcs=16)
        self._deny.add_insecure_port(f"unix:{deny}")
        self.server.start()
        self._deny.start()
        self._gate = PeerGate(path, inner, deny, allowed)
        self._gate.start()
        return f"unix:{path}"

    def close(self) -> None:
        """Remove the gate, the private sockets and the record (the gRPC server is stopped by then)."""
        if self._gate is not None:
            self._gate.close()
        if self._deny is not None:
            self._deny.stop(0)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        if self.record is not None:
            self.record.release()


_PRIVATE_PREFIX = "sandpool-serve-"


def _sweep_private_dirs() -> None:
    """Remove the private socket directories of this user's servers that were killed (their pid is gone)."""
    base = tempfile.gettempdir()
    for name in os.listdir(base):
        pid = name[len(_PRIVATE_PREFIX):].split("-", 1)[0]
        if not name.startswith(_PRIVATE_PREFIX) or not pid.isdigit():
            continue
        path = os.path.join(base, name)
        try:
            if os.lstat(path).st_uid != os.geteuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def build_server(service: Served, config: ServeConfig) -> tuple[grpc.Server, str]:
    """A gRPC server for ``service`` bound to ``config.listen`` (requiring ``config.token`` if set),
    not started yet; it and the bound address."""
    interceptors: list[grpc.ServerInterceptor] = (
        [auth.TokenInterceptor(config.token, service.kinds())] if config.token else [])
    listen = config.listen_on
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_streams + 8, thread_name_prefix="sandpool-rpc"),
        handlers=[service.handler()], interceptors=interceptors, options=_SERVER_OPTIONS,
        maximum_concurrent_rpcs=config.max_streams,
    )
    try:
        if config.tls_cert and config.tls_key:  # ServeConfig has both or neither
            port = server.add_secure_port(listen, auth.server_credentials(config.tls_cert, config.tls_key))
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {listen!r}: {exc}") from None
    if not port:
        raise OSError(f"cannot listen on {listen!r} (address in use?)")
    host, _ = auth.split_listen(listen)
    bound = listen if host == "unix" else f"{'[' + host + ']' if ':' in host else host}:{port}"
    return server, bound

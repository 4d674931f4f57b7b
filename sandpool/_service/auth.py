"""Who may call the server: the bind rule, the bearer token, and TLS credentials.

- A server listens on a unix socket unless told otherwise (only allowed users' connections get
  through: ``peergate.py``). A TCP listener always has a token, loopback included: any local
  process (a sandbox on the host's network too) can reach loopback. Without ``--token-file`` the
  server makes one (``listener.py``); off loopback it refuses to start without ``--token-file``.
- With a token, every call must carry ``authorization: Bearer <token>``; a missing or wrong one
  ends the call UNAUTHENTICATED before any handler runs, so nothing is created.
- With ``--tls-cert``/``--tls-key``, the port speaks TLS only.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable
from typing import Any

import grpc

from .._grpc import messages as m


def split_listen(listen: str) -> tuple[str, str]:
    """``(host, port)`` of ``host:port`` / ``[v6]:port``; ``("unix", path)`` for ``unix:/path``."""
    if listen.startswith("unix:"):
        return "unix", listen[len("unix:"):]
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen must be HOST:PORT (e.g. 127.0.0.1:{m.DEFAULT_PORT}) or unix:/path, "
                         f"got {listen!r}")
    return host.strip("[]"), port


def is_loopback(listen: str) -> bool:
    """True for unix sockets, localhost and loopback IPs; False for wildcards and anything else."""
    host, _ = split_listen(listen)
    if host in ("unix", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(listen: str, token: str | None) -> None:
    """ValueError naming the fix if ``listen`` is not loopback and no token protects it."""
    if token is None and not is_loopback(listen):
        raise ValueError(f"refusing to listen on {listen!r} without a token: anyone who reaches it could run "
                         f"commands. Pass --token-file FILE (and --tls-cert/--tls-key so the token is not sent "
                         f"in clear), or listen on 127.0.0.1")


def read_token(path: str) -> str:
    """The token in ``path`` (surrounding whitespace removed); ValueError if it is empty."""
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"the token file {path!r} is empty; put a long random string in it, "
                         f"e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > {path}")
    return token


def server_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    with open(cert_file, "rb") as f:
        cert = f.read()
    with open(key_file, "rb") as f:
        key = f.read()
    return grpc.ssl_server_credentials([(key, cert)])


def _deny(kind: str, message: str,
          code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED) -> grpc.RpcMethodHandler[Any, Any]:
    def abort(request: object, context: grpc.ServicerContext) -> None:
        context.abort(code, message)

    if kind == "unary_stream":
        return grpc.unary_stream_rpc_method_handler(abort)
    if kind == "stream_stream":
        return grpc.stream_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses, UNAUTHENTICATED, every call whose bearer token is not ``token``."""

    def __init__(self, token: str, kinds: dict[str, str]) -> None:
        self._expected = f"Bearer {token}".encode()
        self._kinds = kinds

    def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        given = dict(handler_call_details.invocation_metadata or ()).get(m.META_TOKEN)
        if isinstance(given, str) and hmac.compare_digest(given.encode(), self._expected):
            return continuation(handler_call_details)
        kind = self._kinds.get(handler_call_details.method, "unary_unary")
        if given is None:
            return _deny(kind, "this sandpool server requires a token; pass token= or set SANDPOOL_TOKEN")
        return _deny(kind, "wrong token for this sandpool server; check token= or SANDPOOL_TOKEN")


class DenyAll(grpc.GenericRpcHandler):
    """Answers every call PERMISSION_DENIED with ``message`` (the gate's refused peers land here)."""

    def __init__(self, message: str, kinds: dict[str, str]) -> None:
        self._message = message
        self._kinds = kinds

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        kind = self._kinds.get(handler_call_details.method, "unary_unary")
        return _deny(kind, self._message, grpc.StatusCode.PERMISSION_DENIED)

"""``coreweave.sandbox.v1.SandboxService`` for a sync ``grpc.server``, backed by a CwsandboxBackend.

Every RPC is checked against the server's API key first, then runs in the backend's trio loop.
Failures leave as the gRPC status and AIP-193 details the client maps to its own exceptions.
The methods the client would use for features without a local meaning (templates, compose files,
snapshots, direct data-plane connections) answer UNIMPLEMENTED with a message saying so; for
ConnectSandbox that is exactly what makes the client fall back to this gateway.
"""

from __future__ import annotations

import hmac
import logging

import grpc
from google.protobuf import message_factory

from ._bridge import Bridge
from ._errors import RpcFailure, invalid, status_for, translate, unimplemented
from ._proto import SERVICE, SERVICE_DESCRIPTOR

log = logging.getLogger("sandpool.cwsandbox")

#: RPC -> backend method. Unary methods take (request, timeout); streaming ones end with a send channel.
_UNARY = {"CreateSandbox": "create", "GetSandbox": "get", "ListSandboxes": "list", "DeleteSandbox": "delete",
          "PurgeSandboxes": "purge", "Exec": "exec", "ReadFile": "read_file", "WriteFile": "write_file"}
_UNSUPPORTED = {
    "CreateSandboxFromTemplate": "creating sandboxes from templates",
    "CreateSandboxFromFile": "creating sandboxes from compose files",
    "GetSandboxBuildLogs": "compose build logs",
    "ConnectSandbox": "the direct data plane (the client uses this server for exec, files and logs instead)",
    "CreateFileSystemSnapshot": "file-system snapshots", "GetFileSystemSnapshot": "file-system snapshots",
    "ListFileSystemSnapshots": "file-system snapshots", "DeleteFileSystemSnapshot": "file-system snapshots",
}


class CwsandboxServicer:
    """The handlers of SandboxService. ``token``: the API key clients must send (None: any key)."""

    def __init__(self, backend, token: str | None = None) -> None:
        self.backend = backend
        self.bridge = Bridge(backend.token, backend.nursery)
        self._expected = f"Bearer {token}".encode() if token else None

    def generic_handler(self) -> grpc.GenericRpcHandler:
        handlers = {}
        for method in SERVICE_DESCRIPTOR.methods:
            request_type = message_factory.GetMessageClass(method.input_type)
            response_type = message_factory.GetMessageClass(method.output_type)
            behaviour = self._behaviour(method.name)
            make = {(False, False): grpc.unary_unary_rpc_method_handler,
                    (False, True): grpc.unary_stream_rpc_method_handler,
                    (True, True): grpc.stream_stream_rpc_method_handler,
                    (True, False): grpc.stream_unary_rpc_method_handler}[
                (method.client_streaming, method.server_streaming)]
            handlers[method.name] = make(behaviour, request_deserializer=request_type.FromString,
                                         response_serializer=response_type.SerializeToString)
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _behaviour(self, name: str):
        if name in _UNARY:
            backend_method = getattr(self.backend, _UNARY[name])

            def unary(request, context):
                with self._serving(context, name):
                    return self.bridge.call(context, backend_method, request, context.time_remaining())
            return unary
        if name == "StreamExec":
            return self._stream_exec
        if name == "StreamLogs":
            return self._stream_logs

        def unsupported(request, context):
            with self._serving(context, name):
                raise unimplemented(_UNSUPPORTED.get(name, name))
        return unsupported

    def _stream_exec(self, request_iterator, context):
        with self._serving(context, "StreamExec"):
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("message") != "init":
                raise invalid("init", "the first message of StreamExec must be init")
            yield from self.bridge.stream(context, self.backend.stream_exec, first.init, request_iterator,
                                          context.time_remaining())

    def _stream_logs(self, request, context):
        with self._serving(context, "StreamLogs"):
            yield from self.bridge.stream(context, self.backend.stream_logs, request)

    def _serving(self, context: grpc.ServicerContext, name: str) -> _Serving:
        self._authenticate(context)
        return _Serving(context, name)

    def _authenticate(self, context: grpc.ServicerContext) -> None:
        if self._expected is None:
            return
        sent = dict(context.invocation_metadata()).get("authorization")
        if sent is None:
            _abort(context, RpcFailure(grpc.StatusCode.UNAUTHENTICATED, "no API key was sent; this sandpool "
                                       "server needs one: set CWSANDBOX_API_KEY to its token"))
        if not hmac.compare_digest(sent.encode(), self._expected):
            _abort(context, RpcFailure(grpc.StatusCode.UNAUTHENTICATED, "invalid API key; set CWSANDBOX_API_KEY "
                                       "to the token this sandpool server was started with"))


class _Serving:
    """Around a handler: any failure leaves as the client's gRPC status (logged at debug level)."""

    def __init__(self, context: grpc.ServicerContext, name: str) -> None:
        self.context, self.name = context, name

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, GeneratorExit) or not isinstance(exc, Exception):
            return False
        if _is_abort(exc):
            return False  # already aborted with a status
        failure = translate(exc)
        log.debug("%s failed: %s", self.name, failure)
        _abort(self.context, failure)


def _abort(context: grpc.ServicerContext, failure: RpcFailure):
    context.abort_with_status(status_for(failure))


def _is_abort(exc: BaseException) -> bool:
    # grpc's abort raises a bare Exception after recording the status; it must propagate unchanged.
    return type(exc) is Exception and not exc.args


def add_cwsandbox_servicer(server: grpc.Server, backend, *, token: str | None = None) -> None:
    """Serve cwsandbox's SandboxService from ``backend`` (see ``open_backend``) on ``server``.

    ``server`` is a sync ``grpc.server``; give it enough worker threads: each open exec or log
    stream holds one for its duration (``DEFAULT_MAX_WORKERS``). With ``token``, clients must send
    it as their API key (``CWSANDBOX_API_KEY``); without, any key (or none) is accepted.
    """
    server.add_generic_rpc_handlers((CwsandboxServicer(backend, token).generic_handler(),))

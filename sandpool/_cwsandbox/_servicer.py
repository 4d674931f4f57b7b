"""``coreweave.sandbox.v1.SandboxService`` for a sync ``grpc.server``, backed by a CwsandboxBackend.

Every RPC is checked against the server's API key first, then runs in the backend's trio loop.
Failures leave as the gRPC status and AIP-193 details the client maps to its own exceptions.
The methods the client would use for features without a local meaning (compose build logs,
direct data-plane connections) answer UNIMPLEMENTED with a message saying so; for
ConnectSandbox that is exactly what makes the client fall back to this gateway.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf import message_factory

from .._grpc.bridge import ServerBridge
from . import _exec
from ._errors import RpcFailure, invalid, status_for, translate, unimplemented
from ._proto import SERVICE, SERVICE_DESCRIPTOR, Message

if TYPE_CHECKING:
    from ._backend import CwsandboxBackend

log = logging.getLogger("sandpool.cwsandbox")

#: RPC -> backend method. Unary methods take (request, timeout); streaming ones end with a send channel.
_UNARY = {"CreateSandbox": "create", "GetSandbox": "get", "ListSandboxes": "list", "DeleteSandbox": "delete",
          "PurgeSandboxes": "purge", "Exec": "exec", "ReadFile": "read_file", "WriteFile": "write_file",
          "CreateFileSystemSnapshot": "create_snapshot", "GetFileSystemSnapshot": "get_snapshot",
          "ListFileSystemSnapshots": "list_snapshots", "DeleteFileSystemSnapshot": "delete_snapshot"}
_UNSUPPORTED = {
    "GetSandboxBuildLogs": "compose build logs",
    "ConnectSandbox": "the direct data plane (the client uses this server for exec, files and logs instead)",
}
#: Creates from a compose file or a stored template (``_specfrom``).
_UNARY.update(CreateSandboxFromFile="create_from_file", CreateSandboxFromTemplate="create_from_template")  # _specfrom


class CwsandboxServicer:
    """The handlers of SandboxService. ``token``: the API key clients must send (None: any key)."""

    def __init__(self, backend: CwsandboxBackend, token: str | None = None) -> None:
        self.backend = backend
        self.bridge = ServerBridge(backend.token, backend.nursery)
        self._expected = f"Bearer {token}".encode() if token else None

    def generic_handler(self) -> grpc.GenericRpcHandler:
        handlers: dict[str, Any] = {}
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

    def _behaviour(self, name: str) -> Callable[..., Any]:
        if name in _UNARY:
            backend_method = getattr(self.backend, _UNARY[name])

            def unary(request: Message, context: grpc.ServicerContext) -> Message:
                with self._serving(context, name):
                    return self.bridge.run(context, backend_method, request, context.time_remaining())
            return unary
        if name == "StreamExec":
            return self._stream_exec
        if name == "StreamLogs":
            return self._stream_logs

        def unsupported(request: Message, context: grpc.ServicerContext) -> NoReturn:
            with self._serving(context, name):
                raise unimplemented(_UNSUPPORTED.get(name, name))
        return unsupported

    def _stream_exec(self, request_iterator: Iterator[Message],
                     context: grpc.ServicerContext) -> Iterator[Message]:
        """The client's every exec: started from this thread, ``ready`` sent from here, stdin pumped
        by a pooled thread; a command that ends at once answered from here, a longer one's output
        and exit forwarded from the loop (``_exec``)."""
        with self._serving(context, "StreamExec"):
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("message") != "init":
                raise invalid("init", "the first message of StreamExec must be init")
            init, timeout = first.init, context.time_remaining()
            target = self.backend.target_now(init.sandbox_id, init.container) or \
                self.bridge.run(context, self.backend.target, init.sandbox_id, init.container)
            proc = _exec.start(target, init, timeout)
            try:
                yield _exec.ready()
                pump = _exec.StdinPump(proc)
                self.backend.pumps.submit(pump.pump, request_iterator)
                ended = _exec.answer_if_ended(proc, _exec.QUICK_SECONDS)
                if ended is not None:
                    yield from ended
                else:
                    yield from _flat(self.bridge.stream(context, _exec.forward, proc, pump), until=_exec.is_last)
            finally:
                if not proc.done():  # the call ended first (or its forwarding never started): kill it
                    proc.cancel()

    def _stream_logs(self, request: Message, context: grpc.ServicerContext) -> Iterator[Message]:
        with self._serving(context, "StreamLogs"):
            yield from _flat(self.bridge.stream(context, self.backend.stream_logs, request))

    @contextlib.contextmanager
    def _serving(self, context: grpc.ServicerContext, name: str) -> Iterator[None]:
        """Check the API key, then run the handler: any failure leaves as the client's gRPC status."""
        self._authenticate(context)
        try:
            yield
        except Exception as exc:
            failure = translate(exc)
            log.debug("%s failed: %s", name, failure)
            _abort(context, failure)

    def _authenticate(self, context: grpc.ServicerContext) -> None:
        if self._expected is None:
            return
        metadata: dict[str, str | bytes] = dict(context.invocation_metadata())
        sent = metadata.get("authorization")
        if sent is None:
            _abort(context, RpcFailure(grpc.StatusCode.UNAUTHENTICATED, "no API key was sent; this sandpool "
                                       "server needs one: set CWSANDBOX_API_KEY to its token"))
        if not hmac.compare_digest(sent if isinstance(sent, bytes) else sent.encode(), self._expected):
            _abort(context, RpcFailure(grpc.StatusCode.UNAUTHENTICATED, "invalid API key; set CWSANDBOX_API_KEY "
                                       "to the token this sandpool server was started with"))


def _flat(batches: Generator[list[Message], None, None],
          until: Callable[[Message], bool] = lambda _message: False) -> Iterator[Message]:
    """The messages of a bridged stream's batches, up to the first for which ``until`` is true (the
    call then ends at once, its status sent behind that message); closing this closes the stream
    (its producer stops)."""
    with contextlib.closing(batches):
        for batch in batches:
            for message in batch:
                yield message
                if until(message):
                    return


def _abort(context: grpc.ServicerContext, failure: RpcFailure) -> NoReturn:
    context.abort_with_status(status_for(failure))  # raises, ending the handler
    raise AssertionError("grpc's abort_with_status returned")  # never reached: for the type checkers


def add_cwsandbox_servicer(server: grpc.Server, backend: CwsandboxBackend, *, token: str | None = None) -> None:
    """Serve cwsandbox's SandboxService from ``backend`` (see ``open_backend``) on ``server``.

    ``server`` is a sync ``grpc.server``; give it enough worker threads: each open exec or log
    stream holds one for its duration (``DEFAULT_MAX_WORKERS``). With ``token``, clients must send
    it as their API key (``CWSANDBOX_API_KEY``); without, any key (or none) is accepted.
    """
    server.add_generic_rpc_handlers((CwsandboxServicer(backend, token).generic_handler(),))

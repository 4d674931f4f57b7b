"""``sandpool serve``: the gRPC server around a Fleet, and the process's main loop.

gRPC's sync server runs handlers in a thread pool; each handler calls into the server's trio loop
(``trio.from_thread``), where the Fleet and its LocalRuntime live. A data-plane stream uses two
threads: the pool thread yields response messages from a ThreadPipe, and a helper thread moves
request messages into another. Exceptions become gRPC statuses in :func:`_abort`, and only there.

SIGTERM or SIGINT shut down gracefully: no new sandboxes, every sandbox stopped, every stream
ended with its sandbox's exit report, the journal closed, then exit 0. If the server is killed
instead, its LocalRuntime's template sees its control socket close and kills every sandbox.
"""

from __future__ import annotations

import contextlib

import logging
import os
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
import trio

from .._errors import (
    ProtocolError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxResourceExhaustedError,
    SandboxUnavailableError,
)
from .._runtime._local import LocalRuntime
from .._runtime._threadpipe import PACE_SECONDS, ThreadPipe
from . import auth, journal
from . import messages as m
from .control import Fleet

log = logging.getLogger("sandpool.serve")

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


@dataclass(frozen=True)
class ServeConfig:
    """What ``sandpool serve`` was asked for. ``max_streams`` bounds concurrent calls and streams."""

    listen: str = m.DEFAULT_ADDRESS
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    orphan_grace_seconds: float = 60.0
    record_file: str | None = None
    max_streams: int = 512
    #: also serve cwsandbox's own gRPC API (coreweave.sandbox.v1) on this address, same sandboxes
    cwsandbox_listen: str | None = None

    def __post_init__(self) -> None:
        auth.check_bind(self.listen, self.token)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together; pass both, or neither for plaintext")
        if not self.orphan_grace_seconds >= 0:
            raise ValueError(f"--orphan-grace-seconds must be >= 0, got {self.orphan_grace_seconds!r}")


_CODES = [
    (ProtocolError, grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (TypeError, grpc.StatusCode.INVALID_ARGUMENT),
    (SandboxNotFoundError, grpc.StatusCode.NOT_FOUND),
    (SandboxResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (SandboxUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (SandboxNotRunningError, grpc.StatusCode.FAILED_PRECONDITION),
    (trio.RunFinishedError, grpc.StatusCode.UNAVAILABLE),
]


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    """End the call with the status for ``exc``; the client raises the same class again."""
    code = next((c for cls, c in _CODES if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error in a call", exc_info=exc)
    if isinstance(exc, trio.RunFinishedError):
        exc = SandboxUnavailableError("the sandpool server is shutting down")
    context.set_trailing_metadata(((m.META_ERROR, m.error_name(exc)),))
    context.abort(code, str(exc) or type(exc).__name__)


class Service:
    """The gRPC methods; each handler thread calls into the trio loop that owns ``fleet``."""

    def __init__(self, fleet: Fleet, token: trio.lowlevel.TrioToken) -> None:
        self.fleet = fleet
        self.token = token
        self._leases: set[threading.Event] = set()
        self._lock = threading.Lock()

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {name: grpc.unary_unary_rpc_method_handler(self._unary(name)) for name in m.UNARY_METHODS}
        methods[m.LEASE_METHOD] = grpc.unary_stream_rpc_method_handler(self.lease)
        methods[m.ATTACH_METHOD] = grpc.stream_stream_rpc_method_handler(self.attach)
        return grpc.method_handlers_generic_handler(m.SERVICE, methods)

    @staticmethod
    def kinds() -> dict[str, str]:
        kinds = {m.path(name): "unary_unary" for name in m.UNARY_METHODS}
        kinds[m.path(m.LEASE_METHOD)] = "unary_stream"
        kinds[m.path(m.ATTACH_METHOD)] = "stream_stream"
        return kinds

    def _unary(self, name: str):
        method = getattr(self.fleet, f"rpc_{name.lower()}")

        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                message = m.unpack(request, f"{name} request")
                reply = trio.from_thread.run(method, message, context.peer(), trio_token=self.token)
                return m.pack(reply)
            except Exception as exc:
                _abort(context, exc)

        return call

    def lease(self, request: bytes, context: grpc.ServicerContext):
        """Name the caller's lease, then hold the stream open until the caller goes away."""
        try:
            lease = trio.from_thread.run_sync(self.fleet.open_lease, context.peer(), trio_token=self.token)
        except Exception as exc:
            _abort(context, exc)
        ended = threading.Event()
        context.add_callback(ended.set)  # runs when the call ends: client closed, cancelled or gone
        with self._lock:
            self._leases.add(ended)
        try:
            yield m.pack({"lease": lease})
            ended.wait()
        finally:
            with self._lock:
                self._leases.discard(ended)
            try:
                self.token.run_sync_soon(self.fleet.lease_lost, lease)
            except trio.RunFinishedError:
                pass

    def attach(self, request_iterator, context: grpc.ServicerContext):
        """One sandbox's data plane: bytes of wire frames both ways (see ``dataplane.py``)."""
        sandbox_id = dict(context.invocation_metadata()).get(m.META_SANDBOX)
        if not sandbox_id:
            _abort(context, ValueError(f"an Attach call needs the {m.META_SANDBOX!r} metadata naming the sandbox"))
        inbound = ThreadPipe(self.token)
        outbound = ThreadPipe(self.token, message_bytes=m.DATA_CHUNK_BYTES, pace=PACE_SECONDS)
        try:
            att = trio.from_thread.run(self.fleet.attach, sandbox_id, inbound, outbound, context.peer(),
                                       trio_token=self.token)
        except Exception as exc:
            _abort(context, exc)

        def closed() -> None:
            inbound.close()
            outbound.close()

        context.add_callback(closed)
        threading.Thread(target=_pump_requests, args=(request_iterator, inbound), daemon=True,
                         name=f"sandpool-attach-{sandbox_id}").start()
        while (chunk := outbound.get_blocking()) is not None:
            yield chunk
        how, detail = att.ending or ("ok", {})
        if how == "error":
            code_name, message = detail
            context.set_trailing_metadata(((m.META_ERROR, "ProtocolError"),))
            context.abort(getattr(grpc.StatusCode, code_name), message)
        context.set_trailing_metadata(tuple((k, str(v)) for k, v in dict(detail).items()))

    def end_leases(self) -> None:
        """Server shutdown: end every lease stream (clients then know the server is going)."""
        with self._lock:
            for ended in self._leases:
                ended.set()


def _pump_requests(request_iterator, inbound: ThreadPipe) -> None:
    try:
        for message in request_iterator:
            if not inbound.put_blocking(message):
                return
    except Exception:  # the client went away; the stream's own status says how
        pass
    finally:
        inbound.close()


def build_server(service: Service, config: ServeConfig) -> tuple[grpc.Server, str]:
    """A started-ready gRPC server bound to ``config.listen``; returns it and the bound address."""
    interceptors = [auth.TokenInterceptor(config.token, service.kinds())] if config.token else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_streams + 8, thread_name_prefix="sandpool-rpc"),
        handlers=[service.handler()], interceptors=interceptors, options=_SERVER_OPTIONS,
        maximum_concurrent_rpcs=config.max_streams,
    )
    try:
        if config.tls_cert:
            port = server.add_secure_port(config.listen, auth.server_credentials(config.tls_cert, config.tls_key))
        else:
            port = server.add_insecure_port(config.listen)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {config.listen!r}: {exc}") from None
    if not port:
        raise OSError(f"cannot listen on {config.listen!r} (address in use?)")
    host, _ = auth.split_listen(config.listen)
    bound = config.listen if host == "unix" else f"{'[' + host + ']' if ':' in host else host}:{port}"
    return server, bound


async def serve_async(config: ServeConfig, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve until SIGTERM/SIGINT (or cancellation); then stop everything and return."""
    record = journal.Journal(config.record_file or journal.default_path(config.listen))
    settled = record.open()
    if settled:
        log.info("%d sandbox(es) of an earlier run recorded as terminated", len(settled))
    runtime = LocalRuntime()
    async with trio.open_nursery() as nursery:
        await runtime.open(nursery)
        fleet = Fleet(runtime, record, nursery, orphan_grace=config.orphan_grace_seconds)
        service = Service(fleet, trio.lowlevel.current_trio_token())
        server, bound = build_server(service, config)
        server.start()
        nursery.start_soon(fleet.sweep_orphans)
        scheme = "tls://" if config.tls_cert else ""
        print(f"sandpool serve: listening on {scheme}{bound} (pid {os.getpid()})", flush=True)
        task_status.started(bound)
        try:
            async with _cwsandbox_listener(config, bound):
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("%s: stopping every sandbox", signal.Signals(signum).name)
                        break
        finally:
            await shut_down(fleet, service, server, runtime)
            nursery.cancel_scope.cancel()


async def shut_down(fleet: Fleet, service: Service, server: grpc.Server, runtime: LocalRuntime) -> None:
    """Stop a server's sandboxes, end its clients' leases, stop gRPC and release the runtime. Shielded."""
    with trio.CancelScope(shield=True):
        await fleet.aclose()
        service.end_leases()
        await trio.to_thread.run_sync(lambda: server.stop(grace=1.0).wait(5.0))
        await runtime.aclose()


@contextlib.asynccontextmanager
async def _cwsandbox_listener(config: ServeConfig, bound: str):
    """With ``--cwsandbox``: cwsandbox's API on its own listener, backed by a session of this very
    server, so sandboxes made through either API are the same fleet (``sandpool ls`` shows both)."""
    if config.cwsandbox_listen is None:
        yield
        return
    from .._cwsandbox import open_cwsandbox_server
    from .._session import Session

    async with Session(address=bound, token=config.token) as session, \
            open_cwsandbox_server(session, config.cwsandbox_listen, token=config.token) as address:
        print(f"sandpool serve: cwsandbox API on {address}", flush=True)
        yield


def serve(config: ServeConfig) -> int:
    """Run the server in this process until it is told to stop; the exit status."""
    logging.basicConfig(level=logging.INFO, format="sandpool serve: %(message)s", stream=sys.stderr)
    trio.run(serve_async, config)
    sys.stdout.flush()
    sys.stderr.flush()
    # gRPC's pool threads are not daemons; one still blocked must not keep a stopped server alive
    os._exit(0)

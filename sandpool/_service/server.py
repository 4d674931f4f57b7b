"""``sandpool serve``: the gRPC server around a Fleet, and the process's main loop.

gRPC's sync server runs handlers in a thread pool; each handler calls into the server's trio loop
through the bridge (``_grpc/bridge.py``), where the Fleet and its LocalRuntime live. A data-plane
stream uses two threads: the pool thread yields response messages from a ThreadPipe, and a helper
thread moves request messages into another. Exceptions become gRPC statuses in :func:`_abort`, and
only there.

SIGTERM or SIGINT shut down gracefully: no new sandboxes, every sandbox stopped, every stream
ended with its sandbox's exit report, the journal closed, then exit 0. If the server is killed
instead, its LocalRuntime's template sees its control socket close and kills every sandbox.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, BinaryIO, NoReturn

import grpc
import trio

from .._errors import (
    ProtocolError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxResourceExhaustedError,
    SandboxUnavailableError,
)
from .._errors_cw import SandboxSnapshotError
from .._runtime.local import LocalRuntime
from .._grpc.bridge import Outbox, RpcEnded, ServerBridge
from .._grpc.threadpipe import PACE_SECONDS, ThreadPipe
from .._isolation import probe
from . import auth, journal
from .._grpc import limits
from .._grpc import endpoint
from .._grpc import messages as m
from .control import Fleet
from .dataplane import Attachment, Ending
from . import fastpath
from .fastpath import FastEnd, FastPlane
from .listener import Listening
from .policy import Policy, Refused

log = logging.getLogger("sandpool.serve")

#: ``also(address, token, open_log)`` of :func:`serve_async`: another API served beside this one
AlsoServe = Callable[[str, str | None, Callable[[str], BinaryIO | None]], AbstractAsyncContextManager[None]]

@dataclass(frozen=True)
class ServeConfig:
    """What ``sandpool serve`` was asked for. ``max_streams`` bounds concurrent calls and streams.

    ``listen`` None means the default unix socket (``endpoint.default_address()``). ``min_isolation``
    and ``allow_host_network`` (None: the defaults for the server's user) make its ``Policy``;
    ``allow_uids`` are the users besides the server's own (and root) that may use its unix socket.
    """

    listen: str | None = None
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    orphan_grace_seconds: float = 60.0
    record_file: str | None = None
    max_streams: int = 512
    min_isolation: str | None = None
    allow_host_network: bool | None = None
    allow_uids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.listen is None:
            object.__setattr__(self, "listen", endpoint.default_address())
        auth.check_bind(self.listen_on, self.token)
        if self.allow_uids and not self.listen_on.startswith("unix:"):
            raise ValueError("--allow-uid applies to unix sockets; a TCP listener admits whoever has its token")
        self.policy()  # ValueError now for an unknown --min-isolation
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together; pass both, or neither for plaintext")
        if not self.orphan_grace_seconds >= 0:
            raise ValueError(f"--orphan-grace-seconds must be >= 0, got {self.orphan_grace_seconds!r}")

    @property
    def listen_on(self) -> str:
        """``listen`` as resolved: the default unix socket when it was None."""
        assert self.listen is not None  # __post_init__ resolved it
        return self.listen

    def policy(self) -> Policy:
        return Policy.default(self.min_isolation, self.allow_host_network)


_CODES = [
    (Refused, grpc.StatusCode.PERMISSION_DENIED),
    (ProtocolError, grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (TypeError, grpc.StatusCode.INVALID_ARGUMENT),
    (SandboxNotFoundError, grpc.StatusCode.NOT_FOUND),
    (SandboxResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (SandboxUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (SandboxNotRunningError, grpc.StatusCode.FAILED_PRECONDITION),
    (SandboxSnapshotError, grpc.StatusCode.FAILED_PRECONDITION),
    (RpcEnded, grpc.StatusCode.CANCELLED),
]


def _abort(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    """End the call with the status for ``exc``; the client raises the same class again."""
    code = next((c for cls, c in _CODES if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error in a call", exc_info=exc)
    name = "CWSandboxAuthenticationError" if isinstance(exc, Refused) else m.error_name(exc)
    if isinstance(exc, SandboxSnapshotError):  # cwsandbox's snapshot errors travel by their own names
        name = type(exc).__name__
    extras = m.error_extras(exc)  # feature, file_system_snapshot_id, ...: set again by the client
    context.set_trailing_metadata(((m.META_ERROR, name),) + (((m.META_ERROR_EXTRAS, extras),) if extras else ()))
    context.abort(code, str(exc) or type(exc).__name__)
    raise AssertionError("unreachable: context.abort raises")


class Service:
    """The gRPC methods; each handler thread calls into the trio loop that owns ``fleet``."""

    def __init__(self, fleet: Fleet, token: trio.lowlevel.TrioToken, fastplane: FastPlane | None = None) -> None:
        self.fleet = fleet
        self.token = token
        self.bridge = ServerBridge(token, fleet.nursery)
        self.fastplane = fastplane
        self._leases: set[threading.Event] = set()
        self._lock = threading.Lock()

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {name: grpc.unary_unary_rpc_method_handler(self._unary(name)) for name in m.UNARY_METHODS}
        methods[m.LEASE_METHOD] = grpc.unary_stream_rpc_method_handler(self.lease)
        methods[m.ATTACH_METHOD] = grpc.stream_stream_rpc_method_handler(self.attach)
        methods[m.LOGS_METHOD] = grpc.unary_stream_rpc_method_handler(self.logs)
        return grpc.method_handlers_generic_handler(m.SERVICE, methods)

    @staticmethod
    def kinds() -> dict[str, str]:
        kinds = {m.path(name): "unary_unary" for name in m.UNARY_METHODS}
        kinds[m.path(m.LEASE_METHOD)] = "unary_stream"
        kinds[m.path(m.ATTACH_METHOD)] = "stream_stream"
        kinds[m.path(m.LOGS_METHOD)] = "unary_stream"
        return kinds

    def _unary(self, name: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        method = getattr(self.fleet, f"rpc_{name.lower()}")

        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                limits.request_bytes(f"{name} request", len(request))
                message = m.unpack(request, f"{name} request")
                return m.pack(self.bridge.run(context, method, message, context.peer()))
            except Exception as exc:
                _abort(context, exc)

        return call

    def lease(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Name the caller's lease, then hold the stream open until the caller goes away."""
        try:
            limits.request_bytes("Lease request", len(request))
            lease = self.bridge.run_sync(self.fleet.open_lease, context.peer())
        except Exception as exc:
            _abort(context, exc)
        ended = threading.Event()
        context.add_callback(ended.set)  # runs when the call ends: client closed, cancelled or gone
        with self._lock:
            self._leases.add(ended)
        try:
            reply = {"lease": lease}
            if self.fastplane is not None:
                reply["fast"] = self.fastplane.advert()
            yield m.pack(reply)
            ended.wait()
        finally:
            with self._lock:
                self._leases.discard(ended)
            self.bridge.soon(self.fleet.lease_lost, lease)

    def logs(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """A sandbox's main log (``Fleet.log_pieces``), read in the trio loop by a task that stops when
        the call ends, handed over through a small bounded outbox, sent in messages of lines."""
        try:
            limits.request_bytes("Logs request", len(request))
            message = m.unpack(request, "Logs request")
            with contextlib.closing(self.bridge.stream(context, self._read_log, message,
                                                       buffer=_LOG_BUFFER)) as batches:
                for batch in batches:
                    for reply in _log_replies(batch):
                        yield m.pack(reply)
        except Exception as exc:
            _abort(context, exc)

    async def _read_log(self, message: dict[str, Any], outbox: Outbox) -> None:
        pieces = self.fleet.log_pieces(message)  # its error (NotFound, ...) is the call's
        try:
            async for piece in pieces:
                await outbox.send(piece)
        except trio.BrokenResourceError:
            pass  # the call ended: nobody reads any more
        except Exception:  # the stream ends short; the server and its other calls go on
            log.exception("reading the main log of %s", message.get("sandbox_id"))

    def attach(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """One sandbox's data plane: bytes of wire frames both ways (see ``dataplane.py``), or, for a
        same-host client that asks, an offer of the fast socket (see ``fastpath.py``)."""
        metadata = dict(context.invocation_metadata())
        given = metadata.get(m.META_SANDBOX)
        try:
            if not given:
                raise ValueError(f"an Attach call needs the {m.META_SANDBOX!r} metadata naming the sandbox")
            sandbox_id = limits.identifier(f"the {m.META_SANDBOX!r} metadata", given)
        except (TypeError, ValueError) as exc:
            _abort(context, exc)
        if metadata.get(m.META_DATA_PLANE) == m.DATA_PLANE_FAST and self.fastplane is not None:
            yield from self._attach_fast(sandbox_id, context)
            return
        inbound = ThreadPipe()
        outbound = ThreadPipe(message_bytes=m.DATA_CHUNK_BYTES, pace=PACE_SECONDS)
        try:
            att = self.bridge.run(context, self.fleet.attach, sandbox_id, inbound, outbound, context.peer())
        except Exception as exc:
            _abort(context, exc)

        def closed() -> None:
            inbound.close()
            outbound.close()

        context.add_callback(closed)
        self.bridge.pump(request_iterator, inbound, f"sandpool-attach-{sandbox_id}")
        while (chunk := outbound.get_blocking()) is not None:
            yield chunk
        _end_stream(context, att)

    def _attach_fast(self, sandbox_id: str, context: grpc.ServicerContext) -> Iterator[bytes]:
        """The Attach call of a fast-plane attachment: the offer, then the attachment's end."""
        assert self.fastplane is not None
        end = FastEnd(self.token)
        try:
            att, offer = self.bridge.run(context, fastpath.attach, self.fleet, self.fastplane, sandbox_id, end,
                                         context.peer())
        except Exception as exc:
            _abort(context, exc)
        if not context.add_callback(end.close_from_thread):  # the call ended already
            end.close_from_thread()
        yield m.pack(offer)
        end.ended.wait()
        _end_stream(context, att)

    def end_leases(self) -> None:
        """Server shutdown: end every lease stream (clients then know the server is going)."""
        with self._lock:
            for ended in self._leases:
                ended.set()


_LOG_BUFFER = 16  # lines between a Logs call's reader and its gRPC thread (each at most 1 MiB)


def _log_replies(batch: list[tuple[str, int]]) -> Iterator[dict[str, Any]]:
    """The Logs replies for a batch of (line, offset after it): lines up to ``LOG_BATCH_BYTES`` each
    (a longer line alone), with the offset after their last."""
    lines: list[str] = []
    size = 0
    for line, offset in batch:
        lines.append(line)
        size += len(line)
        if size >= m.LOG_BATCH_BYTES:
            yield {"lines": lines, "offset": offset}
            lines, size = [], 0
    if lines:
        yield {"lines": lines, "offset": batch[-1][1]}


def _end_stream(context: grpc.ServicerContext, att: Attachment) -> None:
    """End an Attach call as its attachment ended: the exit report, or the error that ended it."""
    ending = att.ending or Ending()
    if ending.error is not None:
        code_name, message = ending.error
        context.set_trailing_metadata(((m.META_ERROR, "ProtocolError"),))
        context.abort(getattr(grpc.StatusCode, code_name), message)
    context.set_trailing_metadata(tuple((k, str(v)) for k, v in ending.trailer.items()))


@dataclass(frozen=True)
class Running:
    """A server that :func:`open_server` started: its fleet, its gRPC service and the address it is bound to."""

    fleet: Fleet
    service: Service
    bound: str


@contextlib.asynccontextmanager
async def open_server(config: ServeConfig, listening: Listening, record: journal.Journal, *,
                      policy: Policy | None, fast_plane: bool) -> AsyncIterator[Running]:
    """The bootstrap of every sandpool server (``sandpool serve``, a Slurm job's): a LocalRuntime and
    the Fleet on it (checking ``policy``, if any), the gRPC service (with the same-host fast plane if
    ``fast_plane``) bound by ``listening``, and the orphan sweep; yields them running.

    However the block ends, :func:`shut_down` runs (every sandbox stopped, leases ended, gRPC
    stopped, the runtime released), then ``listening`` and ``record`` (opened by the caller) close.
    """
    try:
        runtime = LocalRuntime()
        async with trio.open_nursery() as nursery:
            await runtime.open(nursery)
            fleet = Fleet(runtime, record, nursery, orphan_grace=config.orphan_grace_seconds, policy=policy,
                          auto_level=probe.best if policy is not None else None)
            token = trio.lowlevel.current_trio_token()
            fastplane = None
            if fast_plane:
                fastplane = FastPlane(token)
                await nursery.start(fastplane.serve)
            service = Service(fleet, token, fastplane)
            try:
                bound = listening.start(service)
                nursery.start_soon(fleet.sweep_orphans)
                yield Running(fleet, service, bound)
            finally:
                await shut_down(fleet, service, listening.server, runtime)
                nursery.cancel_scope.cancel()
    finally:
        listening.close()
        record.close()


async def serve_async(config: ServeConfig, *, also: AlsoServe | None = None,
                      task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until SIGTERM/SIGINT (or cancellation); then stop everything and return.

    ``also(address, token, open_log)``, if given, is an async context manager held open while the
    server runs: another API over the same fleet (the CLI's ``--cwsandbox``), reaching this server
    at ``address`` with ``token``, and reading main logs with ``open_log(sandbox_id)``."""
    record = journal.Journal(config.record_file or journal.default_path(config.listen_on))
    listening = Listening(config)
    listening.reserve()  # before anything starts: a second server on this address stops here
    try:
        settled = record.open()
    except BaseException:
        listening.close()
        record.close()
        raise
    if settled:
        log.info("%d sandbox(es) of an earlier run recorded as terminated", len(settled))
    async with open_server(config, listening, record, policy=config.policy(), fast_plane=True) as server:
        scheme = "tls://" if config.tls_cert else ""
        token_note = (f"; token in {listening.record.token_path}"
                      if listening.generated_token and listening.record is not None else "")
        print(f"sandpool serve: listening on {scheme}{server.bound} (pid {os.getpid()}){token_note}", flush=True)
        log.info("policy: %s", server.fleet.policy)
        task_status.started(server.bound)
        async with also(server.bound, listening.token, server.fleet.open_log) if also else _nothing():
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("%s: stopping every sandbox", signal.Signals(signum).name)
                    break


async def shut_down(fleet: Fleet, service: Service, server: grpc.Server | None, runtime: LocalRuntime) -> None:
    """Stop a server's sandboxes, end its clients' leases, stop gRPC and release the runtime. Shielded."""
    with trio.CancelScope(shield=True):
        await fleet.aclose()
        service.end_leases()
        if server is not None:
            await trio.to_thread.run_sync(lambda: server.stop(grace=1.0).wait(5.0))
        await runtime.aclose()


@contextlib.asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield


def serve(config: ServeConfig, *, also: AlsoServe | None = None) -> int:
    """Run the server in this process until it is told to stop; the exit status. ``also``: see
    :func:`serve_async`."""
    logging.basicConfig(level=logging.INFO, format="sandpool serve: %(message)s", stream=sys.stderr)
    trio.run(functools.partial(serve_async, config, also=also))
    sys.stdout.flush()
    sys.stderr.flush()
    # gRPC's pool threads are not daemons; one still blocked must not keep a stopped server alive
    os._exit(0)

"""RemoteRuntime: the sandboxes of a ``sandpool serve`` server, reached over gRPC from trio.

gRPC's asyncio API cannot run inside trio, so this uses the sync API without blocking the loop,
through the bridge (``_grpc/bridge.py``): unary calls are gRPC futures whose completion wakes the
trio task (cancelling the task cancels the call); each sandbox's data plane is one bidirectional
stream whose two directions are :class:`ThreadPipe` s (gRPC pulls the request pipe in its own
thread, a worker thread pulls responses), wrapped as a trio Stream so :class:`FrameChannel` runs
over it unchanged. Frames are
batched: whatever is queued when gRPC asks for the next message travels as one message.

Ownership: opening the runtime takes a *lease* from the server, a stream held open while this
runtime lives. Sandboxes created here belong to the lease. ``aclose()`` releases it and the server
stops them; if this process dies instead, the stream breaks and the server stops them after its
orphan grace period unless another client attaches to them first.

gRPC errors become sandpool errors in :func:`translate`, and only there.
"""

from __future__ import annotations

import builtins
import functools
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

import grpc
import trio

from .. import _errors
from .._core.channel import FrameChannel
from .._config import SandboxSpec
from .._errors import SandboxUnavailableError
from .._grpc import bridge, endpoint, fastclient
from .._grpc import messages as m
from .._ids import check_snapshot_id
from .._images.snapshots import SnapshotRecord
from .contract import Runtime, SandboxRecord
from .remote_errors import translate
from .._grpc.threadpipe import PACE_SECONDS, PipeStream, ThreadPipe

#: Create's field (and record.extra's key) naming the pod a further container joins (``sandpool._pods``).
POD = "pod"

ENV_ADDRESS, ENV_TOKEN, ENV_TLS_CA = "SANDPOOL_ADDRESS", "SANDPOOL_TOKEN", "SANDPOOL_TLS_CA"
#: Deadlines of control calls, in seconds (Stop adds the grace period it was given).
CALL_SECONDS = 60.0
#: How long a Snapshot call may take (a capture copies the sandbox's changed files).
SNAPSHOT_SECONDS = 300.0
EXIT_REPORT_SECONDS = 3.0
#: A broken Logs stream is resumed this many times in a row, after 0.5, 1, 2 s (cwsandbox's figures).
LOG_RESUME_ATTEMPTS = 3
LOG_RESUME_BACKOFF_SECONDS = 0.5

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", m.MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", m.MAX_MESSAGE_BYTES),
    # a vanished server host (no RST) is noticed within ~15 s; a killed server at once
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.enable_retries", 0),
]


def parse_address(address: str) -> tuple[str, bool]:
    """``(grpc target, use TLS)``: ``tls://host:port`` means TLS; ``host:port`` and ``unix:/path`` not."""
    if not isinstance(address, str) or not address:
        raise ValueError(f"address must be 'host:port', 'tls://host:port' or 'unix:/path', got {address!r}")
    for prefix, tls in (("tls://", True), ("grpcs://", True), ("grpc://", False)):
        if address.startswith(prefix):
            return address[len(prefix):], tls
    return address, False


class RemoteRuntime(Runtime):
    """Sandboxes of the server at ``address`` (``host:port``, ``tls://host:port``, ``unix:/path``).

    ``token`` (default ``$SANDPOOL_TOKEN``, else the token a server of this user made for this
    address, from its listener record) is sent with every call. For TLS, the server's
    certificate is checked against ``tls_ca`` (a PEM file; default ``$SANDPOOL_TLS_CA``, else the
    system's roots).
    """

    name = "remote"
    shared = True

    def __init__(self, address: str, token: str | None = None, *, tls_ca: str | None = None) -> None:
        self.address = address
        self.endpoint = address
        self._target, self._tls = parse_address(address)
        token = token if token is not None else os.environ.get(ENV_TOKEN) or endpoint.token_for(self._target)
        self._metadata: tuple[tuple[str, str], ...] = ((m.META_TOKEN, f"Bearer {token}"),) if token else ()
        self._tls_ca = tls_ca or os.environ.get(ENV_TLS_CA)
        self._channel: grpc.Channel | None = None
        self._unary: dict[str, grpc.UnaryUnaryMultiCallable] = {}
        self._lease: str | None = None
        self._lease_call: _StreamingCall | None = None
        self._records: dict[str, SandboxRecord] = {}
        self._streams: dict[int, tuple[_StreamingCall, ThreadPipe, ThreadPipe]] = {}
        self._nursery: trio.Nursery | None = None
        self.lost: str | None = None  # why the server became unreachable, once it did
        #: whether attachments take the same-host fast socket (``_service/fastpath.py``); why not, if refused
        self.fast = False
        self.fast_refused: str | None = None
        self.worker_lines = 0  # direct lines to call workers opened through the fast plane
        self._closed = False

    def __repr__(self) -> str:
        attached = len(self._streams)
        state = "closed" if self._closed else f"lost ({self.lost})" if self.lost else "open"
        plane = "unix" if self.fast else "grpc"
        return (f"<RemoteRuntime {self.address} {state} lease={self._lease} attached={attached} data_plane={plane} "
                f"worker_lines={self.worker_lines}>")

    # -- connection ------------------------------------------------------------------------

    def _make_channel(self) -> grpc.Channel:
        if not self._tls:
            return grpc.insecure_channel(self._target, options=_CHANNEL_OPTIONS)
        roots = None
        if self._tls_ca:
            with open(self._tls_ca, "rb") as f:
                roots = f.read()
        return grpc.secure_channel(self._target, grpc.ssl_channel_credentials(roots), options=_CHANNEL_OPTIONS)

    async def open(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._channel = self._make_channel()
        for method in m.UNARY_METHODS:
            self._unary[method] = self._channel.unary_unary(m.path(method))
        self._attach_call = self._channel.stream_stream(m.path(m.ATTACH_METHOD))
        self._logs_call = self._channel.unary_stream(m.path(m.LOGS_METHOD))
        self._lease_call = self._channel.unary_stream(m.path(m.LEASE_METHOD))(m.pack({}), metadata=self._metadata)
        try:
            first = await bridge.next_message(self._lease_call)
        except grpc.RpcError as exc:
            self._channel.close()
            raise translate(exc, self.address) from exc
        except BaseException:
            self._lease_call.cancel()
            self._channel.close()
            raise
        reply = m.unpack(first, "Lease reply")
        self._lease = reply["lease"]
        self.fast = fastclient.wanted(reply.get("fast"))
        nursery.start_soon(self._hold_lease)

    async def _hold_lease(self) -> None:
        """Wait for the lease stream to end; if it ends while open, the server is gone."""
        call = self._lease_call
        assert call is not None  # (``open`` made it before starting this task)

        def drain() -> str:
            try:
                for _ in call:
                    pass
                return "the server ended the lease (it is shutting down)"
            except grpc.RpcError as exc:
                return f"{exc.code().name}: {exc.details()}"

        reason = await bridge.in_thread(drain)
        if not self._closed:
            self.lost = f"lost the sandpool server at {self.address}: {reason}"

    async def _call(self, method: str, request: dict[str, Any], *, timeout: float = CALL_SECONDS,
                    sandbox_id: str | None = None) -> dict[str, Any]:
        """One unary call; cancelling the calling task cancels the call."""
        if self._closed or self._channel is None:
            raise SandboxUnavailableError(f"the remote runtime for {self.address} is closed", sandbox_id=sandbox_id)
        future = self._unary[method].future(m.pack(request), timeout=timeout, metadata=self._metadata)
        try:
            reply = await bridge.result_of(future)
        except grpc.RpcError as exc:
            raise translate(exc, self.address, sandbox_id) from exc
        return m.unpack(reply, f"{method} reply")

    # -- the contract ------------------------------------------------------------------------

    def create(self, spec: SandboxSpec) -> SandboxRecord:
        m.spec_to_dict(spec)  # refuse now what cannot travel
        return SandboxRecord(sandbox_id="", spec=spec, isolation="remote")

    def join_pod(self, record: SandboxRecord, primary: SandboxRecord) -> None:
        record.extra[POD] = primary.sandbox_id  # the server joins it to the primary's network at Create

    async def start(self, record: SandboxRecord) -> FrameChannel:
        request = {"spec": m.spec_to_dict(record.spec), "lease": self._lease}
        if POD in record.extra:
            request[POD] = record.extra[POD]
        try:
            info = await self._call("Create", request, timeout=record.spec.request_timeout_seconds)
            self._update(record, info)
            self._records[record.sandbox_id] = record
            return await self._attach(record)
        except SandboxUnavailableError as exc:
            record.lost = record.lost or str(exc)  # the sandbox reports this, not "failed to start"
            raise

    async def stop(self, record: SandboxRecord, grace_seconds: float) -> None:
        with trio.CancelScope(shield=True):
            if record.sandbox_id:
                try:
                    info = await self._call("Stop", {"sandbox_id": record.sandbox_id, "grace": float(grace_seconds),
                                                     "missing_ok": True},
                                            timeout=grace_seconds + CALL_SECONDS, sandbox_id=record.sandbox_id)
                    self._update(record, info)
                except SandboxUnavailableError as exc:
                    record.lost = record.lost or str(exc)
                if record.channel is not None:
                    with trio.move_on_after(EXIT_REPORT_SECONDS):  # the stream ends with the exit report
                        await record.exited.wait()
                    await record.channel.aclose()
            record.exited.set()

    def list(self) -> list[SandboxRecord]:
        return list(self._records.values())

    async def snapshot(self, record: SandboxRecord, trigger: str = "manual") -> SnapshotRecord:
        """The server captures the sandbox into its own snapshot store; the id restores sandboxes of that
        server (``restore_from_snapshot_id``). Its record as the server reports it."""
        reply = await self._call("Snapshot", {"sandbox_id": record.sandbox_id, "trigger": trigger},
                                 timeout=SNAPSHOT_SECONDS, sandbox_id=record.sandbox_id)
        return _snapshot_record(reply)

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRecord:
        """The record of a snapshot taken through the server; SnapshotNotFoundError for any other id."""
        return _snapshot_record(await self._call("GetSnapshot", {"snapshot_id": check_snapshot_id(snapshot_id)}))

    async def list_snapshots(self, source_sandbox_id: str | None = None) -> builtins.list[SnapshotRecord]:
        """The snapshots taken through the server (of ``source_sandbox_id`` only, if given), oldest first."""
        reply = await self._call("ListSnapshots", {"source_sandbox_id": source_sandbox_id})
        snapshots = reply.get("snapshots")
        if not isinstance(snapshots, list):
            raise _errors.ProtocolError(f"a ListSnapshots reply has no list of snapshots: {reply!r:.200}")
        return [_snapshot_record(r) for r in snapshots]

    async def delete_snapshot(self, snapshot_id: str, *, missing_ok: bool = False) -> bool:
        """Delete a snapshot taken through the server (True), or not find it: False with ``missing_ok``,
        else SnapshotNotFoundError."""
        reply = await self._call("DeleteSnapshot", {"snapshot_id": check_snapshot_id(snapshot_id),
                                                    "missing_ok": missing_ok}, timeout=SNAPSHOT_SECONDS)
        return bool(reply.get("deleted"))

    async def find(self, *, sandbox_id: str | None = None, tags: tuple[str, ...] = (), status: str | None = None,
                   show_terminated: bool = False) -> builtins.list[SandboxRecord]:
        if sandbox_id is not None:
            infos = [await self._call("Get", {"sandbox_id": sandbox_id}, sandbox_id=sandbox_id)]
        else:
            reply = await self._call("List", {"tags": list(tags), "status": status, "show_terminated": show_terminated})
            infos = reply["sandboxes"]
        found = []
        for info in infos:
            record = self._records.get(info["sandbox_id"])
            if record is None:
                spec = _spec_or_tags(info)
                record = SandboxRecord(sandbox_id=info["sandbox_id"], spec=spec, isolation="remote")
                self._records[record.sandbox_id] = record
            if record.channel is None:  # an attached record learns its state from its own stream
                self._update(record, info)
            found.append(record)
        return found

    async def main_log_lines(self, record: SandboxRecord, *, follow: bool, tail_lines: int | None,
                             since: float | None, timestamps: bool) -> AsyncIterator[str]:
        """The server's ``Logs`` stream of the sandbox's main log; leaving early cancels the call. A
        stream that breaks (the server unreachable for a moment) is resumed from the offset after the
        last line received, at most ``LOG_RESUME_ATTEMPTS`` times in a row."""
        request = {"sandbox_id": record.sandbox_id, "follow": follow, "tail_lines": tail_lines, "since": since,
                   "timestamps": timestamps}
        failures = 0
        while True:
            try:
                async for reply in self._logs_stream(request, record.sandbox_id):
                    failures = 0
                    request = {**request, "offset": m.field(reply, "offset", int)}
                    for line in m.field(reply, "lines", list):
                        yield line
                return
            except SandboxUnavailableError:
                failures += 1
                if failures > LOG_RESUME_ATTEMPTS or self._closed:
                    raise
                await trio.sleep(min(LOG_RESUME_BACKOFF_SECONDS * 2 ** (failures - 1), 4.0))

    async def _logs_stream(self, request: dict[str, Any], sandbox_id: str) -> AsyncIterator[dict[str, Any]]:
        if self._closed or self._channel is None:
            raise SandboxUnavailableError(f"the remote runtime for {self.address} is closed", sandbox_id=sandbox_id)
        call = self._logs_call(m.pack(request), metadata=self._metadata)
        try:
            while True:
                try:
                    message = await bridge.next_message(call)
                except grpc.RpcError as exc:
                    raise translate(exc, self.address, sandbox_id) from exc
                if message is None:
                    return
                yield m.unpack(message, "Logs reply")
        finally:
            call.cancel()

    async def attach(self, sandbox_id: str) -> FrameChannel:
        record = self._records.get(sandbox_id)
        if record is None:
            record = (await self.find(sandbox_id=sandbox_id))[0]
        if record.channel is not None and not record.channel.closed:
            return record.channel
        return await self._attach(record)

    async def aclose(self) -> None:
        if self._closed:
            return
        with trio.CancelScope(shield=True):
            if self._lease is not None and self.lost is None and self._channel is not None:
                with trio.move_on_after(CALL_SECONDS):
                    try:  # the server stops what this lease still owns
                        await self._call("Release", {"lease": self._lease, "stop": True})
                    except (_errors.SandpoolError, ValueError, TypeError):
                        pass
            self._closed = True
            for call, inbound, outbound in list(self._streams.values()):
                outbound.close()
                inbound.close()
                call.cancel()
            if self._lease_call is not None:
                self._lease_call.cancel()
            if self._channel is not None:
                self._channel.close()

    # -- data plane --------------------------------------------------------------------------

    async def _attach(self, record: SandboxRecord) -> FrameChannel:
        """Open the sandbox's data plane and shake hands over it; set ``record.channel``.

        Same host (the lease named this machine): the fast socket, else (refused, unreachable) gRPC
        from then on; another host: a gRPC stream."""
        if self._closed or self._nursery is None:
            raise SandboxUnavailableError(f"the remote runtime for {self.address} is closed",
                                          sandbox_id=record.sandbox_id)
        record.extra.pop("attach_error", None)
        if self.fast:
            try:
                channel = await self._open(record, fast=True)
            except _NoFastPlane as exc:
                self.fast = False
                self.fast_refused = str(exc)
            else:
                record.extra["data_plane"] = "unix"
                return channel
        channel = await self._open(record, fast=False)
        record.extra["data_plane"] = "grpc"
        record.connect_worker = None
        return channel

    async def _open(self, record: SandboxRecord, *, fast: bool) -> FrameChannel:
        assert self._nursery is not None
        inbound = ThreadPipe()
        outbound = ThreadPipe(message_bytes=m.DATA_CHUNK_BYTES, pace=PACE_SECONDS)
        metadata = (*self._metadata, (m.META_SANDBOX, record.sandbox_id))
        if fast:
            metadata += ((m.META_DATA_PLANE, m.DATA_PLANE_FAST),)
        call = self._attach_call(outbound.drain_iter(), metadata=metadata)
        key = id(call)
        self._streams[key] = (call, inbound, outbound)
        record.exited = trio.Event() if record.exited.is_set() else record.exited
        pumped = trio.Event()
        self._nursery.start_soon(self._pump, record, call, inbound, key, pumped)

        def close_call() -> None:
            outbound.close()
            call.cancel()

        channel = None
        try:
            stream: trio.abc.Stream = PipeStream(inbound, outbound, on_close=call.cancel)
            if fast:
                stream = await self._redeem(record, inbound, close_call, pumped)
            channel = FrameChannel(stream)
            await channel.handshake(sandbox_id=record.sandbox_id)
        except _NoFastPlane:
            raise
        except BaseException as exc:
            if channel is not None:
                await channel.aclose()
            else:
                inbound.close()
                close_call()
            failure = record.extra.get("attach_error")
            if failure is not None and not isinstance(exc, trio.Cancelled):
                raise failure from exc
            raise
        record.channel = channel
        return channel

    async def _redeem(self, record: SandboxRecord, inbound: ThreadPipe, close_call: Callable[[], None],
                      pumped: trio.Event) -> fastclient.FastStream:
        """The fast socket for an Attach call that asked for it: its offer, redeemed. _NoFastPlane
        (with the call ended and forgotten) if this process cannot use it."""
        try:
            first = await inbound.receive()
        except trio.BrokenResourceError:
            first = b""
        if not first:  # the attach failed (no such sandbox, ...): the pump has the error
            raise SandboxUnavailableError("the server ended the data plane before its offer",
                                          sandbox_id=record.sandbox_id)
        offer = m.unpack(first, "fast-plane offer")
        try:
            sock = await fastclient.redeem(offer)
        except OSError as exc:
            inbound.close()  # the pump reports a detach, which is forgotten here
            close_call()
            await pumped.wait()
            record.detached = False
            record.exited = trio.Event()
            raise _NoFastPlane(str(exc)) from exc
        # calls go straight to the sandbox's call worker, through the server (``_slot._connect``)
        record.connect_worker = functools.partial(self._worker_line, offer)
        return fastclient.FastStream(sock, inbound, on_close=close_call)

    async def _worker_line(self, offer: dict[str, Any], name: str) -> socket.socket:
        sock = await fastclient.open_worker_line(offer, name)
        self.worker_lines += 1
        return sock

    async def _pump(self, record: SandboxRecord, call: _StreamingCall, inbound: ThreadPipe, key: int,
                    pumped: trio.Event) -> None:
        """Move response messages into ``inbound`` (in a thread) until the stream ends; then say how."""
        error = None
        try:
            outcome, detail = await bridge.pump_responses(call, inbound)
            if outcome == "ended":
                self._exit_report(record, detail)
            elif inbound.closed:  # we closed the stream ourselves: detached, not lost
                record.detached = True
            else:
                error = translate(detail, self.address, record.sandbox_id)
                if isinstance(error, SandboxUnavailableError):
                    record.lost = str(error)
                record.extra["attach_error"] = error
        finally:
            self._streams.pop(key, None)
            record.exited.set()
            inbound.close(error)
            pumped.set()

    @staticmethod
    def _exit_report(record: SandboxRecord, trailer: dict[str, Any]) -> None:
        if m.TRAILER_CODE in trailer or m.TRAILER_SIGNAL in trailer:
            code, sig = trailer.get(m.TRAILER_CODE), trailer.get(m.TRAILER_SIGNAL)
            record.exit_code = int(code) if code not in (None, "") else None
            record.exit_signal = int(sig) if sig not in (None, "") else None
            record.status_reason = trailer.get(m.TRAILER_REASON) or record.status_reason
        else:
            record.detached = True

    @staticmethod
    def _update(record: SandboxRecord, info: dict[str, Any]) -> None:
        record.sandbox_id = info["sandbox_id"]
        record.isolation = info.get("isolation") or record.isolation
        record.created_at = info.get("created_at") or record.created_at
        record.started_at = info.get("started_at") or record.started_at
        record.status, record.status_reason = info.get("status"), info.get("status_reason")
        record.returncode = info.get("returncode")
        record.orphaned_for = info.get("orphaned_for")
        record.extra.update(m.network_report_from(info.get("network")))


class _StreamingCall(Protocol):
    """A gRPC call with a response stream, as this module uses it (grpc ships no types)."""

    def __iter__(self) -> Iterator[bytes]: ...

    def __next__(self) -> bytes: ...

    def cancel(self) -> bool: ...


class _NoFastPlane(Exception):
    """This process cannot use the server's fast socket (another user, another mount namespace)."""


def _spec_or_tags(info: dict[str, Any]) -> SandboxSpec:
    """The spec the server reports; sandboxes of an earlier server run have only their tags."""
    if info.get("spec"):
        try:
            return m.spec_from_dict(info["spec"])
        except (TypeError, ValueError):
            pass
    return SandboxSpec(tags=tuple(info.get("tags") or ()))


def _snapshot_record(reply: Any) -> SnapshotRecord:
    """A Snapshot reply as a record; ProtocolError if the server sent something else."""
    try:
        if not isinstance(reply, dict):
            raise TypeError(f"a map was expected, got {type(reply).__name__}")
        record = SnapshotRecord(**{**reply, "layers": tuple(reply["layers"])})
        check_snapshot_id(record.snapshot_id, "snapshot_id")
    except (TypeError, KeyError, ValueError) as exc:
        raise _errors.ProtocolError(f"a Snapshot reply is not a snapshot record: {exc}") from exc
    return record


def resolve_address(address: str | None) -> str | None:
    """``address``, else ``$SANDPOOL_ADDRESS``, else None (the local runtime)."""
    return address or os.environ.get(ENV_ADDRESS) or None

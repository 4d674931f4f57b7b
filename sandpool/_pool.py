"""The warm pool: which call goes to which sandbox (plain sync code), and the trio tasks that act.

One pool serves one sandbox spec (plus a concurrency limit and the reuse flag). Sandboxes start
lazily, up to ``limit``, when calls wait and no idle or starting sandbox can take them; they stay
warm for later calls. A sandbox holds up to ``depth`` calls at once (pipelining): one for calls of
unknown length, more for short ones, so the agent hands its worker whole batches. Everything the
pool decides runs in the session's trio thread, synchronously (``_schedule``); what it does with
I/O (starting a sandbox, sending frames) runs in one task per sandbox.

Failures: a sandbox that dies is never reused. The call it was running (the oldest one sent, since
a worker runs its calls in order) is an infrastructure failure, retried up to ``retries`` on
another sandbox; calls queued behind it never started, so they are resubmitted without charge.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from . import _opref, _serialize
from ._errors import (
    ProtocolError,
    SandboxDiedError,
    SandboxError,
    SandboxNotRunningError,
    SandboxTimeoutError,
    SerializationError,
)
from ._opref import OperationRef

if TYPE_CHECKING:
    from ._config import SandboxSpec
    from ._sandbox import Sandbox
    from ._session import Session

#: Calls of known length are pipelined until a sandbox holds about this much work (seconds).
PIPELINE_SECONDS = 0.002
#: Most calls one sandbox holds at once, and most argument bytes (one call always fits).
MAX_DEPTH = 256
MAX_DEPTH_BYTES = 64 * 1024 * 1024


# -- decisions (plain data in, plain data out) --------------------------------------------------


def pipeline_depth(estimate: float | None, reuse: bool) -> int:
    """How many calls one sandbox may hold, given the function's typical duration (s, or None)."""
    if not reuse:
        return 1
    if estimate is None:
        return 2
    return max(2, min(MAX_DEPTH, math.ceil(PIPELINE_SECONDS / max(estimate, 1e-7))))


def choose_slot(loads: Sequence[tuple[int, int] | None], waiting: int, starting: int, depth: int) -> int | None:
    """Index of the ready sandbox for the next waiting call, or None to keep it waiting.

    ``loads[i]`` is (calls, argument bytes) held by sandbox i, None while it is not ready. An idle
    sandbox wins; else the least loaded one below ``depth``, but only when more calls wait than
    the sandboxes still starting will take (so N long calls spread over N sandboxes).
    """
    best = None
    for i, load in enumerate(loads):
        if load is None or load[0] >= depth or (load[0] and load[1] >= MAX_DEPTH_BYTES):
            continue
        if best is None or load[0] < loads[best][0]:  # type: ignore[index]
            best = i
            if load[0] == 0:
                break
    if best is not None and loads[best][0] and waiting <= starting:  # type: ignore[index]
        return None
    return best


def sandboxes_to_start(waiting: int, idle: int, starting: int, live: int, limit: int) -> int:
    """How many sandboxes to start so that every waiting call has an idle or starting one."""
    return max(0, min(waiting - idle - starting, limit - live))


# -- state ----------------------------------------------------------------------------------------


class CallRef(OperationRef):
    """The OperationRef of one remote call. No task per call: the pool finishes it directly, and
    ``cancel()`` settles it at once and tells the pool, which interrupts the remote side."""

    __slots__ = ("_on_cancel",)

    def __init__(self) -> None:
        super().__init__()
        self._on_cancel: Any = None

    def cancel(self) -> bool:
        with _opref._lock:
            if self._state is not _opref._PENDING:
                return False
            event, callbacks = self._settle(_opref._CANCELLED, None, None)
        self._notify(event, callbacks)
        if self._on_cancel is not None:
            self._on_cancel()
        return True

    def _set_result(self, value: Any) -> None:
        self._finish(_opref._DONE, value, None)

    def _set_error(self, error: BaseException) -> None:
        self._finish(_opref._FAILED, None, error)

    def _set_cancelled(self) -> None:
        self._finish(_opref._CANCELLED, None, None)


@dataclass(eq=False)
class Payload:
    """A pickled function, shared by its calls; ``estimate`` tracks its duration (s, EWMA)."""

    name: str
    data: bytes
    key: bytes
    estimate: float | None = None

    def observe(self, micros: int) -> None:
        seconds = micros / 1e6
        self.estimate = seconds if self.estimate is None else 0.8 * self.estimate + 0.2 * seconds


@dataclass(eq=False)
class Call:
    payload: Payload
    args: bytes
    ref: CallRef
    retries: Any  # a Retries: .max_retries, .retry_on(exc), .delay(attempt)
    timeout: float | None = None
    attempts: int = 0
    slot: Slot | None = None
    req_id: int = 0
    sent: bool = False


@dataclass(eq=False)
class Slot:
    """One sandbox of a pool and the calls it holds (by request id, in the order they were sent)."""

    pool: Pool
    sandbox: Sandbox
    state: str = "starting"  # starting -> ready -> retiring/dead
    inflight: dict[int, Call] = field(default_factory=dict)
    held_bytes: int = 0
    outbox: list[dict] = field(default_factory=list)
    keys: set[bytes] = field(default_factory=set)
    wake: trio.Event = field(default_factory=trio.Event)
    served: int = 0

    def _on_frame(self, frame: dict) -> int:  # the sandbox's reader routes our answers here
        self.pool._on_answer(self, frame)
        return 0

    def _on_sandbox_gone(self, error: BaseException) -> None:
        self.pool._on_gone(self, error)


@dataclass(frozen=True)
class PoolStatistics:
    """Counters of one pool, or of all pools of a session added up."""

    sandboxes_starting: int = 0
    sandboxes_idle: int = 0
    sandboxes_busy: int = 0
    calls_queued: int = 0
    calls_running: int = 0
    calls_done: int = 0
    calls_failed: int = 0
    calls_cancelled: int = 0
    calls_retried: int = 0

    def __add__(self, other: PoolStatistics) -> PoolStatistics:
        return PoolStatistics(*(a + b for a, b in zip(self.__dict__.values(), other.__dict__.values())))


class Pool:
    """The warm sandboxes of one spec and the calls waiting for them. Used in the loop thread only,
    except ``statistics()`` and ``repr``, which read counters."""

    def __init__(self, session: Session, spec: SandboxSpec, limit: int, reuse: bool) -> None:
        self.session, self.spec, self.limit, self.reuse = session, spec, limit, reuse
        self.queue: collections.deque[Call] = collections.deque()
        self.slots: list[Slot] = []
        self.closed = False
        self.counts = collections.Counter()  # done, failed, cancelled, retried
        self.start_error: BaseException | None = None

    def __repr__(self) -> str:
        s = self.statistics()
        return (f"<Pool image={self.spec.container_image} limit={self.limit} reuse={self.reuse} "
                f"sandboxes={s.sandboxes_idle} idle/{s.sandboxes_busy} busy/{s.sandboxes_starting} starting "
                f"calls={s.calls_queued} queued/{s.calls_running} running/{s.calls_done} done/{s.calls_failed} failed>")

    def statistics(self) -> PoolStatistics:
        slots = list(self.slots)
        return PoolStatistics(
            sandboxes_starting=sum(s.state == "starting" for s in slots),
            sandboxes_idle=sum(s.state == "ready" and not s.inflight for s in slots),
            sandboxes_busy=sum(s.state == "ready" and bool(s.inflight) for s in slots),
            calls_queued=sum(not c.ref.done() for c in list(self.queue)),
            calls_running=sum(len(s.inflight) for s in slots),
            calls_done=self.counts["done"], calls_failed=self.counts["failed"],
            calls_cancelled=self.counts["cancelled"], calls_retried=self.counts["retried"],
        )

    # -- decisions ---------------------------------------------------------------------------

    def submit(self, calls: Sequence[Call]) -> None:
        """Queue calls (loop thread) and schedule them."""
        for call in calls:
            if self.closed:
                call.ref._set_cancelled()
            elif not call.ref.done():
                self.queue.append(call)
        self._schedule()

    def _schedule(self) -> None:
        if self.closed:
            return
        queue, ready = self.queue, [s for s in self.slots if s.state == "ready"]
        starting = sum(s.state == "starting" for s in self.slots)
        while queue:
            call = queue[0]
            if call.ref.done():
                queue.popleft()
                continue
            loads = [(len(s.inflight), s.held_bytes) for s in ready]
            depth = pipeline_depth(call.payload.estimate, self.reuse)
            index = choose_slot(loads, len(queue), starting, depth)
            if index is None:
                break
            self._assign(ready[index], queue.popleft())
        if not queue:
            return
        idle = sum(not s.inflight for s in ready)
        live = sum(s.state in ("starting", "ready") for s in self.slots)
        for _ in range(sandboxes_to_start(len(queue), idle, starting, live, self.limit)):
            self._start_slot()
        if not self.slots and self.start_error is not None:  # nothing can run them: fail fast
            error, self.start_error = self.start_error, None
            while queue:
                self._fail(queue.popleft(), error)

    def _assign(self, slot: Slot, call: Call) -> None:
        call.slot, call.sent = slot, False
        call.req_id = slot.sandbox._register(slot)
        slot.inflight[call.req_id] = call
        slot.held_bytes += len(call.args)
        payload = call.payload
        frame = {"t": "call", "id": call.req_id, "fn_key": payload.key, "args": call.args,
                 "fn": b"" if payload.key in slot.keys else payload.data}
        slot.keys.add(payload.key)
        if call.timeout is not None:
            frame["timeout"] = call.timeout
        slot.outbox.append(frame)
        slot.wake.set()

    def cancel(self, call: Call) -> None:
        """The call's ref was cancelled (loop thread): interrupt it wherever it is."""
        self.counts["cancelled"] += 1
        slot = call.slot
        if slot is None or call.req_id not in slot.inflight:
            return  # still queued: _schedule drops it
        if not call.sent:
            slot.outbox = [f for f in slot.outbox if f.get("id") != call.req_id]
            self._release(slot, call)
            self._schedule()
        else:  # answered by the agent with "cancelled" (or a late result), then released
            slot.outbox.append({"t": "cancel", "id": call.req_id})
            slot.wake.set()

    def _release(self, slot: Slot, call: Call) -> None:
        slot.inflight.pop(call.req_id, None)
        slot.held_bytes -= len(call.args)
        slot.sandbox._unregister(call.req_id)

    # -- answers and failures ----------------------------------------------------------------

    def _on_answer(self, slot: Slot, frame: dict) -> None:
        call = slot.inflight.get(frame["id"])
        if call is None:
            return
        self._release(slot, call)
        slot.served += 1
        if frame["t"] == "result":
            if "us" in frame:
                call.payload.observe(frame["us"])
            if not call.ref.done():
                try:
                    value = _serialize.loads_result(frame.get("data", b""), call.payload.name)
                except SerializationError as exc:
                    self._fail(call, exc)
                else:
                    self.counts["done"] += 1
                    call.ref._set_result(value)
        elif not call.ref.done():
            self._on_error(slot, call, frame)
        if not self.reuse and slot.state == "ready":
            self._retire(slot)
        self._schedule()

    def _on_error(self, slot: Slot, call: Call, frame: dict) -> None:
        kind, sandbox_id, name = frame["kind"], slot.sandbox.sandbox_id, call.payload.name
        if kind == "lost":
            self._requeue(call, charge=False)
        elif kind == "worker_died":
            self._infra_failure(call, SandboxDiedError(
                f"call to {name!r} failed: {frame['message']} in sandbox {sandbox_id}",
                sandbox_id=sandbox_id, exit_code=frame.get("code"), signal=frame.get("signal")))
        elif kind == "user":
            self._user_failure(call, _serialize.remote_exception(frame, sandbox_id))
        elif kind == "timeout":
            self._user_failure(call, SandboxTimeoutError(
                f"call to {name!r} did not finish within {call.timeout} s; it was interrupted",
                sandbox_id=sandbox_id))
        elif kind == "cancelled":
            call.ref._set_cancelled()
        elif kind == "serialization":
            self._fail(call, SerializationError(f"call to {name!r}: {frame['message']}"))
        else:
            self._fail(call, SandboxError(f"call to {name!r} failed in sandbox {sandbox_id}: {frame['message']}",
                                          sandbox_id=sandbox_id, reason=kind))

    def _user_failure(self, call: Call, error: BaseException) -> None:
        if call.attempts < call.retries.max_retries and call.retries.retry_on(error):
            self._requeue(call, charge=True, delay=call.retries.delay(call.attempts + 1))
        else:
            self._fail(call, error)

    def _infra_failure(self, call: Call, error: SandboxDiedError) -> None:
        if call.attempts < call.retries.max_retries:
            self._requeue(call, charge=True)
            return
        if not call.retries.max_retries:
            error.args = (f"{error.args[0]}; pass retries=N to retry it on a fresh sandbox",)
        self._fail(call, error)

    def _requeue(self, call: Call, *, charge: bool, delay: float = 0.0) -> None:
        call.slot, call.sent = None, False
        if charge:
            call.attempts += 1
            self.counts["retried"] += 1
        if delay > 0:
            self.session._ensure_open().nursery.start_soon(self._requeue_later, call, delay)
        else:
            self.queue.appendleft(call)

    async def _requeue_later(self, call: Call, delay: float) -> None:
        await trio.sleep(delay)
        self.submit([call])

    def _fail(self, call: Call, error: BaseException) -> None:
        self.counts["failed"] += 1
        call.ref._set_error(error)

    def _on_gone(self, slot: Slot, error: BaseException) -> None:
        if slot.state == "dead":
            return  # called once per registered request
        retiring, slot.state = slot.state == "retiring", "dead"
        if slot in self.slots:
            self.slots.remove(slot)
        slot.wake.set()
        calls = list(slot.inflight.values())
        for call in calls:
            self._release(slot, call)
        head = next((c for c in calls if c.sent), None)
        for call in calls:
            if call.ref.done():
                continue
            if self.closed:
                call.ref._set_cancelled()
            elif call is head and not retiring:
                died = SandboxDiedError(
                    f"call to {call.payload.name!r} failed: {error}", sandbox_id=slot.sandbox.sandbox_id,
                    exit_code=getattr(error, "exit_code", None), signal=getattr(error, "signal", None))
                self._infra_failure(call, died)
            else:
                self._requeue(call, charge=False)
        if not self.closed:
            slot.sandbox.stop(graceful_shutdown_seconds=0)  # a dead sandbox is never reused
            self._schedule()

    # -- actions ---------------------------------------------------------------------------------

    def _start_slot(self) -> None:
        from ._sandbox import Sandbox

        sandbox = Sandbox(_session=self.session, _spec=self.spec)
        self.session._track(sandbox)
        slot = Slot(self, sandbox)
        self.slots.append(slot)
        self.session._ensure_open().nursery.start_soon(self._run_slot, slot)

    def _retire(self, slot: Slot) -> None:
        slot.state = "retiring"
        if slot in self.slots:
            self.slots.remove(slot)
        slot.sandbox.stop(graceful_shutdown_seconds=0)

    async def _run_slot(self, slot: Slot) -> None:
        """Start the slot's sandbox, then send what the pool assigns it until it is gone."""
        try:
            await slot.sandbox._ensure_running()
        except Exception as exc:  # it never ran: drop it; if no sandbox can start, fail the waiting calls
            if slot in self.slots:
                self.slots.remove(slot)
            slot.state = "dead"
            self.start_error = exc
            self._schedule()
            return
        if slot.state != "starting" or self.closed:
            return
        slot.sandbox._register(slot)  # a request that is never answered: we hear of its death even when idle
        slot.state = "ready"
        self._schedule()
        while slot.state != "dead":
            await slot.wake.wait()
            slot.wake = trio.Event()
            frames, slot.outbox = slot.outbox, []
            if not frames:
                continue
            try:
                await slot.sandbox._send_many(frames)
            except (SandboxNotRunningError, ProtocolError):
                return  # the connection broke: the sandbox's reader reports its end to _on_gone
            for frame in frames:
                call = slot.inflight.get(frame["id"]) if frame["t"] == "call" else None
                if call is not None:
                    call.sent = True

    def close(self) -> None:
        """The session is closing: cancel every call; the session stops the sandboxes."""
        self.closed = True
        for call in list(self.queue):
            call.ref._set_cancelled()
        self.queue.clear()
        for slot in list(self.slots):
            for call in list(slot.inflight.values()):
                call.ref._set_cancelled()
            slot.wake.set()

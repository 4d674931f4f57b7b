"""The warm pool: which call goes to which sandbox (plain sync code), and what follows each answer.

One pool serves one sandbox spec (plus a concurrency limit and the reuse flag). Sandboxes start
lazily, up to ``limit``, when calls wait and no idle or starting sandbox can take them; they stay
warm for later calls. A sandbox holds up to ``depth`` calls at once (pipelining): two for calls
of unknown length, more for short ones, so its worker gets whole batches. Everything here runs in
the session's trio thread, synchronously; the I/O (starting a sandbox, sending frames, reading a
direct worker's answers) runs in one task per sandbox (``slot``), which reports back through the
pool's ``SlotEvents`` methods (``slot_ready``, ``slot_failed``, ``slot_lost``, ``worker_lost``,
``call_answered``, ``calls_answered``).

The pool needs no session: it gets a task host (``start_soon``: the session's TaskHost, or a trio
nursery) and a sandbox factory (makes and starts a sandbox for the spec, as a ``PoolSandbox``).
Its timing (work stealing) reads trio's clock, so a test drives it with ``trio.testing.MockClock``.

Failures: a sandbox that dies is never reused. The call it was running (the oldest one sent, as a
worker runs its calls in order) is an infrastructure failure, retried up to ``retries`` on another
sandbox; calls queued behind it never started, so they are resubmitted without charge. The same
holds when only the sandbox's worker process dies; the sandbox then gets a new worker.

Sync callers skip the loop's thread (``submit_from_thread``, the fast path of ``direct.SyncEntry``):
a lone call that finds an idle sandbox with a direct worker, and nothing queued or on its way before
it, is written to the worker's socket from the caller's own thread; and a sync caller blocked on the
result of a call that is its sandbox's only one reads the answer itself (``readhere``), so the
round trip wakes neither the loop's thread nor a second thread. Every entry point of the pool
therefore holds ``lock``.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from typing import TYPE_CHECKING

import trio

from . import bulk as _bulk, serialize as _serialize, slot as _slot
from .call import Call, CallRef, Payload
from .direct import SyncEntry, locked, wake_from_thread
from .readhere import ReadsOwnAnswers
from .._errors import SandboxDiedError, SandboxError, SandboxTimeoutError, SerializationError
from .plan import (MAX_DEPTH, MAX_IN_FLIGHT_BYTES, STEAL_AFTER_SECONDS, PoolStatistics, choose_slot, choose_steals,
                   in_flight_bound, pipeline_depth, sandboxes_to_start)
from .slot import PoolSandbox, Slot, SlotState, TaskStarter

if TYPE_CHECKING:
    from .._config import SandboxSpec

__all__ = ["MAX_DEPTH", "MAX_IN_FLIGHT_BYTES", "Call", "CallRef", "Payload", "Pool", "PoolSandbox", "PoolStatistics",
           "TaskStarter", "choose_slot", "choose_steals", "in_flight_bound", "pipeline_depth", "sandboxes_to_start"]

# The states as module constants: the scheduler compares them per answer, and a global is cheaper
# to read than an enum's member.
_STARTING, _READY, _RECONNECTING = SlotState.STARTING, SlotState.READY, SlotState.RECONNECTING
_RETIRING, _DEAD = SlotState.RETIRING, SlotState.DEAD
_SERVING = (_READY, _RECONNECTING)  # counted as idle or busy
_COMING = (_STARTING, _RECONNECTING)  # will take calls soon
_ENDED = (_RETIRING, _DEAD)


class Pool(ReadsOwnAnswers):
    """The warm sandboxes of one spec and the calls waiting for them. Used in the loop thread only,
    except ``statistics()`` and ``repr``, which read counters.

    ``tasks`` runs the pool's background tasks (one per sandbox, timers); ``factory(spec)`` makes
    and starts one sandbox, raising if it cannot (its owner stops it when the owner closes).
    """

    def __init__(self, tasks: TaskStarter, factory: Callable[[SandboxSpec], Awaitable[PoolSandbox]],
                 spec: SandboxSpec, limit: int, reuse: bool) -> None:
        self.tasks, self.factory = tasks, factory
        self.spec, self.limit, self.reuse = spec, limit, reuse
        self.queue: collections.deque[Call] = collections.deque()
        self.slots: list[Slot] = []
        self.closed = False
        self.counts: collections.Counter[str] = collections.Counter()  # done, failed, cancelled, retried
        self.start_error: BaseException | None = None
        self.steal_timer = False  # a task will look for stalled sandboxes again soon
        self._time: Callable[[], float] | None = None  # the loop clock's: trio.current_time() minus lookups
        self._entry = SyncEntry()
        self.lock = self._entry.lock

    def __repr__(self) -> str:
        s = self.statistics()
        return (f"<Pool image={self.spec.container_image} limit={self.limit} reuse={self.reuse} "
                f"sandboxes={s.sandboxes_idle} idle/{s.sandboxes_busy} busy/{s.sandboxes_starting} starting "
                f"calls={s.calls_queued} queued/{s.calls_running} running/{s.calls_done} done/{s.calls_failed} failed>")

    def statistics(self) -> PoolStatistics:
        slots = list(self.slots)
        return PoolStatistics(
            sandboxes_starting=sum(s.state is _STARTING for s in slots),
            sandboxes_idle=sum(s.state in _SERVING and not s.inflight for s in slots),
            sandboxes_busy=sum(s.state in _SERVING and bool(s.inflight) for s in slots),
            calls_queued=sum(not c.ref.done() for c in list(self.queue)),
            calls_running=sum(len(s.inflight) for s in slots),
            calls_done=self.counts["done"], calls_failed=self.counts["failed"],
            calls_cancelled=self.counts["cancelled"], calls_retried=self.counts["retried"],
        )

    def _now(self) -> float:
        """trio's time, in the loop thread (a MockClock's, under one)."""
        if self._time is None:
            self._time = trio.lowlevel.current_clock().current_time
        return self._time()

    # -- placing calls -------------------------------------------------------------------------

    def submit_from_thread(self, calls: Sequence[Call], loop: Any) -> None:
        """Submit calls from a thread other than the loop's (``loop``: the session's TaskHost). A lone
        call goes to an idle sandbox's worker at once when nothing waits before it; otherwise the
        calls are queued in the loop's thread, in the order submitted. Nothing happens if the loop
        has ended (the session closed, which cancelled every call)."""
        self._entry.enter(loop, lambda: len(calls) == 1 and self._send_now(calls[0], loop),
                          lambda: self.submit(calls))

    def _send_now(self, call: Call, loop: Any) -> bool:
        """Place ``call`` from a sync caller's thread, with the lock held: only where the loop would
        place it the same way at once (an idle ready slot with a direct worker, nothing queued or
        on its way, no timeout to watch, small arguments), so the outcome is the slow path's."""
        if (self.closed or self.queue or self._time is None or call.timeout is not None
                or not isinstance(call.args, bytes) or call.size >= _bulk.BULK_BYTES or call.ref.done()):
            return False
        for slot in self.slots:
            direct = slot.direct
            if (slot.state is _READY and direct is not None and not direct.closed and direct.idle
                    and not slot.inflight and not slot.outbox):
                self._assign(slot, call, wake_from_thread(loop, slot))
                return True
        return False

    @locked
    def _reschedule(self) -> None:
        self._schedule()
        self._steal()

    @locked
    def submit(self, calls: Sequence[Call]) -> None:
        """Queue calls (loop thread) and schedule them."""
        for call in calls:
            if self.closed:
                call.ref.set_cancelled()
            elif not call.ref.done():
                self.queue.append(call)
        self._schedule()

    def _schedule(self) -> None:
        if self.closed or not self.queue:
            return
        queue, ready = self.queue, [s for s in self.slots if s.state is _READY]
        starting = sum(s.state in _COMING for s in self.slots)
        while queue:
            call = queue[0]
            if call.ref.done():
                queue.popleft()
                continue
            loads = [(len(s.inflight), s.held_bytes) for s in ready]
            index = choose_slot(loads, len(queue), starting, pipeline_depth(call.payload.estimate, self.reuse))
            if index is None:
                break
            self._assign(ready[index], queue.popleft())
        if not queue:
            return
        if self.start_error is not None and not self.slots:  # nothing can run them: fail them
            error, self.start_error = self.start_error, None
            while queue:
                self._fail(queue.popleft(), error)
            return
        idle = sum(not s.inflight for s in ready)
        live = sum(s.state not in _ENDED for s in self.slots)
        for _ in range(sandboxes_to_start(len(queue), idle, starting, live, self.limit)):
            self._start_slot()

    def _assign(self, slot: Slot, call: Call, wake: Callable[[], None] | None = None) -> None:
        call.slot, call.sent, call.timed_out, call.stealing = slot, False, False, False
        if not slot.inflight:
            slot.progress_at = (self._time or self._now)()
        call.req_id = slot.sandbox.register(slot)
        slot.inflight[call.req_id] = call
        slot.held_bytes += call.size
        payload = call.payload
        frame = {"t": "call", "id": call.req_id, "fn_key": payload.key, "args": call.args,
                 "fn": b"" if payload.key in slot.keys else payload.data}
        slot.keys.add(payload.key)
        if payload.pickled:  # the function's owner trusts it: results may come back pickled
            frame["pickle"] = True
        if call.timeout is not None:
            frame["timeout"] = call.timeout
            if slot.direct is not None:  # the agent does not see direct calls: watch it here
                self.tasks.start_soon(_slot.watch_timeout, slot, call, call.req_id)
        if slot.bulk_dir is not None:
            frame["bulk"] = _bulk.SANDBOX_DIR  # a large result may come back as a file there
            if call.size >= _bulk.BULK_BYTES:
                path = _bulk.put_args(slot.bulk_dir, _slot.args_file(call.req_id), call.args)
                if path is not None:
                    frame["args"], frame["args_path"] = b"", path
        if isinstance(frame["args"], list):  # large, but no file: one frame after all
            frame["args"] = b"".join(frame["args"])
        _slot.send(slot, call, frame, wake)

    @locked
    def cancel(self, call: Call) -> None:
        """The call's ref was cancelled (loop thread): interrupt it wherever it is."""
        self.counts["cancelled"] += 1
        slot = call.slot
        if slot is None or slot.inflight.get(call.req_id) is not call:
            return  # still queued: _schedule drops it
        if _slot.unsend(slot, call.req_id):
            self._release(slot, call)
            self._schedule()
        else:  # answered "cancelled" (or with a late result) by the sandbox, then released
            slot.outbox.append(_slot.cancel_frame(slot, call.req_id))
            slot.wake.set()
            if slot.direct is not None:
                slot.direct.unpark()  # the answer comes on the worker's connection

    def _release(self, slot: Slot, call: Call) -> None:
        slot.inflight.pop(call.req_id, None)
        slot.held_bytes -= call.size
        slot.sandbox.unregister(call.req_id)

    # -- answers and failures (SlotEvents) ---------------------------------------------------

    @locked
    def calls_answered(self, slot: Slot, frames: list[dict[str, Any]]) -> None:
        """A batch of answers from a direct worker: settle each, then schedule once."""
        for frame in frames:
            self._answer(slot, frame)
        self._schedule()
        self._steal()

    @locked
    def call_answered(self, slot: Slot, frame: dict[str, Any]) -> None:
        """One answer (a result or an error frame) to a call ``slot`` holds."""
        self._answer(slot, frame)
        self._schedule()
        self._steal()

    def _answer(self, slot: Slot, frame: dict[str, Any]) -> None:
        call = slot.inflight.get(frame["id"])
        if call is None:
            return
        self._release(slot, call)
        slot.progress_at = (self._time or self._now)()
        if frame["t"] == "result":
            if "us" in frame:
                call.payload.observe(frame["us"])
            if call.ref.done():
                if frame.get("path"):
                    _bulk.discard(slot.bulk_dir, frame["path"])
            else:
                try:
                    if isinstance(frame.get("path"), str) and slot.bulk_dir:
                        payload = call.payload
                        decode = payload.hold_file if call.ref.forwarded else payload.decode_file
                        value = _bulk.take_result(slot.bulk_dir, frame["path"], payload.name, decode)
                    else:
                        value = call.payload.decode(frame.get("data", b""))
                except SerializationError as exc:
                    self._fail(call, exc)
                else:
                    self.counts["done"] += 1
                    call.ref.set_result(value)
        elif call.timed_out and frame.get("kind") == "cancelled":
            self._user_failure(call, self._timeout_error(call, slot))
        elif not call.ref.done():
            self._on_error(slot, call, frame)
        if not self.reuse and slot.state is _READY:
            self._retire(slot)

    def _on_error(self, slot: Slot, call: Call, frame: dict[str, Any]) -> None:
        kind, sandbox_id, name = frame["kind"], slot.sandbox.sandbox_id, call.payload.name
        if kind == "lost":
            self._requeue(call, charge=False)
        elif kind == "worker_died":
            self._infra_failure(call, SandboxDiedError(
                f"call to {name!r} failed: {frame['message']} in sandbox {sandbox_id}",
                sandbox_id=sandbox_id, exit_code=frame.get("code"), signal=frame.get("signal")))
        elif kind == "user":
            self._user_failure(call, _serialize.remote_exception(frame, sandbox_id, call.payload.pickled))
        elif kind == "timeout":
            self._user_failure(call, self._timeout_error(call, slot))
        elif kind == "cancelled":
            call.ref.set_cancelled()
        elif kind == "serialization":
            self._fail(call, SerializationError(f"call to {name!r}: {frame['message']}"))
        else:
            self._fail(call, SandboxError(f"call to {name!r} failed in sandbox {sandbox_id}: {frame['message']}",
                                          sandbox_id=sandbox_id, reason=kind))

    @staticmethod
    def _timeout_error(call: Call, slot: Slot) -> SandboxTimeoutError:
        return SandboxTimeoutError(f"call to {call.payload.name!r} did not finish within {call.timeout} s; "
                                   "it was interrupted", sandbox_id=slot.sandbox.sandbox_id)

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
            self.tasks.start_soon(self._requeue_later, call, delay)
        else:
            self.queue.appendleft(call)

    async def _requeue_later(self, call: Call, delay: float) -> None:
        await trio.sleep(delay)
        self.submit([call])

    def _fail(self, call: Call, error: BaseException) -> None:
        self.counts["failed"] += 1
        call.ref.set_error(error)

    def _settle_lost(self, slot: Slot, error: SandboxDiedError | None, killed: bool) -> None:
        """A slot's worker (or whole sandbox) is gone: settle what it held, in send order. The
        oldest sent call was running: an infrastructure failure (``error``), unless the pool had
        the worker killed; the others are resubmitted free."""
        calls = list(slot.inflight.values())
        for call in calls:
            self._release(slot, call)
        slot.outbox, slot.keys = [], set()
        head = next((c for c in calls if c.sent), None)
        again: list[Call] = []
        for call in calls:
            if call.ref.done():
                continue
            if self.closed:
                call.ref.set_cancelled()
            elif call.timed_out:
                self._user_failure(call, self._timeout_error(call, slot))
            elif call is head and error is not None and not killed:
                self._infra_failure(call, SandboxDiedError(
                    f"call to {call.payload.name!r} failed: {error}", sandbox_id=error.sandbox_id,
                    exit_code=error.exit_code, signal=error.signal))
            else:
                again.append(call)
        self._requeue_in_order(again)

    def _requeue_in_order(self, calls: list[Call]) -> None:
        """Put ``calls`` back at the head of the queue, free, keeping their order (each requeue
        goes to the front, so the last goes first)."""
        for call in reversed(calls):
            self._requeue(call, charge=False)

    @locked
    def worker_lost(self, slot: Slot, info: dict[str, Any]) -> None:
        """A direct worker ended (its connection closed); the sandbox lives on and gets a new one."""
        if slot.state in _ENDED:
            return
        code, sig = info.get("code"), info.get("signal")
        how = f"was killed by signal {sig}" if sig else f"exited with code {code}"
        error = SandboxDiedError(f"the function's worker process {how} in sandbox {slot.sandbox.sandbox_id}",
                                 sandbox_id=slot.sandbox.sandbox_id, exit_code=code, signal=sig)
        self._settle_lost(slot, error, killed=bool(info.get("killed")))
        slot.direct = slot.worker = None
        slot.state = _RECONNECTING
        slot.wake.set()
        self._schedule()

    @locked
    def slot_lost(self, slot: Slot, error: BaseException) -> None:
        """The slot's sandbox ended (told once per request it had registered)."""
        if slot.state is _DEAD:
            return  # called once per registered request
        retiring, slot.state = slot.state is _RETIRING, _DEAD
        if slot in self.slots:
            self.slots.remove(slot)
        slot.wake.set()
        died = None
        if not retiring:
            died = SandboxDiedError(str(error),
                                    sandbox_id=slot.sandbox.sandbox_id, exit_code=getattr(error, "exit_code", None),
                                    signal=getattr(error, "signal", None))
        self._settle_lost(slot, died, killed=False)
        if not self.closed:
            slot.sandbox.stop(graceful_shutdown_seconds=0)  # a dead sandbox is never reused
            self._schedule()

    # -- sandboxes -------------------------------------------------------------------------------

    def _start_slot(self) -> None:
        slot = Slot(self)
        self.slots.append(slot)
        self.tasks.start_soon(_slot.run_slot, slot, self.factory, self.spec, self.tasks)

    @locked
    def slot_ready(self, slot: Slot) -> None:
        """The slot's sandbox runs and its worker is reachable (again): it takes calls."""
        if slot.state in _COMING:
            slot.state = _READY
            self._schedule()
            self._steal()

    # -- work stealing ---------------------------------------------------------------------------

    def _steal(self) -> None:
        """With nothing queued and a sandbox idle, take back calls that wait behind a stalled one
        (a call much longer than its function's usual): those still here at once, those sent by
        asking the sandbox, which gives them back ("lost") if they have not started; they run on
        the idle sandbox."""
        if not self._may_steal():
            return
        ready = [s for s in self.slots if s.state is _READY]
        views = [(not s.inflight, _waiting(s), s.progress_at) for s in ready]
        taken: list[Call] = []
        for index, count in choose_steals(views, self._now()).items():
            victim = ready[index]
            for call in [c for c in victim.inflight.values() if not c.stealing][1:][-count:]:
                if _slot.unsend(victim, call.req_id):  # still here (the worker may not read for long)
                    self._release(victim, call)
                    taken.append(call)
                elif _slot.left(victim, call.req_id):  # the worker gives it back if it has not started
                    call.stealing = True
                    victim.outbox.append(_slot.cancel_frame(victim, call.req_id, steal=True))
            victim.wake.set()
        if taken:
            self._requeue_in_order(taken)
            self._schedule()
        if not self.steal_timer and any(idle for idle, _, _ in views) and any(w for _, w, _ in views):
            self.steal_timer = True  # someone may stall later: look again then
            self.tasks.start_soon(self._steal_later)

    def _may_steal(self) -> bool:
        """Whether ``_steal`` has anything to look at: nothing queued, and some sandbox holds a call
        waiting behind another (the last test fails in the usual case)."""
        return (not self.queue and not self.closed and self.reuse
                and any(len(s.inflight) > 1 for s in self.slots))

    async def _steal_later(self) -> None:
        await trio.sleep(STEAL_AFTER_SECONDS)
        with self.lock:
            self.steal_timer = False
            self._steal()

    @locked
    def slot_failed(self, slot: Slot, error: BaseException) -> None:
        """The slot's sandbox could not be made or started: drop it (its calls wait for another)."""
        if slot in self.slots:
            self.slots.remove(slot)
        slot.state = _DEAD
        self.start_error = error
        self._schedule()

    def _retire(self, slot: Slot) -> None:
        slot.state = _RETIRING
        if slot in self.slots:
            self.slots.remove(slot)
        slot.wake.set()
        slot.sandbox.stop(graceful_shutdown_seconds=0)

    @locked
    def close(self) -> None:
        """The session is closing: cancel every call; the session stops the sandboxes."""
        self.closed = True
        for call in list(self.queue):
            call.ref.set_cancelled()
        self.queue.clear()
        for slot in list(self.slots):
            for call in list(slot.inflight.values()):
                call.ref.set_cancelled()
            slot.wake.set()


def _waiting(slot: Slot) -> int:
    """Calls the slot holds behind its running one, not already being taken back."""
    return max(0, sum(1 for c in slot.inflight.values() if not c.stealing) - 1)

"""One actor's sandbox and the ordered stream of its calls, carried out in the session's trio loop.

An actor owns one sandbox. Its calls are ordinary ``call`` frames to that sandbox's agent, which
relays them to its call worker (``_sandpool_agent.actors`` holds the instance there): the first
call constructs the instance, each later one runs a method. Calls leave in the order they were
made, on one connection, and the worker runs them in that order, one at a time. A call whose
arguments wait for other calls' results (``actor_refs``) holds back the calls made after it.

Death: the sandbox ending, its worker process dying (the instance went with it) or the
constructor raising makes the actor dead. The calls it had not answered fail with ActorDiedError
(or, with ``retries``, run again on the restarted actor); with ``max_restarts`` left, the link
stops the old sandbox, starts a new one, constructs the instance again (its state is lost) and
sends it the later calls. Closing the session cancels what is pending.

Everything here runs in the loop's thread; a call's ``CallRef.cancel`` and the handles hop there,
except the sync fast path (``submit_from_thread``, shared with pools: ``direct.SyncEntry``): a sync
caller's call that the loop would send at once (a ready actor with an idle direct connection,
nothing queued, relayed or on its way to the loop before it) is written to the worker's socket from
the caller's own thread; and a sync caller blocked on a call that is the only one the worker holds
reads its answer itself (``actor_readhere``). So every entry point here holds the link's ``lock``.
Calls running at once (``max_concurrency`` above 1) go out in steps (``actor_steps``).
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from _sandpool_agent import actors as _agent_actors
from . import actor_direct as _direct, serialize as _serialize
from .actor_readhere import ActorReadsOwnAnswers
from .actor_steps import RunsSteps
from .direct import DirectChannel, SyncEntry, flush_until, locked, send_at_once, wake_from_thread
from .call import CallRef
from .._errors import ActorDiedError, SandboxError, SerializationError

if TYPE_CHECKING:
    from .._session.sandbox import Sandbox
    from .._session.session import Session

_INVOKE = _serialize.dumps(_agent_actors.invoke)  # by reference: the worker has the module
_INVOKE_KEY = _serialize.fn_key(_INVOKE)
_INVOKE_MANY = _serialize.dumps(_agent_actors.invoke_many)
_INVOKE_MANY_KEY = _serialize.fn_key(_INVOKE_MANY)
_CONSTRUCT = _serialize.dumps(_agent_actors.construct)
_CONSTRUCT_KEY = _serialize.fn_key(_CONSTRUCT)
_GONE = f"{_agent_actors.ActorGone.__module__}.{_agent_actors.ActorGone.__qualname__}"


class Phase(enum.Enum):
    STARTING = "starting"  # its sandbox starts; calls wait in the queue
    READY = "ready"  # calls go out as they come
    RESTARTING = "restarting"  # the old sandbox died; a new one starts
    DEAD = "dead"  # killed, or died with no restart left: every call fails at once


@dataclass(eq=False)
class ActorCall:
    """One call to an actor: a method's (or the constructor's) pickled arguments, None while
    they wait for other calls' results."""

    label: str  # "Counter.incr", for messages
    args: bytes | list[bytes] | None  # (parts when large, see _serialize.dumps_parts)
    ref: CallRef  # its pool is the actor's link: cancel() calls link.cancel(call)
    construct: bool = False
    attempts: int = 0
    req_id: int = 0
    ticket: int = 0  # its number among the calls an actor runs at once
    members: list[ActorCall] | None = None  # the calls a step starts (max_concurrency above 1)

    def calls(self) -> list[ActorCall]:
        """The user's calls this frame carries: itself, or those a step starts."""
        return self.members if self.members is not None else [self]


class ActorLink(ActorReadsOwnAnswers, RunsSteps):
    """The loop-side state of one actor: its sandbox, its phase and its calls in order."""

    def __init__(self, session: Session, overrides: dict[str, Any], label: str, actor_id: str,
                 construct_args: bytes | list[bytes],
                 *, name: str | None, max_restarts: int, retries: int, pickled: bool, concurrency: int = 1) -> None:
        self.session, self.overrides, self.label, self.name = session, overrides, label, name
        self.actor_id, self.concurrency = actor_id, concurrency
        self.running: dict[int, ActorCall] = {}  # concurrency above 1: calls started there, by ticket
        self.cancels: list[int] = []  # tickets of running calls to cancel with the next step
        self.tickets = 0
        self.construct_args = construct_args
        self.max_restarts, self.retries, self.pickled = max_restarts, retries, pickled
        self.restarts = 0
        self.phase = Phase.STARTING
        self.death: ActorDiedError | None = None
        self.sandbox: Sandbox | None = None
        self.queue: collections.deque[ActorCall] = collections.deque()  # not sent yet, in call order
        self.outbox: list[dict[str, Any]] = []  # frames for the agent: calls when relayed, cancels
        self.direct: DirectChannel | None = None  # the connection straight to the worker, if any
        self.inflight: dict[int, ActorCall] = {}  # sent, by request id, in send order
        self.keys: set[bytes] = set()  # functions this sandbox's agent has
        self.incarnation: _Incarnation | None = None
        self.wake = trio.Event()
        self.on_dead: list[Any] = []  # told once, when the actor is dead for good (its name is freed)
        self._entry = SyncEntry()
        self.lock = self._entry.lock

    def __repr__(self) -> str:
        sandbox = self.sandbox.sandbox_id if self.sandbox is not None else None
        return (f"<Actor {self.label} {self.phase.value} sandbox={sandbox} restarts={self.restarts}/"
                f"{self.max_restarts} calls={len(self.queue)} queued/{len(self.inflight)} running>")

    @property
    def dead(self) -> bool:
        """Whether the actor is dead for good (read anew each time: it changes across awaits)."""
        return self.phase is Phase.DEAD

    # -- calls (loop thread) -------------------------------------------------------------------

    def submit_from_thread(self, call: ActorCall, loop: Any) -> None:
        """Take a call from a thread other than the loop's (``loop``: the session's TaskHost): sent
        from this thread when the loop would send it at once, else taken in the loop's, after the
        calls made before it."""
        self._entry.enter(loop, lambda: self._send_now(call, loop), lambda: self.submit(call))

    def in_order(self, loop: Any, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the loop's thread: now from there, else soon, after what this thread
        entered before and before any call it makes later (which cannot take the fast path past it:
        a kill, or a call waiting for references, is not overtaken)."""
        if loop.in_loop_thread():
            fn()
        else:
            self._entry.enter(loop, lambda: False, fn)

    def _send_now(self, call: ActorCall, loop: Any) -> bool:
        """Send ``call`` from a sync caller's thread, with the lock held: only where ``submit``
        would send it at once, straight to the worker (a ready actor with an idle direct
        connection, nothing queued or relayed before it, one call at a time), so the outcome is
        the loop's path's. False if it cannot."""
        direct = self.direct
        if (self.phase is not Phase.READY or direct is None or direct.closed or not direct.idle or self.queue
                or self.outbox or self.concurrency > 1 or call.args is None or call.ref.done()):
            return False
        self.queue.append(call)
        self.flush(wake_from_thread(loop, self))
        return True

    @locked
    def submit(self, call: ActorCall) -> None:
        """Take a call, in call order (a dead actor fails it at once)."""
        if call.ref.done():
            return
        if self.phase is Phase.DEAD:
            call.ref.set_error(self._died_error(f"call to {call.label!r}"))
            return
        self.queue.append(call)
        self.flush()

    @locked
    def flush(self, wake: Callable[[], None] | None = None) -> None:
        """Send the queued calls whose arguments are ready, up to the first that is not: straight
        to the worker when connected (a lone call leaves in this step), else through the agent.
        ``wake`` wakes the task that writes what the socket did not take (default ``wake.set``, in
        the loop's thread; a sync caller's thread passes a thread-safe one)."""
        if self.phase is not Phase.READY:
            return
        sandbox, frames = self.sandbox, []
        assert sandbox is not None
        for call in self._ready_calls():
            call.req_id = sandbox.link.register(self.incarnation)
            self.inflight[call.req_id] = call
            fn, key = ((_CONSTRUCT, _CONSTRUCT_KEY) if call.construct else (_INVOKE, _INVOKE_KEY)
                       if call.members is None else (_INVOKE_MANY, _INVOKE_MANY_KEY))
            frame = {"t": "call", "id": call.req_id, "fn_key": key, "args": call.args,
                     "fn": b"" if key in self.keys else fn}
            self.keys.add(key)
            if self.pickled:
                frame["pickle"] = True
            frames.append(frame)
        if frames and self.direct is not None:  # broken: the worker's end (its reader) ends this incarnation
            send_at_once(self.direct, frames, wake or self.wake.set)
        elif frames:
            self.outbox += frames
            self.wake.set()

    def _ready_calls(self) -> list[ActorCall]:
        """The queued calls to send now, in order, up to the first whose arguments wait. An actor
        running calls at once (``concurrency`` above 1) sends them as steps (``_step``)."""
        queue, out = self.queue, []
        if self.concurrency > 1 and not (queue and queue[0].construct):
            step = self._step()
            return [] if step is None else [ActorCall(f"{self.label} (step)", step[1], CallRef(None), members=step[0])]
        while queue and (queue[0].args is not None or queue[0].ref.done()):
            call = queue.popleft()
            if not call.ref.done():
                out.append(call)
                if call.construct and self.concurrency > 1:
                    break
        return out

    @locked
    def cancel(self, call: ActorCall) -> None:
        """The call's ref was cancelled: drop it if it has not left, else interrupt it there."""
        if self.running.get(call.ticket) is call:  # running at once with others: cancel its task
            self.cancels.append(call.ticket)
            self.flush()
            return
        if call.req_id not in self.inflight or self.sandbox is None:
            self.flush()  # it may have held back the calls behind it
            return
        for index, frame in enumerate(self.outbox):
            if frame["id"] == call.req_id and frame["t"] == "call":
                del self.outbox[index]
                self._release(call)
                return
        if self.direct is not None and self.direct.take_back(call.req_id):
            self._release(call)
            return
        self.outbox.append({"t": "cancel", "id": call.req_id, **({"call": True} if self.direct else {})})
        self.wake.set()
        if self.direct is not None:
            self.direct.unpark()  # the answer comes on the worker's connection

    @locked
    def kill(self) -> None:
        """End the actor for good: fail its calls and stop its sandbox."""
        if self.phase is not Phase.DEAD:
            self._end(ActorDiedError(f"actor {self.label} was killed", actor_name=self.name), restart=False)

    # -- the sandbox (loop thread) ---------------------------------------------------------------

    async def run(self) -> None:
        """Start the sandbox, construct the instance and send calls; again after each death while
        restarts are left. Runs as a task of the session: a failure of its own (the session
        closing under it, a bug) ends this actor, never the session."""
        try:
            await self._run()
        except Exception as exc:
            self._end(ActorDiedError(f"actor {self.label} ended: {exc!r}", actor_name=self.name),
                      restart=False, cause=exc)

    async def _run(self) -> None:
        while self.phase is not Phase.DEAD:
            sandbox = self.sandbox = self.session.sandbox(**self.overrides)
            self.keys = set()
            try:
                await sandbox.link.ensure_running()
            except Exception as exc:
                self._end(ActorDiedError(f"actor {self.label}: its sandbox did not start: {exc}",
                                         actor_name=self.name), restart=False, cause=exc)
                return
            if self.dead:  # killed meanwhile
                sandbox.stop(graceful_shutdown_seconds=0)
                return
            incarnation = _Incarnation(self, sandbox)
            sandbox.link.register(incarnation)  # never answered: we hear of the sandbox's end even when idle
            self.incarnation = incarnation
            nursery = self.session._ensure_open().nursery
            direct = await _direct.connect(sandbox, nursery, incarnation.on_answers, incarnation.on_worker_end)
            with self.lock:
                if self.incarnation is not incarnation:  # killed or dead meanwhile
                    continue
                self.direct = direct
                self.queue.appendleft(ActorCall(f"{self.label}()", self.construct_args, CallRef(None),
                                                construct=True))
                self.phase = Phase.READY
                self.flush()
            await self._send_until_dead(sandbox)

    async def _send_until_dead(self, sandbox: Sandbox) -> None:
        """Send the agent's frames and write what the worker's connection holds, until this
        sandbox is no longer the actor's. Cancels do not wait behind calls being written."""
        while self.sandbox is sandbox and self.phase is Phase.READY:
            direct = self.direct
            if not self.outbox and (direct is None or direct.idle):
                await self.wake.wait()
            self.wake = trio.Event()
            frames, self.outbox = self.outbox, []
            try:
                if frames:
                    await sandbox.link.send_many(frames)
                if direct is not None:
                    await flush_until(direct, self.wake)
            except SandboxError:  # it is ending: its reader tells us (sandbox_gone)
                await self.wake.wait()

    @locked
    def on_answer(self, frame: dict[str, Any]) -> int:
        """An answer from the current sandbox (routed here by request id)."""
        call = self.inflight.get(frame["id"])
        if call is None:
            return 0
        if frame["t"] == "result":
            self._release(call)
            if call.construct or call.ref.done():
                if self.concurrency > 1:
                    self.flush()  # the first step
                return 0
            try:
                value = _serialize.loads_result(frame.get("data", b""), call.label, self.pickled)
            except SerializationError as exc:
                self._fail(call, exc)
            else:
                if call.members is not None:
                    self._settle_step(value)
                else:
                    call.ref.set_result(value)
        else:
            self.on_error(call, frame)
        if self.concurrency > 1:
            self.flush()  # the next step
        return 0

    def _fail(self, call: ActorCall, error: BaseException) -> None:
        for member in call.calls():
            if call.members is not None:
                self.running.pop(member.ticket, None)
            member.ref.set_error(error)

    @locked
    def on_error(self, call: ActorCall | None, frame: dict[str, Any]) -> None:
        """An ``error`` answer (or, with no call, the worker's end): the call's, or the actor's death."""
        kind, sandbox_id = frame["kind"], self.sandbox.sandbox_id if self.sandbox else None
        if kind in ("worker_died", "lost") or (kind == "user" and frame.get("type_name") == _GONE):
            self._end(ActorDiedError(
                f"actor {self.label} died: its worker process in sandbox {sandbox_id} ended "
                f"({frame['message']})", sandbox_id=sandbox_id, exit_code=frame.get("code"),
                signal=frame.get("signal"), actor_name=self.name), restart=True)
            return
        assert call is not None  # (only the worker's end comes without a call, and it is handled above)
        self._release(call)
        if kind == "user":
            error: BaseException = _serialize.remote_exception(frame, sandbox_id, self.pickled)
        elif kind == "cancelled":
            for member in call.calls():
                self.running.pop(member.ticket, None)
                member.ref.set_cancelled()
            return
        elif kind == "serialization":
            error = SerializationError(f"call to {call.label!r}: {frame['message']}")
        else:
            error = SandboxError(f"call to {call.label!r} failed in sandbox {sandbox_id}: {frame['message']}",
                                 sandbox_id=sandbox_id, reason=kind)
        if call.construct:  # it would fail again: no restart
            self._end(ActorDiedError(f"actor {self.label} died: its constructor raised {error!r}",
                                     sandbox_id=sandbox_id, actor_name=self.name), restart=False, cause=error)
        else:
            self._fail(call, error)

    @locked
    def sandbox_gone(self, error: BaseException) -> None:
        """The current sandbox ended."""
        if self.phase in (Phase.DEAD, Phase.RESTARTING) or self.sandbox is None:
            return
        code = getattr(error, "exit_code", None)
        sig = getattr(error, "signal", None)
        self._end(ActorDiedError(f"actor {self.label} died: {error}", sandbox_id=self.sandbox.sandbox_id,
                                 exit_code=code, signal=sig, actor_name=self.name), restart=True, cause=error)

    def _release(self, call: ActorCall) -> None:
        self.inflight.pop(call.req_id, None)
        if self.sandbox is not None:
            self.sandbox.link.unregister(call.req_id)

    @locked
    def _end(self, death: ActorDiedError, *, restart: bool, cause: BaseException | None = None) -> None:
        """This incarnation is over: settle its calls, stop its sandbox, restart if allowed."""
        if self.phase in (Phase.DEAD, Phase.RESTARTING):
            return
        if cause is not None:
            death.__cause__ = cause
        closing = self.session._closed
        restart = restart and not closing and self.restarts < self.max_restarts
        unsent = {f["id"] for f in self.outbox if f["t"] == "call"} | (self.direct.held() if self.direct else set())
        waiting = [m for c in self.inflight.values() if c.req_id in unsent and not c.construct
                   for m in c.calls()] + list(self.queue)
        sent = [m for c in self.inflight.values() if not c.construct and c.req_id not in unsent for m in c.calls()]
        sent += [c for c in self.running.values() if c not in sent and c not in waiting]
        self.running, self.cancels = {}, []
        for call in list(self.inflight.values()):
            self._release(call)
        self.outbox, self.queue = [], collections.deque()
        self.death = death
        self.phase = Phase.RESTARTING if restart else Phase.DEAD
        for call in sent + waiting:
            if call.ref.done():
                continue
            if closing:
                call.ref.set_cancelled()
            elif restart and (call in waiting or call.attempts < self.retries):
                call.attempts += call not in waiting
                self.queue.append(call)  # to the new instance, in the same order
            else:
                call.ref.set_error(self._died_error(f"call to {call.label!r}"))
        if self.sandbox is not None and not closing:  # a closing session stops it itself
            self.sandbox.stop(graceful_shutdown_seconds=0)
        self.incarnation, self.direct = None, None
        if restart:
            self.restarts += 1
            self.phase = Phase.STARTING  # run() starts the next sandbox
            self.sandbox = None
        else:
            for notify in self.on_dead:
                notify(self)
        self.wake.set()

    def _died_error(self, what: str) -> ActorDiedError:
        death = self.death
        assert death is not None
        error = ActorDiedError(f"{what} failed: {death}", sandbox_id=death.sandbox_id, exit_code=death.exit_code,
                               signal=death.signal, actor_name=self.name)
        error.__cause__ = death.__cause__
        return error


class _Incarnation:
    """The requests of one of the actor's sandboxes: frames and the end of an earlier sandbox
    (after a restart) are not the current one's."""

    def __init__(self, link: ActorLink, sandbox: Sandbox) -> None:
        self.link, self.sandbox = link, sandbox

    def _on_frame(self, frame: dict[str, Any]) -> int:
        return self.link.on_answer(frame) if self.link.incarnation is self else 0

    def on_answers(self, frames: list[dict[str, Any]]) -> None:
        for frame in frames:
            self._on_frame(frame)

    def _on_sandbox_gone(self, error: BaseException) -> None:
        if self.link.incarnation is self:
            self.link.sandbox_gone(error)

    def on_worker_end(self, info: dict[str, Any]) -> None:
        """The direct worker's connection closed (it died, or broke the protocol)."""
        if self.link.incarnation is self:
            self.link.on_error(None, {"kind": "worker_died", "message": _how(info), "code": info.get("code"),
                                       "signal": info.get("signal")})


def _how(info: dict[str, Any]) -> str:
    if info.get("signal"):
        return f"killed by signal {info['signal']}"
    if info.get("code") is not None:
        return f"exited with code {info['code']}"
    return "its connection ended"


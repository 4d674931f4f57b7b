"""One sandbox of a pool: the trio tasks that start it, reach its call worker and carry the frames.

A slot reaches its worker directly when it can (local sandboxes): it asks the agent for a worker
listening in the sandbox's /tmp (a ``worker`` frame) and connects to it through the path where
this process sees that directory (the sandbox's ``bulk_dir``), so calls skip the agent's relay: two
socket hops instead of four. Cancels still go to the agent (``cancel`` with ``call: True``),
which signals the worker and kills it if it does not answer in time. Otherwise (remote runtimes,
or the connection failing) calls go through the agent, which relays them to its worker.

The pool (``pool``) decides; the slot's task only sends what the pool put in its outbox and
tells the pool what happened through ``SlotEvents``, a protocol the pool implements. The slot sees
its sandbox as a ``PoolSandbox``: what a sandbox factory returns (the session's sandboxes, or a
test's), so nothing here knows the session's Sandbox class.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio

from . import bulk as _bulk
from .direct import DirectChannel, WorkerRequest, flush_until, send_at_once
from .._errors import ProtocolError, SandboxError, SandboxNotRunningError

if TYPE_CHECKING:
    from .call import Call
    from .._config import SandboxSpec

#: How long to wait for the agent to start a direct worker, and for its account of a worker's end.
WORKER_START_SECONDS = 5.0
WORKER_EXIT_SECONDS = 3.0
#: Past a call's timeout, how long before the pool interrupts it itself (direct mode's backstop).
TIMEOUT_GRACE_SECONDS = 1.0


class SlotState(enum.Enum):
    """Where a slot is: STARTING -> READY <-> RECONNECTING (its direct worker is being replaced);
    RETIRING (no more calls: ``reuse=False``) or DEAD (its sandbox ended or never started) at the end."""

    STARTING = "starting"
    READY = "ready"
    RECONNECTING = "reconnecting"
    RETIRING = "retiring"
    DEAD = "dead"

    def __repr__(self) -> str:
        return self.value


class PoolSandbox(Protocol):
    """A started sandbox as a pool uses it: request ids routed to handlers, frames to its agent."""

    @property
    def sandbox_id(self) -> str | None: ...

    #: Where this process sees the sandbox's /tmp (see ``bulk``), or None (remote, unreachable).
    bulk_dir: str | None
    #: A same-host server's way to connect to a worker by socket name, or None.
    connect_worker: Callable[[str], Awaitable[Any]] | None

    def register(self, handler: Any, /) -> int:
        """A new request id whose frames go to ``handler`` (``_on_frame``/``_on_sandbox_gone``)."""
        ...

    def unregister(self, req_id: int, /) -> None: ...

    # Awaitable, not async def: a member may hand out its connection's bound send functions.
    def send(self, frame: dict[str, Any], /) -> Awaitable[None]:
        """Send one frame to the agent; SandboxNotRunningError (or why it failed) once it is gone."""
        ...

    def send_many(self, frames: list[dict[str, Any]], /) -> Awaitable[None]:
        """Send frames in one write; raises as ``send``."""
        ...

    def stop(self, *, graceful_shutdown_seconds: float) -> Any:
        """Begin stopping the sandbox (returns at once)."""


class TaskStarter(Protocol):
    """Where a pool's tasks run: a trio nursery, or a TaskHost."""

    def start_soon(self, async_fn: Callable[..., Awaitable[Any]], *args: Any) -> None: ...


class SlotEvents(Protocol):
    """What a slot tells its pool (the pool implements it); all called in the loop's thread."""

    closed: bool

    def slot_ready(self, slot: Slot) -> None:
        """The sandbox runs and a worker is reachable: the slot takes calls (again)."""

    def slot_failed(self, slot: Slot, error: BaseException) -> None:
        """The sandbox could not be made or started."""

    def slot_lost(self, slot: Slot, error: BaseException) -> None:
        """The sandbox ended (once per request the slot had registered)."""

    def worker_lost(self, slot: Slot, info: dict[str, Any]) -> None:
        """The direct worker ended (the agent's ``exit`` frame); the sandbox lives on."""

    def call_answered(self, slot: Slot, frame: dict[str, Any]) -> None:
        """A ``result`` or ``error`` frame for one of the slot's calls."""

    def calls_answered(self, slot: Slot, frames: list[dict[str, Any]]) -> None:
        """A batch of answers from the direct worker."""


@dataclass(eq=False)
class Slot:
    """One sandbox of a pool and the calls it holds (by request id, in the order they were sent).
    ``started`` is None until the factory has started it; ``sandbox`` is read only after."""

    events: SlotEvents
    started: PoolSandbox | None = None
    state: SlotState = SlotState.STARTING
    inflight: dict[int, Call] = field(default_factory=dict)
    held_bytes: int = 0
    outbox: list[dict[str, Any]] = field(default_factory=list)
    keys: set[bytes] = field(default_factory=set)  # functions the sandbox's worker has
    wake: trio.Event = field(default_factory=trio.Event)
    bulk_dir: str | None = None  # where this process sees the sandbox's /tmp (see _bulk)
    direct: DirectChannel | None = None  # the connection straight to the worker, if any
    worker: WorkerRequest | None = None
    leaving: list[int] = field(default_factory=list)  # direct: calls handed to the connection, not all sent
    progress_at: float = 0.0  # when it last answered, or took a call while idle (trio.current_time)

    @property
    def sandbox(self) -> PoolSandbox:
        """The started sandbox: only a started slot holds calls or a worker."""
        assert self.started is not None
        return self.started

    def _on_frame(self, frame: dict[str, Any]) -> int:  # the sandbox's reader routes relayed answers here
        self.events.call_answered(self, frame)
        return 0

    def _on_sandbox_gone(self, error: BaseException) -> None:
        self.events.slot_lost(self, error)


async def run_slot(slot: Slot, factory: Callable[[SandboxSpec], Awaitable[PoolSandbox]], spec: SandboxSpec,
                   tasks: TaskStarter) -> None:
    """Start the slot's sandbox, reach its worker, then send what the pool assigns until the end."""
    events = slot.events
    try:
        sandbox = slot.started = await factory(spec)
    except Exception as exc:  # it never ran: the pool drops it (and fails its calls if none can start)
        events.slot_failed(slot, exc)
        return
    if not _still_wanted(slot):
        return
    sandbox.register(slot)  # a request that is never answered: we hear of its death even when idle
    slot.bulk_dir = sandbox.bulk_dir
    await _connect(slot, tasks)
    events.slot_ready(slot)
    while slot.state not in (SlotState.DEAD, SlotState.RETIRING):
        if not slot.outbox and (slot.direct is None or slot.direct.idle):
            await slot.wake.wait()
        slot.wake = trio.Event()
        if slot.state is SlotState.RECONNECTING:
            await _connect(slot, tasks)
            events.slot_ready(slot)
            continue
        frames, slot.outbox = slot.outbox, []
        calls = [f for f in frames if f["t"] == "call"]
        others = [f for f in frames if f["t"] != "call"]  # cancels and steals, always to the agent
        try:
            if slot.direct is not None:
                await _send_direct(slot, slot.direct, calls, others)
                continue
            if calls:
                await sandbox.send_many(calls)
                _mark_sent(slot, [f["id"] for f in calls])
            if others:  # after their calls, on the same connection
                await sandbox.send_many(others)
        except (SandboxNotRunningError, ProtocolError):
            # the worker's connection broke: its exit (or the sandbox's end) resubmits the calls;
            # or the agent's connection broke: the sandbox's reader reports the end to the pool
            continue


async def _send_direct(slot: Slot, direct: DirectChannel, calls: list[dict[str, Any]],
                       others: list[dict[str, Any]]) -> None:
    """Hand calls to the worker's connection, send the cancels and steals of calls that left, and
    write until the connection is drained or the pool wakes the slot again.

    The worker reads no calls while one of its calls runs, so the writing may wait that long; a
    cancel or steal to send then may be what lets the worker read again (its SIGINT handler does).
    A cancel of a call that has not wholly left waits in the outbox: the agent would kill the
    worker for not answering a cancel of a call it cannot read yet."""
    direct.unpark()  # the answers to what goes now (calls, cancels, steals) are the loop's to read
    if calls:
        direct.send_now(calls)
        slot.leaving += [f["id"] for f in calls]
    ready = [f for f in others if left(slot, f["id"])]
    if len(ready) < len(others):
        slot.outbox[:0] = [f for f in others if not left(slot, f["id"])]
    if ready:
        await slot.sandbox.send_many(ready)
    await flush_until(direct, slot.wake)
    held = direct.held()
    _mark_sent(slot, [i for i in slot.leaving if i not in held])
    slot.leaving = [i for i in slot.leaving if i in held]


def _mark_sent(slot: Slot, req_ids: list[int]) -> None:
    for req_id in req_ids:
        call = slot.inflight.get(req_id)
        if call is not None:
            call.sent = True


def left(slot: Slot, req_id: int) -> bool:
    """Whether the frame of the slot's call ``req_id`` has wholly left for its worker (or the call
    is over): sent, or, direct, in neither the outbox nor the part of the connection not sent yet
    (the slot's task hands the connection what it takes from the outbox in the same step)."""
    call = slot.inflight.get(req_id)
    if call is None or call.sent:
        return True
    return (slot.direct is not None and req_id not in slot.direct.held()
            and all(f.get("id") != req_id for f in slot.outbox if f["t"] == "call"))


async def _connect(slot: Slot, tasks: TaskStarter) -> None:
    """Start a direct worker and connect to it; on any failure, calls go through the agent."""
    slot.direct = slot.worker = None
    sandbox, handle = slot.sandbox, WorkerRequest()
    line = sandbox.connect_worker  # a same-host server's
    if slot.bulk_dir is None and line is None:
        return
    name = f".sandpool-worker-{secrets.token_hex(6)}"
    req_id = sandbox.register(handle)
    try:
        await sandbox.send({"t": "worker", "id": req_id, "listen": f"{_bulk.SANDBOX_DIR}/{name}"})
        with trio.move_on_after(WORKER_START_SECONDS):
            await handle.started.wait()
        if not handle.ok:
            raise SandboxError(f"the agent did not start a direct worker: {handle.exit.get('message')}")
        if slot.bulk_dir is not None:
            channel = await DirectChannel.connect(slot.bulk_dir, name)
        else:
            assert line is not None  # (one of the two ways is there: checked above)
            channel = DirectChannel(await line(name))
    except (OSError, SandboxError):
        if handle.ok:  # started, but unreachable: stop it, so that the agent relays calls instead
            try:
                await sandbox.send({"t": "cancel", "id": req_id})
            except SandboxError:
                pass
            with trio.move_on_after(WORKER_EXIT_SECONDS):
                await handle.exited.wait()
        sandbox.unregister(req_id)
        return
    slot.direct, slot.worker = channel, handle
    handle.on_end = channel.unpark  # a parked reader must see the worker's end (its EOF) at once
    tasks.start_soon(_read_direct, slot, channel, handle, req_id)


def send(slot: Slot, call: Call, frame: dict[str, Any], wake: Callable[[], None] | None = None) -> None:
    """Send a call's frame: at once when it is the slot's only call and the worker's connection is
    idle (a lone call leaves in this very step of the loop), else through the slot's task, which
    sends what accumulated in one write. ``wake`` wakes that task (default ``slot.wake.set``, in the
    loop's thread; a sync caller's thread passes a thread-safe one)."""
    direct = slot.direct
    if direct is not None and direct.idle and not slot.outbox and len(slot.inflight) == 1:
        send_at_once(direct, [frame], wake or slot.wake.set)  # broken: the worker's end resubmits it
        call.sent = True
        return
    slot.outbox.append(frame)
    (wake or slot.wake.set)()


async def _read_direct(slot: Slot, channel: DirectChannel, handle: WorkerRequest, req_id: int) -> None:
    """Feed the worker's answers to the pool; at its end, wait for the agent's account of it."""
    events = slot.events
    try:
        while True:
            batch = await channel.receive_batch()
            if batch is None:
                break
            events.calls_answered(slot, batch)
    except ProtocolError:
        pass
    finally:
        channel.close()
    with trio.move_on_after(WORKER_EXIT_SECONDS):
        await handle.exited.wait()
    slot.sandbox.unregister(req_id)
    if slot.worker is handle:
        events.worker_lost(slot, handle.exit)


def args_file(req_id: int) -> str:
    """The name of the file in the sandbox's /tmp that carries a large argument of call ``req_id``."""
    return f".sandpool-a-{req_id}"


def unsend(slot: Slot, req_id: int) -> bool:
    """Take a call's frame back, out of the outbox or out of what the worker's connection has not
    begun to send (removing its bulk file); False if any of it left (the call must then be
    cancelled remotely)."""
    for index, frame in enumerate(slot.outbox):
        if frame.get("id") == req_id and frame["t"] == "call":
            if frame.get("args_path"):
                _bulk.discard(slot.bulk_dir, frame["args_path"])
            del slot.outbox[index]
            return True
    if slot.direct is not None and slot.direct.take_back(req_id):
        _bulk.discard(slot.bulk_dir, args_file(req_id))  # if it had one
        return True
    return False


def cancel_frame(slot: Slot, req_id: int, steal: bool = False) -> dict[str, Any]:
    """The frame that cancels a sent call (or, with ``steal``, asks for it back if it has not
    started): to the agent, marked as a direct call if it went so."""
    frame: dict[str, Any] = {"t": "cancel", "id": req_id}
    if slot.direct is not None:
        frame["call"] = True
    if steal:
        frame["steal"] = True
    return frame


async def watch_timeout(slot: Slot, call: Call, req_id: int) -> None:
    """Direct mode's backstop for a function that swallows its timeout (the worker enforces it;
    the agent, which does so for relayed calls, does not see direct ones): interrupt it."""
    assert call.timeout is not None  # (only calls with a timeout are watched)
    await trio.sleep(call.timeout + TIMEOUT_GRACE_SECONDS)
    while slot.inflight.get(req_id) is call and not call.ref.done():
        if next(iter(slot.inflight.values())) is call:  # it is the one running: it overstayed
            call.timed_out = True
            slot.outbox.append(cancel_frame(slot, req_id))
            slot.wake.set()
            return
        await trio.sleep(TIMEOUT_GRACE_SECONDS)


def _still_wanted(slot: Slot) -> bool:
    """Whether the pool still wants the slot that was starting (a function, not an inline test: the
    state changes across awaits, which a narrowed ``slot.state`` would hide from type checkers)."""
    return slot.state is SlotState.STARTING and not slot.events.closed

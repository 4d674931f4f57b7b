"""One sandbox of a pool: the trio tasks that start it, reach its call worker and carry the frames.

A slot reaches its worker directly when it can (local sandboxes): it asks the agent for a worker
listening in the sandbox's /tmp (a ``worker`` frame) and connects to it through the path where
this process sees that directory (see ``_bulk.host_dir``), so calls skip the agent's relay: two
socket hops instead of four. Cancels still go to the agent (``cancel`` with ``call: True``),
which signals the worker and kills it if it does not answer in time. Otherwise (remote runtimes,
or the connection failing) calls go through the agent, which relays them to its worker.

The pool (``_pool``) decides; the slot's task only sends what the pool put in its outbox and
feeds answers back to the pool.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from . import bulk as _bulk
from .direct import DirectChannel
from .._errors import ProtocolError, SandboxError, SandboxNotRunningError

if TYPE_CHECKING:
    from .call import Call
    from .pool import Pool
    from .._session.sandbox import Sandbox

#: How long to wait for the agent to start a direct worker, and for its account of a worker's end.
WORKER_START_SECONDS = 5.0
WORKER_EXIT_SECONDS = 3.0
#: Past a call's timeout, how long before the pool interrupts it itself (direct mode's backstop).
TIMEOUT_GRACE_SECONDS = 1.0


@dataclass(eq=False)
class Slot:
    """One sandbox of a pool and the calls it holds (by request id, in the order they were sent)."""

    pool: Pool
    sandbox: Sandbox
    state: str = "starting"  # starting -> ready <-> reconnecting; retiring/dead at the end
    inflight: dict[int, Call] = field(default_factory=dict)
    held_bytes: int = 0
    outbox: list[dict] = field(default_factory=list)
    keys: set[bytes] = field(default_factory=set)  # functions the sandbox's worker has
    wake: trio.Event = field(default_factory=trio.Event)
    bulk_dir: str | None = None  # where this process sees the sandbox's /tmp (see _bulk)
    direct: DirectChannel | None = None  # the connection straight to the worker, if any
    worker: _WorkerHandle | None = None
    leaving: list[int] = field(default_factory=list)  # direct: calls handed to the connection, not all sent
    progress_at: float = 0.0  # when it last answered, or took a call while idle (time.monotonic)

    def _on_frame(self, frame: dict) -> int:  # the sandbox's reader routes relayed answers here
        self.pool._on_answer(self, frame)
        return 0

    def _on_sandbox_gone(self, error: BaseException) -> None:
        self.pool._on_gone(self, error)


class _WorkerHandle:
    """The pending ``worker`` request of a direct worker: answered ``started``, then ``exit``."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.ok = False
        self.exited = trio.Event()
        self.exit: dict = {}

    def _on_frame(self, frame: dict) -> int:
        if frame["t"] == "started":
            self.ok = True
            self.started.set()
        else:  # "exit", or an "error" refusing to start it
            self.exit = frame
            self.started.set()
            self.exited.set()
        return 0

    def _on_sandbox_gone(self, error: BaseException) -> None:
        self.started.set()
        self.exited.set()


async def run_slot(pool: Pool, slot: Slot, nursery: trio.Nursery) -> None:
    """Start the slot's sandbox, reach its worker, then send what the pool assigns until the end."""
    sandbox = slot.sandbox
    try:
        await sandbox._ensure_running()
    except Exception as exc:  # it never ran: the pool drops it (and fails its calls if none can start)
        pool._start_failed(slot, exc)
        return
    if slot.state != "starting" or pool.closed:
        return
    sandbox._register(slot)  # a request that is never answered: we hear of its death even when idle
    slot.bulk_dir = _bulk.host_dir(sandbox)
    await _connect(slot, nursery)
    pool._ready(slot)
    while slot.state not in ("dead", "retiring"):
        if not slot.outbox and (slot.direct is None or slot.direct.idle):
            await slot.wake.wait()
        slot.wake = trio.Event()
        if slot.state == "reconnecting":
            await _connect(slot, nursery)
            pool._ready(slot)
            continue
        frames, slot.outbox = slot.outbox, []
        calls = [f for f in frames if f["t"] == "call"]
        others = [f for f in frames if f["t"] != "call"]  # cancels and steals, always to the agent
        try:
            if slot.direct is not None:
                await _send_direct(slot, slot.direct, calls, others)
                continue
            if calls:
                await sandbox._send_many(calls)
                _mark_sent(slot, [f["id"] for f in calls])
            if others:  # after their calls, on the same connection
                await sandbox._send_many(others)
        except (SandboxNotRunningError, ProtocolError):
            # the worker's connection broke: its exit (or the sandbox's end) resubmits the calls;
            # or the agent's connection broke: the sandbox's reader reports the end to the pool
            continue


async def _send_direct(slot: Slot, direct: DirectChannel, calls: list[dict], others: list[dict]) -> None:
    """Hand calls to the worker's connection, send the cancels and steals of calls that left, and
    write until the connection is drained or the pool wakes the slot again.

    The worker reads no calls while one of its calls runs, so the writing may wait that long; a
    cancel or steal to send then may be what lets the worker read again (its SIGINT handler does).
    A cancel of a call that has not wholly left waits in the outbox: the agent would kill the
    worker for not answering a cancel of a call it cannot read yet."""
    if calls:
        direct.send_now(calls)
        slot.leaving += [f["id"] for f in calls]
    ready = [f for f in others if left(slot, f["id"])]
    if len(ready) < len(others):
        slot.outbox[:0] = [f for f in others if not left(slot, f["id"])]
    if ready:
        await slot.sandbox._send_many(ready)
    if not direct.idle:
        error = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_when_set, slot.wake, nursery.cancel_scope)
            try:
                await direct.flush()
            except SandboxNotRunningError as exc:  # raised below, not as an exception group
                error = exc
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error
    held = direct.held()
    _mark_sent(slot, [i for i in slot.leaving if i not in held])
    slot.leaving = [i for i in slot.leaving if i in held]


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


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


async def _connect(slot: Slot, nursery: trio.Nursery) -> None:
    """Start a direct worker and connect to it; on any failure, calls go through the agent."""
    slot.direct = slot.worker = None
    record = slot.sandbox._record
    line = record.connect_worker if record is not None else None  # a same-host server's
    if slot.bulk_dir is None and line is None:
        return
    sandbox, handle = slot.sandbox, _WorkerHandle()
    name = f".sandpool-worker-{secrets.token_hex(6)}"
    req_id = sandbox._register(handle)
    try:
        await sandbox._send({"t": "worker", "id": req_id, "listen": f"{_bulk.SANDBOX_DIR}/{name}"})
        with trio.move_on_after(WORKER_START_SECONDS):
            await handle.started.wait()
        if not handle.ok:
            raise SandboxError(f"the agent did not start a direct worker: {handle.exit.get('message')}")
        channel = (await DirectChannel.connect(slot.bulk_dir, name) if slot.bulk_dir is not None
                   else DirectChannel(await line(name)))
    except (OSError, SandboxError):
        if handle.ok:  # started, but unreachable: stop it, so that the agent relays calls instead
            try:
                await sandbox._send({"t": "cancel", "id": req_id})
            except SandboxError:
                pass
            with trio.move_on_after(WORKER_EXIT_SECONDS):
                await handle.exited.wait()
        sandbox._unregister(req_id)
        return
    slot.direct, slot.worker = channel, handle
    nursery.start_soon(_read_direct, slot, channel, handle, req_id)


def send(slot: Slot, call: Call, frame: dict) -> None:
    """Send a call's frame: at once when it is the slot's only call and the worker's connection is
    idle (a lone call leaves in this very step of the loop), else through the slot's task, which
    sends what accumulated in one write."""
    direct = slot.direct
    if direct is not None and direct.idle and not slot.outbox and len(slot.inflight) == 1:
        try:
            direct.send_now([frame])
        except SandboxNotRunningError:
            pass  # broken: the worker's end resubmits the call
        call.sent = True
        if not direct.idle:
            slot.wake.set()  # the slot's task writes the rest
        return
    slot.outbox.append(frame)
    slot.wake.set()


async def _read_direct(slot: Slot, channel: DirectChannel, handle: _WorkerHandle, req_id: int) -> None:
    """Feed the worker's answers to the pool; at its end, wait for the agent's account of it."""
    pool = slot.pool
    try:
        while True:
            batch = await channel.receive_batch()
            if batch is None:
                break
            pool._on_answers(slot, batch)
    except ProtocolError:
        pass
    finally:
        channel.close()
    with trio.move_on_after(WORKER_EXIT_SECONDS):
        await handle.exited.wait()
    slot.sandbox._unregister(req_id)
    if slot.worker is handle:
        pool._worker_gone(slot, handle.exit)


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
    await trio.sleep(call.timeout + TIMEOUT_GRACE_SECONDS)  # type: ignore[operator]
    while slot.inflight.get(req_id) is call and not call.ref.done():
        if next(iter(slot.inflight.values())) is call:  # it is the one running: it overstayed
            call.timed_out = True
            slot.outbox.append(cancel_frame(slot, req_id))
            slot.wake.set()
            return
        await trio.sleep(TIMEOUT_GRACE_SECONDS)

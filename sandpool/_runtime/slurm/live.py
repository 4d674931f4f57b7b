"""Liveness of Slurm-placed sandboxes: the heartbeat, the squeue poll, and telling why one ended.

Three signals, each in its own task of the runtime's nursery:

- the data plane: when a sandbox's stream ends, :meth:`Liveness.watch_end` decides whether it
  ended by itself (its main command, an OOM kill, a stop) or was lost (its job's server vanished,
  or Slurm ended the job: the server then shuts down, or Slurm's signal reaches the sandbox's
  processes directly, or the stream ends with no exit report at all; every one of these orders
  means the same);
- the heartbeat: :meth:`Liveness.heartbeat` asks each allocation's server for its sandboxes every
  ``heartbeat_seconds``; no answer for ``lost_after_seconds`` is a lost node (it hangs, or its
  network is gone, where no connection reset ever arrives);
- Slurm: :meth:`Liveness.poll` runs one ``squeue`` for every watched job; an allocation whose job
  left the RUNNING state was ended by Slurm (scancel, time limit, preemption, node failure).

A lost allocation loses every sandbox in it: their readers end (each Sandbox fails with the reason,
calls retry elsewhere), its job is cancelled, and a node that went silent is left out of new
placements for a while.

:class:`Liveness` does this for one SlurmRuntime, which hands it what it needs (its allocations,
the nodes to avoid, and how to query and cancel jobs, and what to do when a sandbox left its
allocation) and pokes it when a poll is due sooner.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import trio

from ..._core import lifecycle
from ..._config import SandboxStatus
from ..._errors import SandboxUnavailableError, SandpoolError
from ..._grpc.messages import SHUTDOWN_REASON
from . import cli
from .place import SUSPECT_SECONDS, Placement, end_reason, ended_by_slurm

if TYPE_CHECKING:
    from ..contract import SandboxRecord


class Timings(Protocol):
    """What the watch reads of its runtime's settings (a SlurmRuntime)."""

    heartbeat_seconds: float
    lost_after_seconds: float
    poll_seconds: float

#: How a sandbox's server reports an end that Slurm caused: it shut down, or the sandbox's processes
#: were signalled directly (the job's whole process tree gets Slurm's SIGTERM).
_ENVIRONMENT_ENDS = (SHUTDOWN_REASON, lifecycle.reason_for("parent_gone"))


class Liveness:
    """The liveness watch of one SlurmRuntime's allocations and sandboxes (see the module doc)."""

    def __init__(self, rt: Timings, *, placements: dict[str, Placement], suspects: dict[str, float],
                 squeue: Callable[[list[str] | None], Awaitable[list[cli.Job]]],
                 cancel: Callable[[list[Placement]], Awaitable[None]],
                 left: Callable[[SandboxRecord, Placement], None]) -> None:
        self.rt = rt  # its settings: heartbeat_seconds, lost_after_seconds, poll_seconds
        self.placements, self.suspects = placements, suspects  # shared with the runtime
        self.squeue, self.cancel, self.left = squeue, cancel, left
        self.nursery: trio.Nursery | None = None
        self._poll_now = trio.Event()

    def start(self, nursery: trio.Nursery) -> None:
        """Start polling Slurm in ``nursery`` (the runtime's), where lost sandboxes are handled too."""
        self.nursery = nursery
        nursery.start_soon(self.poll)

    def poke(self) -> None:
        """Poll Slurm now rather than at the next interval (a job was submitted or cancelled)."""
        self._poll_now.set()

    def watch_job(self, p: Placement) -> None:
        """Watch a connected allocation's server: its heartbeat."""
        assert self.nursery is not None
        self.nursery.start_soon(self.heartbeat, p)

    def watch(self, record: SandboxRecord, p: Placement) -> None:
        """Watch a connected sandbox: its data plane's end."""
        assert self.nursery is not None
        self.nursery.start_soon(self.watch_end, record, p)

    async def watch_end(self, record: SandboxRecord, p: Placement) -> None:
        """When a sandbox's data plane ends, say why (ended by itself, or lost) and tell the runtime."""
        inner = record.extra["inner"]
        await inner.exited.wait()
        record.exit_code, record.exit_signal = inner.exit_code, inner.exit_signal
        stopping = bool(record.extra.get("stopping")) or p.stopping
        if not stopping:
            reason = end_reason(p, server_ended(inner), inner.lost)
            if reason:
                self.lose_job(p, reason, suspect=bool(inner.lost))
                self.lose(record, reason)
        if not record.lost:
            ended_well = inner.exit_code in (0, None) and not inner.exit_signal
            stopped = stopping or inner.status_reason == "stopped"  # by us, or by another client
            record.status = (SandboxStatus.TERMINATED if stopped else SandboxStatus.COMPLETED if ended_well
                             else SandboxStatus.FAILED).value
            record.status_reason = inner.status_reason
        record.exited.set()
        self.left(record, p)

    async def heartbeat(self, p: Placement) -> None:
        """Ask the allocation's server for its sandboxes every ``heartbeat_seconds``; silence is a lost node."""
        rt = self.rt
        last_ok = time.monotonic()
        while not (p.ended or p.stopping or p.lost):
            await trio.sleep(rt.heartbeat_seconds)
            with trio.move_on_after(rt.lost_after_seconds):
                try:
                    await p.remote.find(tags=(), status=None)
                    last_ok = time.monotonic()
                except SandboxUnavailableError:
                    pass
                except SandpoolError:  # the server answered: it is alive
                    last_ok = time.monotonic()
            if time.monotonic() - last_ok >= rt.lost_after_seconds and not (p.ended or p.stopping):
                self.lose_job(p, f"slurm job {p.job_id} on node {p.node}: its sandpool server did not answer "
                                 f"for {rt.lost_after_seconds:g} s (node down or unreachable)", suspect=True)

    def lose_job(self, p: Placement, reason: str, *, suspect: bool) -> None:
        """Mark an allocation lost: every sandbox in it is lost, its job cancelled, a silent node avoided."""
        if p.stopping or p.lost:
            return
        p.lost = reason
        if suspect and p.node:
            self.suspects[p.node] = time.monotonic() + SUSPECT_SECONDS
        for record in list(p.members.values()):
            self.lose(record, reason)
        p.wake()  # starts waiting for it go elsewhere
        assert self.nursery is not None
        self.nursery.start_soon(self.cancel, [p])

    def lose(self, record: SandboxRecord, reason: str) -> None:
        """Mark a connected sandbox lost: its reader ends."""
        if record.extra.get("stopping") or record.lost or record.exited.is_set():
            return
        record.lost = reason
        record.status, record.status_reason = SandboxStatus.FAILED.value, reason
        assert self.nursery is not None
        if record.channel is not None and not record.channel.closed:
            self.nursery.start_soon(record.channel.aclose)  # the sandbox's reader sees the end

    async def poll(self) -> None:
        """One ``squeue`` for every watched job, every ``poll_seconds`` (sooner when poked)."""
        while True:
            watched = [p for p in self.placements.values() if not p.ended and not p.gone and p.job_id]
            if watched:
                try:
                    jobs = {j.job_id: j for j in await self.squeue([p.job_id for p in watched if p.job_id])}
                except SandboxUnavailableError:
                    jobs = None  # slurmctld does not answer: the heartbeat still watches the nodes
                for p in watched if jobs is not None else ():
                    p.see(jobs.get(p.job_id or "") if jobs is not None else None)
                    state = cli.base_state(p.job.state) if p.job else "GONE"
                    if p.remote is not None and not p.stopping and (p.gone or state not in cli.ACTIVE | cli.WAITING):
                        self.lose_job(p, ended_by_slurm(p), suspect=state in ("NODE_FAIL", "BOOT_FAIL"))
            self._poll_now = trio.Event()
            with trio.move_on_after(self.rt.poll_seconds):
                await self._poll_now.wait()


def server_ended(inner: SandboxRecord) -> bool:
    """Whether the job's side ended the sandbox's stream because the job itself was ending: its
    server shut down (it says so), Slurm's signal reached the sandbox's processes first (they say
    so), or the server closed the stream without any exit report (it went away mid-shutdown; which of
    these a client sees depends only on which process handled Slurm's SIGTERM first)."""
    return inner.status_reason in _ENVIRONMENT_ENDS or inner.detached

"""Liveness of Slurm-placed sandboxes: the heartbeat, the squeue poll, and telling why one ended.

Three signals, each in its own task of the runtime's nursery:

- the data plane: when a job's stream ends, :func:`watch_end` decides whether the sandbox ended
  by itself (its main command, an OOM kill) or was lost (its server vanished, or Slurm ended the
  job: the server then shuts down, or Slurm's signal reaches the sandbox's processes directly, or
  the stream ends with no exit report at all; every one of these orders means the same);
- the heartbeat: :func:`heartbeat` asks each job's server for its sandbox every
  ``heartbeat_seconds``; no answer for ``lost_after_seconds`` is a lost node (it hangs, or its
  network is gone, where no connection reset ever arrives);
- Slurm: :func:`poll` runs one ``squeue`` for every watched job; a running sandbox whose job left
  the RUNNING state was ended by Slurm (scancel, time limit, preemption, node failure).

A lost sandbox's reader ends (its Sandbox fails with the reason, calls retry elsewhere), its job is
cancelled, and a node that went silent is left out of new placements for a while.

:class:`Liveness` does this for one SlurmRuntime, which hands it what it needs (its records and
placements, the nodes to avoid, and how to query, cancel and release jobs) and pokes it when a poll
is due sooner.
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
    """The liveness watch of one SlurmRuntime's sandboxes (see the module doc)."""

    def __init__(self, rt: Timings, *, records: dict[str, SandboxRecord], placements: dict[str, Placement],
                 suspects: dict[str, float], squeue: Callable[[list[str] | None], Awaitable[list[cli.Job]]],
                 cancel: Callable[[list[Placement]], Awaitable[None]],
                 release: Callable[..., Awaitable[None]]) -> None:
        self.rt = rt  # its settings: heartbeat_seconds, lost_after_seconds, poll_seconds
        self.records, self.placements, self.suspects = records, placements, suspects  # shared with the runtime
        self.squeue, self.cancel, self.release = squeue, cancel, release
        self.nursery: trio.Nursery | None = None
        self._poll_now = trio.Event()

    def start(self, nursery: trio.Nursery) -> None:
        """Start polling Slurm in ``nursery`` (the runtime's), where lost sandboxes are handled too."""
        self.nursery = nursery
        nursery.start_soon(self.poll)

    def poke(self) -> None:
        """Poll Slurm now rather than at the next interval (a job was submitted or cancelled)."""
        self._poll_now.set()

    def watch(self, record: SandboxRecord, p: Placement) -> None:
        """Watch a connected sandbox: its data plane's end, and its server's heartbeat."""
        assert self.nursery is not None
        self.nursery.start_soon(self.watch_end, record, p)
        self.nursery.start_soon(self.heartbeat, record, p)

    async def watch_end(self, record: SandboxRecord, p: Placement) -> None:
        """When the job's data plane ends, say why (ended by itself, or lost) and release the job."""
        inner = p.inner
        await inner.exited.wait()
        record.exit_code, record.exit_signal = inner.exit_code, inner.exit_signal
        if not p.stopping:
            reason = end_reason(p, server_ended(inner), inner.lost)
            if reason:
                self.lose(record, p, reason, suspect=bool(inner.lost))
        if not record.lost:
            ended_well = inner.exit_code in (0, None) and not inner.exit_signal
            record.status = (SandboxStatus.TERMINATED if p.stopping else SandboxStatus.COMPLETED if ended_well
                             else SandboxStatus.FAILED).value
            record.status_reason = inner.status_reason
        record.exited.set()
        if not p.stopping:  # it ended by itself or was lost: nobody will stop it, so release its job now
            await self.release([p], wait=False)

    async def heartbeat(self, record: SandboxRecord, p: Placement) -> None:
        """Ask the job's server for its sandbox every ``heartbeat_seconds``; silence is a lost node."""
        rt = self.rt
        last_ok = time.monotonic()
        while not (p.inner.exited.is_set() or p.stopping or record.lost):
            await trio.sleep(rt.heartbeat_seconds)
            with trio.move_on_after(rt.lost_after_seconds):
                try:
                    await p.remote.find(sandbox_id=p.address["sandbox_id"])
                    last_ok = time.monotonic()
                except SandboxUnavailableError:
                    pass
                except SandpoolError:  # the server answered (it no longer has the sandbox): it is alive
                    last_ok = time.monotonic()
            if time.monotonic() - last_ok >= rt.lost_after_seconds and not p.inner.exited.is_set():
                self.lose(record, p, f"slurm job {p.job_id} on node {p.node}: its sandpool server did not answer "
                                     f"for {rt.lost_after_seconds:g} s (node down or unreachable)", suspect=True)

    def lose(self, record: SandboxRecord, p: Placement, reason: str, *, suspect: bool) -> None:
        """Mark a connected sandbox lost: its reader ends, its job is cancelled, a silent node avoided."""
        if p.stopping or record.lost:
            return
        record.lost = reason
        record.status, record.status_reason = SandboxStatus.FAILED.value, reason
        if suspect and p.node:
            self.suspects[p.node] = time.monotonic() + SUSPECT_SECONDS
        assert self.nursery is not None
        if record.channel is not None and not record.channel.closed:
            self.nursery.start_soon(record.channel.aclose)  # the sandbox's reader sees the end
        self.nursery.start_soon(self.cancel, [p])

    async def poll(self) -> None:
        """One ``squeue`` for every watched job, every ``poll_seconds`` (sooner when poked)."""
        while True:
            watched = [p for p in self.placements.values() if not p.ended and not p.gone]
            if watched:
                try:
                    jobs = {j.job_id: j for j in await self.squeue([p.job_id for p in watched])}
                except SandboxUnavailableError:
                    jobs = None  # slurmctld does not answer: the heartbeat still watches the nodes
                for p in watched if jobs is not None else ():
                    p.see(jobs.get(p.job_id))
                    record = self.records[p.sandbox_id]
                    state = cli.base_state(p.job.state) if p.job else "GONE"
                    connected = record.channel is not None and p.inner is not None and not p.inner.exited.is_set()
                    if connected and not p.stopping and (p.gone or state not in cli.ACTIVE | cli.WAITING):
                        self.lose(record, p, ended_by_slurm(p), suspect=state in ("NODE_FAIL", "BOOT_FAIL"))
            self._poll_now = trio.Event()
            with trio.move_on_after(self.rt.poll_seconds):
                await self._poll_now.wait()


def server_ended(inner: SandboxRecord) -> bool:
    """Whether the job's side ended the sandbox's stream because the job itself was ending: its
    server shut down (it says so), Slurm's signal reached the sandbox's processes first (they say
    so), or the server closed the stream without any exit report (it went away mid-shutdown; which of
    these a client sees depends only on which process handled Slurm's SIGTERM first)."""
    return inner.status_reason in _ENVIRONMENT_ENDS or inner.detached

"""SlurmRuntime: sandboxes in Slurm allocations, one allocation per pool; the client talks to them directly.

Placement is Slurm's: an allocation is one job on one node, sized for ``slots`` sandboxes of one
spec (``cli.sbatch_argv``). The job runs a small sandpool server on its node (``slurmjob``), which
reports its address in the job's directory under the spool (a directory the submit host and the
nodes share, like a home directory). The client attaches to it as to any ``sandpool serve``,
through a RemoteRuntime per job, and starts the sandboxes of that spec in it: the first sandbox of
a spec waits for Slurm, the next ones take a free slot of a running allocation (a gRPC Create on
the node, milliseconds). exec, files and function calls go over sandpool's own data plane, never
through ``srun``.

Growing and shrinking (``grow``): a start that finds no free slot of its spec asks for a new
allocation; the starts that arrive together are batched into one (as many as a node holds, so a
pool that starts its ``max_concurrency`` sandboxes at once gets one allocation for them where a
node holds them), and a spec that keeps asking grows geometrically. An allocation whose sandboxes
are all gone is released after ``linger_seconds`` unless a new sandbox of its spec took it again.

Liveness (``live``): a heartbeat per allocation marks it lost when its server has not answered for
``lost_after_seconds``, and one ``squeue`` poll for all jobs reports what Slurm decided (cancelled,
preempted, time limit, node failure). A lost allocation's sandboxes are lost (an infrastructure
failure: functions retry their call on a fresh sandbox), its job is cancelled, and its node is left
out of new placements for a while.

Cleanup: closing the runtime cancels every job it submitted. If this process dies instead, a small
reaper process (it holds a pipe from us) cancels them; if the whole submit host vanishes, each
job's server ends once no client held it for the orphan grace.
"""

from __future__ import annotations

import builtins
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import trio

from ..._core.channel import FrameChannel
from ..._config import SandboxSpec, SandboxStatus
from ..._errors import SandboxFailedError, SandboxNotFoundError, SandboxNotRunningError, SandboxUnavailableError
from ..._errors import SandpoolError, SandboxResourceExhaustedError
from ..._grpc import messages as m
from . import cli
from . import live as _slurm_live
from . import nodes as _nodes  # noqa: F401  (registers the nodes as the runners of SANDPOOL_RUNTIME=slurm)
from ..contract import Runtime, SandboxRecord
from .grow import Growth
from .place import SUSPECT_SECONDS, Placement, exclusions, judge_start, parse_sandbox_id
from .place import sandbox_id as make_sandbox_id, stale_dirs

ENV = {"partition": "SANDPOOL_SLURM_PARTITION", "account": "SANDPOOL_SLURM_ACCOUNT", "qos": "SANDPOOL_SLURM_QOS",
       "spool_dir": "SANDPOOL_SLURM_SPOOL", "python": "SANDPOOL_SLURM_PYTHON"}
ENV_SBATCH_ARGS = "SANDPOOL_SLURM_SBATCH_ARGS"
#: How often a starting sandbox looks for its job's address file; how long jobs get to leave the queue.
ADDRESS_POLL_SECONDS = 0.05
JOB_END_SECONDS = 10.0
RELEASE_POLL_SECONDS = 0.1
STOP_SLACK_SECONDS = 5.0
#: The reaper: reads "+job" / "-job" lines; at EOF (we are gone, however) cancels what is left.
_REAPER = ("import subprocess,sys\njobs=set()\nfor line in sys.stdin:\n"
           "    (jobs.add if line[0]=='+' else jobs.discard)(line[1:].strip())\n"
           "if jobs:\n    subprocess.run(['scancel',*sorted(jobs)],"
           "stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL)\n")




class SlurmRuntime(Runtime):
    """Sandboxes in Slurm allocations. Options: ``partition``, ``account``, ``qos``, ``sbatch_args``
    (more sbatch options, last so they win), ``spool_dir`` (shared with the nodes; default
    ``$SANDPOOL_SLURM_SPOOL`` or ``~/.local/state/sandpool/slurm``), ``python`` (the interpreter on
    the nodes that has sandpool; default this one), ``orphan_grace_seconds`` (a job nobody holds
    ends after this), ``heartbeat_seconds``/``lost_after_seconds`` (liveness), ``poll_seconds``
    (squeue), ``agent_start_seconds`` (a running job must report its address within this),
    ``placement_attempts`` (tries when the cluster loses a job before its sandbox started),
    ``linger_seconds`` (an allocation without sandboxes is released after this) and
    ``min_slots`` (each new allocation holds room for at least this many sandboxes of its spec,
    up to what a node holds: a pool's size known ahead)."""

    name = "slurm"
    shared = True

    def __init__(self, partition: str | None = None, *, account: str | None = None, qos: str | None = None,
                 sbatch_args: tuple[str, ...] | list[str] = (), spool_dir: str | None = None,
                 python: str | None = None, orphan_grace_seconds: float = 30.0, heartbeat_seconds: float = 1.0,
                 lost_after_seconds: float = 3.0, poll_seconds: float = 0.5, agent_start_seconds: float = 60.0,
                 placement_attempts: int = 3, linger_seconds: float = 2.0, min_slots: int = 1) -> None:
        if isinstance(sbatch_args, str):
            raise TypeError(f"sbatch_args must be a list of strings, not a string; use {shlex.split(sbatch_args)!r}")
        for name, value in (("orphan_grace_seconds", orphan_grace_seconds), ("heartbeat_seconds", heartbeat_seconds),
                            ("lost_after_seconds", lost_after_seconds), ("poll_seconds", poll_seconds),
                            ("agent_start_seconds", agent_start_seconds), ("linger_seconds", linger_seconds)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        for name, count in (("placement_attempts", placement_attempts), ("min_slots", min_slots)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{name} must be an int >= 1, got {count!r}")
        self.partition, self.account, self.qos = partition, account, qos
        self.sbatch_args = tuple(sbatch_args)
        self.spool_dir = spool_dir or os.path.join(os.path.expanduser("~"), ".local", "state", "sandpool", "slurm")
        self.python = python or sys.executable
        self.orphan_grace_seconds, self.heartbeat_seconds = orphan_grace_seconds, heartbeat_seconds
        self.lost_after_seconds, self.poll_seconds = lost_after_seconds, poll_seconds
        self.agent_start_seconds, self.placement_attempts = agent_start_seconds, placement_attempts
        self.linger_seconds, self.min_slots = linger_seconds, min_slots
        self.endpoint = f"slurm:{os.environ.get('SLURM_CONF', 'default')}:{partition or ''}"
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._records: dict[str, SandboxRecord] = {}  # served sandboxes by id (ours and found ones)
        self._starting: list[SandboxRecord] = []  # starts not served yet (no id until they are)
        self._placements: dict[str, Placement] = {}  # allocations by key (ours and found ones)
        self._suspects: dict[str, float] = {}  # node -> until when new sandboxes avoid it
        self._nursery: trio.Nursery | None = None
        self._reaper: trio.Process | None = None
        self._reaper_lock = trio.Lock()
        self._live = _slurm_live.Liveness(self, placements=self._placements, suspects=self._suspects,
                                          squeue=self._squeue, cancel=self._cancel, left=self._left)
        self._growth = Growth(self, placements=self._placements, suspects=self._suspects, submitted=self._submitted)
        self._closed = False

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> SlurmRuntime:
        """Options from ``SANDPOOL_SLURM_PARTITION``, ``_ACCOUNT``, ``_QOS``, ``_SPOOL``, ``_PYTHON``
        and ``_SBATCH_ARGS`` (shell words)."""
        env = os.environ if environ is None else environ
        options: dict[str, Any] = {name: env[var] for name, var in ENV.items() if env.get(var)}
        return cls(sbatch_args=tuple(shlex.split(env.get(ENV_SBATCH_ARGS, ""))), **options)

    def __repr__(self) -> str:
        states = [SandboxStatus.parse(r.status).value for r in self.list() if r.status]
        counts = " ".join(f"{s}={states.count(s)}" for s in sorted(set(states)))
        state = "closed" if self._closed else "open" if self._nursery else "not_opened"
        counts = f" {counts}" if counts else ""
        jobs = sum(p.owned and not p.ended for p in self._placements.values())
        return f"<SlurmRuntime partition={self.partition or '(default)'} {state} jobs={jobs}{counts}>"

    # -- opening and closing -------------------------------------------------------------------

    async def open(self, nursery: trio.Nursery) -> None:
        problem = cli.have_slurm()
        if problem:
            raise SandboxUnavailableError(problem)
        os.makedirs(self.spool_dir, mode=0o700, exist_ok=True)
        self._nursery = nursery
        self._reaper = await trio.lowlevel.open_process(
            [sys.executable, "-S", "-c", _REAPER], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)  # a terminal's Ctrl-C must not take it with us
        self._live.start(nursery)
        self._growth.nursery = nursery
        try:  # dead clients' job directories
            live = {job.key for job in await self._squeue(None) if job.key}
            for path in stale_dirs(self.spool_dir, live, time.time()):
                shutil.rmtree(path, ignore_errors=True)
        except SandboxUnavailableError:
            pass

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True  # starts still waiting give up
        with trio.CancelScope(shield=True):
            ours = [p for p in self._placements.values() if p.owned and not p.ended]
            async with trio.open_nursery() as nursery:  # connected sandboxes stop politely, at once
                for p in ours:
                    p.stopping = True
                    for record in p.members.values():
                        inner = record.extra.get("inner")
                        if inner is not None and not inner.exited.is_set() and not record.lost:
                            nursery.start_soon(p.remote.stop, inner, 0.0)
            await self._release(ours)  # one scancel for all, then one wait
            for p in ours:
                for record in list(p.members.values()):
                    record.exited.set()
            for p in self._placements.values():
                if p.remote is not None:
                    await p.remote.aclose()
            if self._reaper is not None and self._reaper.stdin is not None:
                await self._reaper.stdin.aclose()
                with trio.move_on_after(5.0):
                    await self._reaper.wait()
                if self._reaper.returncode is None:
                    self._reaper.kill()

    # -- the contract --------------------------------------------------------------------------

    def create(self, spec: SandboxSpec) -> SandboxRecord:
        m.spec_to_dict(spec)  # refuse now what cannot travel to the node
        return SandboxRecord(sandbox_id="", spec=spec, isolation="slurm")

    async def start(self, record: SandboxRecord) -> FrameChannel:
        reason = ""
        self._starting.append(record)
        try:
            for _ in range(self.placement_attempts):
                p = await self._growth.claim(record)
                try:
                    verdict, reason = await self._wait_placed(record, p)
                    if verdict == "placed":
                        return await self._serve(record, p)
                finally:
                    p.claims -= 1
                    self._maybe_idle(p)
                if verdict == "gave_up":
                    record.status, record.status_reason = SandboxStatus.FAILED.value, reason
                    raise SandboxFailedError(reason, sandbox_id=record.sandbox_id or None, status_reason=reason)
                released = p.stopping or p.ended  # by us, while this start waited: no fault of its node
                await self._release([p], wait=p.node not in exclusions(self._suspects, time.monotonic()))
                if verdict in ("fail", "never"):
                    record.status, record.status_reason = SandboxStatus.FAILED.value, reason
                    if verdict == "never":
                        raise SandboxResourceExhaustedError(reason, sandbox_id=record.sandbox_id or None,
                                                            reason="Unschedulable")
                    raise SandboxFailedError(reason, sandbox_id=record.sandbox_id or None, status_reason=reason)
                if p.node and not released:
                    self._suspects[p.node] = time.monotonic() + SUSPECT_SECONDS
            raise SandboxUnavailableError(f"Slurm lost the sandbox's job {self.placement_attempts} times before it "
                                          f"started; last: {reason}", sandbox_id=record.sandbox_id or None)
        finally:
            self._starting.remove(record)

    def abandon_start(self, record: SandboxRecord) -> None:
        record.extra["abandoned"] = True
        p = record.extra.get("placement")
        if p is not None:
            p.wake()

    async def stop(self, record: SandboxRecord, grace_seconds: float) -> None:
        with trio.CancelScope(shield=True):
            p: Placement | None = record.extra.get("placement")
            inner = record.extra.get("inner")
            record.extra["stopping"] = True
            if p is not None and inner is not None:
                # its slot is free for the next sandbox of its spec now, not once the stop is done
                p.leaving.add(id(record))
                if not inner.exited.is_set() and not record.lost and not p.ended:
                    with trio.move_on_after(grace_seconds + STOP_SLACK_SECONDS):
                        await p.remote.stop(inner, grace_seconds)
                self._left(record, p)
            record.exited.set()

    def list(self) -> builtins.list[SandboxRecord]:
        return [*self._records.values(), *self._starting]

    async def find(self, *, sandbox_id: str | None = None, tags: tuple[str, ...] = (), status: str | None = None,
                   show_terminated: bool = False) -> builtins.list[SandboxRecord]:
        if sandbox_id is not None:
            parsed = parse_sandbox_id(sandbox_id)
            if parsed is None:
                raise SandboxNotFoundError(f"no sandbox {sandbox_id!r}: Slurm sandboxes are named "
                                           f"slurm-<job id>-<id>", sandbox_id=sandbox_id)
            if sandbox_id not in self._records:
                jobs = [j for j in await self._squeue([parsed[0]]) if j.key]
                await self._discover(jobs, inner_id=parsed[1])
            if sandbox_id not in self._records:
                raise SandboxNotFoundError(f"no sandbox {sandbox_id!r}: Slurm's sandpool job {parsed[0]} does not "
                                           f"hold it", sandbox_id=sandbox_id)
            return [self._records[sandbox_id]]
        await self._discover([j for j in await self._squeue(None) if j.key and set(tags) <= set(j.tags)],
                             tags=tags, show_terminated=show_terminated)
        wanted = SandboxStatus.parse(status) if status is not None else None
        show_terminated = show_terminated or bool(wanted and wanted.is_terminal)
        found = []
        for record in self._records.values():
            current = SandboxStatus.parse(record.status or "unspecified")
            if all(t in record.spec.tags for t in tags) and (wanted is None or current == wanted) \
                    and (show_terminated or not current.is_terminal):
                found.append(record)
        return found

    async def attach(self, sandbox_id: str) -> FrameChannel:
        record = self._records.get(sandbox_id) or (await self.find(sandbox_id=sandbox_id))[0]
        if record.channel is not None and not record.channel.closed:
            return record.channel
        p: Placement = record.extra["placement"]
        inner = record.extra["inner"]
        if p.ended or p.lost or inner.exited.is_set():
            raise SandboxNotRunningError(f"sandbox {sandbox_id} is not running: "
                                         f"{p.lost or inner.status_reason or 'its Slurm job has ended'}",
                                         sandbox_id=sandbox_id)
        channel: FrameChannel = await p.remote.attach(inner.sandbox_id)
        record.channel = channel
        self._serving(record, p)
        return channel

    async def main_log_lines(self, record: SandboxRecord, *, follow: bool, tail_lines: int | None,
                             since: float | None, timestamps: bool) -> AsyncIterator[str]:
        """The main command's log, streamed by the job's server (its ``Logs`` call, resumed after a
        broken stream as from any sandpool server). The server goes with the job: once the job has
        ended, its log is gone (SandboxNotRunningError), as is a follow stream cut by Slurm."""
        p: Placement | None = record.extra.get("placement")
        inner = record.extra.get("inner")
        if p is None or p.remote is None or inner is None or p.ended:
            raise SandboxNotRunningError(f"sandbox {record.sandbox_id} has no log to stream: its Slurm job "
                                         f"{'has ended' if p is not None and p.ended else 'is not connected'}",
                                         sandbox_id=record.sandbox_id)
        async for line in p.remote.main_log_lines(inner, follow=follow, tail_lines=tail_lines, since=since,
                                                  timestamps=timestamps):
            yield line

    def job(self, sandbox: object) -> dict[str, Any]:
        """Where Slurm put a sandbox (a Sandbox of this runtime, or its record): ``{"job_id", "node",
        "state", "reason", "times", "slots"}`` as last seen ({} before it had an allocation).
        ``times`` are Unix times: ``submitted`` (sbatch), ``launched`` (the job's process started on
        its node), ``ready`` (its server answered), ``connected`` (this sandbox started or attached
        there). ``slots``: how many sandboxes the allocation holds room for."""
        record = getattr(sandbox, "_record", sandbox)
        if not isinstance(record, SandboxRecord):
            return {}
        p: Placement | None = record.extra.get("placement")
        if p is None:
            return {}
        summary = p.summary()
        summary["times"]["connected"] = record.extra.get("connected_at")
        summary["slots"] = p.slots
        return summary

    # -- placing -------------------------------------------------------------------------------

    async def nodes(self) -> builtins.list[cli.Node]:
        """The nodes of the runtime's partition as ``sinfo`` describes them now (its runners)."""
        return await self._growth.nodes(fresh=True)

    async def _wait_placed(self, record: SandboxRecord, p: Placement) -> tuple[str, str]:
        """Wait until the allocation's server reports its address, or the job is lost or failed."""
        while True:
            if record.extra.get("abandoned") or self._closed:
                return "gave_up", "stopped while it waited for Slurm to place it"
            if p.stopping or p.ended:
                return "retry", f"its allocation (slurm job {p.job_id}) was released meanwhile"
            now = time.monotonic()
            verdict, reason = judge_start(p, now, self.agent_start_seconds, exclusions(self._suspects, now))
            if p.job is not None and verdict == "wait":
                waiting = cli.base_state(p.job.state) in cli.WAITING
                record.status = (SandboxStatus.PENDING if waiting else SandboxStatus.CREATING).value
                record.status_reason = cli.describe(p.job)
            if verdict != "wait":
                return verdict, reason
            with trio.move_on_after(ADDRESS_POLL_SECONDS):
                await p.changed.wait()

    async def _connect(self, p: Placement) -> None:
        """Attach to the allocation's server once, like to any sandpool server; start its heartbeat."""
        from ..remote import RemoteRuntime  # gRPC loads when the first sandbox connects, not at import

        async with p.connecting:
            if p.remote is not None:
                return
            assert self._nursery is not None and p.address is not None
            remote = RemoteRuntime(p.address["address"], p.token())
            await remote.open(self._nursery)
            p.remote, p.connected_at = remote, time.time()
            self._live.watch_job(p)

    async def _serve(self, record: SandboxRecord, p: Placement) -> FrameChannel:
        """Start ``record``'s sandbox in its allocation: a Create on the job's server, with the job's
        identity in its environment and its pinning already honoured by the placement."""
        await self._connect(p)
        assert p.address is not None
        identity = p.address.get("identity") or {}
        spec = record.spec.with_overrides(environment_variables={**record.spec.environment_variables, **identity},
                                          runner_ids=None)
        inner = p.remote.create(spec)
        record.extra["inner"] = inner
        try:  # (its claim holds its slot meanwhile; it is a member once it runs)
            channel: FrameChannel = await p.remote.start(inner)
        except BaseException:
            record.lost = record.lost or inner.lost
            raise
        record.sandbox_id = make_sandbox_id(p.job_id, inner.sandbox_id)
        self._records[record.sandbox_id] = record
        record.channel, record.isolation = channel, inner.isolation or "slurm"
        record.started_at = time.time()
        record.status, record.status_reason = SandboxStatus.RUNNING.value, None
        self._serving(record, p)
        return channel

    def _serving(self, record: SandboxRecord, p: Placement) -> None:
        """``record`` is attached to its allocation's server: watch it, and make room for its threads."""
        record.runner_id = p.node
        record.extra["connected_at"] = time.time()
        p.members[id(record)] = record
        limiter = trio.to_thread.current_default_thread_limiter()  # each attachment holds a blocked gRPC thread
        attached = sum(len(q.members) + 1 for q in self._placements.values() if q.remote is not None and not q.ended)
        limiter.total_tokens = max(limiter.total_tokens, 40 + 2 * attached)
        self._live.watch(record, p)

    async def _squeue(self, job_ids: builtins.list[str] | None) -> builtins.list[cli.Job]:
        code, out, err = await cli.query(cli.squeue_argv(job_ids))
        if code != 0 and "Invalid job id" not in err:
            raise SandboxUnavailableError(f"squeue failed: {' '.join(err.split())}")
        return cli.parse_squeue(out)

    # -- other clients' sandboxes ------------------------------------------------------------

    async def _discover(self, jobs: builtins.list[cli.Job], *, inner_id: str | None = None,
                        tags: tuple[str, ...] = (), show_terminated: bool = False) -> None:
        """Records for the sandboxes that these sandpool jobs' servers hold (ours are known): each
        running job that reported an address is asked, through a connection of its own."""
        for job in jobs:
            p = next((q for q in self._placements.values() if q.job_id == job.job_id), None)
            if p is None:
                key = job.key or "-"
                p = self._placements[key] = Placement(key=key, job_dir=os.path.join(self.spool_dir, key), owned=False,
                                                      job_id=job.job_id)
            p.see(job)
            if p.owned or p.ended or p.lost or cli.base_state(job.state) not in cli.ACTIVE or p.read_address() is None:
                continue
            try:
                await self._connect(p)
                infos = await p.remote.find(sandbox_id=inner_id) if inner_id else \
                    await p.remote.find(tags=tags, show_terminated=show_terminated)
            except (SandpoolError, OSError):
                continue  # gone meanwhile, or not ours to read (its token)
            for inner in infos:
                sid = make_sandbox_id(p.job_id, inner.sandbox_id)
                record = self._records.get(sid)
                if record is None:
                    record = self._records[sid] = SandboxRecord(sandbox_id=sid, spec=inner.spec, isolation="slurm")
                    record.extra.update(placement=p, inner=inner)
                    record.runner_id = p.node
                if record.channel is None:
                    record.status, record.status_reason = inner.status, inner.status_reason

    # -- releasing -----------------------------------------------------------------------------

    def _left(self, record: SandboxRecord, p: Placement) -> None:
        """A sandbox is gone from its allocation (ended, stopped or lost)."""
        p.members.pop(id(record), None)
        p.leaving.discard(id(record))
        self._maybe_idle(p)

    def _maybe_idle(self, p: Placement) -> None:
        """An allocation of ours that serves and awaits no sandbox is released after the linger,
        unless a new sandbox of its spec takes it meanwhile; a lost one at once."""
        if not p.owned or p.ended or p.stopping or p.members or p.claims:
            return
        since = p.idle_since = time.monotonic()
        assert self._nursery is not None
        self._nursery.start_soon(self._linger, p, since)

    async def _linger(self, p: Placement, since: float) -> None:
        if not p.lost:
            await trio.sleep(self.linger_seconds)
        if p.idle_since == since and not (p.members or p.claims or p.ended):
            await self._release([p], wait=not p.lost)

    async def _cancel(self, placements: builtins.list[Placement]) -> None:
        ids = [p.job_id for p in placements if p.job_id and not p.gone]
        if ids:
            try:
                await cli.run(["scancel", *ids], check=False)
            except SandboxUnavailableError:
                pass  # the reaper, or each job's own orphan grace, ends them
            self._live.poke()

    async def _release(self, placements: builtins.list[Placement], *, wait: bool = True) -> None:
        """Cancel the jobs, wait (bounded) until Slurm is done with them, close their connections and
        tidy up. Shielded; asks squeue itself, as the poll task may be gone (closing)."""
        with trio.CancelScope(shield=True):
            placements = [p for p in placements if not p.ended]
            for p in placements:
                p.stopping = True
                p.wake()
            await self._cancel(placements)
            with trio.move_on_after(JOB_END_SECONDS if wait else 0):
                while busy := [p for p in placements if not p.gone and not (
                        p.job and cli.base_state(p.job.state) not in cli.WAITING | cli.ACTIVE | cli.ENDING)]:
                    try:
                        jobs = {j.job_id: j for j in await self._squeue([p.job_id for p in busy if p.job_id])}
                        for p in busy:
                            p.see(jobs.get(p.job_id or ""))
                    except SandboxUnavailableError:
                        pass
                    await trio.sleep(RELEASE_POLL_SECONDS)
            for p in placements:
                if p.remote is not None:
                    await p.remote.aclose()
                p.ended = True
                if p.owned:
                    await self._reap(f"-{p.job_id}")
                    shutil.rmtree(p.job_dir, ignore_errors=True)

    async def _submitted(self, p: Placement) -> None:
        """A job we submitted: poll Slurm for it soon, and let the reaper know it."""
        self._live.poke()
        await self._reap(f"+{p.job_id}")

    async def _reap(self, line: str) -> None:
        if self._reaper is None or self._reaper.stdin is None:
            return
        async with self._reaper_lock:
            try:
                await self._reaper.stdin.send_all(f"{line}\n".encode())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

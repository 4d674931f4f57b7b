"""SlurmRuntime: each sandbox is a Slurm job on a node Slurm chose; the client talks to it directly.

Placement is Slurm's: the spec's requests become ``sbatch`` options (``_slurm_cli.sbatch_argv``).
The job runs a one-sandbox sandpool server on its node (``_slurm_job``), which reports its address
in the job's directory under the spool (a directory the submit host and the nodes share, like a
home directory). The client then attaches to it as to any ``sandpool serve``, through a
RemoteRuntime per job: exec, files and function calls go over sandpool's own gRPC data plane, never
through ``srun``.

Liveness: a heartbeat (a control call every ``heartbeat_seconds``) marks a sandbox lost when its
server has not answered for ``lost_after_seconds``, and one ``squeue`` poll for all jobs reports
what Slurm decided (cancelled, preempted, time limit, node failure). A lost sandbox is an
infrastructure failure (functions retry their call on a fresh sandbox), its job is cancelled, and
its node is left out of new placements for a while.

Cleanup: stopping a sandbox cancels its job; closing the runtime cancels every job it submitted.
If this process dies instead, a small reaper process (it holds a pipe from us) cancels them; if the
whole submit host vanishes, each job's server stops once no client held it for the orphan grace.
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

import trio

from ..._core.channel import FrameChannel
from ..._config import SandboxSpec, SandboxStatus
from ..._errors import SandboxFailedError, SandboxNotFoundError, SandboxNotRunningError, SandboxUnavailableError
from ..._errors import SandpoolError, SandboxResourceExhaustedError
from ..._grpc import messages as m
from . import cli
from . import live as _slurm_live
from ..contract import Runtime, SandboxRecord
from ..._isolation.runners import check_pinning
from .place import SUSPECT_SECONDS, Placement, exclusions, judge_start, new_job_dir, stale_dirs

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
    """Sandboxes placed by Slurm. Options: ``partition``, ``account``, ``qos``, ``sbatch_args``
    (more sbatch options, last so they win), ``spool_dir`` (shared with the nodes; default
    ``$SANDPOOL_SLURM_SPOOL`` or ``~/.local/state/sandpool/slurm``), ``python`` (the interpreter on
    the nodes that has sandpool; default this one), ``orphan_grace_seconds`` (a job nobody holds
    ends after this), ``heartbeat_seconds``/``lost_after_seconds`` (liveness), ``poll_seconds``
    (squeue), ``agent_start_seconds`` (a running job must report its address within this) and
    ``placement_attempts`` (tries when the cluster loses a job before its sandbox started)."""

    name = "slurm"
    shared = True

    def __init__(self, partition: str | None = None, *, account: str | None = None, qos: str | None = None,
                 sbatch_args: tuple[str, ...] | list[str] = (), spool_dir: str | None = None,
                 python: str | None = None, orphan_grace_seconds: float = 30.0, heartbeat_seconds: float = 1.0,
                 lost_after_seconds: float = 3.0, poll_seconds: float = 0.5, agent_start_seconds: float = 60.0,
                 placement_attempts: int = 3) -> None:
        if isinstance(sbatch_args, str):
            raise TypeError(f"sbatch_args must be a list of strings, not a string; use {shlex.split(sbatch_args)!r}")
        for name, value in (("orphan_grace_seconds", orphan_grace_seconds), ("heartbeat_seconds", heartbeat_seconds),
                            ("lost_after_seconds", lost_after_seconds), ("poll_seconds", poll_seconds),
                            ("agent_start_seconds", agent_start_seconds)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        if isinstance(placement_attempts, bool) or not isinstance(placement_attempts, int) or placement_attempts < 1:
            raise ValueError(f"placement_attempts must be an int >= 1, got {placement_attempts!r}")
        self.partition, self.account, self.qos = partition, account, qos
        self.sbatch_args = tuple(sbatch_args)
        self.spool_dir = spool_dir or os.path.join(os.path.expanduser("~"), ".local", "state", "sandpool", "slurm")
        self.python = python or sys.executable
        self.orphan_grace_seconds, self.heartbeat_seconds = orphan_grace_seconds, heartbeat_seconds
        self.lost_after_seconds, self.poll_seconds = lost_after_seconds, poll_seconds
        self.agent_start_seconds, self.placement_attempts = agent_start_seconds, placement_attempts
        self.endpoint = f"slurm:{os.environ.get('SLURM_CONF', 'default')}:{partition or ''}"
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._records: dict[str, SandboxRecord] = {}
        self._placements: dict[str, Placement] = {}
        self._suspects: dict[str, float] = {}  # node -> until when new sandboxes avoid it
        self._nursery: trio.Nursery | None = None
        self._reaper: trio.Process | None = None
        self._reaper_lock = trio.Lock()
        self._live = _slurm_live.Liveness(self, records=self._records, placements=self._placements,
                                          suspects=self._suspects, squeue=self._squeue, cancel=self._cancel,
                                          release=self._release)
        self._closed = False

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> SlurmRuntime:
        """Options from ``SANDPOOL_SLURM_PARTITION``, ``_ACCOUNT``, ``_QOS``, ``_SPOOL``, ``_PYTHON``
        and ``_SBATCH_ARGS`` (shell words)."""
        env = os.environ if environ is None else environ
        options = {name: env[var] for name, var in ENV.items() if env.get(var)}
        return cls(sbatch_args=tuple(shlex.split(env.get(ENV_SBATCH_ARGS, ""))), **options)

    def __repr__(self) -> str:
        states = [SandboxStatus.parse(r.status).value for r in self._records.values() if r.status]
        counts = " ".join(f"{s}={states.count(s)}" for s in sorted(set(states)))
        state = "closed" if self._closed else "open" if self._nursery else "not_opened"
        counts = f" {counts}" if counts else ""
        return f"<SlurmRuntime partition={self.partition or '(default)'} {state} jobs={len(self._records)}{counts}>"

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
            live = [(self._records[sid], p) for sid, p in self._placements.items() if p.owned and not p.ended]
            async with trio.open_nursery() as nursery:  # connected ones stop politely, at once
                for record, p in live:
                    if p.inner is not None and not p.inner.exited.is_set() and not record.lost:
                        nursery.start_soon(p.remote.stop, p.inner, 0.0)
            await self._release([p for _, p in live])  # one scancel for all, then one wait
            for record, _ in live:
                record.exited.set()
            for p in self._placements.values():
                if p.remote is not None:
                    await p.remote.aclose()
            if self._reaper is not None:
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
        for _ in range(self.placement_attempts):
            p = await self._submit(record)
            try:
                verdict, reason = await self._wait_placed(record, p)
                if verdict == "placed":
                    return await self._connect(record, p)
            except BaseException:
                await self._release([p])
                raise
            await self._release([p], wait=p.node not in exclusions(self._suspects, time.monotonic()))
            if verdict in ("fail", "never"):
                record.status, record.status_reason = SandboxStatus.FAILED.value, reason
                if verdict == "never":
                    raise SandboxResourceExhaustedError(reason, sandbox_id=record.sandbox_id, reason="Unschedulable")
                raise SandboxFailedError(reason, sandbox_id=record.sandbox_id, status_reason=reason)
            if p.node:
                self._suspects[p.node] = time.monotonic() + SUSPECT_SECONDS
        raise SandboxUnavailableError(f"Slurm lost the sandbox's job {self.placement_attempts} times before it "
                                      f"started; last: {reason}", sandbox_id=record.sandbox_id)

    def abandon_start(self, record: SandboxRecord) -> None:
        record.extra["abandoned"] = True
        p = record.extra.get("placement")
        if p is not None:
            p.wake()

    async def stop(self, record: SandboxRecord, grace_seconds: float) -> None:
        with trio.CancelScope(shield=True):
            p: Placement | None = record.extra.get("placement")
            if p is not None:
                p.stopping = True
                inner = p.inner
                if inner is not None and not inner.exited.is_set() and not record.lost:
                    with trio.move_on_after(grace_seconds + STOP_SLACK_SECONDS):
                        await p.remote.stop(inner, grace_seconds)
                await self._release([p], wait=not record.lost)  # a lost node's job: Slurm ends it
            record.exited.set()

    def list(self) -> list[SandboxRecord]:
        return list(self._records.values())

    async def find(self, *, sandbox_id: str | None = None, tags: tuple[str, ...] = (), status: str | None = None,
                   show_terminated: bool = False) -> builtins.list[SandboxRecord]:
        if sandbox_id is not None:
            job_id = sandbox_id.removeprefix("slurm-")
            if not job_id.isdigit():
                raise SandboxNotFoundError(f"no sandbox {sandbox_id!r}: Slurm sandboxes are named slurm-<job id>",
                                           sandbox_id=sandbox_id)
            jobs = [j for j in await self._squeue([job_id]) if j.key]
            if not jobs and sandbox_id not in self._records:
                raise SandboxNotFoundError(f"no sandbox {sandbox_id!r}: Slurm has no sandpool job {job_id}",
                                           sandbox_id=sandbox_id)
        else:
            jobs = [j for j in await self._squeue(None) if j.key]
        for job in jobs:
            self._adopt_job(job)
        wanted = SandboxStatus.parse(status) if status is not None else None
        show_terminated = show_terminated or bool(wanted and wanted.is_terminal)
        found = []
        for record in self._records.values():
            if sandbox_id is not None:
                if record.sandbox_id == sandbox_id:
                    found.append(record)
                continue
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
        verdict, reason = await self._wait_placed(record, p)
        if verdict != "placed":
            raise SandboxNotRunningError(f"sandbox {sandbox_id} is not running: {reason}", sandbox_id=sandbox_id)
        return await self._connect(record, p)

    async def main_log_lines(self, record: SandboxRecord, *, follow: bool, tail_lines: int | None,
                             since: float | None, timestamps: bool) -> AsyncIterator[str]:
        """The main command's log, streamed by the job's server (its ``Logs`` call, resumed after a
        broken stream as from any sandpool server). The server goes with the job: once the job has
        ended, its log is gone (SandboxNotRunningError), as is a follow stream cut by Slurm."""
        p: Placement | None = record.extra.get("placement")
        if p is None or p.remote is None or p.inner is None or p.ended:
            raise SandboxNotRunningError(f"sandbox {record.sandbox_id} has no log to stream: its Slurm job "
                                         f"{'has ended' if p is not None and p.ended else 'is not connected'}",
                                         sandbox_id=record.sandbox_id)
        async for line in p.remote.main_log_lines(p.inner, follow=follow, tail_lines=tail_lines, since=since,
                                                  timestamps=timestamps):
            yield line

    def job(self, sandbox: object) -> dict:
        """Where Slurm put a sandbox (a Sandbox of this runtime, or its record): ``{"job_id", "node",
        "state", "reason", "times"}`` as last seen ({} before it was submitted). ``times`` are Unix
        times: ``submitted`` (sbatch), ``launched`` (the job's process started on its node),
        ``ready`` (its server served the sandbox), ``connected`` (this client attached)."""
        record = getattr(sandbox, "_record", sandbox)
        p: Placement | None = record.extra.get("placement") if record is not None else None
        return p.summary() if p is not None else {}

    # -- placing -------------------------------------------------------------------------------

    async def _submit(self, record: SandboxRecord) -> Placement:
        """Write the job's directory and ``sbatch`` it (shielded: a job we submit, we know)."""
        unpinned = await self._unpinned_nodes(record.spec.runner_ids)
        key, job_dir = new_job_dir(self.spool_dir, {
            "spec": m.spec_to_dict(record.spec), "orphan_grace_seconds": self.orphan_grace_seconds,
            "sys_path": [p for p in sys.path if p]})  # so functions pickled by reference import there
        command = [self.python, "-m", "sandpool._service.slurmjob", job_dir]
        options = dict(key=key, owner=self.owner, job_dir=job_dir, command=command, partition=self.partition,
                       account=self.account, qos=self.qos, extra=self.sbatch_args)
        avoid = tuple(sorted({*exclusions(self._suspects, time.monotonic()), *unpinned}))
        submitted_at = time.time()
        with trio.CancelScope(shield=True):
            try:
                try:
                    out = await cli.run(cli.sbatch_argv(record.spec, exclude=avoid, **options))
                except SandboxResourceExhaustedError:
                    if avoid == unpinned:
                        raise
                    # only the avoided nodes fit
                    out = await cli.run(cli.sbatch_argv(record.spec, exclude=unpinned, **options))
            except SandpoolError as exc:
                shutil.rmtree(job_dir, ignore_errors=True)
                exc.sandbox_id = record.sandbox_id or None
                raise
            p = Placement(key=key, job_dir=job_dir, owned=True, job_id=out.strip().split(";")[0],
                          submitted_at=submitted_at)
            self._register(record, p)
            await self._reap(f"+{p.job_id}")
        return p

    async def _unpinned_nodes(self, runner_ids: tuple[str, ...] | None) -> tuple[str, ...]:
        """The partition's nodes that ``runner_ids`` (node names: a Slurm runtime's runners) leave
        out, for ``--exclude`` (Slurm's ``--nodelist`` would ask for all of them at once); () when
        nothing is pinned. RunnerNotFoundError for a name that is not a node of the partition."""
        if not runner_ids:
            return ()
        nodes = await self._nodes()
        check_pinning(runner_ids, nodes, f"in the Slurm partition {self.partition or '(default)'}")
        return tuple(sorted(set(nodes) - set(runner_ids)))

    async def _nodes(self) -> list[str]:
        """The nodes of the runtime's partition (``sinfo``)."""
        code, out, err = await cli.query(cli.sinfo_nodes_argv(self.partition))
        if code != 0:
            raise SandboxUnavailableError(f"sinfo failed: {' '.join(err.split())}")
        return sorted(set(out.split()))

    def _register(self, record: SandboxRecord, p: Placement) -> None:
        record.sandbox_id = p.sandbox_id
        record.extra["placement"] = p
        record.status, record.status_reason = SandboxStatus.PENDING.value, f"slurm job {p.job_id}: submitted"
        self._records[p.sandbox_id] = record
        self._placements[p.sandbox_id] = p
        self._live.poke()

    def _adopt_job(self, job: cli.Job) -> None:
        """A record for a sandpool job found in the queue (or the one already held), updated."""
        sandbox_id = f"slurm-{job.job_id}"
        record = self._records.get(sandbox_id)
        if record is None:
            record = SandboxRecord(sandbox_id="", spec=SandboxSpec(tags=job.tags), isolation="slurm")
            p = Placement(key=job.key or "", job_dir=os.path.join(self.spool_dir, job.key or "-"), owned=False,
                          job_id=job.job_id)
            self._register(record, p)
        p = record.extra["placement"]
        p.see(job)
        if record.channel is None and not p.ended and not record.lost:
            record.status = cli.sandbox_status(job.state, p.read_address() is not None).value
            record.status_reason = cli.describe(job)

    async def _wait_placed(self, record: SandboxRecord, p: Placement) -> tuple[str, str]:
        """Wait until the job's server reports its address, or the job is lost or failed."""
        while True:
            if record.extra.get("abandoned") or self._closed:
                return "fail", "stopped while it waited for Slurm to place it"
            now = time.monotonic()
            verdict, reason = judge_start(p, now, self.agent_start_seconds, exclusions(self._suspects, now))
            if p.job is not None:
                waiting = cli.base_state(p.job.state) in cli.WAITING
                record.status = (SandboxStatus.PENDING if waiting else SandboxStatus.CREATING).value
                record.status_reason = cli.describe(p.job)
            if verdict != "wait":
                return verdict, reason
            with trio.move_on_after(ADDRESS_POLL_SECONDS):
                await p.changed.wait()

    async def _connect(self, record: SandboxRecord, p: Placement) -> FrameChannel:
        """Attach to the job's server, like any sandpool server; start its heartbeat and end watch."""
        from ..remote import RemoteRuntime  # gRPC loads when the first sandbox connects, not at import

        token = p.token()
        assert self._nursery is not None and p.address is not None
        remote = RemoteRuntime(p.address["address"], token)
        await remote.open(self._nursery)
        p.remote = remote
        inner_id = p.address["sandbox_id"]
        p.inner = (await remote.find(sandbox_id=inner_id))[0]
        channel = await remote.attach(inner_id)
        limiter = trio.to_thread.current_default_thread_limiter()  # each job holds two blocked gRPC threads
        connected = sum(q.remote is not None and not q.ended for q in self._placements.values())
        limiter.total_tokens = max(limiter.total_tokens, 40 + 2 * connected)
        record.channel, record.isolation = channel, p.inner.isolation or "slurm"
        record.started_at = p.connected_at = time.time()
        record.status, record.status_reason = SandboxStatus.RUNNING.value, None
        record.extra["node"] = p.node
        self._live.watch(record, p)
        return channel

    async def _squeue(self, job_ids: builtins.list[str] | None) -> builtins.list[cli.Job]:
        code, out, err = await cli.query(cli.squeue_argv(job_ids))
        if code != 0 and "Invalid job id" not in err:
            raise SandboxUnavailableError(f"squeue failed: {' '.join(err.split())}")
        return cli.parse_squeue(out)

    # -- releasing -----------------------------------------------------------------------------

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
            for p in placements:
                p.stopping = True
            await self._cancel(placements)
            with trio.move_on_after(JOB_END_SECONDS if wait else 0):
                while busy := [p for p in placements if not p.gone and not (
                        p.job and cli.base_state(p.job.state) not in cli.WAITING | cli.ACTIVE | cli.ENDING)]:
                    try:
                        jobs = {j.job_id: j for j in await self._squeue([p.job_id for p in busy])}
                        for p in busy:
                            p.see(jobs.get(p.job_id))
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

    async def _reap(self, line: str) -> None:
        if self._reaper is None:
            return
        async with self._reaper_lock:
            try:
                await self._reaper.stdin.send_all(f"{line}\n".encode())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

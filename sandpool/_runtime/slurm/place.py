"""One Slurm allocation as plain data, and the decisions about it (no I/O here).

A placement is an allocation's job: its key (which names its directory in the spool, shared with
the node), the job id Slurm gave it, what ``squeue`` last said, the address its server reported,
how many sandboxes of its spec it holds room for (``slots``), the sandboxes it serves
(``members``) and the starts waiting for a slot in it (``claims``). The runtime does the I/O;
these functions say what it means.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from . import cli

if TYPE_CHECKING:
    from ..._config import SandboxSpec
    from ..contract import SandboxRecord

#: How long a node we saw die is left out of new placements (Slurm needs SlurmdTimeout to notice).
SUSPECT_SECONDS = 60.0
#: A job directory this old whose job Slurm no longer lists is a dead client's: removed at open.
STALE_SECONDS = 600.0


@dataclass(eq=False)
class Placement:
    """An allocation's Slurm job. ``job`` is the latest ``squeue`` line (None until seen, or once gone)."""

    key: str
    job_dir: str
    owned: bool  # submitted by this runtime (it removes the directory and reaps the job)
    job_id: str | None = None
    job: cli.Job | None = None
    gone: bool = False  # Slurm no longer knows the job
    running_since: float | None = None
    address: dict[str, Any] | None = None
    submitted_at: float | None = None  # Unix times, for ``SlurmRuntime.job``
    connected_at: float | None = None
    stopping: bool = False  # this runtime is releasing the allocation
    ended: bool = False
    lost: str | None = None  # why the allocation was lost (its node or job gone), once it was
    remote: Any = None  # the RemoteRuntime speaking to the job's server, once connected
    shape: SandboxSpec | None = None  # the spec of the sandboxes it holds (None: another client's job)
    slots: int = 1
    members: dict[int, SandboxRecord] = field(default_factory=dict)  # the sandboxes it serves, by id()
    leaving: set[int] = field(default_factory=set)  # members being stopped: their slots are free again
    claims: int = 0  # starts waiting for one of its slots
    idle_since: float | None = None
    connecting: trio.Lock = field(default_factory=trio.Lock)
    changed: trio.Event = field(default_factory=trio.Event)

    @property
    def free(self) -> int:
        """Slots that no sandbox serves (but for those being stopped) or waits for."""
        return self.slots - len(self.members.keys() - self.leaving) - self.claims

    @property
    def usable(self) -> bool:
        """Whether new sandboxes may still go here (it is ours, and neither released nor lost)."""
        return self.owned and not (self.stopping or self.ended or self.gone or self.lost)

    @property
    def node(self) -> str | None:
        if self.address and self.address.get("node"):
            return str(self.address["node"])
        return self.job.nodes if self.job and self.job.nodes not in ("", "(null)") else None

    def summary(self) -> dict[str, Any]:
        """What ``SlurmRuntime.job`` reports (see there)."""
        address = self.address or {}
        times = {"submitted": self.submitted_at, "launched": address.get("launched_at"),
                 "ready": address.get("ready_at"), "connected": self.connected_at}
        return {"job_id": self.job_id, "node": self.node, "state": cli.base_state(self.job.state) if self.job else None,
                "reason": self.job.reason if self.job else None, "times": times}

    def see(self, job: cli.Job | None) -> None:
        """Record what squeue says (None: the job is not listed) and wake whoever waits on it."""
        if job is None:
            self.gone = True
        else:
            self.job = job
            if cli.base_state(job.state) in cli.ACTIVE and self.running_since is None:
                self.running_since = time.monotonic()
        self.wake()

    def wake(self) -> None:
        """Wake the tasks waiting for news of this job."""
        self.changed.set()
        self.changed = trio.Event()

    def read_address(self) -> dict[str, Any] | None:
        """``address.json`` of the job, once its server wrote it (atomically)."""
        if self.address is None:
            try:
                with open(os.path.join(self.job_dir, "address.json")) as f:
                    self.address = json.load(f)
            except (OSError, ValueError):
                return None
        return self.address

    def token(self) -> str:
        with open(os.path.join(self.job_dir, "token")) as f:
            return f.read().strip()

    def log_tail(self, lines: int = 6) -> str:
        """The end of the job's output (why a job died before it reported an address)."""
        try:
            with open(os.path.join(self.job_dir, "job.log"), errors="replace") as f:
                text = f.read()[-4000:]
        except OSError:
            return ""
        return " | ".join(line for line in text.splitlines()[-lines:] if line.strip())


def judge_start(p: Placement, now: float, agent_seconds: float, dead_nodes: tuple[str, ...] = ()) -> tuple[str, str]:
    """Where a starting placement stands: ``("placed"|"wait"|"retry"|"fail"|"never", reason)``.

    placed: the job's server reported its address. fail: the sandbox cannot start (its server
    reported an error, or the job failed on its own). never: Slurm keeps the job queued for a reason
    that waiting does not clear (it asks more than the partition allows). retry: the cluster lost
    the job before it reported (node failure, launch failure, preemption, or a server that never
    answered within ``agent_seconds`` of the job running, or a job running on one of ``dead_nodes``,
    nodes whose sandboxes just went silent: Slurm may take a minute to notice, the job will never
    report); a fresh job may succeed elsewhere. wait: otherwise.
    """
    if p.lost:
        return "retry", p.lost
    address = p.read_address()
    if address is not None:
        if "error" in address:
            return "fail", f"the sandbox could not start on node {address.get('node')}: {address['error']}"
        return "placed", ""
    if p.gone:
        return "retry", f"slurm job {p.job_id} vanished from the queue before its sandbox started"
    if p.job is None:
        return "wait", ""
    state = cli.base_state(p.job.state)
    if state in cli.WAITING:
        if p.job.reason in NEVER_RUNS:
            return "never", (f"Slurm cannot place this sandbox: {cli.describe(p.job)} will never run as asked; "
                             f"lower its resources (cpu, memory, gpu, time) or choose another partition")
        return "wait", ""
    if state in cli.ACTIVE:
        if p.node in dead_nodes:
            return "retry", f"{cli.describe(p.job)}, but node {p.node} stopped answering before its sandbox started"
        if p.running_since is not None and now - p.running_since > agent_seconds:
            return "retry", f"{cli.describe(p.job)}, but its sandpool server did not report within {agent_seconds:g} s"
        return "wait", ""
    if state in cli.ENDING or state in cli.INFRASTRUCTURE:
        return "retry", f"{cli.describe(p.job)} before its sandbox started"
    tail = p.log_tail()
    return "fail", f"{cli.describe(p.job)} before its sandbox started" + (f"; job output: {tail}" if tail else "")


#: Pending reasons that never clear by waiting (the request exceeds a limit or matches no node).
NEVER_RUNS = frozenset({"BadConstraints", "PartitionNodeLimit", "PartitionTimeLimit", "PartitionConfig",
                        "InvalidAccount", "InvalidQOS", "QOSMaxCpuPerJobLimit", "QOSMaxGRESPerJob",
                        "QOSMaxMemoryPerJob", "AccountNotAllowed", "QOSNotAllowed", "PartitionDown",
                        "Nodes_required_for_job_are_DOWN,_DRAINED_or_reserved_for_jobs_in_higher_priority_partitions"})


def new_job_dir(spool_dir: str, job: dict[str, Any]) -> tuple[str, str]:
    """A fresh job directory in the spool (mode 0700) with a new per-job ``token`` (0600) and
    ``job.json``; its ``(key, path)``."""
    key = secrets.token_hex(6)
    job_dir = os.path.join(spool_dir, key)
    os.mkdir(job_dir, 0o700)
    fd = os.open(os.path.join(job_dir, "token"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32))
    with open(os.path.join(job_dir, "job.json"), "w") as f:
        json.dump(job, f)
    return key, job_dir


def stale_dirs(spool_dir: str, live_keys: set[str], now: float, min_age: float = STALE_SECONDS) -> list[str]:
    """Job directories in the spool that no queued job uses and nobody touched for ``min_age`` s
    (their client died before it could remove them)."""
    stale = []
    for name in os.listdir(spool_dir) if os.path.isdir(spool_dir) else ():
        path = os.path.join(spool_dir, name)
        try:
            old = now - os.stat(path).st_mtime >= min_age
        except OSError:
            continue
        if old and name not in live_keys and os.path.isfile(os.path.join(path, "job.json")):
            stale.append(path)
    return stale


def exclusions(suspects: dict[str, float], now: float) -> tuple[str, ...]:
    """Nodes to keep new sandboxes off: those seen dying less than SUSPECT_SECONDS ago."""
    return tuple(sorted(n for n, until in suspects.items() if until > now))


def ended_by_slurm(p: Placement) -> str:
    """Why a connected sandbox whose job Slurm ended (or forgot) is lost."""
    state = cli.base_state(p.job.state) if p.job is not None else "no longer in the queue"
    shown = "" if state in cli.ACTIVE | cli.WAITING else f" ({state})"  # those are stale news here
    return (f"slurm job {p.job_id} on node {p.node} was ended by Slurm{shown}: scancel, a time limit, "
            f"preemption or a node failure")


def end_reason(p: Placement, server_shut_down: bool, inner_lost: str | None) -> str | None:
    """Why a connected sandbox was lost (an infrastructure failure), or None if it ended by itself.

    Lost: the connection to its server broke, or Slurm ended the job (scancel by someone else, time
    limit, preemption, node failure: the server then shuts down and says so).
    """
    where = f"slurm job {p.job_id} on node {p.node}"
    if p.job is not None and cli.base_state(p.job.state) in cli.INFRASTRUCTURE - {"CANCELLED"}:
        return ended_by_slurm(p)
    if inner_lost:
        return f"{where} became unreachable: {inner_lost}"
    if server_shut_down:
        return ended_by_slurm(p)
    return None


def sandbox_id(job_id: str | None, inner_id: str) -> str:
    """A Slurm sandbox's id: ``slurm-<job id>-<its id on the job's server, without "sb-">``."""
    return f"slurm-{job_id}-{inner_id.removeprefix('sb-')}"


def parse_sandbox_id(sandbox_id: str) -> tuple[str, str] | None:
    """``(job id, id on the job's server)`` of a Slurm sandbox id; None if it is not one."""
    job_id, _, inner = sandbox_id.removeprefix("slurm-").partition("-")
    if not (sandbox_id.startswith("slurm-") and job_id.isdigit() and inner):
        return None
    return job_id, f"sb-{inner}"


def slots_fit(node: cli.Node, size: tuple[float, int | None, int]) -> int:
    """How many sandboxes of ``size`` (``cli.slot_size``) one allocation on ``node`` can hold."""
    cpus, memory, gpus = size
    fits = [int(node.cpus // cpus) if cpus > 0 else node.cpus]
    if memory:
        fits.append(int(node.memory_mib * 2**20 // memory))
    if gpus:
        fits.append(node.gpus // gpus)
    return max(0, min(fits))


def job_sizes(wanted: int, held: int, fit: int, floor: int = 1) -> list[int]:
    """The slot counts of the new jobs for ``wanted`` more sandboxes of a spec that already holds
    ``held`` slots, where one job holds at most ``fit``: demand first, and a spec that keeps asking
    for more grows geometrically (a lone extra sandbox gets a job as large as what it holds, up to
    a node), at least ``floor`` slots a job."""
    fit = max(1, fit)
    total = max(wanted, min(fit, max(held, floor))) if wanted < fit else wanted
    sizes = [fit] * (total // fit) + ([total % fit] if total % fit else [])
    return sizes

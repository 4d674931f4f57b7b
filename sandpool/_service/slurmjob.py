"""The job side of a Slurm allocation: ``python -m sandpool._service.slurmjob JOB_DIR``.

Slurm runs this as the job's batch step on the node it chose. It is a small ``sandpool serve``
for one client: it reads the per-job token the client left in ``JOB_DIR`` (a directory both sides
see), serves gRPC on the node's address, which it reports by writing ``JOB_DIR/address.json``,
and hosts the sandboxes the client creates in it, each with the node's own LocalRuntime (so the
node's isolation level and cgroups apply). One job holds several sandboxes of one spec (a pool's):
the client starts them over sandpool's data plane as they are wanted, never through ``srun``.

Admission on the node is the allocation: the node-local ledger holds exactly the cpus, memory and
gpus Slurm gave the job (``SLURM_CPUS_ON_NODE``, ``SLURM_MEM_PER_NODE``, ``CUDA_VISIBLE_DEVICES``),
so a gpu sandbox sees the devices Slurm assigned. Each sandbox's environment carries the job's
``SLURM_*`` identity (``SLURMD_NODENAME``, ``SLURM_JOB_ID`` ...): the address file lists them and
the client adds them to each spec.

The job ends on SIGTERM (the client releases the allocation with ``scancel``; a time limit,
preemption: every sandbox is stopped first), or when no client has held a lease on it for the
orphan grace period (the client died or lost the node): then the node's resources go back to Slurm.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from .._isolation import admission

log = logging.getLogger("sandpool.slurm-job")

#: Variables of the job that the sandbox sees: who and where it is.
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURMD_NODENAME", "SLURM_JOB_NODELIST", "SLURM_JOB_PARTITION",
                   "SLURM_CLUSTER_NAME", "SLURM_CPUS_ON_NODE", "SLURM_MEM_PER_NODE", "SLURM_JOB_GPUS",
                   "SLURM_GPUS_ON_NODE", "SLURM_JOB_ACCOUNT")
ENV_BIND = "SANDPOOL_SLURM_BIND"


def allocation(env: dict[str, str], machine: admission.Capacity) -> admission.Capacity:
    """What Slurm gave this job on this node, as the node-local admission capacity."""
    cpus = float(env.get("SLURM_CPUS_ON_NODE") or machine.cpu)
    if env.get("SLURM_MEM_PER_NODE"):
        memory = int(env["SLURM_MEM_PER_NODE"]) * 2**20
    elif env.get("SLURM_MEM_PER_CPU"):
        memory = int(env["SLURM_MEM_PER_CPU"]) * 2**20 * int(cpus)
    else:
        memory = machine.memory
    gpus: tuple[int, ...] = ()
    if env.get("SLURM_JOB_GPUS") or env.get("SLURM_GPUS_ON_NODE"):  # else CUDA_VISIBLE_DEVICES is the submitter's
        gpus = tuple(int(i) for i in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if i.strip().isdigit())
    return admission.Capacity(cpu=cpus, memory=memory, gpus=gpus)


def job_identity(env: dict[str, str]) -> dict[str, str]:
    """The job's ``SLURM_*`` variables that its sandboxes see (who and where they are)."""
    return {k: env[k] for k in SLURM_VARIABLES if env.get(k)}


def node_address(env: dict[str, str]) -> str:
    """Where clients reach this node: ``$SANDPOOL_SLURM_BIND``, else Slurm's NodeAddr for the node."""
    if env.get(ENV_BIND):
        return env[ENV_BIND]
    node = env.get("SLURMD_NODENAME", "")
    try:
        out = subprocess.run(["scontrol", "show", "node", node, "--oneliner"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for field in out.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return os.uname().nodename


def launched_at() -> float | None:
    """When this process started (the job's batch step, which exec'd this), as a Unix time."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])  # since boot, in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def _write_json(path: str, data: dict[str, Any]) -> None:
    """Write atomically: the client never reads half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


async def run_job(job_dir: str, env: dict[str, str]) -> int:
    """Serve the allocation's sandboxes until Slurm ends the job or no client holds it; exit status 0."""
    import trio  # here, not at import: GRPC_VERBOSITY must be set before gRPC loads (see main)

    from .._isolation import host
    from .journal import Journal
    from .listener import Listening
    from .server import ServeConfig, open_server

    with open(os.path.join(job_dir, "token")) as f:
        token = f.read().strip()
    with open(os.path.join(job_dir, "job.json")) as f:
        job = json.load(f)
    # the client's import path, where it exists here (a shared file system): the sandboxes' template
    # inherits it, so functions pickled by reference to the client's modules unpickle on the node
    sys.path += [p for p in job.get("sys_path", ()) if p not in sys.path and os.path.isdir(p)]
    # the node-local admission ledger holds what Slurm allocated, no more
    host.use_ledger(admission.Ledger(allocation(env, admission.machine_capacity())))
    grace = float(job.get("orphan_grace_seconds", 30.0))
    config = ServeConfig(listen=f"{node_address(env)}:0", token=token, orphan_grace_seconds=grace,
                         record_file=os.path.join(job_dir, "journal.jsonl"))
    journal = Journal(config.record_file)
    journal.open()
    async with open_server(config, Listening(config, publish=False), journal, policy=None,
                           fast_plane=False) as server:
        _write_json(os.path.join(job_dir, "address.json"), {
            "address": server.bound, "node": env.get("SLURMD_NODENAME"), "job_id": env.get("SLURM_JOB_ID"),
            "pid": os.getpid(), "launched_at": launched_at(), "ready_at": time.time(),
            "identity": job_identity(env)})
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as waiting:
                async def on_signal() -> None:
                    async for signum in signals:
                        log.info("%s: stopping the sandboxes", signal.Signals(signum).name)
                        waiting.cancel_scope.cancel()

                waiting.start_soon(on_signal)
                await _until_orphaned(server.fleet.leases, grace)
                log.info("no client held this job for %g s: ending it", grace)
                waiting.cancel_scope.cancel()
    return 0


async def _until_orphaned(leases: dict[str, str], grace: float, beat: float = 0.5) -> None:
    """Return once ``leases`` (the server's live client leases) has been empty for ``grace`` seconds."""
    import trio

    empty_since: float | None = time.monotonic()  # the client connects right after the address appears
    while True:
        now = time.monotonic()
        if leases:
            empty_since = None
        elif empty_since is None:
            empty_since = now
        elif now - empty_since >= grace:
            return
        await trio.sleep(min(beat, grace))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m sandpool._service.slurmjob JOB_DIR", file=sys.stderr)
        return 2
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before gRPC loads: its info logs are noise here
    logging.basicConfig(level=logging.INFO, format="sandpool slurm job: %(message)s", stream=sys.stderr)
    import trio

    status = trio.run(run_job, argv[0], dict(os.environ))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # gRPC's pool threads are not daemons; one still blocked must not keep the job alive


if __name__ == "__main__":
    main(sys.argv[1:])

"""The job side of a Slurm-placed sandbox: ``python -m sandpool._service.slurmjob JOB_DIR``.

Slurm runs this as the job's batch step on the node it chose. It is a one-sandbox ``sandpool
serve``: it reads the spec and the per-job token the client left in ``JOB_DIR`` (a directory both
sides see), starts the sandbox with the node's own LocalRuntime (so the node's isolation level and
cgroups apply) and serves it over gRPC on the node's address, which it reports by writing
``JOB_DIR/address.json``. The client then speaks sandpool's data plane to it directly.

Admission on the node is the allocation: the node-local ledger holds exactly the cpus, memory and
gpus Slurm gave the job (``SLURM_CPUS_ON_NODE``, ``SLURM_MEM_PER_NODE``, ``CUDA_VISIBLE_DEVICES``),
so a gpu sandbox sees the devices Slurm assigned. The sandbox's environment carries the job's
``SLURM_*`` identity (``SLURMD_NODENAME``, ``SLURM_JOB_ID`` ...).

The job ends when the sandbox ends (stopped, completed, died), on SIGTERM (``scancel``, a time
limit, preemption: the sandbox is stopped first), or when no client has been attached to it for the
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

from .._config import SandboxSpec, SandboxStatus
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


def sandbox_spec(spec: SandboxSpec, env: dict[str, str]) -> SandboxSpec:
    """The spec with the job's identity added to its environment (Slurm's values win), unpinned:
    its ``runner_ids`` named Slurm nodes, and Slurm placed it on one of them."""
    slurm = {k: env[k] for k in SLURM_VARIABLES if env.get(k)}
    return spec.with_overrides(environment_variables={**spec.environment_variables, **slurm}, runner_ids=None)


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
    """Serve the job's one sandbox until it ends; the job's exit status (1 if it failed)."""
    import trio  # here, not at import: GRPC_VERBOSITY must be set before gRPC loads (see main)

    from .._isolation import host
    from .._grpc import messages as m
    from .journal import Journal
    from .listener import Listening
    from .server import ServeConfig, open_server

    with open(os.path.join(job_dir, "token")) as f:
        token = f.read().strip()
    with open(os.path.join(job_dir, "job.json")) as f:
        job = json.load(f)
    spec = sandbox_spec(m.spec_from_dict(job["spec"]), env)
    # the client's import path, where it exists here (a shared file system): the sandbox's template
    # inherits it, so functions pickled by reference to the client's modules unpickle on the node
    sys.path += [p for p in job.get("sys_path", ()) if p not in sys.path and os.path.isdir(p)]
    # the node-local admission ledger holds what Slurm allocated, no more
    host.use_ledger(admission.Ledger(allocation(env, admission.machine_capacity())))
    address_file = os.path.join(job_dir, "address.json")
    config = ServeConfig(listen=f"{node_address(env)}:0", token=token,
                         orphan_grace_seconds=float(job.get("orphan_grace_seconds", 30.0)),
                         record_file=os.path.join(job_dir, "journal.jsonl"))
    journal = Journal(config.record_file)
    journal.open()
    status = 0
    async with open_server(config, Listening(config, publish=False), journal, policy=None,
                           fast_plane=False) as server:
        fleet = server.fleet
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            try:
                info = await fleet.rpc_create({"spec": m.spec_to_dict(spec)}, "slurm")
            except Exception as exc:  # the client reads why, and fails the start with it
                _write_json(address_file, {"error": f"{type(exc).__name__}: {exc}", "node": env.get(
                    "SLURMD_NODENAME")})
                return 1
            _write_json(address_file, {"address": server.bound, "sandbox_id": info["sandbox_id"],
                                       "node": env.get("SLURMD_NODENAME"), "job_id": env.get("SLURM_JOB_ID"),
                                       "pid": os.getpid(), "launched_at": launched_at(),
                                       "ready_at": time.time()})
            hosted = fleet.sandboxes[info["sandbox_id"]]
            async with trio.open_nursery() as waiting:
                async def on_signal() -> None:
                    async for signum in signals:
                        log.info("%s: stopping the sandbox", signal.Signals(signum).name)
                        waiting.cancel_scope.cancel()

                waiting.start_soon(on_signal)
                await hosted.ended.wait()
                waiting.cancel_scope.cancel()
            status = 1 if hosted.state.status == SandboxStatus.FAILED else 0
    return status


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

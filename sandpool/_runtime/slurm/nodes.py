"""A Slurm partition's nodes as cwsandbox runners: each node is one runner, named as Slurm names it.

``sandpool.list_runners()`` and ``get_runner()`` list these when ``SANDPOOL_RUNTIME=slurm`` (the
partition of ``SANDPOOL_SLURM_PARTITION``, else every partition); ``runner_ids`` pins a sandbox to
these names, and ``Session.list(runner_ids=...)`` finds the sandboxes on them.
"""

from __future__ import annotations

import os
import platform
import subprocess

from ..._cwextra import Runner, RunnerResources
from ..._errors import SandboxUnavailableError
from ..._isolation.runners import register_source
from . import cli

#: Node states in which Slurm starts jobs (``sinfo``'s long form, without its flag characters).
HEALTHY = frozenset({"idle", "mixed", "allocated", "completing", "planned"})
ENV_PARTITION = "SANDPOOL_SLURM_PARTITION"


def node_runner(node: cli.Node, partition: str | None, include_resources: bool) -> Runner:
    """One node as a runner: its cpus, memory and gpus, healthy while Slurm schedules on it, and
    (``include_resources``) what its jobs leave of them."""
    resources = None
    if include_resources:
        resources = RunnerResources(
            available_cpu_millicores=max(0, (node.cpus - node.cpus_used) * 1000),
            available_memory_bytes=max(0, (node.memory_mib - node.memory_used_mib) * 2**20),
            available_gpu_count=max(0, node.gpus - node.gpus_used),
            running_sandboxes=0)  # Slurm knows jobs, not the sandboxes in them
    return Runner(runner_id=node.name, organization_id="", runner_group_id=partition or "slurm",
                  tags=("slurm", node.state), healthy=node.state in HEALTHY, is_shared=True, connected_at=None,
                  max_cpu_millicores=node.cpus * 1000, max_memory_bytes=node.memory_mib * 2**20,
                  max_gpu_count=node.gpus, supported_gpu_types=("gpu",) if node.gpus else (),
                  supported_architectures=(platform.machine(),), supports_privileged=False,
                  available_storage_classes=(), supported_service_visibilities=(), resources=resources)


def list_nodes(partition: str | None, *, timeout: float = 30.0) -> list[cli.Node]:
    """The partition's nodes, asked of ``sinfo`` now (SandboxUnavailableError if it cannot answer)."""
    try:
        done = subprocess.run(cli.sinfo_argv(partition), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SandboxUnavailableError(f"cannot list the Slurm nodes: sinfo: {exc}") from exc
    if done.returncode != 0:
        raise SandboxUnavailableError(f"cannot list the Slurm nodes: sinfo failed: {' '.join(done.stderr.split())}")
    return cli.parse_sinfo(done.stdout)


def node_runners(include_resources: bool) -> list[Runner]:
    """The runners of the process's Slurm runtime (``SANDPOOL_SLURM_PARTITION``'s nodes)."""
    partition = os.environ.get(ENV_PARTITION) or None
    return [node_runner(n, partition, include_resources) for n in list_nodes(partition)]


register_source("slurm", node_runners)

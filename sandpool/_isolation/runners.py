"""cwsandbox's discovery: ``list_runners`` and ``get_runner``.

Locally, this machine is the one runner ``"local"``, with its capacity and (on request) what the
process's admission ledger has left of it. Where ``$SANDPOOL_RUNTIME`` names another runtime that
registered its runners here (Slurm: one runner per node), those are listed instead; the filters
are the same for every source.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable
from typing import Any

from .._cwextra import LOCAL_RUNNER_ID, Runner, RunnerResources
from .._errors_cw import RunnerNotFoundError
from . import probe
from .host import ledger


_STARTED = time.time()
#: Names the process's runtime by (``$SANDPOOL_RUNTIME``, as the session reads it).
ENV_RUNTIME = "SANDPOOL_RUNTIME"
#: Runner sources of other runtimes, by runtime name: ``source(include_resources)`` lists them.
_SOURCES: dict[str, Callable[[bool], list[Runner]]] = {}


def register_source(runtime: str, source: Callable[[bool], list[Runner]]) -> None:
    """Let ``list_runners``/``get_runner`` describe ``runtime``'s runners when it is the process's."""
    _SOURCES[runtime] = source


def _runners(include_resources: bool) -> list[Runner]:
    """The runners of the process's runtime: this machine, or those its registered source lists."""
    name = os.environ.get(ENV_RUNTIME, "").strip().lower()
    source = _SOURCES.get(name)
    if source is not None:
        return source(include_resources)
    return [_local_runner(include_resources)]


def _local_runner(include_resources: bool) -> Runner:
    book = ledger()
    cap = book.capacity
    resources = None
    if include_resources:
        used_cpu, used_memory, used_gpus = book.used()
        resources = RunnerResources(
            available_cpu_millicores=max(0, int((cap.cpu - used_cpu) * 1000)),
            available_memory_bytes=max(0, cap.memory - used_memory),
            available_gpu_count=len(cap.gpus) - len(used_gpus), running_sandboxes=len(book.grants))
    return Runner(runner_id=LOCAL_RUNNER_ID, organization_id="", runner_group_id=LOCAL_RUNNER_ID,
                  tags=(), healthy=True, is_shared=False, connected_at=_STARTED,
                  max_cpu_millicores=int(cap.cpu * 1000), max_memory_bytes=cap.memory,
                  max_gpu_count=len(cap.gpus), supported_gpu_types=(),
                  supported_architectures=(platform.machine(),), supports_privileged=os.geteuid() == 0,
                  available_storage_classes=(), supported_service_visibilities=service_visibilities(),
                  resources=resources)


def service_visibilities() -> tuple[str, ...]:
    """The service visibilities sandboxes here can have: public (a host port) and private (reachable
    from the other bridge sandboxes) where bridge networks with rules can be made (root, with the
    namespaces level: docs/network.md), else none."""
    if os.geteuid() != 0 or probe.unavailable("namespaces") is not None:
        return ()
    return ("public", "private")


def list_runners(*, auth: Any = None, runner_group_id: str | None = None, gpu_type: str | None = None,
                 architecture: str | None = None, healthy_only: bool = False, include_resources: bool = False,
                 min_available_cpu_millicores: int | None = None, min_available_memory_bytes: int | None = None,
                 min_available_gpu_count: int | None = None, service_visibility: str | None = None) -> list[Runner]:
    """The runners that pass the filters: this machine as ``"local"``, or (``SANDPOOL_RUNTIME=slurm``)
    each node of the Slurm partition."""
    need = include_resources or any(
        v is not None for v in (min_available_cpu_millicores, min_available_memory_bytes, min_available_gpu_count))
    kept = []
    for runner in _runners(need):
        res = runner.resources
        if ((runner_group_id in (None, runner.runner_group_id))
                and (architecture in (None, *runner.supported_architectures))
                and (gpu_type is None or gpu_type in runner.supported_gpu_types)
                and (service_visibility is None or str(getattr(service_visibility, "value", service_visibility))
                     in runner.supported_service_visibilities)
                and (runner.healthy or not healthy_only)
                and (res is None or (res.available_cpu_millicores >= (min_available_cpu_millicores or 0)
                                     and res.available_memory_bytes >= (min_available_memory_bytes or 0)
                                     and res.available_gpu_count >= (min_available_gpu_count or 0)))):
            kept.append(runner if include_resources else dataclasses.replace(runner, resources=None))
    return kept


def get_runner(runner_id: str, *, organization_id: str = "", auth: Any = None) -> Runner:
    """The runner ``runner_id`` (with its resources); RunnerNotFoundError naming the runners there are."""
    runners = _runners(True)
    for runner in runners:
        if runner.runner_id == runner_id:
            return runner
    raise RunnerNotFoundError(f"no runner {runner_id!r}; the runners are {sorted(r.runner_id for r in runners)!r}",
                              runner_id=runner_id)


def check_pinning(runner_ids: tuple[str, ...] | None, known: tuple[str, ...] | list[str], where: str) -> None:
    """Refuse ``runner_ids`` that name a runner ``known`` does not hold: RunnerNotFoundError naming
    the first unknown id and the known runners (``where`` says whose). None or () pins nothing."""
    for runner_id in runner_ids or ():
        if runner_id not in known:
            raise RunnerNotFoundError(
                f"runner_ids={list(runner_ids or ())!r}: no runner {runner_id!r} {where}; the runners are "
                f"{sorted(known)!r} (sandpool.list_runners()); pin to one of them or leave runner_ids out",
                runner_id=runner_id)

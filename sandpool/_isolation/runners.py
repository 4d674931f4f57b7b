"""This machine as cwsandbox's one runner, ``"local"``: ``list_runners`` and ``get_runner``, with
its capacity and (on request) what the process's admission ledger has left of it."""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from typing import Any

from .._cwextra import LOCAL_RUNNER_ID, Runner, RunnerResources
from .._errors_cw import RunnerNotFoundError
from . import probe
from .host import ledger


_STARTED = time.time()


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
    """This machine as the one runner ``"local"``, or [] when it does not pass the filters."""
    runner = _local_runner(include_resources or any(
        v is not None for v in (min_available_cpu_millicores, min_available_memory_bytes, min_available_gpu_count)))
    res = runner.resources
    keep = ((runner_group_id in (None, runner.runner_group_id))
            and (architecture in (None, *runner.supported_architectures))
            and gpu_type is None
            and (service_visibility is None or str(getattr(service_visibility, "value", service_visibility))
                 in runner.supported_service_visibilities)
            and (res is None or (res.available_cpu_millicores >= (min_available_cpu_millicores or 0)
                                 and res.available_memory_bytes >= (min_available_memory_bytes or 0)
                                 and res.available_gpu_count >= (min_available_gpu_count or 0))))
    if not include_resources:
        runner = dataclasses.replace(runner, resources=None)
    return [runner] if keep else []


def get_runner(runner_id: str, *, organization_id: str = "", auth: Any = None) -> Runner:
    """The local runner; RunnerNotFoundError for any other id."""
    if runner_id != LOCAL_RUNNER_ID:
        raise RunnerNotFoundError(f"no runner {runner_id!r}; locally the one runner is {LOCAL_RUNNER_ID!r}",
                                  runner_id=runner_id)
    return _local_runner(include_resources=True)


def check_pinning(runner_ids: tuple[str, ...] | None, known: tuple[str, ...] | list[str], where: str) -> None:
    """Refuse ``runner_ids`` that name a runner ``known`` does not hold: RunnerNotFoundError naming
    the first unknown id and the known runners (``where`` says whose). None or () pins nothing."""
    for runner_id in runner_ids or ():
        if runner_id not in known:
            raise RunnerNotFoundError(
                f"runner_ids={list(runner_ids or ())!r}: no runner {runner_id!r} {where}; the runners are "
                f"{sorted(known)!r} (sandpool.list_runners()); pin to one of them or leave runner_ids out",
                runner_id=runner_id)

"""Admission by requests: never start more sandboxes than the machine has cpus, memory and gpus for.

Plain sync decisions over plain data (the runtime does the waiting). cpu and memory requests above
the whole machine (4 cpus on a 2-cpu machine) are scaled down to it with one warning, or refused
with ``$SANDPOOL_STRICT_RESOURCES=1``; a gpu where there is none is refused at once; a request that
fits the machine but not what is free now waits. Sandboxes without requests take nothing. GPUs are device indices:
a grant names which ones, and the sandbox sees them as ``CUDA_VISIBLE_DEVICES``.

The gpu inventory is ``$SANDPOOL_FAKE_GPUS`` when set (a count, "4", or indices, "0,2"), else what
``nvidia-smi -L`` lists. The ledger is one per process; sandboxes of other processes are not counted.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import warnings

from .._config import ResourceOptions
from .._errors import SandboxResourceExhaustedError

ENV_FAKE_GPUS = "SANDPOOL_FAKE_GPUS"
#: "1": a cpu or memory request larger than the machine is refused instead of scaled down to it.
ENV_STRICT_RESOURCES = "SANDPOOL_STRICT_RESOURCES"
_warned: set[tuple[float, int]] = set()  # requests already warned about being scaled down (once each)


@dataclasses.dataclass(frozen=True)
class Request:
    """What one sandbox asks for: cores, bytes, gpu count."""

    cpu: float = 0.0
    memory: int = 0
    gpus: int = 0

    @classmethod
    def of(cls, resources: ResourceOptions | None) -> Request:
        """From a ResourceOptions (or None): requests, which default to the limits."""
        if resources is None:
            return cls()
        return cls(cpu=resources.cpu_request or 0.0, memory=resources.memory_request or 0, gpus=resources.gpu_count)

    def __bool__(self) -> bool:
        return bool(self.cpu or self.memory or self.gpus)


@dataclasses.dataclass(frozen=True)
class Capacity:
    cpu: float
    memory: int
    gpus: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Grant:
    request: Request
    gpus: tuple[int, ...] = ()

    def environment(self) -> dict[str, str]:
        """Variables a sandbox with this grant gets (the gpus it may use)."""
        if not self.request.gpus:
            return {}
        devices = ",".join(map(str, self.gpus))
        return {"CUDA_VISIBLE_DEVICES": devices, "NVIDIA_VISIBLE_DEVICES": devices}


def gpu_inventory() -> tuple[int, ...]:
    """GPU indices of this machine (see the module doc)."""
    fake = os.environ.get(ENV_FAKE_GPUS)
    if fake is not None:
        fake = fake.strip()
        if not fake:
            return ()
        if "," in fake:
            return tuple(int(i) for i in fake.split(","))
        return tuple(range(int(fake)))
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(i for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU ")))


def machine_capacity() -> Capacity:
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except AttributeError:
        cpus = float(os.cpu_count() or 1)
    memory = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    memory = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return Capacity(cpu=cpus, memory=memory, gpus=gpu_inventory())


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


class Ledger:
    """Requests granted to running sandboxes, against a fixed capacity. Not thread-safe (one loop)."""

    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity
        self.grants: dict[str, Grant] = {}

    def __repr__(self) -> str:
        cpu, memory, gpus = self._used()
        return (f"<Ledger cpu={cpu:g}/{self.capacity.cpu:g} memory={_gib(memory)}/{_gib(self.capacity.memory)} "
                f"gpus={len(gpus)}/{len(self.capacity.gpus)} sandboxes={len(self.grants)}>")

    def used(self) -> tuple[float, int, set[int]]:
        """Cores, bytes and gpu indices granted now."""
        return self._used()

    def _used(self) -> tuple[float, int, set[int]]:
        cpu = sum(g.request.cpu for g in self.grants.values())
        memory = sum(g.request.memory for g in self.grants.values())
        gpus = {i for g in self.grants.values() for i in g.gpus}
        return cpu, memory, gpus

    def check(self, request: Request) -> Request:
        """The request as it is admitted: cpu and memory above the whole machine scaled down to it
        (one warning per distinct request), unless ``$SANDPOOL_STRICT_RESOURCES=1``. Raises
        SandboxResourceExhaustedError for gpus the machine lacks, and in strict mode for the rest."""
        cap = self.capacity
        problems = []
        strict = os.environ.get(ENV_STRICT_RESOURCES, "") == "1"
        big_cpu, big_memory = request.cpu > cap.cpu, bool(cap.memory) and request.memory > cap.memory
        if strict and big_cpu:
            problems.append(f"{request.cpu:g} cpus but the machine has {cap.cpu:g}")
        if strict and big_memory:
            problems.append(f"{_gib(request.memory)} of memory but the machine has {_gib(cap.memory)}")
        if request.gpus > len(cap.gpus):
            have = f"{len(cap.gpus)}" if cap.gpus else f"none (set {ENV_FAKE_GPUS}=N to fake some for tests)"
            problems.append(f"{request.gpus} gpus but the machine has {have}")
        if problems:
            raise SandboxResourceExhaustedError(
                "the sandbox can never start here: it requests " + "; ".join(problems)
                + "; lower resources (requests default to the limits) or use a bigger machine"
                + (f" (or unset {ENV_STRICT_RESOURCES} to scale cpu and memory down)" if strict else ""),
                reason="InsufficientResources")
        if big_cpu or big_memory:
            return self._scaled(request, big_cpu, big_memory)
        return request

    def _scaled(self, request: Request, big_cpu: bool, big_memory: bool) -> Request:
        cap = self.capacity
        fitted = dataclasses.replace(request, cpu=min(request.cpu, cap.cpu),
                                     memory=min(request.memory, cap.memory) if cap.memory else request.memory)
        if (request.cpu, request.memory) not in _warned:
            _warned.add((request.cpu, request.memory))
            asked = ", ".join(x for x in (f"{request.cpu:g} cpus" if big_cpu else "",
                                          f"{_gib(request.memory)} of memory" if big_memory else "") if x)
            warnings.warn(f"a sandbox requests {asked} but this machine has {cap.cpu:g} cpus and "
                          f"{_gib(cap.memory)}; it runs scaled down to {fitted.cpu:g} cpus and "
                          f"{_gib(fitted.memory)} (set {ENV_STRICT_RESOURCES}=1 to refuse instead)",
                          UserWarning, stacklevel=2)
        return fitted

    def try_grant(self, key: str, request: Request) -> Grant | None:
        """Reserve ``request`` for ``key`` if it fits what is free now (scaled by ``check``); None
        means wait and retry."""
        request = self.check(request)
        if not request:
            grant = Grant(request)
            self.grants[key] = grant
            return grant
        cpu, memory, gpus = self._used()
        cap = self.capacity
        free_gpus = [i for i in cap.gpus if i not in gpus]
        if cpu + request.cpu > cap.cpu + 1e-9 or (cap.memory and memory + request.memory > cap.memory) \
                or request.gpus > len(free_gpus):
            return None
        grant = Grant(request, tuple(free_gpus[: request.gpus]))
        self.grants[key] = grant
        return grant

    def release(self, key: str) -> bool:
        """Return ``key``'s grant; True if something was released (waiters may now fit)."""
        grant = self.grants.pop(key, None)
        return grant is not None and bool(grant.request)

    def waiting_message(self, request: Request, seconds: float) -> str:
        cpu, memory, gpus = self._used()
        return (f"waited {seconds:g} s for {request.cpu:g} cpus, {_gib(request.memory)} and {request.gpus} gpus; "
                f"in use: {cpu:g}/{self.capacity.cpu:g} cpus, {_gib(memory)}/{_gib(self.capacity.memory)}, "
                f"{len(gpus)}/{len(self.capacity.gpus)} gpus by {len(self.grants)} sandboxes; stop some sandboxes "
                f"or lower resources.requests")

"""Growing a SlurmRuntime's allocations: which allocation a start takes, and submitting new ones.

A start of a spec takes a free slot of an allocation of that spec (a running one first). Where none
is free, the starts of that spec that arrive within ``BATCH_SECONDS`` of each other ask for new
allocations together (``place.job_sizes``: as many slots a job as a node holds, at least the
runtime's ``min_slots``, and a spec that keeps asking grows geometrically), and each start is handed
its slot in one of them. Pinning (``runner_ids``: node names) becomes ``--exclude`` of the
partition's other nodes, checked against ``sinfo`` before anything is submitted.

:class:`Growth` does this for one SlurmRuntime, which hands it its settings, its allocations and
the nodes to avoid (shared), and how to announce a new job (to the liveness poll and the reaper).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from ..._config import SandboxSpec
from ..._errors import SandboxResourceExhaustedError, SandboxUnavailableError, SandpoolError
from ..._grpc import messages as m
from ..._isolation.runners import check_pinning
from ..contract import SandboxRecord
from . import cli
from .place import Placement, exclusions, job_sizes, new_job_dir, slots_fit

#: Starts of one spec arriving within this long of each other ask for one allocation together.
BATCH_SECONDS = 0.01
#: How long ``sinfo``'s description of the nodes is reused for sizing allocations.
NODES_FRESH_SECONDS = 10.0


class Settings(Protocol):
    """What the growth reads of its runtime's settings (a SlurmRuntime)."""

    partition: str | None
    account: str | None
    qos: str | None
    sbatch_args: tuple[str, ...]
    spool_dir: str
    python: str
    owner: str
    orphan_grace_seconds: float
    min_slots: int


class _Want:
    """A start waiting for the allocation a batch gives it (or the error that batch ran into)."""

    def __init__(self) -> None:
        self.placement: Placement | None = None
        self.error: BaseException | None = None
        self.done = trio.Event()


class Growth:
    """Slots for a SlurmRuntime's starts, and the allocations they need (see the module doc)."""

    def __init__(self, rt: Settings, *, placements: dict[str, Placement], suspects: dict[str, float],
                 submitted: Callable[[Placement], Awaitable[None]]) -> None:
        self.rt = rt
        self.placements, self.suspects = placements, suspects  # shared with the runtime
        self.submitted = submitted  # told of each job we submit (shielded, before anyone may wait on it)
        self.nursery: trio.Nursery | None = None
        self._wants: dict[SandboxSpec, list[_Want]] = {}  # starts waiting for a batch, by spec
        self._nodes_seen: tuple[float, list[cli.Node]] | None = None

    async def claim(self, record: SandboxRecord) -> Placement:
        """A slot for ``record`` in an allocation of its spec: a free one (a running allocation's
        first), else one of the allocations that this start and those arriving with it ask for."""
        spec = record.spec
        free = [p for p in self.placements.values() if p.shape == spec and p.usable and p.free > 0]
        if free:
            p = min(free, key=lambda q: (q.read_address() is None, q.submitted_at or 0.0))
        else:
            want = _Want()
            batch = self._wants.setdefault(spec, [])
            batch.append(want)
            if len(batch) == 1:
                assert self.nursery is not None
                self.nursery.start_soon(self._grow, spec)
            await want.done.wait()
            if want.error is not None:
                raise want.error
            assert want.placement is not None
            p = want.placement
        p.claims += 1
        p.idle_since = None
        record.extra["placement"] = p
        return p

    async def _grow(self, spec: SandboxSpec) -> None:
        """Submit the allocations for the starts of ``spec`` that wait for one (after a short
        gathering), and hand each start its slot; a failed submission fails them all."""
        await trio.sleep(BATCH_SECONDS)
        batch = self._wants.pop(spec, [])
        try:
            unpinned = await self._unpinned_nodes(spec.runner_ids)
            avoid = tuple(sorted({*exclusions(self.suspects, time.monotonic()), *unpinned}))
            nodes = [n for n in await self.nodes() if n.name not in avoid and n.state not in ("down", "drain")]
            fit = max([slots_fit(n, cli.slot_size(spec)) for n in nodes] or [1])
            held = sum(p.slots for p in self.placements.values() if p.shape == spec and p.usable)
            waiting = iter(batch)
            for slots in job_sizes(len(batch), held, fit, self.rt.min_slots):
                p = await self._submit(spec, slots, avoid, unpinned)
                for _, want in zip(range(slots), waiting):  # (range first: zip must not take a want too many)
                    want.placement = p
                    want.done.set()
        except BaseException as exc:
            for want in batch:
                if not want.done.is_set():
                    want.error = exc
                    want.done.set()
            if not isinstance(exc, Exception):
                raise

    async def _submit(self, spec: SandboxSpec, slots: int, avoid: tuple[str, ...],
                      unpinned: tuple[str, ...]) -> Placement:
        """Write an allocation's directory and ``sbatch`` it (shielded: a job we submit, we know)."""
        rt = self.rt
        key, job_dir = new_job_dir(rt.spool_dir, {
            "spec": m.spec_to_dict(spec), "slots": slots, "orphan_grace_seconds": rt.orphan_grace_seconds,
            "sys_path": [p for p in sys.path if p]})  # so functions pickled by reference import there
        command = [rt.python, "-m", "sandpool._service.slurmjob", job_dir]
        options: dict[str, Any] = dict(key=key, owner=rt.owner, job_dir=job_dir, command=command,
                                       partition=rt.partition, account=rt.account, qos=rt.qos,
                                       extra=rt.sbatch_args, slots=slots)
        submitted_at = time.time()
        with trio.CancelScope(shield=True):
            try:
                try:
                    out = await cli.run(cli.sbatch_argv(spec, exclude=avoid, **options))
                except SandboxResourceExhaustedError:
                    if avoid == unpinned:
                        raise
                    # only the avoided nodes fit
                    out = await cli.run(cli.sbatch_argv(spec, exclude=unpinned, **options))
            except SandpoolError:
                shutil.rmtree(job_dir, ignore_errors=True)
                raise
            p = Placement(key=key, job_dir=job_dir, owned=True, job_id=out.strip().split(";")[0],
                          submitted_at=submitted_at, shape=spec, slots=slots)
            self.placements[key] = p
            await self.submitted(p)
        # a shield without a deadline never swallows an exception, so ``p`` is bound here
        return p  # pyright: ignore[reportPossiblyUnboundVariable]

    async def _unpinned_nodes(self, runner_ids: tuple[str, ...] | None) -> tuple[str, ...]:
        """The partition's nodes that ``runner_ids`` (node names: a Slurm runtime's runners) leave
        out, for ``--exclude`` (Slurm's ``--nodelist`` would ask for all of them at once); () when
        nothing is pinned. RunnerNotFoundError for a name that is not a node of the partition."""
        if not runner_ids:
            return ()
        nodes = [n.name for n in await self.nodes(fresh=True)]
        check_pinning(runner_ids, nodes, f"in the Slurm partition {self.rt.partition or '(default)'}")
        return tuple(sorted(set(nodes) - set(runner_ids)))

    async def nodes(self, *, fresh: bool = False) -> list[cli.Node]:
        """The nodes of the runtime's partition (``sinfo``), reused for NODES_FRESH_SECONDS."""
        now = time.monotonic()
        if fresh or self._nodes_seen is None or now - self._nodes_seen[0] > NODES_FRESH_SECONDS:
            code, out, err = await cli.query(cli.sinfo_argv(self.rt.partition))
            if code != 0:
                raise SandboxUnavailableError(f"sinfo failed: {' '.join(err.split())}")
            self._nodes_seen = (now, cli.parse_sinfo(out))
        return self._nodes_seen[1]

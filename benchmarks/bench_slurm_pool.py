"""Starting a pool's sandboxes through Slurm: one allocation per pool beside one job per sandbox.

    python benchmarks/bench_slurm_pool.py [--quick] [--runs 3] [--json PATH]

Uses the Slurm cluster of ``$SLURM_CONF`` when it answers; otherwise starts the throwaway 3-node
cluster of ``scripts/slurm-cluster.sh`` (and stops it at the end). Each run measures, with one
``SlurmRuntime`` and the local runtime beside it:

- per-job start: ``sandbox.start()`` of a sandbox whose spec no allocation holds (each a new tag),
  so every start is sbatch, Slurm's scheduling, the job's launch and its server's start; each is
  stopped before the next (p50/p99);
- pool start: a pool of ``--slots`` sandboxes of one spec (``min_slots``: the allocation is sized
  for the pool), its first sandbox started (it waits for Slurm), then the 2nd..Nth ``start()`` one
  after another, each timed: the start inside a running allocation (target p50 <= 50 ms);
- pool start, all at once: the 2nd..Nth ``start()`` refs issued together, wall time (each pool
  fills its slots again after stopping them, 5 rounds each way);
- the local runtime's start to RUNNING, the floor of any start.

Prints a Markdown table per run (pool/per-job ratio) and writes every figure as JSON (default
``benchmarks/results/bench_slurm_pool.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import sandpool
from _measure import latency
from bench_slurm import SCRIPT, ensure_cluster
from sandpool import Session, SlurmRuntime

TARGET_MS = 50.0


def _start_s(sb: sandpool.Sandbox) -> float:
    began = time.perf_counter()
    sb.start().result()
    return time.perf_counter() - began


def per_job_starts(session: Session, n: int) -> list[float]:
    """Starts of sandboxes of a new spec each (a new tag): a new allocation every time."""
    out = []
    for i in range(n):
        sb = session.sandbox(tags=[f"job-{i}-{time.monotonic_ns()}"])
        out.append(_start_s(sb))
        sb.stop(graceful_shutdown_seconds=0).result()
    return out


def pool_starts(session: Session, slots: int, pools: int, rounds: int) -> tuple[list[float], list[float], list[float]]:
    """(first starts, 2nd..Nth starts one at a time, 2nd..Nth all at once wall times) of ``pools``
    pools of ``slots`` sandboxes each, each pool a spec of its own (a new allocation). Once a pool's
    first sandbox runs, its other slots are filled ``rounds`` times one at a time and ``rounds``
    times all at once, each round's sandboxes stopped before the next (a stop frees its slot)."""
    firsts, later, together = [], [], []
    for i in range(pools):
        tag = f"pool-{i}-{time.monotonic_ns()}"
        first = session.sandbox(tags=[tag])
        firsts.append(_start_s(first))
        for _ in range(rounds):
            rest = [session.sandbox(tags=[tag]) for _ in range(slots - 1)]
            later += [_start_s(sb) for sb in rest]
            sandpool.results([sb.stop(graceful_shutdown_seconds=0) for sb in rest])
            rest = [session.sandbox(tags=[tag]) for _ in range(slots - 1)]
            began = time.perf_counter()
            sandpool.results([sb.start() for sb in rest])
            together.append(time.perf_counter() - began)
            sandpool.results([sb.stop(graceful_shutdown_seconds=0) for sb in rest])
        first.stop(graceful_shutdown_seconds=0).result()
    return firsts, later, together


def local_starts(n: int) -> list[float]:
    with Session() as local:
        out = []
        for _ in range(n):
            sb = local.sandbox()
            out.append(_start_s(sb))
            sb.stop(graceful_shutdown_seconds=0).result()
        return out


def one_run(spool: str, n_jobs: int, slots: int, pools: int, rounds: int) -> dict[str, Any]:
    runtime = SlurmRuntime(spool_dir=spool, min_slots=slots, linger_seconds=0.2)
    with Session(runtime=runtime) as session:
        jobs = per_job_starts(session, n_jobs)
        firsts, later, together = pool_starts(session, slots, pools, rounds)
    return {"per_job_start": latency(jobs), "pool_first_start": latency(firsts),
            "pool_later_start": latency(later), "pool_later_together": latency(together),
            "local_start": latency(local_starts(20)), "slots": slots}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slots", type=int, default=4, help="sandboxes a pool holds (a node has 4 cpus)")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_slurm_pool.json"))
    args = parser.parse_args()
    n_jobs, pools, rounds = (3, 1, 2) if args.quick else (8, 3, 5)
    private = ensure_cluster()
    runs = []
    try:
        for run in range(args.runs):
            spool = tempfile.mkdtemp(prefix="sandpool-bench-spool-")
            try:
                figures = one_run(spool, n_jobs, args.slots, pools, rounds)
            finally:
                shutil.rmtree(spool, ignore_errors=True)
            runs.append(figures)
            job, later = figures["per_job_start"], figures["pool_later_start"]
            print(f"\nrun {run + 1}: pool of {args.slots} sandboxes through Slurm ({platform.node()}, "
                  f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f})\n")
            print("| measure | p50 (ms) | p99 (ms) | n | /per-job p50 |\n|---|---:|---:|---:|---:|")
            for label, key in (("per-job start (a new allocation)", "per_job_start"),
                               ("pool: 1st sandbox (its allocation)", "pool_first_start"),
                               ("pool: 2nd..Nth sandbox, one at a time", "pool_later_start"),
                               ("pool: 2nd..Nth sandboxes at once (wall)", "pool_later_together"),
                               ("local start (floor)", "local_start")):
                f = figures[key]
                print(f"| {label} | {f['p50_ms']:.1f} | {f['p99_ms']:.1f} | {f['n']} | "
                      f"{f['p50_ms'] / job['p50_ms']:.3f} |")
            print(f"\n2nd..Nth start p50 {later['p50_ms']:.1f} ms: target <= {TARGET_MS:.0f} ms "
                  f"{'met' if later['p50_ms'] <= TARGET_MS else 'NOT met'}")
    finally:
        if private is not None:
            subprocess.run([SCRIPT, "stop"], env=private)
            shutil.rmtree(private["SANDPOOL_SLURM_DIR"], ignore_errors=True)
    record = {"runs": runs, "machine": {"node": platform.node(), "cpus": os.cpu_count(),
                                         "python": platform.python_version(), "loadavg": os.getloadavg()}}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())

"""sandpool through Slurm beside the local runtime, in one run.

    python benchmarks/bench_slurm.py [--quick] [--json PATH]

Uses the Slurm cluster of ``$SLURM_CONF`` when it answers; otherwise starts the throwaway 3-node
cluster of ``scripts/slurm-cluster.sh`` in a directory of its own (and stops it at the end).
Measures each operation with ``Session()`` (the local runtime) and ``Session(runtime=SlurmRuntime())``:

- start to RUNNING: ``sandbox.start()`` until it resolves, one sandbox at a time, each stopped before
  the next, each with a tag of its own (p50/p99). Through Slurm each is a new allocation: sbatch, Slurm's scheduling, the job's launch on its node,
  the job's sandpool server starting its sandbox, and the client attaching; the split is printed.
- N sandboxes at once: N ``start()`` refs issued together, wall time until all run (through Slurm
  they share allocations as a node holds them; ``bench_slurm_pool.py`` measures the starts in a
  running allocation).
- exec round trip: ``sb.exec(["true"]).result()`` one after another (p50/p99).
- call round trip: ``f.remote(1).result()`` of a trivial function, one after another (p50/p99).
- call throughput: ``f.map`` of trivial calls over 3 warm sandboxes, calls/s (through Slurm each asks
  4 cpus, a whole node, so that they land on the three nodes).

Prints a Markdown table with Slurm/local ratios and writes every figure as JSON (default
``benchmarks/results/bench_slurm.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import sandpool
from _measure import latency, map_calls_per_s, timed
from sandpool import Session, SlurmRuntime

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "slurm-cluster.sh")


def trivial(x):
    return x


def ensure_cluster() -> dict | None:
    """Use $SLURM_CONF's cluster if it answers; else start a private one (returned, to stop later)."""
    if os.environ.get("SLURM_CONF") and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0:
        return None
    with socket.socket() as s:  # a free block of 4 ports: slurmctld and three nodes
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1] % 10000 + 20000
    env = {**os.environ, "SANDPOOL_SLURM_DIR": tempfile.mkdtemp(prefix="sandpool-bench-slurm-"),
           "SANDPOOL_SLURM_PORT": str(base)}
    done = subprocess.run([SCRIPT, "start"], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        subprocess.run([SCRIPT, "stop"], env=env)
        sys.exit(f"no Slurm cluster: {done.stderr.strip()}")
    os.environ["SLURM_CONF"] = done.stdout.strip().split("=", 1)[1]
    return env


def measure(session: Session, n_start: int, n: int, runtime: SlurmRuntime | None, fn_resources=None) -> dict:
    results: dict = {}
    starts, splits = [], []
    for i in range(n_start):
        sb = session.sandbox(tags=[f"start-{i}"])  # a spec of its own: through Slurm, a new allocation each
        began = time.perf_counter()
        sb.start().result()
        starts.append(time.perf_counter() - began)
        if runtime is not None:
            t = runtime.job(sb)["times"]
            splits.append({"queued (sbatch to launch)": t["launched"] - t["submitted"],
                           "server start (launch to ready)": t["ready"] - t["launched"],
                           "attach (ready to connected)": t["connected"] - t["ready"]})
        sb.stop(graceful_shutdown_seconds=0).result()
    results["start"] = latency(starts)
    if splits:
        results["start_split_ms"] = {k: statistics.median(s[k] for s in splits) * 1000 for k in splits[0]}

    many = [session.sandbox() for _ in range(6)]
    began = time.perf_counter()
    sandpool.results([sb.start() for sb in many])
    results["six_at_once_s"] = time.perf_counter() - began
    sandpool.results([sb.stop(graceful_shutdown_seconds=0) for sb in many])

    sb = session.sandbox()
    sb.wait()
    results["exec_rtt"] = latency(timed(n, lambda: sb.exec(["true"]).result()))
    sb.stop(graceful_shutdown_seconds=0).result()  # the function's sandboxes take the whole cluster

    f = session.function(max_concurrency=3, resources=fn_resources)(trivial)
    sandpool.results(f.map([(i,) for i in range(300)]))  # warm: three sandboxes up, the function shipped
    results["call_rtt"] = latency(timed(n, lambda: f.remote(1).result()))
    results["calls_per_s"] = map_calls_per_s(f, n * 20)
    if runtime is not None:
        results["call_nodes"] = sorted({runtime.job(s)["node"] for s in session.list().result()})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_slurm.json"))
    args = parser.parse_args()
    n_start, n = (5, 50) if args.quick else (20, 200)
    private = ensure_cluster()
    spool = tempfile.mkdtemp(prefix="sandpool-bench-spool-")
    try:
        with Session() as local:
            figures = {"local": measure(local, n_start, n, None)}
        runtime = SlurmRuntime(spool_dir=spool)
        with Session(runtime=runtime) as slurm:
            figures["slurm"] = measure(slurm, n_start, n, runtime, {"cpu": 4})  # a whole node each
    finally:
        shutil.rmtree(spool, ignore_errors=True)
        if private is not None:
            subprocess.run([SCRIPT, "stop"], env=private)
            shutil.rmtree(private["SANDPOOL_SLURM_DIR"], ignore_errors=True)
    rows = [("start to RUNNING p50 (ms)", "start", "p50_ms"), ("start to RUNNING p99 (ms)", "start", "p99_ms"),
            ("6 sandboxes started at once (s)", "six_at_once_s", None),
            ("exec round trip p50 (ms)", "exec_rtt", "p50_ms"), ("exec round trip p99 (ms)", "exec_rtt", "p99_ms"),
            ("call round trip p50 (ms)", "call_rtt", "p50_ms"), ("call round trip p99 (ms)", "call_rtt", "p99_ms"),
            ("trivial calls/s (map, 3 sandboxes)", "calls_per_s", None)]
    print(f"\nsandpool through Slurm beside local ({platform.node()}, {os.cpu_count()} cpus, n={n})\n")
    print("| measure | local | slurm | slurm/local |\n|---|---:|---:|---:|")
    ratios = {}
    for label, key, sub in rows:
        local, slurm = figures["local"][key], figures["slurm"][key]
        if sub:
            local, slurm = local[sub], slurm[sub]
        ratios[label] = slurm / local
        print(f"| {label} | {local:.2f} | {slurm:.2f} | {slurm / local:.2f} |")
    print("\nSlurm start, split (median ms): " + ", ".join(
        f"{k} {v:.0f}" for k, v in figures["slurm"]["start_split_ms"].items()))
    print(f"call sandboxes on nodes: {', '.join(figures['slurm']['call_nodes'])}")
    figures["ratios"] = ratios
    figures["machine"] = {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "loadavg": os.getloadavg()}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(figures, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
